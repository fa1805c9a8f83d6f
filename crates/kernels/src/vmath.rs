//! Vectorised `exp` over slices: softmax rows, the LM head's log-sum-exp over 49k logits per
//! token, and sampling. glibc's scalar `expf` was 8-9% of a training step and of a sampling run.
//!
//! On AVX-512 CPUs 16 lanes at a time: `e^x = 2^f 2^n` with `n = floor(x log2 e)`, `f` in
//! `[0, 1)` and `2^f` from a degree-6 minimax polynomial, so results are within 2 ulp of
//! `f32::exp`. Elsewhere the scalar `f32::exp`. NaN stays NaN, `-inf` gives 0 and `inf` inf.
use std::sync::OnceLock;

/// Whether the AVX-512 path (F and DQ) runs (`PREFTUNE_NO_AVX512` forces the scalar one, for
/// comparison).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("PREFTUNE_NO_AVX512").is_none()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512dq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Sums of this many values are taken in f32, then added in f64: 49k additions in one f32
/// accumulator lose ~1e-4 relative, which adds up over a sequence.
pub const BLOCK: usize = 1024;

/// `xs[i] = exp(xs[i] - shift)` in place; returns the sum of the results (f32 blocks added in f64).
pub fn exp_shifted(xs: &mut [f32], shift: f32) -> f64 {
    let mut total = 0f64;
    exp_shifted_blocks(xs, shift, |s| total += s);
    total
}

/// [`exp_shifted`], handing the sum of each [`BLOCK`] of results to `block_sum` in order (a
/// sampler finds the block its draw falls in without a second pass over the whole row).
pub fn exp_shifted_blocks(xs: &mut [f32], shift: f32, block_sum: impl FnMut(f64)) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let p = xs.as_mut_ptr();
        // SAFETY: avx512f and avx512dq were detected above; `xs` is read and written in place
        // through one pointer.
        return unsafe { imp::exp_shifted(p, p, xs.len(), shift, block_sum) };
    }
    let mut block_sum = block_sum;
    for block in xs.chunks_mut(BLOCK) {
        let mut s = 0f32;
        for x in block {
            *x = (*x - shift).exp();
            s += *x;
        }
        block_sum(s as f64);
    }
}

/// `sum_i exp(xs[i] - shift)` without writing (f32 blocks added in f64).
pub fn sum_exp_shifted(xs: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let mut total = 0f64;
        // SAFETY: avx512f and avx512dq were detected above; a null destination means `xs` is
        // only read.
        unsafe {
            imp::exp_shifted(xs.as_ptr(), std::ptr::null_mut(), xs.len(), shift, |s| {
                total += s
            })
        };
        return total;
    }
    xs.chunks(BLOCK)
        .map(|b| b.iter().map(|&x| (x - shift).exp()).sum::<f32>() as f64)
        .sum()
}

/// `xs[i] = scale * exp(xs[i] - shift)` in place with a faster, less exact `exp`; returns the sum
/// of the results, added in one f32 accumulator (for rows of a few thousand values at most).
/// Relative error below `2e-7 + 8e-8 |xs[i] - shift|`: attention's probabilities, where values
/// far below their row's largest weigh nothing and the products round them to bf16 anyway.
/// PyTorch's CPU flash attention makes the same trade (`exp_u20`).
pub fn exp_shifted_fast(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f and avx512dq were detected above.
        return unsafe { imp::exp_shifted_fast(xs, shift, scale) };
    }
    let mut sum = 0f32;
    for x in xs {
        *x = scale * (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// `out[i] = 1 / (1 + exp(-x[i]))` (SiLU's gate).
pub fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "sigmoid_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f and avx512dq were detected above; the lengths match.
        return unsafe { imp::sigmoid_into(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

/// The largest value (`-inf` for an empty slice; NaN if any value is NaN).
pub fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f was detected above.
        return unsafe { imp::max(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, |m, x| {
        if x.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// `e^x` in 16 lanes: `t = x log2 e`, `e^x = 2^f 2^floor(t)` with `f = t - floor(t)` in
    /// `[0, 1)` from `vreduceps`, `2^f` from a degree-6 minimax polynomial, and `vscalefps`
    /// multiplies by `2^floor(t)`. The rounding error of `t` (up to 1e-5 at |x| = 88) is carried
    /// separately and added to `f`. Infinite `t` reduces to `f = 0`, so `-inf` gives 0 and `inf`
    /// gives inf with no clamping; NaN stays NaN. Thirteen vector operations, where the Taylor
    /// form it replaced took fourteen with a two-µop rounding (measured 1.19x its throughput).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn exp16(x: __m512) -> __m512 {
        let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
        let t = _mm512_mul_ps(x, log2e);
        // t + lo = x log2 e to about 2^-48 relative: the product's rounding error, exactly, and
        // x times what the f32 constant misses of log2 e. For infinite t, lo is NaN: the fixup
        // (table: class QNaN -> +0, every other class keeps lo) makes it 0.
        let lo = _mm512_fmsub_ps(x, log2e, t);
        let lo = _mm512_fmadd_ps(x, _mm512_set1_ps(1.925_963e-8), lo);
        let lo = _mm512_fixupimm_ps::<0>(lo, lo, _mm512_set1_epi32(8));
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
        _mm512_scalef_ps(exp2_fraction(_mm512_add_ps(f, lo)), t)
    }

    /// [`exp16`] without carrying the rounding error of `t = x log2 e`: four operations fewer,
    /// and a relative error up to `2e-7 + 8e-8 |x|` instead of 2 ulp.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn exp16_fast(x: __m512) -> __m512 {
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
        _mm512_scalef_ps(exp2_fraction(f), t)
    }

    /// `2^f` for `f` in `[0, 1)` (a little outside is fine): degree-6 minimax, relative error
    /// 1.9e-9, 6.2e-8 after f32 rounding.
    #[inline]
    #[target_feature(enable = "avx512f")]
    // The linear coefficient is the fit's, not ln 2 (it is 1.8e-7 below it).
    #[allow(clippy::approx_constant)]
    fn exp2_fraction(f: __m512) -> __m512 {
        let mut p = _mm512_set1_ps(2.170_225_5e-4);
        for c in [
            1.243_968_8e-3,
            9.678_841e-3,
            5.548_334e-2,
            2.402_298_3e-1,
            6.931_47e-1,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        p
    }

    /// `xs[i] = scale * exp_fast(xs[i] - shift)`; returns their sum.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn exp_shifted_fast(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
        let (sh, sc) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
        let mut acc = _mm512_setzero_ps();
        for i in (0..xs.len()).step_by(16) {
            let m = crate::first_lanes(xs.len() - i);
            let p = xs[i..].as_mut_ptr();
            // SAFETY: lanes from `i` up to the slice's end, masked beyond it: masked lanes are
            // neither read nor written.
            let v = unsafe { _mm512_maskz_loadu_ps(m, p) };
            let e = _mm512_mul_ps(exp16_fast(_mm512_sub_ps(v, sh)), sc);
            let e = _mm512_maskz_mov_ps(m, e);
            // SAFETY: as for the load.
            unsafe { _mm512_mask_storeu_ps(p, m, e) };
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `e = exp(src[i] - shift)` for `len` values from `src`, stored at `dst` unless it is null
    /// (`dst` may be `src`: each value is read before its own slot is written); each block's sum
    /// goes to `block_sum`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and DQ. `src` must be valid for reading `len` values, and
    /// `dst`, unless null, valid for writing `len` values (it may be `src`).
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn exp_shifted(
        src: *const f32,
        dst: *mut f32,
        len: usize,
        shift: f32,
        mut block_sum: impl FnMut(f64),
    ) {
        let sh = _mm512_set1_ps(shift);
        for b0 in (0..len).step_by(BLOCK) {
            let end = (b0 + BLOCK).min(len);
            let mut acc = _mm512_setzero_ps();
            let mut i = b0;
            while i < end {
                let m = crate::first_lanes(end - i);
                // SAFETY: the caller guarantees `len` values at `src` (and `dst`); masked lanes
                // past the end are neither read nor written.
                let v = unsafe { _mm512_maskz_loadu_ps(m, src.add(i)) };
                let e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(v, sh)));
                if !dst.is_null() {
                    // SAFETY: as for the load: `dst` holds `len` values, masked lanes untouched.
                    unsafe { _mm512_mask_storeu_ps(dst.add(i), m, e) };
                }
                acc = _mm512_add_ps(acc, e);
                i += 16;
            }
            block_sum(_mm512_reduce_add_ps(acc) as f64);
        }
    }

    /// `out[i] = sigmoid(x[i])`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and DQ, and `out` must be at least as long as `x`.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn sigmoid_into(x: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        let sig = |v: __m512| {
            _mm512_div_ps(
                one,
                _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))),
            )
        };
        let mut i = 0;
        while i + 16 <= x.len() {
            // SAFETY: 16 values from `i` lie inside both slices.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(i),
                    sig(_mm512_loadu_ps(x.as_ptr().add(i))),
                )
            };
            i += 16;
        }
        if i < x.len() {
            let m = crate::first_lanes(x.len() - i);
            // SAFETY: masked lanes past the end are neither read nor written.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, sig(v));
            }
        }
    }

    /// The largest value (NaN if any is NaN).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn max(xs: &[f32]) -> f32 {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut nan = false;
        let mut chunks = xs.chunks_exact(16);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly 16 values.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) != 0;
            m = _mm512_max_ps(m, v);
        }
        let mut best = _mm512_reduce_max_ps(m);
        for &x in chunks.remainder() {
            nan |= x.is_nan();
            best = best.max(x);
        }
        if nan {
            f32::NAN
        } else {
            best
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// From e^-86 to e^80 (sums stay finite in f32 blocks), within 2 ulp of the scalar `f32::exp`, at
    /// every slice length around the 16-lane and block boundaries.
    #[test]
    fn exp_matches_the_scalar_one() {
        for len in [0, 1, 15, 16, 17, 1023, 1024, 1025, 3000] {
            let xs: Vec<f32> = (0..len)
                .map(|i| -86.0 + 166.0 * (i as f32 * 0.618_034).fract())
                .collect();
            let mut ys = xs.clone();
            let sum = exp_shifted(&mut ys, 0.5);
            let mut want_sum = 0f64;
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x - 0.5).exp();
                want_sum += want as f64;
                assert!(ulps(y, want) <= 2, "exp({}) = {y}, want {want}", x - 0.5);
            }
            assert!(
                (sum - want_sum).abs() <= 1e-6 * want_sum.max(1e-30),
                "{sum} vs {want_sum}"
            );
            let read_only = sum_exp_shifted(&xs, 0.5);
            assert_eq!(read_only, sum, "length {len}");
        }
    }

    #[test]
    fn exp_edges() {
        let mut xs = vec![
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -200.0,
            1.0,
            f32::INFINITY,
            200.0,
        ];
        exp_shifted(&mut xs, 0.0);
        assert_eq!(xs[0], 0.0);
        assert_eq!(xs[5], f32::INFINITY);
        assert_eq!(xs[6], f32::INFINITY);
        assert!(xs[1].is_nan());
        assert_eq!(xs[2], 1.0);
        assert_eq!(xs[3], 0.0);
        assert!(ulps(xs[4], std::f32::consts::E) <= 1);
    }

    /// Within 3 ulp of the sigmoid taken in f64 (the scalar f32 formula is up to 2 ulp off it).
    #[test]
    fn sigmoid_matches_the_exact_one() {
        let xs: Vec<f32> = (0..100)
            .map(|i| (i as f32 - 50.0) * 0.37)
            .chain([-100.0, 100.0, f32::NAN, f32::NEG_INFINITY, f32::INFINITY])
            .collect();
        let mut ys = vec![0f32; xs.len()];
        sigmoid_into(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (1.0 / (1.0 + (-x as f64).exp())) as f32;
            if x.is_nan() {
                assert!(y.is_nan());
            } else {
                // Below f32's normal range the f32 exp has overflowed: 0 is as near as it gets.
                assert!(
                    ulps(y, want) <= 3 || (y - want).abs() <= 1e-38,
                    "sigmoid({x}) = {y}, want {want}"
                );
            }
        }
    }

    /// The fast exp against f64's, within its stated bound, with the scale applied and the sum
    /// returned, at lengths around the 16-lane boundary; `-inf` and NaN as in [`exp_shifted`].
    #[test]
    fn fast_exp_keeps_its_bound() {
        for len in [1, 15, 16, 17, 128, 1000] {
            let xs: Vec<f32> = (0..len)
                .map(|i| -86.0 + 90.0 * (i as f32 * 0.618_034).fract())
                .collect();
            let mut ys = xs.clone();
            let sum = exp_shifted_fast(&mut ys, 0.5, 0.25);
            let mut want_sum = 0f64;
            for (&x, &y) in xs.iter().zip(&ys) {
                let d = (x - 0.5) as f64;
                let want = 0.25 * d.exp();
                want_sum += want;
                let bound = 2e-7 + 8e-8 * d.abs();
                assert!(
                    (y as f64 - want).abs() <= bound * want,
                    "exp({d}) = {y}, want {want}"
                );
            }
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "{sum} vs {want_sum}"
            );
        }
        let mut xs = [f32::NEG_INFINITY, f32::NAN, 0.0];
        exp_shifted_fast(&mut xs, 0.0, 1.0);
        assert_eq!(xs[0], 0.0);
        assert!(xs[1].is_nan());
        assert_eq!(xs[2], 1.0);
    }

    #[test]
    fn max_finds_the_largest_and_propagates_nan() {
        let mut xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        assert_eq!(max(&xs), 50.0);
        xs[35] = 1e9;
        assert_eq!(max(&xs), 1e9);
        xs[3] = f32::NAN;
        assert!(max(&xs).is_nan());
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
