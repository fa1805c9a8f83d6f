//! bf16 matrix products with f32 accumulation: the matmuls of `bf16` mixed-precision training,
//! whose master weights, optimiser state, norms and softmax stay in f32 (what `torch.autocast`
//! does on CPU).
//!
//! candle 0.11's bf16 matmul is no faster than its f32 one. Two instruction sets do better, and
//! one packed layout of the operands serves both:
//! - Intel AMX: `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32
//!   sums in one instruction.
//! - AVX-512 BF16 (AMD Zen 4/5, Intel Cooper Lake and later): `vdpbf16ps` adds 16 dot products
//!   of bf16 pairs to 16 f32 sums, twice the multiply-adds of an f32 FMA.
//!
//! Operands are packed by AVX-512BW kernels, which both have. Without either (another CPU, or
//! `PREFTUNE_NO_BF16_GEMM=1`) the operands get the same rounding and the product runs as an f32
//! GEMM, so every path gives the same numbers up to summation order. `PREFTUNE_NO_AMX=1` skips
//! AMX only.
use std::sync::OnceLock;

pub(crate) mod tiles;

/// A strided f32 matrix: element `(i, k)` is `data[i * rs + k * cs]`.
///
/// The fields are private and every constructor checks that the last element lies inside
/// `data`: the SIMD kernels load from a view without bounds checks, so a view is the proof
/// that those loads stay in the slice.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows x cols` matrix. Panics if `data` is shorter than `rows * cols`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// The transpose of a row-major `cols x rows` matrix, without copying. Panics if `data` is
    /// shorter than `rows * cols`.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, 1, rows)
    }

    /// Element `(i, k)` at `data[i * rs + k * cs]`, any strides. Panics unless every element lies
    /// in `data` (an empty view needs nothing).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
            assert!(
                last.is_some_and(|l| l < data.len()),
                "bf16gemm::View: a {rows} x {cols} view with strides ({rs}, {cs}) does not fit \
                 in {} values",
                data.len()
            );
        }
        View {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The data, rows, columns and strides (row, column).
    pub(crate) fn parts(&self) -> (&'a [f32], usize, usize, usize, usize) {
        (self.data, self.rows, self.cols, self.rs, self.cs)
    }

    pub(crate) fn get(&self, i: usize, k: usize) -> f32 {
        self.data[i * self.rs + k * self.cs]
    }
}

/// Which instructions run this process's bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// bf16-rounded operands through an f32 GEMM: the same numbers, slower than f32 mode.
    F32,
}

impl Backend {
    /// The name benchmarks and messages print.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Amx => "amx",
            Backend::Avx512Bf16 => "avx512-bf16",
            Backend::F32 => "f32-fallback",
        }
    }
}

/// The backend: AMX where the CPU has AMX-TILE, AMX-BF16 and AVX-512BW and the OS grants the tile
/// state (unless `PREFTUNE_NO_AMX` is set), else AVX-512 BF16 where the CPU has it and AVX-512BW,
/// else the f32 fallback; `PREFTUNE_NO_BF16_GEMM` forces the fallback.
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let off = |v: &str| std::env::var_os(v).is_some();
        if off("PREFTUNE_NO_BF16_GEMM") {
            Backend::F32
        } else if !off("PREFTUNE_NO_AMX") && imp::amx() {
            Backend::Amx
        } else if imp::avx512_bf16() {
            Backend::Avx512Bf16
        } else {
            Backend::F32
        }
    })
}

/// Whether this process can run `backend`'s instructions (AMX: granted the tiles), detected once.
pub(crate) fn runs(backend: Backend) -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    static DP: OnceLock<bool> = OnceLock::new();
    match backend {
        Backend::Amx => *AMX.get_or_init(imp::amx),
        Backend::Avx512Bf16 => *DP.get_or_init(imp::avx512_bf16),
        Backend::F32 => true,
    }
}

/// Whether bf16 products run on bf16 instructions (AMX or AVX-512 BF16), and so faster than f32.
pub fn available() -> bool {
    backend() != Backend::F32
}

/// Rounds to the nearest bf16 (ties to even), as the bits of its upper half. NaN stays NaN.
/// Branch-free, so that loops over it vectorise.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet = (b >> 16) | 0x40;
    (if x.is_nan() { quiet } else { rounded }) as u16
}

/// `x` rounded to bf16 and widened back.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// `B` converted once for many products (the LM head's weight across its row chunks): bf16 in
/// the pair layout both bf16 backends read, or bf16-rounded f32 rows for the fallback.
pub struct PackedB {
    rows: usize,
    cols: usize,
    data: Packed,
}

enum Packed {
    Pairs(Vec<u16>),
    Dense(Vec<f32>),
}

impl PackedB {
    pub fn new(b: View) -> Self {
        let data = if available() {
            Packed::Pairs(imp::pack_b(b))
        } else {
            Packed::Dense(rounded_rows(b))
        };
        PackedB {
            rows: b.rows,
            cols: b.cols,
            data,
        }
    }
}

/// `C = A B^T` with `A` (m x k) and `B` (n x k) rounded to bf16 and the sums kept in f32; `C` is
/// row-major m x n. With `accumulate`, adds to `C` instead of overwriting it.
pub fn gemm_nt(a: View, b: View, c: &mut [f32], accumulate: bool) {
    gemm_packed(a, &PackedB::new(b), c, accumulate)
}

/// [`gemm_nt`] with `B` packed beforehand.
pub fn gemm_packed(a: View, b: &PackedB, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.cols, "gemm: inner dimensions differ");
    assert_eq!(c.len(), a.rows * b.rows, "gemm: output size");
    if a.rows == 0 || b.rows == 0 {
        return;
    }
    match &b.data {
        // SAFETY: `pb` is `pack_b` of a view with `a`'s columns, `c` holds m x n values (both
        // asserted above) and `available()` chose a backend this CPU has.
        Packed::Pairs(pb) => unsafe {
            imp::gemm(backend(), a, pb, b.rows, c.as_mut_ptr(), accumulate)
        },
        Packed::Dense(d) => fallback(a, d, b.rows, c, accumulate),
    }
}

/// [`gemm_packed`] into a new `m x n` buffer. The bf16 backends write every value once, so the
/// buffer is not zeroed first (zeroing was a pass over memory as large as the product's output).
pub fn gemm_packed_new(a: View, b: &PackedB) -> Vec<f32> {
    assert_eq!(a.cols, b.cols, "gemm: inner dimensions differ");
    let len = a.rows * b.rows;
    match &b.data {
        Packed::Pairs(pb) if len > 0 => {
            let mut c: Vec<f32> = Vec::with_capacity(len);
            // SAFETY: `pb` is `pack_b` of a view with `a`'s columns (asserted), `c` has room for
            // m x n values, and pairs are packed only when the CPU has a bf16 backend.
            unsafe { imp::gemm(backend(), a, pb, b.rows, c.as_mut_ptr(), false) };
            // SAFETY: the product (accumulate = false) wrote all `len` values.
            unsafe { c.set_len(len) };
            c
        }
        _ => {
            let mut c = vec![0f32; len];
            gemm_packed(a, b, &mut c, false);
            c
        }
    }
}

/// [`gemm_nt`] into a new buffer (see [`gemm_packed_new`]).
pub fn gemm_nt_new(a: View, b: View) -> Vec<f32> {
    gemm_packed_new(a, &PackedB::new(b))
}

/// `v` as row-major f32 values rounded to bf16.
fn rounded_rows(v: View) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.rows * v.cols);
    for i in 0..v.rows {
        out.extend((0..v.cols).map(|k| round_bf16(v.get(i, k))));
    }
    out
}

/// The same rounding, then the f32 GEMM candle's CPU matmul uses ([`crate::f32gemm`]); `b`: `n`
/// rows from [`rounded_rows`].
fn fallback(a: View, b: &[f32], n: usize, c: &mut [f32], accumulate: bool) {
    assert_eq!(
        b.len(),
        n * a.cols,
        "bf16gemm fallback: b is not {n} rows of {}",
        a.cols
    );
    let dense = rounded_rows(a);
    crate::f32gemm::gemm_nt(
        View::rows(&dense, a.rows, a.cols),
        View::rows(b, n, a.cols),
        c,
        accumulate,
    )
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{bf16_bits, Backend, View};
    use std::arch::asm;
    use std::arch::x86_64::{__cpuid, __cpuid_count, _mm_prefetch, _MM_HINT_T0};

    /// Rows and columns of `C` per block: 2 x 2 tiles of 16 x 16.
    const BLOCK: usize = 32;
    /// bf16 values along `k` per tile step.
    const KSTEP: usize = 32;
    /// Bytes of A's rows per pass over B's panels (AMX): 256 rows at k = 576.
    const A_IN_L2: usize = 288 << 10;
    /// Tile steps between prefetching a tile of B and loading it.
    const PREFETCH: usize = 4;

    /// Whether the CPU has the AVX-512F and BW that the packing kernels use.
    fn avx512_bw() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// Whether the CPU has AVX-512 BF16 and the AVX-512BW the packing kernels use.
    pub fn avx512_bf16() -> bool {
        avx512_bw() && is_x86_feature_detected!("avx512bf16")
    }

    /// Whether the CPU has AMX-BF16 (and AVX-512BW) and Linux grants this process the tiles.
    pub fn amx() -> bool {
        // Leaf 7 is read only if the CPU reports it.
        let (tile, bf16) = {
            if __cpuid(0).eax < 7 {
                return false;
            }
            let l7 = __cpuid_count(7, 0);
            ((l7.edx >> 24) & 1 == 1, (l7.edx >> 22) & 1 == 1)
        };
        // The packing kernels use AVX-512BW, which every CPU with AMX has.
        if !(tile
            && bf16
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw"))
        {
            return false;
        }
        // Linux hands out the 8 KiB tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
        // XFEATURE_XTILEDATA), once per process.
        let rc: i64;
        // SAFETY: a syscall with integer arguments; it clobbers rcx and r11 only.
        unsafe {
            asm!("syscall", inlateout("rax") 158i64 => rc, in("rdi") 0x1023i64, in("rsi") 18i64,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        rc == 0
    }

    /// `ldtilecfg`'s 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// `A` as row-major bf16 rows of `kp` values (zero beyond `k` and beyond `m`), one block of 32
    /// rows per task. Every value is written, so the buffer is not zeroed first.
    pub(super) fn pack_a(a: View, mp: usize, kp: usize) -> Vec<u16> {
        use rayon::prelude::*;
        let mut out: Vec<u16> = Vec::with_capacity(mp * kp);
        out.spare_capacity_mut()[..mp * kp]
            .par_chunks_mut(BLOCK * kp)
            .enumerate()
            .for_each(|(blk, part)| {
                let dst = part.as_mut_ptr() as *mut u16;
                // SAFETY: `part` holds the block's 32 x kp values; the kernels write each once
                // and read `a` only within its rows and columns (masked loads beyond them).
                unsafe { simd::pack_a_block(a, blk * BLOCK, kp, dst) }
            });
        // SAFETY: every block wrote all of its `BLOCK * kp` values.
        unsafe { out.set_len(mp * kp) };
        out
    }

    /// `B` in AMX's pair layout: panels of 16 rows of `B` (columns of `C`), each `kp / 2` rows of
    /// 16 pairs `(B[j][2q], B[j][2q + 1])`, so that one tile row is 64 contiguous bytes. Every
    /// value is written, so the buffer is not zeroed first.
    pub fn pack_b(b: View) -> Vec<u16> {
        use rayon::prelude::*;
        let np = b.rows.div_ceil(BLOCK) * BLOCK;
        let kp = b.cols.div_ceil(KSTEP) * KSTEP;
        let mut out: Vec<u16> = Vec::with_capacity(np * kp);
        // Four panels per task: a transposed source then reads 64 contiguous values of each row.
        const GROUP: usize = 4;
        out.spare_capacity_mut()[..np * kp]
            .par_chunks_mut(kp * 16 * GROUP)
            .enumerate()
            .for_each(|(g, part)| {
                let dst = part.as_mut_ptr() as *mut u16;
                let panels = part.len() / (kp * 16);
                // SAFETY: `part` holds `panels` whole panels; the kernels write each value once
                // and read `b` only within its rows and columns.
                unsafe { simd::pack_b_panels(b, g * GROUP * 16, panels, kp, dst) }
            });
        // SAFETY: every panel wrote all of its `kp * 16` values.
        unsafe { out.set_len(np * kp) };
        out
    }

    /// [`pack_a`] on this thread into `dst` (resized to `mp * kp`, `mp` = rows rounded up to 32).
    /// Panics unless the CPU has AVX-512F and BW (every bf16 backend has them).
    pub(super) fn pack_a_into(a: View, kp: usize, dst: &mut Vec<u16>) {
        assert!(
            kp.is_multiple_of(KSTEP) && kp >= a.cols && avx512_bw(),
            "pack_a_into: kp {kp} for {} columns",
            a.cols
        );
        let mp = a.rows.div_ceil(BLOCK) * BLOCK;
        dst.clear();
        dst.reserve(mp * kp);
        for blk in 0..mp / BLOCK {
            // SAFETY: `dst` has room for `mp * kp` values and block `blk` writes its 32 x kp
            // of them; the packing kernels need AVX-512F and BW, which every bf16 backend has
            // (its caller packs pairs only on one).
            unsafe {
                simd::pack_a_block(a, blk * BLOCK, kp, dst.as_mut_ptr().add(blk * BLOCK * kp))
            }
        }
        // SAFETY: the blocks wrote all `mp * kp` values.
        unsafe { dst.set_len(mp * kp) };
    }

    /// [`pack_b`] on this thread into `dst` (resized to `np * kp`, `np` = rows rounded up to 32).
    /// Panics unless the CPU has AVX-512F and BW (every bf16 backend has them).
    pub(super) fn pack_b_into(b: View, kp: usize, dst: &mut Vec<u16>) {
        assert!(
            kp.is_multiple_of(KSTEP) && kp >= b.cols && avx512_bw(),
            "pack_b_into: kp {kp} for {} columns",
            b.cols
        );
        let np = b.rows.div_ceil(BLOCK) * BLOCK;
        dst.clear();
        dst.reserve(np * kp);
        // SAFETY: `dst` has room for the `np / 16` panels of `kp * 16` values the kernel writes;
        // AVX-512F and BW as in `pack_a_into`.
        unsafe {
            simd::pack_b_panels(b, 0, np / 16, kp, dst.as_mut_ptr());
            dst.set_len(np * kp);
        }
    }

    /// `c` (m x n, row-major) `=` or `+=` `A B^T` on this thread: `pa` rows of `kp` values (at
    /// least `m` rounded up to 32 of them), `pb` panels `panel` values apart (at least `n`
    /// rounded up to 32 columns, `kp` values along `k` each).
    ///
    /// # Safety
    /// `backend` is a bf16 backend this CPU has; the buffers hold what is stated above; `c` is
    /// valid for writes (and reads, if `accumulate`) of `m x n` values that nothing else touches.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        backend: Backend,
        pa: &[u16],
        pb: &[u16],
        (kp, panel): (usize, usize),
        m: usize,
        n: usize,
        c: *mut f32,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract is the kernels' (rows and columns from 0, multiples of 32).
        unsafe {
            match backend {
                Backend::Amx => blocks_of(pa, pb, kp, panel, n, 0..m, 0..n, Out(c), accumulate),
                Backend::Avx512Bf16 => {
                    dp::blocks_of(pa, pb, kp, panel, n, 0..m, 0..n, c, accumulate)
                }
                Backend::F32 => unreachable!("tile: the f32 fallback packs no pairs"),
            }
        }
    }

    /// `C = A B^T` from `pb`, `B` (n x k) packed by [`pack_b`], into `c` (m x n, row-major).
    ///
    /// # Safety
    /// `pb` is [`pack_b`] of an n x k view with `a`'s `k`; `c` is valid for writes of `m x n`
    /// values, which may be uninitialised unless `accumulate` (then they are read too), and no
    /// other reference to them is live; `backend` is one this CPU has (not [`Backend::F32`]).
    pub unsafe fn gemm(
        backend: Backend,
        a: View,
        pb: &[u16],
        n: usize,
        c: *mut f32,
        accumulate: bool,
    ) {
        let (m, k) = (a.rows, a.cols);
        let mp = m.div_ceil(BLOCK) * BLOCK;
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let pa = pack_a(a, mp, kp);
        let (row_blocks, col_blocks) = (mp / BLOCK, n.div_ceil(BLOCK));
        let threads = rayon::current_num_threads()
            .min((m * n * k / (1 << 20)).max(1))
            .clamp(1, row_blocks.max(col_blocks));
        let out = Out(c);
        // SAFETY: the backend's instructions are available (checked by the caller); the packed
        // buffers cover every read (rows up to a multiple of 32 of `pa`, all padded columns of
        // `pb`); each call writes only its own rows x columns of `c`, which holds m x n values.
        let run = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| unsafe {
            match backend {
                Backend::Amx => blocks_of(&pa, pb, kp, kp * 16, n, rows, cols, out, accumulate),
                Backend::Avx512Bf16 => {
                    dp::blocks_of(&pa, pb, kp, kp * 16, n, rows, cols, out.0, accumulate)
                }
                Backend::F32 => unreachable!("gemm: the f32 fallback packs no pairs"),
            }
        };
        if threads == 1 {
            return run(0..m, 0..n);
        }
        // Many rows (training): split C by blocks of rows; every part reads all of B. Few rows
        // (decoding): split by blocks of columns, so each thread streams its share of B, the
        // part of the work that costs.
        let by_rows = row_blocks >= threads;
        let (blocks, len) = if by_rows {
            (row_blocks, m)
        } else {
            (col_blocks, n)
        };
        let per = blocks.div_ceil(threads) * BLOCK;
        rayon::scope(|s| {
            for start in (0..len).step_by(per) {
                let (run, part) = (&run, start..(start + per).min(len));
                s.spawn(move |_| match by_rows {
                    true => run(part, 0..n),
                    false => run(0..m, part),
                });
            }
        });
    }

    /// `C`'s first element, shared by threads that write disjoint blocks of it.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: the threads given an `Out` write disjoint parts of one buffer that outlives them.
    unsafe impl Send for Out {}
    // SAFETY: as for `Send`: no two threads write the same element, and none reads another's.
    unsafe impl Sync for Out {}

    /// Computes the block `rows` x `cols` of `C` (row-major, `n` columns, at `out`); `rows.start`
    /// and `cols.start` are multiples of 32. Panels of `B` start `panel` values apart: `kp * 16`
    /// for a whole [`pack_b`], more when `pb` starts inside a longer one's panels (the first
    /// `kp` of its values along `k`, from some multiple of 32).
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process was granted the tiles ([`amx`]). `pa` is [`pack_a`]
    /// (rows padded to a multiple of 32, `kp` per row) and `pb` the panels of a [`pack_b`] (all
    /// padded columns), `panel >= kp * 16` values apart (a multiple of 512) with `kp` values
    /// each from its start, of products with `kp` a multiple of 32 covering `rows` and `cols`;
    /// `out` is valid for writes (and reads, if `accumulate`) of the block, and no other thread
    /// touches it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn blocks_of(
        pa: &[u16],
        pb: &[u16],
        kp: usize,
        panel: usize,
        n: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: Out,
        accumulate: bool,
    ) {
        // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
        // unsafe operation below.
        unsafe {
            #[repr(C, align(64))]
            struct Buf([f32; BLOCK * BLOCK]);
            let mut buf = Buf([0.0; BLOCK * BLOCK]);
            let a_stride = kp * 2;
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack));
            // Rows of A in chunks that stay in L2 while every panel of B passes by: with B's
            // panels outermost, all of A was read again from memory for each 32 columns.
            let per = (A_IN_L2 / (2 * kp)).max(BLOCK) / BLOCK * BLOCK;
            for chunk in rows.clone().step_by(per) {
                let chunk = chunk..(chunk + per).min(rows.end);
                for nb in cols.clone().step_by(BLOCK) {
                    let b0 = pb.as_ptr().add((nb / 16) * panel);
                    let b1 = b0.add(panel);
                    for mb in chunk.clone().step_by(BLOCK) {
                        let a0 = pa.as_ptr().add(mb * kp);
                        let a1 = a0.add(16 * kp);
                        let (h, w) = ((rows.end - mb).min(BLOCK), (cols.end - nb).min(BLOCK));
                        // A whole block of `C` is loaded into (when accumulating) and stored from the
                        // tiles in place: bouncing it through `buf` cost a copy as large as `C`.
                        let whole = h == BLOCK && w == BLOCK;
                        let c0 = out.0.add(mb * n + nb);
                        if whole && accumulate {
                            asm!(
                                "tileloadd tmm0, [{p0} + {s}*1]",
                                "tileloadd tmm1, [{p1} + {s}*1]",
                                "tileloadd tmm2, [{p2} + {s}*1]",
                                "tileloadd tmm3, [{p3} + {s}*1]",
                                p0 = in(reg) c0,
                                p1 = in(reg) c0.add(16),
                                p2 = in(reg) c0.add(16 * n),
                                p3 = in(reg) c0.add(16 * n + 16),
                                s = in(reg) n * 4,
                                options(nostack, readonly),
                            );
                        } else {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack)
                            );
                        }
                        for kk in (0..kp).step_by(KSTEP) {
                            // B streams from memory once (decoding reads every weight once per step):
                            // fetch the tiles PREFETCH steps ahead, which the hardware prefetcher does not
                            // do for tile loads by itself.
                            for line in (0..1024).step_by(64) {
                                let ahead = (kk + PREFETCH * KSTEP) * 32 + line;
                                _mm_prefetch::<_MM_HINT_T0>((b0 as *const i8).wrapping_add(ahead));
                                _mm_prefetch::<_MM_HINT_T0>((b1 as *const i8).wrapping_add(ahead));
                            }
                            if h <= 16 {
                                // At most 16 rows (decoding): the second row tile is padding, and
                                // multiplying it took half of the time (TDPBF16PS, not memory, bound
                                // a 16-row product: the LM head 3.7 -> 2.2 ms without it).
                                asm!(
                                    "tileloadd tmm4, [{a0} + {sa}*1]",
                                    "tileloadd tmm6, [{b0} + {sb}*1]",
                                    "tileloadd tmm7, [{b1} + {sb}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    a0 = in(reg) a0.add(kk),
                                    b0 = in(reg) b0.add(kk * 16),
                                    b1 = in(reg) b1.add(kk * 16),
                                    sa = in(reg) a_stride,
                                    sb = in(reg) 64usize,
                                    options(nostack, readonly),
                                );
                                continue;
                            }
                            asm!(
                                "tileloadd tmm4, [{a0} + {sa}*1]",
                                "tileloadd tmm5, [{a1} + {sa}*1]",
                                "tileloadd tmm6, [{b0} + {sb}*1]",
                                "tileloadd tmm7, [{b1} + {sb}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0.add(kk),
                                a1 = in(reg) a1.add(kk),
                                b0 = in(reg) b0.add(kk * 16),
                                b1 = in(reg) b1.add(kk * 16),
                                sa = in(reg) a_stride,
                                sb = in(reg) 64usize,
                                options(nostack, readonly),
                            );
                        }
                        if whole {
                            store_block(c0, n);
                            continue;
                        }
                        store_block(buf.0.as_mut_ptr(), BLOCK);
                        for i in 0..h {
                            let dst = out.0.add((mb + i) * n + nb);
                            let src = &buf.0[i * BLOCK..][..w];
                            if accumulate {
                                let dst = std::slice::from_raw_parts_mut(dst, w);
                                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                            } else {
                                // Raw copy: `C` may be uninitialised (no reference to it is formed).
                                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, w);
                            }
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack));
        }
    }

    /// Stores the 2 x 2 accumulator tiles as a 32 x 32 f32 block at `p`, rows `row` values apart.
    ///
    /// # Safety
    /// AMX is configured and `p` has room for 32 rows of `row` values (the last 32 of each used).
    #[inline(always)]
    unsafe fn store_block(p: *mut f32, row: usize) {
        // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
        // unsafe operation below.
        unsafe {
            asm!(
                "tilestored [{p0} + {s}*1], tmm0",
                "tilestored [{p1} + {s}*1], tmm1",
                "tilestored [{p2} + {s}*1], tmm2",
                "tilestored [{p3} + {s}*1], tmm3",
                p0 = in(reg) p,
                p1 = in(reg) p.add(16),
                p2 = in(reg) p.add(16 * row),
                p3 = in(reg) p.add(16 * row + 16),
                s = in(reg) row * 4,
                options(nostack),
            );
        }
    }

    /// The AVX-512 BF16 kernel: `vdpbf16ps` adds, in each of 16 f32 lanes, the dot product of
    /// one bf16 pair of `A` (broadcast) with one of `B`, so [`pack_b`]'s panels (16 pairs of `B`
    /// per 64 bytes) and [`pack_a`]'s rows (one pair of `A` per u32) feed it as they are.
    mod dp {
        use std::arch::x86_64::*;

        /// Rows of `C` per step: 8 rows x 32 columns of sums fill 16 of the 32 registers.
        const MR: usize = 8;

        /// The block `rows` x `cols` of `C` (row-major, `n` columns, at `out`); `rows.start`
        /// and `cols.start` are multiples of 32. For each 32 columns, the two panels of `B`
        /// (kp x 64 bytes: L1 or L2) are reused by every 8 rows of `A`; the sums stay in
        /// registers for the whole of `k` and are stored once (masked at the edges, so `C` may
        /// be uninitialised unless `accumulate`).
        ///
        /// # Safety
        /// The CPU has AVX-512F, BW and BF16. `pa` and `pb` are [`super::pack_a`] and the
        /// panels of a [`super::pack_b`] (`panel >= kp * 16` values apart, a multiple of 512)
        /// of products covering `rows` and `cols` (rows of `pa` padded to a multiple of 32,
        /// columns of `pb` likewise); `out` is valid for writes (and reads, if `accumulate`) of
        /// the block, and no other thread touches it.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn blocks_of(
            pa: &[u16],
            pb: &[u16],
            kp: usize,
            panel: usize,
            n: usize,
            rows: std::ops::Range<usize>,
            cols: std::ops::Range<usize>,
            out: *mut f32,
            accumulate: bool,
        ) {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                let steps = kp / 2; // pairs along k; one 64-byte row of a panel per pair
                for nb in cols.clone().step_by(32) {
                    let b0 = pb.as_ptr().add((nb / 16) * panel) as *const __m512i;
                    let b1 = b0.add(panel / 32);
                    let w = (cols.end - nb).min(32);
                    let (m0, m1) = (
                        crate::first_lanes(w),
                        crate::first_lanes(w.saturating_sub(16)),
                    );
                    for mb in rows.clone().step_by(MR) {
                        // Pairs of A as i32; a `Vec<u16>` promises only 2-byte alignment.
                        let a = pa.as_ptr().add(mb * kp) as *const i32;
                        let mut acc = [_mm512_setzero_ps(); 2 * MR];
                        for q in 0..steps {
                            let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(q)));
                            let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(q)));
                            for i in 0..MR {
                                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                                    a.add(i * steps + q).read_unaligned(),
                                ));
                                acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], x, v0);
                                acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], x, v1);
                            }
                        }
                        for i in 0..(rows.end - mb).min(MR) {
                            let c = out.add((mb + i) * n + nb);
                            for (h, m) in [(0, m0), (1, m1)] {
                                if m == 0 {
                                    continue;
                                }
                                let (c, mut v) = (c.add(16 * h), acc[2 * i + h]);
                                if accumulate {
                                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c));
                                }
                                _mm512_mask_storeu_ps(c, m, v);
                            }
                        }
                    }
                }
            }
        }
    }

    /// AVX-512 packing kernels (both backends need AVX-512BW; `amx` and `avx512_bf16` check
    /// it). The rounding is [`super::bf16_bits`] lane by lane, so packed values equal the scalar
    /// ones.
    mod simd {
        use super::{View, BLOCK, KSTEP};
        use std::arch::x86_64::*;

        /// Each f32 lane rounded to bf16 (ties to even, NaN quiet) in the upper half of its u32.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn round_hi(x: __m512) -> __m512i {
            let b = _mm512_castps_si512(x);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)))
        }

        /// 32 consecutive values (`lo` then `hi`) as 32 bf16 in order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn round_row(lo: __m512, hi: __m512) -> __m512i {
            // The upper u16 of every u32: indices 1, 3, .., 63 of `lo ++ hi`.
            let idx = _mm512_set_epi16(
                63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23,
                21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
            );
            _mm512_permutex2var_epi16(round_hi(lo), idx, round_hi(hi))
        }

        /// u32 lane `j` = `(bf16(b[j]) << 16) | bf16(a[j])`: one row of pairs.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn pairs(a: __m512, b: __m512) -> __m512i {
            _mm512_mask_blend_epi16(
                0xAAAA_AAAA,
                _mm512_srli_epi32::<16>(round_hi(a)),
                round_hi(b),
            )
        }

        /// Transposes 16 rows of 16 u32.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn transpose16(r: &mut [__m512i; 16]) {
            let mut t = [_mm512_setzero_si512(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + c]: rows 4g..4g+4 at column 4L + c in 128-bit lane L.
            let mut u = [_mm512_setzero_si512(); 16];
            for g in 0..4 {
                let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            for c in 0..4 {
                let x_lo = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
                let x_hi = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
                let y_lo = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
                let y_hi = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
                r[c] = _mm512_shuffle_i32x4::<0x88>(x_lo, y_lo);
                r[4 + c] = _mm512_shuffle_i32x4::<0xDD>(x_lo, y_lo);
                r[8 + c] = _mm512_shuffle_i32x4::<0x88>(x_hi, y_hi);
                r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(x_hi, y_hi);
            }
        }

        /// Lanes `0..n` of 16 f32 at `p` (`n` <= 16); zeros elsewhere, which are not read.
        ///
        /// # Safety
        /// The CPU has AVX-512F; `p` is valid for reads of `n.min(16)` f32 (none if `n == 0`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn load(p: *const f32, n: usize) -> __m512 {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                match n {
                    16.. => _mm512_loadu_ps(p),
                    0 => _mm512_setzero_ps(),
                    _ => _mm512_maskz_loadu_ps(crate::first_lanes(n), p),
                }
            }
        }

        /// Row `i` of `v`, values `k..k + 32` (zeros beyond its columns) as 32 bf16.
        ///
        /// # Safety
        /// The CPU has AVX-512F and BW; `v.cs == 1` and `i < v.rows`. The loads then read only
        /// row `i`'s columns, which [`View`]'s constructors proved lie in `v.data`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn row_chunk(v: View, i: usize, k: usize) -> __m512i {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                // `wrapping_add`: past the last column the pointer is never read.
                let p = v.data.as_ptr().wrapping_add(i * v.rs + k);
                let n = v.cols.saturating_sub(k);
                round_row(
                    load(p, n),
                    load(p.wrapping_add(16.min(n)), n.saturating_sub(16)),
                )
            }
        }

        /// Values `(i0..i0 + 16, k)` of a view with `rs == 1` (zeros beyond its rows/columns).
        ///
        /// # Safety
        /// The CPU has AVX-512F; `v.rs == 1`. The load reads only elements of the view, which
        /// [`View`]'s constructors proved lie in `v.data`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn column_chunk(v: View, i0: usize, k: usize) -> __m512 {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                if k >= v.cols || i0 >= v.rows {
                    return _mm512_setzero_ps();
                }
                load(v.data.as_ptr().add(i0 + k * v.cs), v.rows - i0)
            }
        }

        /// Rows `i0..i0 + 32` of `A` packed at `dst` (32 rows of `kp`).
        ///
        /// # Safety
        /// The CPU has AVX-512F and BW; `kp` is a multiple of 32 at least `a.cols`, and `dst` is
        /// valid for writes of `32 * kp` u16. Reads of `a` stay inside the view (rows past
        /// `a.rows` are written as zeros, never read).
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) unsafe fn pack_a_block(a: View, i0: usize, kp: usize, dst: *mut u16) {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                let store = |ii: usize, k: usize, v: __m512i| {
                    _mm512_storeu_si512(dst.add(ii * kp + k) as *mut __m512i, v)
                };
                if a.cs == 1 {
                    for ii in 0..BLOCK {
                        for k in (0..kp).step_by(KSTEP) {
                            let v = match i0 + ii < a.rows {
                                true => row_chunk(a, i0 + ii, k),
                                false => _mm512_setzero_si512(),
                            };
                            store(ii, k, v);
                        }
                    }
                } else if a.rs == 1 {
                    // A transposed source (backward's dy^T): pairs of columns k, k + 1 for 16 rows at
                    // a time, then a 16 x 16 transpose of the pairs gives 16 rows of 32 values.
                    for k0 in (0..kp).step_by(KSTEP) {
                        for half in 0..2 {
                            let r0 = i0 + 16 * half;
                            let mut p = [_mm512_setzero_si512(); 16];
                            for (q, pq) in p.iter_mut().enumerate() {
                                let k = k0 + 2 * q;
                                *pq = pairs(column_chunk(a, r0, k), column_chunk(a, r0, k + 1));
                            }
                            transpose16(&mut p);
                            for (ii, v) in p.into_iter().enumerate() {
                                store(16 * half + ii, k0, v);
                            }
                        }
                    }
                } else {
                    for ii in 0..BLOCK {
                        for k in 0..kp {
                            let v = match i0 + ii < a.rows && k < a.cols {
                                true => super::bf16_bits(a.get(i0 + ii, k)),
                                false => 0,
                            };
                            dst.add(ii * kp + k).write(v);
                        }
                    }
                }
            }
        }

        /// `panels` panels of 16 rows of `B` from row `j0`, packed at `dst` (`kp * 16` each).
        ///
        /// # Safety
        /// The CPU has AVX-512F and BW; `kp` is a multiple of 32 at least `b.cols`, and `dst` is
        /// valid for writes of `panels * kp * 16` u16. Reads of `b` stay inside the view.
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(super) unsafe fn pack_b_panels(
            b: View,
            j0: usize,
            panels: usize,
            kp: usize,
            dst: *mut u16,
        ) {
            // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
            // unsafe operation below.
            unsafe {
                let store = |p: usize, q: usize, v: __m512i| {
                    _mm512_storeu_si512(dst.add(p * kp * 16 + q * 32) as *mut __m512i, v)
                };
                if b.cs == 1 {
                    // Per 32 values of `k`: 16 rows of 16 pairs, transposed into 16 rows of pairs.
                    for p in 0..panels {
                        let jp = j0 + 16 * p;
                        for k0 in (0..kp).step_by(KSTEP) {
                            let mut r = [_mm512_setzero_si512(); 16];
                            for (jj, rj) in r.iter_mut().enumerate() {
                                if jp + jj < b.rows {
                                    *rj = row_chunk(b, jp + jj, k0);
                                }
                            }
                            transpose16(&mut r);
                            for (q, v) in r.into_iter().enumerate() {
                                store(p, k0 / 2 + q, v);
                            }
                        }
                    }
                } else if b.rs == 1 {
                    // A transposed source (backward's W^T and x^T): 16 contiguous values of rows k
                    // and k + 1 make one row of pairs; the task's panels read 64 values of each row.
                    for k in (0..kp).step_by(2) {
                        for p in 0..panels {
                            let jp = j0 + 16 * p;
                            store(
                                p,
                                k / 2,
                                pairs(column_chunk(b, jp, k), column_chunk(b, jp, k + 1)),
                            );
                        }
                    }
                } else {
                    for p in 0..panels {
                        for k in 0..kp {
                            for jj in 0..16 {
                                let j = j0 + 16 * p + jj;
                                let v = match j < b.rows && k < b.cols {
                                    true => super::bf16_bits(b.get(j, k)),
                                    false => 0,
                                };
                                dst.add(p * kp * 16 + (k / 2) * 32 + jj * 2 + (k % 2))
                                    .write(v);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    pub fn amx() -> bool {
        false
    }
    pub fn avx512_bf16() -> bool {
        false
    }
    pub fn pack_b(_: super::View) -> Vec<u16> {
        unreachable!("no bf16 instructions here")
    }
    pub(super) fn pack_a(_: super::View, _: usize, _: usize) -> Vec<u16> {
        unreachable!("no bf16 instructions here")
    }
    pub(super) fn pack_a_into(_: super::View, _: usize, _: &mut Vec<u16>) {
        unreachable!("no bf16 instructions here")
    }
    pub(super) fn pack_b_into(_: super::View, _: usize, _: &mut Vec<u16>) {
        unreachable!("no bf16 instructions here")
    }
    /// Never called: no backend packs pairs here.
    ///
    /// # Safety
    /// None needed; it only panics. It is `unsafe` to match the x86-64 signature.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        _: super::Backend,
        _: &[u16],
        _: &[u16],
        _: (usize, usize),
        _: usize,
        _: usize,
        _: *mut f32,
        _: bool,
    ) {
        unreachable!("no bf16 instructions here")
    }
    /// Never called: no backend packs pairs here.
    ///
    /// # Safety
    /// None needed; it only panics. It is `unsafe` to match the x86-64 signature.
    pub unsafe fn gemm(
        _: super::Backend,
        _: super::View,
        _: &[u16],
        _: usize,
        _: *mut f32,
        _: bool,
    ) {
        // SAFETY: the caller upholds this function's `# Safety` contract, which covers every
        // unsafe operation below.
        unsafe { unreachable!("no bf16 instructions here") }
    }
}

/// Every backend this CPU can run, the fallback last: each test covers them all.
#[cfg(test)]
pub(crate) fn backends() -> Vec<Backend> {
    let mut v = Vec::new();
    if imp::amx() {
        v.push(Backend::Amx);
    }
    if imp::avx512_bf16() {
        v.push(Backend::Avx512Bf16);
    }
    v.push(Backend::F32);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: View, b: View) -> Vec<f32> {
        let mut c = vec![0f32; a.rows * b.rows];
        for i in 0..a.rows {
            for j in 0..b.rows {
                let s: f64 = (0..a.cols)
                    .map(|k| round_bf16(a.get(i, k)) as f64 * round_bf16(b.get(j, k)) as f64)
                    .sum();
                c[i * b.rows + j] = s as f32;
            }
        }
        c
    }

    /// [`gemm_nt`] on the given backend.
    fn gemm_on(be: Backend, a: View, b: View, c: &mut [f32], accumulate: bool) {
        match be {
            Backend::F32 => fallback(a, &rounded_rows(b), b.rows, c, accumulate),
            _ => {
                assert_eq!(c.len(), a.rows * b.rows);
                // SAFETY: `be` came from `backends()` (this CPU has it), `c` holds m x n values
                // and the pairs are `pack_b` of `b`.
                unsafe { imp::gemm(be, a, &imp::pack_b(b), b.rows, c.as_mut_ptr(), accumulate) }
            }
        }
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The vectorised packing gives `bf16_bits` of every value, in AMX's pair layout (`B`) and in
    /// rows (`A`), for row-major, transposed and other strided sources, ties, NaN, infinities and
    /// denormals included.
    #[test]
    fn packing_rounds_each_value_as_the_scalar_code() {
        if backends() == [Backend::F32] {
            eprintln!("no bf16 instructions on this CPU: nothing is packed");
            return;
        }
        let (n, k) = (37, 70);
        let special = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::NAN,
            // NaNs whose payload lies in the low half: plain rounding would carry into infinity.
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            -3.7,
            f32::MAX,
        ];
        let mut b = data(n * k, 5);
        for (t, v) in b.iter_mut().enumerate().filter(|(t, _)| t % 7 == 0) {
            *v = special[t / 7 % special.len()];
        }
        let bt: Vec<f32> = (0..k * n).map(|t| b[(t % n) * k + t / n]).collect();
        let spread: Vec<f32> = b.iter().flat_map(|&v| [v, 0.0]).collect();
        let strided = View::strided(&spread, n, k, 2 * k, 2);
        let (np, kp) = (64, 96);
        let mut want = vec![0u16; np * kp];
        for j in 0..n {
            for kk in 0..k {
                want[(j / 16) * kp * 16 + (kk / 2) * 32 + (j % 16) * 2 + kk % 2] =
                    bf16_bits(b[j * k + kk]);
            }
        }
        // `pack_a`: row-major rows of `kp`, zero beyond the matrix.
        let mut want_a = vec![0u16; np * kp];
        for j in 0..n {
            for kk in 0..k {
                want_a[j * kp + kk] = bf16_bits(b[j * k + kk]);
            }
        }
        for (name, v) in [
            ("rows", View::rows(&b, n, k)),
            ("transposed", View::transposed(&bt, n, k)),
            ("strided", strided),
        ] {
            assert_eq!(imp::pack_b(v), want, "pack_b {name}");
            assert_eq!(imp::pack_a(v, np, kp), want_a, "pack_a {name}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nan() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    /// Odd sizes (edge blocks, `k` not a multiple of 32) and the strided views that backward uses,
    /// on every backend this CPU has, against an f64 sum of the rounded operands.
    #[test]
    fn products_match_a_reference_on_odd_shapes_and_layouts() {
        eprintln!("backends: {:?} (this process: {:?})", backends(), backend());
        for &(m, n, k) in &[
            (1, 1, 1),
            (37, 45, 70),
            (64, 32, 32),
            (100, 17, 129),
            (5, 300, 64),
            // 16 rows in a block (one row tile, the other skipped), alone and after a full one,
            // and 17 (both tiles).
            (16, 40, 96),
            (48, 33, 64),
            (17, 40, 96),
            (49, 33, 64),
            // Enough work for two threads: a few rows split by columns, many rows by rows.
            (4, 530, 1100),
            (70, 530, 600),
            // More rows per thread than one pass over B's panels takes (AMX: 256).
            (601, 70, 40),
        ] {
            let x = data(m * k, 1);
            let y = data(n * k, 2);
            let xt: Vec<f32> = (0..k * m).map(|t| x[(t % m) * k + t / m]).collect();
            let yt: Vec<f32> = (0..k * n).map(|t| y[(t % n) * k + t / n]).collect();
            let cases = [
                (View::rows(&x, m, k), View::rows(&y, n, k)),
                (View::transposed(&xt, m, k), View::rows(&y, n, k)),
                (View::rows(&x, m, k), View::transposed(&yt, n, k)),
                (View::transposed(&xt, m, k), View::transposed(&yt, n, k)),
            ];
            for (ci, (a, b)) in cases.into_iter().enumerate() {
                let want = reference(a, b);
                // Into a fresh, unzeroed buffer on this process's backend.
                let fresh = gemm_nt_new(a, b);
                for be in backends() {
                    let mut got = vec![0.5f32; m * n];
                    gemm_on(be, a, b, &mut got, false);
                    let mut acc = vec![0.5f32; m * n];
                    gemm_on(be, a, b, &mut acc, true);
                    if be == backend() {
                        assert_eq!(fresh, got, "{m}x{n}x{k} case {ci}: fresh buffer");
                    }
                    for t in 0..m * n {
                        let tol = 1e-5 * (1.0 + want[t].abs()) * (k as f32).sqrt();
                        assert!(
                            (got[t] - want[t]).abs() <= tol,
                            "{be:?} {m}x{n}x{k} case {ci} at {t}: {} vs {}",
                            got[t],
                            want[t]
                        );
                        assert!(
                            (acc[t] - 0.5 - want[t]).abs() <= tol,
                            "{be:?} accumulate {ci} at {t}"
                        );
                    }
                }
            }
        }
    }

    /// The bf16 backends and the f32 fallback agree, so a run means the same on any CPU.
    #[test]
    fn bf16_backends_agree_with_the_fallback() {
        let (m, n, k) = (300, 200, 576);
        let x = data(m * k, 3);
        let y = data(n * k, 4);
        let (a, b) = (View::rows(&x, m, k), View::rows(&y, n, k));
        let mut f = vec![0f32; m * n];
        gemm_on(Backend::F32, a, b, &mut f, false);
        for be in backends() {
            let mut got = vec![0f32; m * n];
            gemm_on(be, a, b, &mut got, false);
            let worst = got
                .iter()
                .zip(&f)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-3, "{be:?} vs fallback differ by {worst}");
        }
    }

    /// A view is checked against its slice when made: the kernels' unchecked loads rely on it.
    #[test]
    fn views_that_overrun_their_data_are_refused() {
        let d = [0f32; 12];
        let fits = [
            (3, 4, 4, 1),
            (4, 3, 1, 4),
            (2, 2, 10, 1),
            (0, 99, 99, 99),
            (6, 1, 2, 0),
        ];
        for (r, c, rs, cs) in fits {
            let v = View::strided(&d, r, c, rs, cs);
            assert_eq!((v.rows, v.cols), (r, c));
        }
        let overruns = [
            (4, 4, 4, 1),
            (3, 5, 1, 3),
            (2, 2, 11, 1),
            (1, 2, 0, usize::MAX),
        ];
        for (r, c, rs, cs) in overruns {
            let made = std::panic::catch_unwind(|| View::strided(&d, r, c, rs, cs));
            assert!(
                made.is_err(),
                "{r} x {c} strides ({rs}, {cs}) over 12 values"
            );
        }
        assert!(std::panic::catch_unwind(|| View::rows(&d, 4, 4)).is_err());
        assert!(std::panic::catch_unwind(|| View::transposed(&d, 5, 3)).is_err());
        // Before views were checked, this read 20 values past the slice's end on AVX-512.
        assert!(std::panic::catch_unwind(|| gemm_nt_new(
            View::rows(&d, 2, 16),
            View::rows(&d, 1, 16)
        ))
        .is_err());
    }
}
