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

/// Keys whose scores are reduced together in [`attend_lanes`]: one vector of sixteen sums.
#[cfg(target_arch = "x86_64")]
const KEY_BLOCK: usize = 16;

/// Value rows [`attend_lanes`] reads once for every query row of the group (32 KiB at head size
/// 128: they stay in L1 from the first query row to the last).
#[cfg(target_arch = "x86_64")]
const VALUE_BLOCK: usize = 64;

/// [`attend_generic`] for `dh = 16 * L`, with the keys and values read once for all the group's
/// query rows (the query heads sharing a KV group, and their time steps): keys go by blocks of
/// sixteen, each block scored against every query row while it sits in L1, and the sixteen
/// multiply-add chains of a row are summed together by [`sum16`] (a vector reduction per score
/// costs twice the chain itself). Values go by blocks of [`VALUE_BLOCK`] rows the same way, each
/// output row accumulating in `L` registers within a block.
///
/// # Safety
/// As [`attend_avx512`], with `g.dh == 16 * L`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_lanes<const L: usize>(g: &Group, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, v, tk, dh) = (g.k.as_ptr(), g.v.as_ptr(), g.tk, g.dh);
    debug_assert_eq!(dh, 16 * L);
    if tk == 0 {
        // No keys: nothing to attend to (the value loop below would not write `out`).
        out.fill(0.0);
        return;
    }
    let rows = g.q.len() / dh;
    let load_q = |r: usize| -> [__m512; L] {
        // SAFETY: query row `r < rows` holds `dh = 16 L` values of `g.q`.
        std::array::from_fn(|c| unsafe { _mm512_loadu_ps(g.q.as_ptr().add(r * dh + 16 * c)) })
    };
    // `q . k_j` as sixteen lanes of partial sums (one multiply-add chain).
    let chain = |q: &[__m512; L], j: usize| {
        // SAFETY: key row `j < tk` lies within the `tk * dh` values of `g.k`.
        let kj = unsafe { k.add(j * dh) };
        let mut acc = _mm512_setzero_ps();
        for (c, qc) in q.iter().enumerate() {
            // SAFETY: lanes `16 c .. 16 c + 16` of the key row, inside it since `c < L`.
            acc = _mm512_fmadd_ps(*qc, unsafe { _mm512_loadu_ps(kj.add(16 * c)) }, acc);
        }
        acc
    };
    // Scores of every row, `[rows, tk]`.
    let mut s = vec![0f32; rows * tk];
    let blocked = tk / KEY_BLOCK * KEY_BLOCK;
    let scale = _mm512_set1_ps(g.scale);
    for j0 in (0..blocked).step_by(KEY_BLOCK) {
        for r in 0..rows {
            let q = load_q(r);
            // Chain `a` scores key `j0 + KEY_ORDER[a]` (`< blocked <= tk`), so that `sum16`'s
            // lanes come out in key order.
            let acc: [__m512; KEY_BLOCK] = std::array::from_fn(|a| chain(&q, j0 + KEY_ORDER[a]));
            let scores = _mm512_mul_ps(scale, sum16(acc));
            // SAFETY: `s` holds `rows * tk` values and `j0 + 16 <= tk`.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr().add(r * tk + j0), scores) };
        }
    }
    for r in 0..rows {
        let q = load_q(r);
        for j in blocked..tk {
            s[r * tk + j] = g.scale * _mm512_reduce_add_ps(chain(&q, j));
        }
        let sr = &mut s[r * tk..][..tk];
        let inv = softmax_unnormalised(g, r, sr);
        sr.iter_mut().for_each(|p| *p *= inv);
    }
    for j0 in (0..tk).step_by(VALUE_BLOCK) {
        let block = VALUE_BLOCK.min(tk - j0);
        for (r, or) in out.chunks_exact_mut(dh).enumerate() {
            // Even and odd keys in two sets of accumulators: one set alone waits on the
            // multiply-add latency (`L` chains, where the two FMA units need eight).
            let (mut even, mut odd) = ([_mm512_setzero_ps(); L], [_mm512_setzero_ps(); L]);
            if j0 > 0 {
                // SAFETY: `or` holds `dh = 16 L` values.
                even = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(or.as_ptr().add(16 * c)) });
            }
            let add_row = |o: &mut [__m512; L], j: usize, p: f32| {
                let p = _mm512_set1_ps(p);
                // SAFETY: value row `j < tk` lies within the `tk * dh` values of `g.v`.
                let vj = unsafe { v.add(j * dh) };
                for (c, oc) in o.iter_mut().enumerate() {
                    // SAFETY: lanes `16 c .. 16 c + 16` of the value row.
                    *oc = _mm512_fmadd_ps(p, unsafe { _mm512_loadu_ps(vj.add(16 * c)) }, *oc);
                }
            };
            let ps = &s[r * tk + j0..][..block];
            for (i, pair) in ps.chunks_exact(2).enumerate() {
                add_row(&mut even, j0 + 2 * i, pair[0]);
                add_row(&mut odd, j0 + 2 * i + 1, pair[1]);
            }
            if block % 2 == 1 {
                add_row(&mut even, j0 + block - 1, ps[block - 1]);
            }
            for c in 0..L {
                let oc = _mm512_add_ps(even[c], odd[c]);
                // SAFETY: `or` holds `dh = 16 L` values.
                unsafe { _mm512_storeu_ps(or.as_mut_ptr().add(16 * c), oc) };
            }
        }
    }
}

/// The key each of [`sum16`]'s input vectors must hold for its output lanes to come out in key
/// order: its reduction tree leaves the sum of input `4 e + m` in lane `4 m + e`.
#[cfg(target_arch = "x86_64")]
const KEY_ORDER: [usize; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// The sixteen horizontal sums of `x`, as one vector: the sum of `x[4 e + m]` in lane `4 m + e`.
/// Four levels of shuffles and adds (15 adds in all), where sixteen separate reductions take 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn sum16(x: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Halves: 128-bit lanes 0-1 of `h[i]` hold `x[2i]`'s partial sums, lanes 2-3 `x[2i + 1]`'s.
    let h: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Quarters: 128-bit lane `m` of `q[i]` holds four partial sums of `x[4i + m]`.
    let q: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (h[2 * i], h[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Within each 128-bit lane `m`: elements 0-1 of `e[i]` are two partial sums of
    // `x[8i + m]`, elements 2-3 two of `x[8i + 4 + m]`.
    let e: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (q[2 * i], q[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Element `e` of 128-bit lane `m`: the sum of `x[4e + m]`.
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(e[0], e[1]),
        _mm512_shuffle_ps::<0xDD>(e[0], e[1]),
    )
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
        // 20: the generic loop; the others: the AVX-512 kernel's register-resident sizes. Key
        // counts: fewer than a key block, whole key blocks, one and more value blocks, tails.
        for dh in [20, 32, 64, 96, 128] {
            for tk in [1, 7, 16, 37, 64, 65, 150] {
                matches_plain_attention_at(dh, tk);
            }
        }
    }

    #[test]
    fn no_keys_give_zeros() {
        for dh in [20, 64] {
            let q = vec![0.5f32; 3 * dh];
            let mut out = vec![f32::NAN; 3 * dh];
            let g = Group {
                q: &q,
                k: &[],
                v: &[],
                mask: None,
                scale: 0.25,
                tk: 0,
                dh,
            };
            attend(&g, &mut out);
            assert!(out.iter().all(|&o| o == 0.0), "dh {dh}");
        }
    }

    fn matches_plain_attention_at(dh: usize, tk: usize) {
        let (rows, t) = (4, 2);
        let val = |i: usize, s: f32| ((i as f32 * 0.37 + s).sin()) * 0.8;
        let q: Vec<f32> = (0..rows * dh).map(|i| val(i, 0.1)).collect();
        let k: Vec<f32> = (0..tk * dh).map(|i| val(i, 1.3)).collect();
        let v: Vec<f32> = (0..tk * dh).map(|i| val(i, 2.9)).collect();
        // The second query head's last keys masked out (all but its first key when there are
        // few).
        let mut mask = vec![0f32; t * tk];
        mask[tk + tk.saturating_sub(3).max(1)..]
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
                    "dh {dh}, tk {tk}, row {r} col {i}: {got} vs {want}"
                );
            }
        }
    }
}
