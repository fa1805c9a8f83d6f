//! `y = x W^T` for a few rows of `x` (decoding: one new token per sequence), streaming the weight
//! once in its stored `[out, in]` layout.
//!
//! Sampling is bound by reading the weights every step (540 MB for SmolLM2-135M in f32). candle's
//! GEMM packs an operand into blocks on each call, which at a handful of rows costs more memory
//! traffic than the multiply itself. This kernel reads each weight row once, from where it lies,
//! and dots it with every `x` row while it is in L1. AVX2 + FMA when the CPU has them; callers
//! fall back to candle otherwise. Inference only: no backward.

/// Rows of `x` up to which [`matmul_t`] is used with AVX2. Measured on SmolLM2 sampling (2
/// threads, against candle's GEMM): 1.06x at 1 row, 2.1x at 2, 1.5x at 4, 1.2x at 8, even at 12
/// to 16, 0.8x at 32.
pub const MAX_ROWS: usize = 12;

/// The same with AVX-512, whose kernel keeps 16 sums of 16 lanes in registers: at 16 rows it
/// stays bound by reading the weights, where candle's GEMM (packing `W` on every call) streamed
/// them at under half the machine's bandwidth.
pub const MAX_ROWS_AVX512: usize = 32;

/// Rows of `x` up to which this CPU's kernel is used.
pub fn max_rows() -> usize {
    if avx512() {
        MAX_ROWS_AVX512
    } else {
        MAX_ROWS
    }
}

fn avx512() -> bool {
    crate::vmath::available()
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x: [m, k]`, `w: [n, k]` (both row-major) -> `x W^T: [m, n]`, split over the output features
/// across candle's thread count. Panics if the CPU lacks AVX2/FMA (check [`available`]).
pub fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    matmul_t_with(x, m, w, n, k, avx512())
}

/// [`matmul_t`] with the AVX-512 kernel (`wide`, where the CPU has it) or the AVX2 one.
fn matmul_t_with(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, wide: bool) -> Vec<f32> {
    assert!(available(), "gemv::matmul_t needs AVX2 and FMA");
    let wide = wide && avx512();
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    // Work per call is m*n*k multiply-adds; below ~64k a second thread costs more than it saves
    // (one row through a 576 x 576 weight is 330k: single-threaded, decoding one sequence ran at
    // 0.6x candle's speed).
    let threads = if m * n * k < 1 << 16 {
        1
    } else {
        rayon::current_num_threads().clamp(1, n.div_ceil(2))
    };
    let per = n.div_ceil(threads).div_ceil(2) * 2;
    // Each part computes `W_part x^T` ([rows, m]); the parts are then laid out as [m, n].
    let mut yt = vec![0f32; n * m];
    if threads == 1 {
        rows_dot(x, m, w, k, &mut yt, wide);
    } else {
        use rayon::prelude::*;
        yt.par_chunks_mut(per * m)
            .zip(w.par_chunks(per * k))
            .for_each(|(out, wp)| rows_dot(x, m, wp, k, out, wide));
    }
    let mut y = vec![0f32; m * n];
    for (o, col) in yt.chunks(m).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * n + o] = *v;
        }
    }
    y
}

/// `out[o * m + r] = w[o] . x[r]` for every weight row `o` of `w` and row `r` of `x`.
fn rows_dot(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul_t` checked that the CPU has AVX2 and FMA; slices are bounds-checked by
    // construction (`w` holds whole rows of `k`, `out` one value per (row, x row)).
    unsafe {
        if wide {
            rows_dot_avx512(x, m, w, k, out)
        } else {
            rows_dot_avx2(x, m, w, k, out)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, w, k, out, wide);
        unreachable!("available() is false off x86_64")
    }
}

/// [`rows_dot`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA. `w` holds whole rows of `k` values, `x` holds `m` rows of `k`,
/// and `out` holds `w.len() / k * m` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dot_avx2(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // unsafe operation below.
    unsafe {
        let rows = w.len() / k;
        // Two weight rows x up to four x rows per pass: 8 accumulators, 6 loads per 8 FMAs. A short
        // last group of x rows gets its own instantiation rather than repeating rows.
        let mut o = 0;
        while o < rows {
            let wn = (rows - o).min(2);
            let w0 = w.as_ptr().add(o * k);
            let w1 = w.as_ptr().add((o + wn - 1) * k);
            let mut r = 0;
            while r < m {
                let xr = x.as_ptr().add(r * k);
                let (s0, s1, xn) = match m - r {
                    1 => widen(pass::<1>(w0, w1, xr, k)),
                    2 => widen(pass::<2>(w0, w1, xr, k)),
                    3 => widen(pass::<3>(w0, w1, xr, k)),
                    _ => widen(pass::<4>(w0, w1, xr, k)),
                };
                for j in 0..xn {
                    out[o * m + r + j] = s0[j];
                    if wn == 2 {
                        out[(o + 1) * m + r + j] = s1[j];
                    }
                }
                r += 4;
            }
            o += 2;
        }
    }
}

fn widen<const N: usize>((a, b): ([f32; N], [f32; N])) -> ([f32; 4], [f32; 4], usize) {
    let mut s0 = [0f32; 4];
    let mut s1 = [0f32; 4];
    s0[..N].copy_from_slice(&a);
    s1[..N].copy_from_slice(&b);
    (s0, s1, N)
}

/// Dot products of weight rows `w0`, `w1` with the `N` consecutive `x` rows at `x`.
///
/// # Safety
/// The CPU must have AVX2 and FMA. `w0` and `w1` must be valid for reading `k` values, and `x`
/// for reading `N * k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pass<const N: usize>(
    w0: *const f32,
    w1: *const f32,
    x: *const f32,
    k: usize,
) -> ([f32; N], [f32; N]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // unsafe operation below.
    unsafe {
        use std::arch::x86_64::*;
        let k8 = k / 8 * 8;
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i < k8 {
            let v0 = _mm256_loadu_ps(w0.add(i));
            let v1 = _mm256_loadu_ps(w1.add(i));
            for j in 0..N {
                let b = _mm256_loadu_ps(x.add(j * k + i));
                a0[j] = _mm256_fmadd_ps(v0, b, a0[j]);
                a1[j] = _mm256_fmadd_ps(v1, b, a1[j]);
            }
            i += 8;
        }
        let hsum = |v: __m256| -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            _mm_cvtss_f32(_mm_hadd_ps(s, s))
        };
        let mut s0 = [0f32; N];
        let mut s1 = [0f32; N];
        for j in 0..N {
            s0[j] = hsum(a0[j]);
            s1[j] = hsum(a1[j]);
            for t in k8..k {
                let xv = *x.add(j * k + t);
                s0[j] += *w0.add(t) * xv;
                s1[j] += *w1.add(t) * xv;
            }
        }
        (s0, s1)
    }
}

/// Four weight rows x up to four `x` rows per pass: 16 accumulators, 8 loads per 16 FMAs; the
/// last partial 16 lanes of `k` by masked loads. A short last group of weight rows repeats its
/// last row (results not stored), a short group of `x` rows gets its own instantiation.
///
/// # Safety
/// The CPU must have AVX-512F; the slices are laid out as for [`rows_dot_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_dot_avx512(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // unsafe operation below.
    unsafe {
        let rows = w.len() / k;
        let mut o = 0;
        while o < rows {
            let wn = (rows - o).min(4);
            let wp: [*const f32; 4] =
                std::array::from_fn(|i| w.as_ptr().add((o + i.min(wn - 1)) * k));
            let mut r = 0;
            while r < m {
                let xr = x.as_ptr().add(r * k);
                let xn = (m - r).min(4);
                let mut s = [[0f32; 4]; 4];
                // The first pass over a group of weight rows also fetches the next group into cache:
                // the hardware prefetcher alone left the weight loads stalling.
                let next = (r == 0 && o + 4 < rows).then(|| w.as_ptr().add((o + 4) * k));
                match xn {
                    1 => pass512::<1>(wp, xr, k, next, &mut s),
                    2 => pass512::<2>(wp, xr, k, next, &mut s),
                    3 => pass512::<3>(wp, xr, k, next, &mut s),
                    _ => pass512::<4>(wp, xr, k, next, &mut s),
                }
                for (i, si) in s.iter().enumerate().take(wn) {
                    out[(o + i) * m + r..][..xn].copy_from_slice(&si[..xn]);
                }
                r += 4;
            }
            o += 4;
        }
    }
}

/// `s[i][j] = w[i] . x[j]` for the four weight rows `w` and the `N` consecutive `x` rows at `x`.
///
/// # Safety
/// The CPU must have AVX-512F. Each `w[a]` must be valid for reading `k` values and `x` for
/// reading `N * k` values; `next`, if given, must point at four more rows of `k` values in the
/// same allocation (they are only prefetched).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pass512<const N: usize>(
    w: [*const f32; 4],
    x: *const f32,
    k: usize,
    next: Option<*const f32>,
    s: &mut [[f32; 4]; 4],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // unsafe operation below.
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); N]; 4];
        let mut i = 0;
        while i < k {
            // One 64-byte line per step of each of the next group's rows (it is 4 rows when there
            // is a next group: a short group is only ever the last).
            if let Some(p) = next {
                for a in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(a * k + i) as *const i8);
                }
            }
            let mask: __mmask16 = if k - i >= 16 {
                0xffff
            } else {
                ((1u32 << (k - i)) - 1) as __mmask16
            };
            let wv = [
                _mm512_maskz_loadu_ps(mask, w[0].add(i)),
                _mm512_maskz_loadu_ps(mask, w[1].add(i)),
                _mm512_maskz_loadu_ps(mask, w[2].add(i)),
                _mm512_maskz_loadu_ps(mask, w[3].add(i)),
            ];
            for j in 0..N {
                let b = _mm512_maskz_loadu_ps(mask, x.add(j * k + i));
                for (acc_a, &wa) in acc.iter_mut().zip(&wv) {
                    acc_a[j] = _mm512_fmadd_ps(wa, b, acc_a[j]);
                }
            }
            i += 16;
        }
        for a in 0..4 {
            for j in 0..N {
                s[a][j] = _mm512_reduce_add_ps(acc[a][j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_matmul_over_odd_shapes() {
        if !available() {
            eprintln!("no AVX2/FMA here: the kernel is not used on this CPU");
            return;
        }
        let mut seed = 1u32;
        let mut rnd = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (m, n, k) in [
            (1, 1, 1),
            (1, 7, 9),
            (3, 5, 16),
            (4, 2, 8),
            (5, 33, 70),
            (9, 64, 576),
            (16, 1537, 577),
            (32, 6, 31),
            (64, 1001, 300),
        ] {
            let (x, w) = (rnd(m * k), rnd(n * k));
            for wide in [false, true] {
                let y = matmul_t_with(&x, m, &w, n, k, wide);
                for r in 0..m {
                    for o in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                            .sum();
                        let got = y[r * n + o] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k} [{r},{o}] (avx512 {wide}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
