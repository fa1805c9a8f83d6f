//! Attention for one KV group without a graph (decoding): every query row against the cached
//! keys and values, in f32, without storing scores or probabilities.

/// One KV group's inputs: query rows `q` (`[rows, dh]`) against keys and values `k`, `v` (`[tk,
/// dh]`). `mask`, when given, is the group's batch row of an additive mask with its number of rows
/// `t`: query row `r` reads mask row `r % t` (the query heads sharing a KV group are stacked along
/// time).
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: Option<(&'a [f32], usize)>,
    pub scale: f32,
    pub tk: usize,
    pub dh: usize,
}

/// `out[r] = softmax(scale * q[r] K^T + mask[r % t]) V` for every query row `r` of the group;
/// `out` holds `rows * dh` values.
pub fn attend(g: &Group, out: &mut [f32]) {
    let (tk, dh) = (g.tk, g.dh);
    assert!(
        g.k.len() >= tk * dh && g.v.len() >= tk * dh,
        "attend: k, v hold fewer than {tk} rows"
    );
    assert_eq!(g.q.len(), out.len(), "attend: q and out differ in size");
    #[cfg(target_arch = "x86_64")]
    if crate::vmath::available() {
        // SAFETY: `vmath::available` checked that the CPU has AVX-512F, the only requirement of
        // `attend_avx512`.
        return unsafe { attend_avx512(g, out) };
    }
    attend_generic(g, out)
}

#[inline(always)]
fn attend_generic(g: &Group, out: &mut [f32]) {
    let (k, v, tk, dh) = (g.k, g.v, g.tk, g.dh);
    let mut s = vec![0f32; tk];
    for (r, (qr, or)) in
        g.q.chunks_exact(dh)
            .zip(out.chunks_exact_mut(dh))
            .enumerate()
    {
        for (j, sj) in s.iter_mut().enumerate() {
            *sj = g.scale * dot(qr, &k[j * dh..][..dh]);
        }
        if let Some((m, t)) = g.mask {
            s.iter_mut()
                .zip(&m[(r % t) * tk..][..tk])
                .for_each(|(sj, mj)| *sj += mj);
        }
        let max = crate::vmath::max(&s);
        let inv = (crate::vmath::exp_shifted(&mut s, max) as f32).recip();
        or.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            let p = p * inv;
            or.iter_mut()
                .zip(&v[j * dh..][..dh])
                .for_each(|(o, &x)| *o += p * x);
        }
    }
}

/// [`attend_generic`] compiled for AVX-512 (the crate targets baseline x86-64).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(g: &Group, out: &mut [f32]) {
    attend_generic(g, out)
}

/// A dot product in 16 independent lanes (so that it vectorises), summed at the end.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain f64 softmax-attention, with a mask on one of two stacked query heads.
    #[test]
    fn matches_plain_attention() {
        let (rows, tk, dh, t) = (4, 37, 20, 2);
        let val = |i: usize, s: f32| ((i as f32 * 0.37 + s).sin()) * 0.8;
        let q: Vec<f32> = (0..rows * dh).map(|i| val(i, 0.1)).collect();
        let k: Vec<f32> = (0..tk * dh).map(|i| val(i, 1.3)).collect();
        let v: Vec<f32> = (0..tk * dh).map(|i| val(i, 2.9)).collect();
        let mut mask = vec![0f32; t * tk];
        mask[tk - 3..tk]
            .iter_mut()
            .for_each(|m| *m = f32::NEG_INFINITY);
        let mut out = vec![0f32; rows * dh];
        let g = Group {
            q: &q,
            k: &k,
            v: &v,
            mask: Some((&mask, t)),
            scale: 0.25,
            tk,
            dh,
        };
        attend(&g, &mut out);
        for r in 0..rows {
            let s: Vec<f64> = (0..tk)
                .map(|j| {
                    let d: f64 = (0..dh)
                        .map(|i| q[r * dh + i] as f64 * k[j * dh + i] as f64)
                        .sum();
                    0.25 * d + mask[(r % t) * tk + j] as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for i in 0..dh {
                let want: f64 = (0..tk)
                    .map(|j| (s[j] - max).exp() / z * v[j * dh + i] as f64)
                    .sum();
                let got = out[r * dh + i] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} col {i}: {got} vs {want}"
                );
            }
        }
    }
}
