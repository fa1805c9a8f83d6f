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

/// Adds query row `r`'s mask row to its scores `s` and exponentiates them (shifted by their
/// maximum); returns the reciprocal of their sum, which turns them into probabilities.
#[inline(always)]
fn softmax_unnormalised(g: &Group, r: usize, s: &mut [f32]) -> f32 {
    if let Some((m, t)) = g.mask {
        s.iter_mut()
            .zip(&m[(r % t) * g.tk..][..g.tk])
            .for_each(|(sj, mj)| *sj += mj);
    }
    let max = crate::vmath::max(s);
    (crate::vmath::exp_shifted(s, max) as f32).recip()
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
        let inv = softmax_unnormalised(g, r, &mut s);
        or.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            let p = p * inv;
            or.iter_mut()
                .zip(&v[j * dh..][..dh])
                .for_each(|(o, &x)| *o += p * x);
        }
    }
}

/// AVX-512 attention: at head sizes 32, 64, 96 and 128 a query row and its output row stay in
/// registers ([`attend_lanes`]); other sizes run [`attend_generic`] compiled for AVX-512 (the
/// crate targets baseline x86-64).
///
/// # Safety
/// The CPU must have AVX-512F; `g.k` and `g.v` hold at least `g.tk * g.dh` values and `out` as
/// many as `g.q` (checked by [`attend`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(g: &Group, out: &mut [f32]) {
    match g.dh {
        // SAFETY: the caller's contract, and `g.dh` is 16 times the lane count.
        32 => unsafe { attend_lanes::<2>(g, out) },
        // SAFETY: as above.
        64 => unsafe { attend_lanes::<4>(g, out) },
        // SAFETY: as above.
        96 => unsafe { attend_lanes::<6>(g, out) },
        // SAFETY: as above.
        128 => unsafe { attend_lanes::<8>(g, out) },
        _ => attend_generic(g, out),
    }
}

/// [`attend_generic`] for `dh = 16 * L`: each score is one fused multiply-add chain and one
/// vector reduction (where the generic loop's sixteen-lane sum compiles to sixteen dependent scalar
/// adds), and `P V` accumulates in `L` registers, storing the output row once.
///
/// # Safety
/// As [`attend_avx512`], with `g.dh == 16 * L`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_lanes<const L: usize>(g: &Group, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, v, tk, dh) = (g.k.as_ptr(), g.v.as_ptr(), g.tk, g.dh);
    debug_assert_eq!(dh, 16 * L);
    let mut s = vec![0f32; tk];
    for (r, (qr, or)) in
        g.q.chunks_exact(dh)
            .zip(out.chunks_exact_mut(dh))
            .enumerate()
    {
        // SAFETY: `qr` holds `dh = 16 L` values.
        let q: [__m512; L] =
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(qr.as_ptr().add(16 * c)) });
        for (j, sj) in s.iter_mut().enumerate() {
            // SAFETY: key row `j < tk` lies within the `tk * dh` values of `g.k`.
            let kj = unsafe { k.add(j * dh) };
            let mut acc = _mm512_setzero_ps();
            for (c, qc) in q.iter().enumerate() {
                // SAFETY: lanes `16 c .. 16 c + 16` of key row `j`, inside it since `c < L`.
                acc = _mm512_fmadd_ps(*qc, unsafe { _mm512_loadu_ps(kj.add(16 * c)) }, acc);
            }
            *sj = g.scale * _mm512_reduce_add_ps(acc);
        }
        let inv = softmax_unnormalised(g, r, &mut s);
        let mut o = [_mm512_setzero_ps(); L];
        for (j, &p) in s.iter().enumerate() {
            let p = _mm512_set1_ps(p * inv);
            // SAFETY: value row `j < tk` lies within the `tk * dh` values of `g.v`.
            let vj = unsafe { v.add(j * dh) };
            for (c, oc) in o.iter_mut().enumerate() {
                // SAFETY: lanes `16 c .. 16 c + 16` of value row `j`.
                *oc = _mm512_fmadd_ps(p, unsafe { _mm512_loadu_ps(vj.add(16 * c)) }, *oc);
            }
        }
        for (c, oc) in o.iter().enumerate() {
            // SAFETY: `or` holds `dh = 16 L` values.
            unsafe { _mm512_storeu_ps(or.as_mut_ptr().add(16 * c), *oc) };
        }
    }
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
        // 20: the generic loop; the others: the AVX-512 kernel's register-resident sizes.
        for dh in [20, 32, 64, 96, 128] {
            matches_plain_attention_at(dh);
        }
    }

    fn matches_plain_attention_at(dh: usize) {
        let (rows, tk, t) = (4, 37, 2);
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
                    "dh {dh}, row {r} col {i}: {got} vs {want}"
                );
            }
        }
    }
}
