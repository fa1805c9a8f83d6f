//! The inner loops of the model's fused ops (RMSNorm, SwiGLU, RoPE, attention probabilities and
//! the softmax backward), on plain slices and generic over f32 and f64. The model crate wraps them
//! as candle ops with hand-written backward passes, checked there against finite differences and
//! against the ops composed from candle primitives.
use num_traits::Float;
use std::mem::MaybeUninit;

/// The element types the fused loops are written for.
pub trait Real:
    Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + std::ops::MulAssign + 'static
{
    /// `x` in this type (`as` conversion).
    fn of(x: f64) -> Self;

    /// `row[i] = exp(row[i] - max(row))` in place; returns the sum (softmax before normalising).
    fn exp_minus_max(row: &mut [Self]) -> Self {
        let max = row.iter().copied().fold(Self::neg_infinity(), Float::max);
        let mut sum = Self::zero();
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        sum
    }

    /// The largest value of `row` (negative infinity when empty).
    fn max_of(row: &[Self]) -> Self {
        row.iter().copied().fold(Self::neg_infinity(), Float::max)
    }

    /// `row[i] = scale * exp(row[i] - shift)` in place; returns their sum. In f32 with
    /// [`crate::vmath::exp_shifted_fast`]'s less exact `exp` (attention's probabilities).
    fn exp_shifted_fast(row: &mut [Self], shift: Self, scale: Self) -> Self {
        let mut sum = Self::zero();
        for s in row.iter_mut() {
            *s = scale * (*s - shift).exp();
            sum += *s;
        }
        sum
    }

    /// `out[i] = sigmoid(x[i])`.
    fn sigmoid_into(x: &[Self], out: &mut [Self]) {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = sigmoid(v));
    }
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }

    fn exp_minus_max(row: &mut [f32]) -> f32 {
        let max = crate::vmath::max(row);
        crate::vmath::exp_shifted(row, max) as f32
    }

    fn sigmoid_into(x: &[f32], out: &mut [f32]) {
        crate::vmath::sigmoid_into(x, out)
    }

    fn max_of(row: &[f32]) -> f32 {
        crate::vmath::max(row)
    }

    fn exp_shifted_fast(row: &mut [f32], shift: f32, scale: f32) -> f32 {
        crate::vmath::exp_shifted_fast(row, shift, scale)
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
}

pub fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

/// Runs `f(first_row, rows)` over `out` split into whole rows of `row` values, one part per
/// thread; each part's result is returned in order. Small buffers stay on the calling thread.
pub fn par_rows<T: Send, R: Send>(
    out: &mut [T],
    row: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let rows = out.len() / row.max(1);
    let threads = rayon::current_num_threads().clamp(1, rows.max(1));
    if threads == 1 || out.len() < 1 << 14 {
        return vec![f(0, out)];
    }
    // rayon's pool, not fresh threads: a decoding step calls these kernels hundreds of times.
    use rayon::prelude::*;
    let per = rows.div_ceil(threads);
    out.par_chunks_mut(per * row)
        .enumerate()
        .map(|(i, part)| f(i * per, part))
        .collect()
}

fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let ms = x.iter().map(|&v| v * v).sum::<T>() / T::of(x.len() as f64);
    (ms + T::of(eps)).sqrt().recip()
}

/// A new vector of `len` values written by `f` over whole rows of `row` values, a part per
/// thread ([`par_rows`]), without zeroing it first: the zeroing was a pass over memory as large as
/// the output, about 4% of a bf16 training step across the fused ops.
///
/// # Safety
/// `f(first_row, part)` must write every value of `part` (it may panic instead).
unsafe fn new_rows<T: Send>(
    len: usize,
    row: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    par_rows(&mut out.spare_capacity_mut()[..len], row, f);
    // SAFETY: the parts cover all `len` values and `f` wrote every one (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// Values per piece of the SwiGLU loops: their sigmoids go to a buffer on the stack.
const PIECE: usize = 256;

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w` over rows of `w.len()` values.
pub fn rms_norm<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm: rows of {d}");
    // SAFETY: every row of a part is written whole: `o`, `xr` and `w` all hold `d` values.
    unsafe {
        new_rows(x.len(), d, |r0, part| {
            for (i, o) in part.chunks_mut(d).enumerate() {
                let xr = &x[(r0 + i) * d..][..d];
                let inv = inv_rms(xr, eps);
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                    o.write(xv * inv * wv);
                }
            }
        })
    }
}

/// RMSNorm's backward. With `n = x * inv` and `g = dy * w`: `dx = inv * (g - n * mean(g * n))`,
/// `dw = sum_rows(dy * n)`. `out` holds `dx` (as many values as `x`), then `dw`.
pub fn rms_norm_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64, out: &mut [T]) {
    let d = w.len();
    let (dx, dw) = out.split_at_mut(x.len());
    let partial_dw = par_rows(dx, d, |r0, part| {
        let mut dw = vec![T::zero(); d];
        for (i, o) in part.chunks_mut(d).enumerate() {
            let xr = &x[(r0 + i) * d..][..d];
            let gr = &dy[(r0 + i) * d..][..d];
            let inv = inv_rms(xr, eps);
            let mut dot = T::zero();
            for j in 0..d {
                let nj = xr[j] * inv;
                dot += gr[j] * w[j] * nj;
                dw[j] += gr[j] * nj;
            }
            let mean = dot / T::of(d as f64);
            for j in 0..d {
                o[j] = inv * (gr[j] * w[j] - xr[j] * inv * mean);
            }
        }
        dw
    });
    for part in partial_dw {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
}

/// SwiGLU: `silu(g) * u`, elementwise, split over rows of `row` values.
pub fn swiglu<T: Real>(g: &[T], u: &[T], row: usize) -> Vec<T> {
    let n = g.len();
    assert_eq!(u.len(), n, "swiglu: gate and up differ in size");
    let mut out = Vec::with_capacity(n);
    sigmoid_pass(&mut out.spare_capacity_mut()[..n], row, g, |i0, s, o| {
        let (g, u) = (&g[i0..][..o.len()], &u[i0..][..o.len()]);
        for (((o, &s), &g), &u) in o.iter_mut().zip(s).zip(g).zip(u) {
            o.write(g * s * u);
        }
    });
    // SAFETY: the pass wrote every value: `o`, `s`, `g` and `u` are as long as the piece.
    unsafe { out.set_len(n) };
    out
}

/// SwiGLU's backward: `d g = dy * u * s * (1 + g * (1 - s))`, `d u = dy * g * s` with
/// `s = sigmoid(g)`. Returns `d g`, then `d u`.
pub fn swiglu_bwd<T: Real>(g: &[T], u: &[T], dy: &[T], row: usize) -> Vec<T> {
    let n = g.len();
    assert!(u.len() == n && dy.len() == n, "swiglu_bwd: sizes differ");
    let mut out = Vec::with_capacity(2 * n);
    let (dg, du) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    // Two passes so each splits into rows on its own; each writes every value of its half.
    let piece = |i0: usize, len: usize| (&g[i0..][..len], &u[i0..][..len], &dy[i0..][..len]);
    sigmoid_pass(dg, row, g, |i0, s, o| {
        let (g, u, dy) = piece(i0, o.len());
        for ((((o, &s), &g), &u), &dy) in o.iter_mut().zip(s).zip(g).zip(u).zip(dy) {
            o.write(dy * u * s * (T::one() + g * (T::one() - s)));
        }
    });
    sigmoid_pass(du, row, g, |i0, s, o| {
        let (g, _, dy) = piece(i0, o.len());
        for (((o, &s), &g), &dy) in o.iter_mut().zip(s).zip(g).zip(dy) {
            o.write(s * (dy * g));
        }
    });
    // SAFETY: both passes wrote every value of their halves (each piece's slices are as long as
    // it), which make up the `2 * n`.
    unsafe { out.set_len(2 * n) };
    out
}

/// Hands `write` each piece of `out` (at most [`PIECE`] values, from `out[i0]`) with the sigmoids
/// of `g[i0..]` beside it, split over rows of `row`; `write` must write every value of its piece.
fn sigmoid_pass<T: Real>(
    out: &mut [MaybeUninit<T>],
    row: usize,
    g: &[T],
    write: impl Fn(usize, &[T], &mut [MaybeUninit<T>]) + Sync,
) {
    par_rows(out, row, |r0, part| {
        let off = r0 * row;
        let mut s = [T::zero(); PIECE];
        for (p, o) in part.chunks_mut(PIECE).enumerate() {
            let i0 = off + p * PIECE;
            let s = &mut s[..o.len()];
            T::sigmoid_into(&g[i0..][..o.len()], s);
            write(i0, s, o);
        }
    });
}

/// Rotate-half RoPE over `x` laid out `[B, H, T, dh]` with `cos`, `sin` laid out `[B, T, dh/2]`.
/// Its backward is the same rotation by `-sin`.
pub fn rope<T: Real>(x: &[T], cos: &[T], sin: &[T], h: usize, t: usize, dh: usize) -> Vec<T> {
    assert!(
        dh > 0 && dh.is_multiple_of(2) && x.len().is_multiple_of(dh),
        "rope: head size {dh}"
    );
    let half = dh / 2;
    // SAFETY: each row's two halves are written whole (`j` runs over all `half` of each).
    unsafe {
        new_rows(x.len(), dh, |r0, part| {
            for (i, o) in part.chunks_mut(dh).enumerate() {
                let r = r0 + i; // row index over (b, h, t)
                let (bi, ti) = (r / (h * t), r % t);
                let tab = (bi * t + ti) * half;
                let (c, s) = (&cos[tab..tab + half], &sin[tab..tab + half]);
                let xr = &x[r * dh..(r + 1) * dh];
                let (x1, x2) = xr.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for j in 0..half {
                    o1[j].write(x1[j] * c[j] - x2[j] * s[j]);
                    o2[j].write(x2[j] * c[j] + x1[j] * s[j]);
                }
            }
        })
    }
}

/// The shape of [`attention_probs`]'s inputs: `q` holds `B x G` groups of `rt` rows of `dh`
/// (the `R` query heads of a KV group stacked along time, `rt = R * t`); group `(b, g)` of `k`
/// starts at `b * ks0 + g * ks1` and holds `tk` rows of `dh`.
#[derive(Clone, Copy, Debug)]
pub struct ProbsShape {
    pub g: usize,
    pub rt: usize,
    pub tk: usize,
    pub dh: usize,
    pub ks0: usize,
    pub ks1: usize,
}

/// `out = softmax(scale * Q K^T + mask)` per group, `[B, G, rt, tk]`. `mask`, when given, is
/// `[B, t, tk]` (additive), and query row `r` of a group reads mask row `r % t`.
pub fn attention_probs<T: Real>(
    q: &[T],
    k: &[T],
    s: ProbsShape,
    scale: f64,
    mask: Option<(&[f32], usize)>,
    out: &mut [T],
) {
    let ProbsShape {
        g,
        rt,
        tk,
        dh,
        ks0,
        ks1,
    } = s;
    assert_eq!(
        q.len() % (rt * dh),
        0,
        "attention_probs: q is not whole groups"
    );
    assert_eq!(out.len(), q.len() / dh * tk, "attention_probs: out size");
    let scale = T::of(scale);
    par_rows(out, rt * tk, |grp0, part| {
        for (gi, p) in part.chunks_mut(rt * tk).enumerate() {
            let grp = grp0 + gi; // index over (b, g)
            let qg = &q[grp * rt * dh..][..rt * dh];
            let kg = &k[(grp / g) * ks0 + (grp % g) * ks1..][..tk * dh];
            // SAFETY: the slices hold rt x dh, tk x dh and rt x tk values (checked by the
            // slicing above and the asserts) with the strides given; `p` aliases neither input.
            unsafe {
                gemm::gemm(
                    rt,
                    tk,
                    dh,
                    p.as_mut_ptr(),
                    1,
                    tk as isize,
                    false,
                    qg.as_ptr(),
                    1,
                    dh as isize,
                    kg.as_ptr(),
                    dh as isize,
                    1,
                    T::zero(),
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            let bi = grp / g;
            for (r, row) in p.chunks_mut(tk).enumerate() {
                if let Some((m, t)) = mask {
                    let mrow = &m[(bi * t + r % t) * tk..][..tk];
                    for (s, &mv) in row.iter_mut().zip(mrow) {
                        *s += T::of(mv as f64);
                    }
                }
                let inv = T::exp_minus_max(row).recip();
                row.iter_mut().for_each(|s| *s *= inv);
            }
        }
    });
}

/// Softmax's backward over rows of `row` values: `out = scale * P * (dP - rowsum(dP * P))`.
pub fn softmax_bwd<T: Real>(p: &[T], dp: &[T], row: usize, scale: f64, out: &mut [T]) {
    let scale = T::of(scale);
    par_rows(out, row, |r0, part| {
        for (i, o) in part.chunks_mut(row).enumerate() {
            let off = (r0 + i) * row;
            let (pr, dr) = (&p[off..off + row], &dp[off..off + row]);
            let dot: T = pr.iter().zip(dr).map(|(&a, &b)| a * b).sum();
            for j in 0..row {
                o[j] = scale * pr[j] * (dr[j] - dot);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-3, 3) from a fixed sequence.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f64 * 0.006 - 3.0)
            .collect()
    }

    /// The ops that write fresh buffers, against plain loops, at sizes that split across threads
    /// (above `par_rows`' 16,384 values) with rows that are not whole pieces: every value must be
    /// written, in place. In f64 every path is scalar, so the values are equal exactly.
    #[test]
    fn fresh_outputs_equal_plain_loops() {
        let (rows, d) = (70, 300);
        let n = rows * d;
        let (x, w, u, dy) = (values(n, 1), values(d, 2), values(n, 3), values(n, 4));

        let want: Vec<f64> = (0..n)
            .map(|i| {
                let r = &x[i / d * d..][..d];
                let inv = (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5)
                    .sqrt()
                    .recip();
                x[i] * inv * w[i % d]
            })
            .collect();
        assert_eq!(rms_norm(&x, &w, 1e-5), want);

        let s: Vec<f64> = x.iter().map(|&g| sigmoid(g)).collect();
        let want: Vec<f64> = (0..n).map(|i| x[i] * s[i] * u[i]).collect();
        assert_eq!(swiglu(&x, &u, d), want);
        let want: Vec<f64> = (0..n)
            .map(|i| dy[i] * u[i] * s[i] * (1.0 + x[i] * (1.0 - s[i])))
            .chain((0..n).map(|i| s[i] * (dy[i] * x[i])))
            .collect();
        assert_eq!(swiglu_bwd(&x, &u, &dy, d), want);

        // RoPE: B = 2, H = 5, T = 35, dh = 60 (n values), tables [B, T, dh / 2].
        let (b, h, t, dh) = (2, 5, 35, 60);
        assert_eq!(b * h * t * dh, n);
        let (cos, sin) = (values(b * t * dh / 2, 5), values(b * t * dh / 2, 6));
        let half = dh / 2;
        let want: Vec<f64> = (0..n)
            .map(|i| {
                let (r, j) = (i / dh, i % dh);
                let tab = ((r / (h * t)) * t + r % t) * half;
                let (x1, x2) = (x[r * dh + j % half], x[r * dh + half + j % half]);
                let (c, s) = (cos[tab + j % half], sin[tab + j % half]);
                if j < half {
                    x1 * c - x2 * s
                } else {
                    x2 * c + x1 * s
                }
            })
            .collect();
        assert_eq!(rope(&x, &cos, &sin, h, t, dh), want);
    }

    /// The f32 SwiGLU (vectorised sigmoid) against the f64 one.
    #[test]
    fn f32_swiglu_matches_f64() {
        let n = 70 * 300;
        let (g, u) = (values(n, 7), values(n, 8));
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let got = swiglu(&f32s(&g), &f32s(&u), 300);
        for (a, b) in got.iter().zip(swiglu(&g, &u, 300)) {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
    }
}
