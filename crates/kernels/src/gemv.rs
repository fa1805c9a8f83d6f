//! `y = x W^T` for a few rows of `x` (decoding: one new token per sequence), streaming the weight
//! once in its stored `[out, in]` layout.
//!
//! Sampling is bound by reading the weights every step (540 MB for SmolLM2-135M in f32). candle's
//! GEMM packs an operand into blocks on each call, which at a handful of rows costs more memory
//! traffic than the multiply itself. These kernels read each weight row once, from where it lies:
//! - up to 7 rows (AVX-512) or 12 (AVX2), the row-dot kernels dot each weight row with every `x`
//!   row while it is in L1, and sum each dot product's lanes at the end;
//! - from 8 rows on AVX-512, the k-major kernel (`kmajor`) holds `x` column by column (four
//!   rows of four columns a vector) and broadcasts four weights at a time into all rows at once:
//!   no horizontal sums, one load of weights per `rows / 4` FMAs of 16 lanes. At 16 rows it
//!   reaches about 135 GFLOP/s in sampling, streaming the weights at 17 GB/s where a plain read
//!   of them runs at 22-25 (BENCHMARKS.md, "Few-row f32 products").
//!
//! AVX2 + FMA at least; callers fall back to candle otherwise. Inference only: no backward.

/// Rows of `x` up to which [`matmul_t`] is used with AVX2. Measured on SmolLM2 sampling (2
/// threads, against candle's GEMM): 1.06x at 1 row, 2.1x at 2, 1.5x at 4, 1.2x at 8, even at 12
/// to 16, 0.8x at 32.
pub const MAX_ROWS: usize = 12;

/// The same with AVX-512, whose kernels keep their sums in registers: at 16 rows they stay
/// bound by reading the weights, where candle's GEMM (packing `W` on every call) streamed them
/// at under half the machine's bandwidth.
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
    matmul_t_with(x, m, w, n, k, kernel_for(m))
}

/// The kernel [`matmul_t`] uses for `m` rows on this CPU.
pub fn kernel_for(m: usize) -> Kernel {
    if !avx512() {
        Kernel::RowsAvx2
    } else if m >= MIN_ROWS_KMAJOR {
        Kernel::KMajor
    } else {
        Kernel::RowsAvx512
    }
}

/// The kernels behind [`matmul_t`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kernel {
    /// Dot products of weight rows with `x` rows, AVX2 (`rows_dot_avx2`).
    RowsAvx2,
    /// The same on AVX-512 (`rows_dot_avx512`): bound by reading the weights at few rows.
    RowsAvx512,
    /// `x` held k-major, four weights at a time broadcast into all rows at once (`kmajor`).
    KMajor,
}

/// The kernels this CPU runs (for benchmarks and tests; [`matmul_t`] picks one).
pub fn kernels() -> Vec<Kernel> {
    match (available(), avx512()) {
        (false, _) => vec![],
        (true, false) => vec![Kernel::RowsAvx2],
        (true, true) => vec![Kernel::RowsAvx2, Kernel::RowsAvx512, Kernel::KMajor],
    }
}

/// [`matmul_t`] on a given kernel (one of [`kernels`]).
pub fn matmul_t_with(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    kernel: Kernel,
) -> Vec<f32> {
    assert!(available(), "gemv::matmul_t needs AVX2 and FMA");
    assert!(
        kernel == Kernel::RowsAvx2 || avx512(),
        "{kernel:?} needs AVX-512F"
    );
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
    let packed: Vec<Packed> = if kernel == Kernel::KMajor {
        (0..m)
            .step_by(KMAJOR_ROWS)
            .map(|r0| Packed::new(x, k, r0, (m - r0).min(KMAJOR_ROWS)))
            .collect()
    } else {
        Vec::new()
    };
    let mut y = vec![0f32; m * n];
    let out = Out {
        y: y.as_mut_ptr(),
        n,
    };
    // Each part computes `W_part x^T` ([rows, m]) a group of weight rows at a time, then turns it
    // into its columns of `y` while it is in cache. (The k-major kernel writing `y` itself, 16
    // rows apart, was a third slower: at the LM head's width every row's line falls in one L1
    // set. Transposing all parts after the threads joined, on one thread, took 6% of sampling.)
    let part = |o0: usize, wp: &[f32]| {
        let rows = wp.len() / k;
        let mut yt = vec![0f32; rows * m];
        match kernel {
            Kernel::KMajor => {
                for p in &packed {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: checked above that the CPU has AVX-512F; `p` was packed from `x`
                    // over `k` columns, `wp` holds whole weight rows of `k` values, `p.r0 +
                    // p.rows <= m`, and `yt` holds a value per (weight row, x row).
                    unsafe {
                        kmajor_any(p, m, wp, k, &mut yt)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = p;
                        unreachable!("available() is false off x86_64")
                    }
                }
            }
            _ => rows_dot(x, m, wp, k, &mut yt, kernel == Kernel::RowsAvx512),
        }
        // SAFETY: this part's weight rows are columns `o0..o0 + rows` of `y` (within `n`), and
        // no other part writes them.
        unsafe { out.at(o0).put_transposed(&yt, rows, m) }
    };
    if threads == 1 {
        part(0, w);
    } else {
        use rayon::prelude::*;
        w.par_chunks(per * k)
            .enumerate()
            .for_each(|(i, wp)| part(i * per, wp));
    }
    y
}

/// `out[o * m + r] = w[o] . x[r]` for every weight row `o` of `w` and row `r` of `x`.
fn rows_dot(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul_t` checked that the CPU has AVX2 and FMA (and AVX-512F when `wide`); slices
    // are laid out by construction (`w` holds whole rows of `k`, `out` one value per (row, x
    // row)).
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
            let mask = crate::first_lanes(k - i);
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

/// Rows of `x` from which the AVX-512 path holds `x` k-major ([`kmajor`]) instead of dotting
/// rows ([`rows_dot_avx512`]). `cargo bench -p preftune-kernels --bench gemv` (2 threads, medians
/// of two runs): at 8 rows the LM head took 6.5 against 8.0 ms and the MLP's shapes were even
/// (0.17-0.19 ms both); at 4 the row-dot kernel was faster everywhere (0.10 against 0.15 ms).
const MIN_ROWS_KMAJOR: usize = 8;

/// `x` rows in one k-major chunk: eight vectors of four rows.
const KMAJOR_ROWS: usize = 32;

/// `x` laid out for [`kmajor`]: for each block `b` of four columns, `v` vectors of 16 lanes, lane
/// `4q + g` of vector `c` holding `x[4c + q][4b + g]` (zeros past the last row and column).
fn pack_kmajor(x: &[f32], rows: usize, k: usize, v: usize) -> Vec<f32> {
    let mut xt = vec![0f32; k.div_ceil(4) * v * 16];
    for j in 0..rows {
        let (c, q) = (j / 4, j % 4);
        for (b, xs) in x[j * k..][..k].chunks(4).enumerate() {
            xt[(b * v + c) * 16 + 4 * q..][..xs.len()].copy_from_slice(xs);
        }
    }
    xt
}

/// `x` rows `r0..r0 + rows`, packed for [`kmajor`] with `v` vectors per block.
struct Packed {
    xt: Vec<f32>,
    r0: usize,
    rows: usize,
    v: usize,
}

impl Packed {
    /// Rows `r0..r0 + rows` of `x` ([_, k]), `rows <= KMAJOR_ROWS`.
    fn new(x: &[f32], k: usize, r0: usize, rows: usize) -> Packed {
        let v = kmajor_vectors(rows);
        let xt = pack_kmajor(&x[r0 * k..], rows, k, v);
        Packed { xt, r0, rows, v }
    }
}

/// Where [`matmul_t`]'s parts write: `y[r * n]` starts row `r` of the output.
#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    n: usize,
}

// SAFETY: an `Out` is only a place to write; the threads of [`matmul_t_with`] each write their
// own columns through it, and it does not outlive the `y` it was made from.
unsafe impl Send for Out {}
// SAFETY: as for `Send`: shared between threads that write disjoint elements.
unsafe impl Sync for Out {}

impl Out {
    /// The same output, starting at column `o0`.
    ///
    /// # Safety
    /// `o0` must be within row 0 of the output (`o0 <= n`).
    unsafe fn at(self, o0: usize) -> Out {
        // SAFETY: the caller keeps `o0` within row 0 of `y`.
        let y = unsafe { self.y.add(o0) };
        Out { y, n: self.n }
    }

    /// `y[r][o] = yt[o * m + r]` for `o < rows`, `r < m`, in tiles of 16 columns so that each
    /// row of `y` is written a line at a time.
    ///
    /// # Safety
    /// Columns `0..rows` of the output's `m` rows must be this caller's to write.
    unsafe fn put_transposed(self, yt: &[f32], rows: usize, m: usize) {
        assert_eq!(yt.len(), rows * m);
        for o in (0..rows).step_by(16) {
            let tile = (rows - o).min(16);
            for r in 0..m {
                let mut line = [0f32; 16];
                for (t, v) in line.iter_mut().enumerate().take(tile) {
                    *v = yt[(o + t) * m + r];
                }
                // SAFETY: the caller owns columns `0..rows` of row `r < m`; `o + tile <= rows`.
                let dst = unsafe { self.y.add(r * self.n + o) };
                if tile == 16 {
                    // A constant length: one 64-byte copy, not a call to `memmove` (6% of
                    // sampling with the length variable).
                    // SAFETY: as above, with `tile` 16.
                    unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), dst, 16) };
                } else {
                    for (t, v) in line.iter().enumerate().take(tile) {
                        // SAFETY: as above, `t < tile`.
                        unsafe { *dst.add(t) = *v };
                    }
                }
            }
        }
    }
}

/// Vectors of four `x` rows [`kmajor_any`] is instantiated for, to hold `rows` rows.
fn kmajor_vectors(rows: usize) -> usize {
    match rows.div_ceil(4) {
        5 | 6 => 6,
        v if v > 6 => 8,
        v => v,
    }
}

/// [`kmajor`] instantiated for `p.v` vectors ([`kmajor_vectors`]), with as many weight rows per
/// pass as keep 24 accumulators.
///
/// # Safety
/// The CPU must have AVX-512F. `p.xt` was packed by [`pack_kmajor`] for `p.v` vectors over `k`
/// columns, `w` holds whole rows of `k` values, `p.r0 + p.rows <= m`, and `out` holds
/// `w.len() / k * m` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kmajor_any(p: &Packed, m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    // Blocking the columns so that `xt`'s part stays in L1 (with panels of weight rows kept in
    // L2 between blocks) ran at half this speed on SmolLM2's shapes: each weight row is read
    // in one pass instead.
    let a = Args {
        xt: &p.xt,
        rn: p.rows,
        r0: p.r0,
        m,
        w,
        k,
    };
    // SAFETY: the caller upholds [`kmajor`]'s contract.
    unsafe {
        match p.v {
            1 => kmajor::<1, 24>(a, out),
            2 => kmajor::<2, 12>(a, out),
            3 => kmajor::<3, 8>(a, out),
            4 => kmajor::<4, 6>(a, out),
            6 => kmajor::<6, 4>(a, out),
            8 => kmajor::<8, 3>(a, out),
            v => unreachable!("kmajor_vectors gives no {v}"),
        }
    }
}

/// What [`kmajor`] reads.
struct Args<'a> {
    /// `x` rows `r0..r0 + rn` as [`pack_kmajor`] lays them out.
    xt: &'a [f32],
    rn: usize,
    r0: usize,
    /// All rows of `x` (the stride of the output).
    m: usize,
    /// Whole weight rows of `k` values.
    w: &'a [f32],
    k: usize,
}

/// `out[o * m + r0 + j] = w[o] . x[r0 + j]` for `j < rn`.
///
/// Each weight row's four values at a block are broadcast to all 16 lanes at once (one load,
/// no shuffle) and multiplied into `V` vectors of four `x` rows each: `R` weight rows make
/// `R * V` accumulators, `V` loads of `x` and `R` broadcasts per `R * V` FMAs. The row-dot
/// kernel needs a load of `x` per FMA and 16 horizontal sums per pass; here each row's four
/// column partials are summed once at the end, ((g0 + g1) + (g2 + g3)).
///
/// # Safety
/// The CPU must have AVX-512F. `a.w` holds whole rows of `a.k` values, `a.xt` holds
/// `a.k.div_ceil(4) * 16 * V` values, `a.rn <= 4 * V`, `a.r0 + a.rn <= a.m`, and `out` holds
/// `a.w.len() / a.k * a.m` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kmajor<const V: usize, const R: usize>(a: Args, out: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
    // unsafe operation below: weight reads stay within the rows `wp` points at (full blocks
    // below `k`, the last partial block copied through `tail`), `x` reads within `xt`, stores
    // within `out` (masked to the rows below `rn`).
    unsafe {
        use std::arch::x86_64::*;
        let Args {
            xt,
            rn,
            r0,
            m,
            w,
            k,
        } = a;
        let rows = w.len() / k;
        let xp = xt.as_ptr();
        // Blocks of four columns: `0..full` whole, then a partial one if `k` ends in one.
        let full = k / 4;
        // Lanes 0..4 of a vector's sums hold x rows 4c..4c+4; `rn` bounds the last vector.
        let masks: [__mmask16; V] =
            std::array::from_fn(|c| crate::first_lanes(rn.saturating_sub(4 * c).min(4)));
        let mut o = 0;
        while o < rows {
            let wn = (rows - o).min(R);
            // A short last group repeats its last row (its sums are not stored).
            let wp: [*const f32; R] =
                std::array::from_fn(|i| w.as_ptr().add((o + a_min(i, wn - 1)) * k));
            // The next group's rows, fetched into L2 a line per four blocks while this one is
            // summed (into L1 instead was 7% slower on the LM head: the lines displaced `xt`).
            let next = (rows - o - wn).min(R);
            let np = w.as_ptr().add((o + wn) * k);
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            // Registers: `R * V` accumulators, plus either the block's `V` vectors of `x` (one
            // broadcast at a time) or its `R` broadcasts (one vector of `x` at a time), whichever
            // is fewer: 8 x 3 with all of `x` held needs 33 of the 32 and spills.
            macro_rules! block {
                ($b:expr, $load:expr) => {{
                    let b = $b;
                    let xs = xp.add(b * V * 16);
                    if V <= R {
                        let xv: [__m512; V] =
                            std::array::from_fn(|c| _mm512_loadu_ps(xs.add(c * 16)));
                        for (acc_i, wi) in acc.iter_mut().zip(&wp) {
                            let wb = _mm512_broadcast_f32x4($load(wi.add(b * 4)));
                            for (acc_c, xc) in acc_i.iter_mut().zip(&xv) {
                                *acc_c = _mm512_fmadd_ps(wb, *xc, *acc_c);
                            }
                        }
                    } else {
                        let wb: [__m512; R] = std::array::from_fn(|i| {
                            _mm512_broadcast_f32x4($load(wp[i].add(b * 4)))
                        });
                        for c in 0..V {
                            let xc = _mm512_loadu_ps(xs.add(c * 16));
                            for (acc_i, wbi) in acc.iter_mut().zip(&wb) {
                                acc_i[c] = _mm512_fmadd_ps(*wbi, xc, acc_i[c]);
                            }
                        }
                    }
                }};
            }
            let load = |p: *const f32| _mm_loadu_ps(p);
            let mut b = 0;
            while b + 4 <= full {
                for i in 0..next {
                    _mm_prefetch::<_MM_HINT_T1>(np.add(i * k + b * 4) as *const i8);
                }
                for d in 0..4 {
                    block!(b + d, load);
                }
                b += 4;
            }
            while b < full {
                block!(b, load);
                b += 1;
            }
            if full * 4 < k {
                let tail = |p: *const f32| {
                    let mut t = [0f32; 4];
                    for (g, tg) in t.iter_mut().enumerate().take(k - full * 4) {
                        *tg = *p.add(g);
                    }
                    _mm_loadu_ps(t.as_ptr())
                };
                block!(full, tail);
            }
            // `continue` rather than `take(wn)`: a loop of constant length indexes `acc` by
            // constants, which keeps it in registers; `take` made LLVM spill every accumulator
            // after every FMA (half the speed).
            for (i, acc_i) in acc.iter().enumerate() {
                if i >= wn {
                    continue;
                }
                for (c, v) in acc_i.iter().enumerate() {
                    // A vector past the chunk's rows (`kmajor_vectors` rounds 5 up to 6 and 7
                    // up to 8) stores nothing, and its place may lie past the end of `out`.
                    if masks[c] == 0 {
                        continue;
                    }
                    // Lanes 4q..4q+4 hold x row 4c + q's four column partials.
                    let s = _mm512_add_ps(*v, _mm512_permute_ps::<0b10_11_00_01>(*v));
                    let s = _mm512_add_ps(s, _mm512_permute_ps::<0b01_00_11_10>(s));
                    let sums = _mm512_maskz_compress_ps(0x1111, s);
                    let dst = out.as_mut_ptr().add((o + i) * m + r0 + 4 * c);
                    _mm512_mask_storeu_ps(dst, masks[c], sums);
                }
            }
            o += R;
        }
    }
}

/// `i.min(j)`, usable inside `array::from_fn` closures under `target_feature`.
#[inline(always)]
fn a_min(i: usize, j: usize) -> usize {
    i.min(j)
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
            (8, 1, 1),
            (17, 29, 33),
            (21, 30, 41),
            (24, 13, 577),
            (27, 7, 64),
            (30, 50, 19),
            (32, 6, 31),
            // Beyond 32 rows, chunks of 32 and a partial last one.
            (33, 20, 40),
            (40, 9, 100),
            (49, 37, 64),
            (64, 1001, 300),
        ] {
            let (x, w) = (rnd(m * k), rnd(n * k));
            // One thread, and three (unequal parts of the weight rows) where the work is split.
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                for kernel in kernels() {
                    let y = pool.install(|| matmul_t_with(&x, m, &w, n, k, kernel));
                    for r in 0..m {
                        for o in 0..n {
                            let want: f64 = (0..k)
                                .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                                .sum();
                            let got = y[r * n + o] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "{m}x{n}x{k} [{r},{o}] ({kernel:?}, {threads} threads): {got} vs \
                                 {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
