//! AdamW's elementwise update, as `torch.optim.AdamW` does it: decoupled weight decay, then the
//! bias-corrected step. One pass over a parameter ([`update`], the CPU trainer's), or the same
//! arithmetic in two ([`ema`] for each moment, then [`param`]), as the GPU's in-place kernels run
//! it (crates/kernels-cuda, `optim.cuh`). Every value is rounded after each operation, in the
//! same order on both, so the two give the same bits.

/// One step's constants, the same for every value of a parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub b1: f32,
    pub b2: f32,
    /// `sqrt(1 - b2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 - b1^t)`.
    pub step_size: f32,
    /// `1 - lr * weight_decay` (1 for parameters without decay).
    pub decay: f32,
}

impl Step {
    /// Step `t` (from 1) of `torch.optim.AdamW` with learning rate `lr`, betas `b1` and `b2`,
    /// `eps` and `weight_decay` (0 for parameters without decay): bias corrections in f64, each
    /// constant rounded once to f32.
    pub fn at(t: i32, lr: f64, (b1, b2): (f64, f64), eps: f64, weight_decay: f64) -> Step {
        Step {
            b1: b1 as f32,
            b2: b2 as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            eps: eps as f32,
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
        }
    }
}

/// `beta * a + (1 - beta) * g`: the first moment's update.
#[inline(always)]
fn first(a: f32, g: f32, beta: f32) -> f32 {
    beta * a + (1.0 - beta) * g
}

/// `beta * a + (1 - beta) * g * g`: the second moment's update.
#[inline(always)]
fn second(a: f32, g: f32, beta: f32) -> f32 {
    beta * a + (1.0 - beta) * g * g
}

/// The parameter's new value from its moments.
#[inline(always)]
fn value(s: &Step, p: f32, m: f32, v: f32) -> f32 {
    let denom = (v.sqrt() / s.bc2_sqrt) + s.eps;
    p * s.decay - s.step_size * m / denom
}

/// Moments and parameter in one pass. Panics unless the four slices have one length.
pub fn update(s: &Step, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    let n = p.len();
    assert!(
        m.len() == n && v.len() == n && g.len() == n,
        "adamw::update: lengths differ"
    );
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        *m = first(*m, g, s.b1);
        *v = second(*v, g, s.b2);
        *p = value(s, *p, *m, *v);
    }
}

/// One moment in place: the first (`square` false, `beta` = b1) or the second (`square`, b2).
/// Panics unless `a` and `g` have one length.
pub fn ema(a: &mut [f32], g: &[f32], beta: f32, square: bool) {
    assert_eq!(a.len(), g.len(), "adamw::ema: lengths differ");
    for (a, &g) in a.iter_mut().zip(g) {
        *a = match square {
            false => first(*a, g, beta),
            true => second(*a, g, beta),
        };
    }
}

/// The parameter in place from moments already updated by [`ema`]. Panics unless the three
/// slices have one length.
pub fn param(s: &Step, p: &mut [f32], m: &[f32], v: &[f32]) {
    let n = p.len();
    assert!(m.len() == n && v.len() == n, "adamw::param: lengths differ");
    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
        *p = value(s, *p, m, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two-pass form gives the one pass's bits, and the one pass is PyTorch's formula.
    #[test]
    fn two_passes_equal_one_and_follow_torch() {
        let s = Step::at(3, 1e-3, (0.9, 0.999), 1e-8, 0.01);
        let n = 1000;
        let wave = |k: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * k).sin()).collect() };
        let (p0, m0, g) = (wave(0.37), wave(0.11), wave(0.53));
        let v0: Vec<f32> = wave(0.29).iter().map(|x| x * x).collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        update(&s, &mut p, &mut m, &mut v, &g);
        let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
        ema(&mut m2, &g, s.b1, false);
        ema(&mut v2, &g, s.b2, true);
        param(&s, &mut p2, &m2, &v2);
        assert_eq!((&p, &m, &v), (&p2, &m2, &v2));
        for i in 0..n {
            let (b1, b2) = (s.b1 as f64, s.b2 as f64);
            let gi = g[i] as f64;
            let mi = b1 * m0[i] as f64 + (1.0 - b1) * gi;
            let vi = b2 * v0[i] as f64 + (1.0 - b2) * gi * gi;
            let want = p0[i] as f64 * s.decay as f64
                - s.step_size as f64 * mi / (vi.sqrt() / s.bc2_sqrt as f64 + s.eps as f64);
            assert!((p[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", p[i]);
        }
    }
}
