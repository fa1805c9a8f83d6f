//! Vectorised `exp` over slices: softmax rows, the LM head's log-sum-exp over 49k logits per
//! token, and sampling. glibc's scalar `expf` was 8-9% of a training step and of a sampling run.
//!
//! On AVX-512 CPUs 16 lanes at a time: `e^x = 2^n e^r` with `n = round(x log2 e)`,
//! `|r| <= ln 2 / 2`, and `e^r` from its degree-7 Taylor polynomial (truncation error below 7e-9,
//! so results are within 2 ulp of `f32::exp`). Elsewhere the scalar `f32::exp`. NaN stays NaN,
//! `-inf` gives 0.
use std::sync::OnceLock;

/// Whether the AVX-512 path runs (`PREFTUNE_NO_AVX512` forces the scalar one, for comparison).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("PREFTUNE_NO_AVX512").is_none()
                && std::is_x86_feature_detected!("avx512f")
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
        // SAFETY: avx512f was detected above; `xs` is read and written in place through one
        // pointer.
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
        // SAFETY: avx512f was detected above; a null destination means `xs` is only read.
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

/// `out[i] = 1 / (1 + exp(-x[i]))` (SiLU's gate).
pub fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "sigmoid_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: avx512f was detected above; the lengths match.
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

    /// `e^x` in 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        // Clamped so that `n` stays finite; the NaN operand goes second so NaN passes through.
        let x = _mm512_max_ps(
            _mm512_set1_ps(-104.0),
            _mm512_min_ps(_mm512_set1_ps(88.72), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split in two so that `x - n ln 2` is exact to f32 precision.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `e = exp(src[i] - shift)` for `len` values from `src`, stored at `dst` unless it is null
    /// (`dst` may be `src`: each value is read before its own slot is written); each block's sum
    /// goes to `block_sum`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F. `src` must be valid for reading `len` values, and `dst`, unless
    /// null, valid for writing `len` values (it may be `src`).
    #[target_feature(enable = "avx512f")]
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
                let m: __mmask16 = if end - i >= 16 {
                    0xffff
                } else {
                    ((1u32 << (end - i)) - 1) as __mmask16
                };
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
    /// The CPU must have AVX-512F, and `out` must be at least as long as `x`.
    #[target_feature(enable = "avx512f")]
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
            let m: __mmask16 = ((1u32 << (x.len() - i)) - 1) as __mmask16;
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
        let mut xs = vec![f32::NEG_INFINITY, f32::NAN, 0.0, -200.0, 1.0];
        exp_shifted(&mut xs, 0.0);
        assert_eq!(xs[0], 0.0);
        assert!(xs[1].is_nan());
        assert_eq!(xs[2], 1.0);
        assert_eq!(xs[3], 0.0);
        assert!(ulps(xs[4], std::f32::consts::E) <= 1);
    }

    #[test]
    fn sigmoid_matches_the_scalar_one() {
        let xs: Vec<f32> = (0..100)
            .map(|i| (i as f32 - 50.0) * 0.37)
            .chain([-100.0, 100.0, f32::NAN])
            .collect();
        let mut ys = vec![0f32; xs.len()];
        sigmoid_into(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = 1.0 / (1.0 + (-x).exp());
            if x.is_nan() {
                assert!(y.is_nan());
            } else {
                assert!(
                    (y - want).abs() <= 2e-7 * want.max(1e-30) + 1e-38,
                    "sigmoid({x}) = {y}, want {want}"
                );
            }
        }
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
