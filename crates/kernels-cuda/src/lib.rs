//! preftune's CUDA kernels: the sources (`src/cuda`), their entry points and launch shapes, and,
//! with the `cuda` feature, the PTX nvcc made of them. No candle here: the model crate wraps
//! them as candle ops with a backward, as it wraps `preftune-kernels` on the CPU.
//!
//! | family | entry points | launch |
//! |---|---|---|
//! | RMSNorm | `rmsnorm_fwd`, `rmsnorm_bwd` + `col_sum` | [`per_row`], [`rmsnorm_bwd`] + [`elementwise`] |
//! | SwiGLU | `swiglu_fwd`, `swiglu_bwd` | [`elementwise`] |
//! | RoPE | `rope` (backward: the same with `-sin`) | [`elementwise`] over `rows * dh / 2` |
//! | log-softmax + gather | `lse_gather`, `lse_gather_bwd` | [`per_row`], [`elementwise`] over `rows * V` |
//! | attention in tiles | `flash_fwd`, `flash_bwd_dq`, `flash_bwd_dkdv`, per head size | [`flash_rows`], [`flash_rows`], [`flash_keys`] |
//! | attention of a decoding step (no backward; f32 and bf16) | `flash_decode` per head size, then `flash_decode_combine` | [`flash_decode`], [`flash_decode_combine`] |
//! | LoRA dropout | `dropout` (`preftune-kernels`' `rng` bits; its own backward) | [`elementwise`] |
//! | AdamW, in place | `adamw_ema` (each moment), `adamw_param` (`preftune-kernels`' `adamw` bits) | [`elementwise`] |
//!
//! Each entry point exists for f32, bf16 and f64 ([`Dtype`]) and computes in f32 (f64 for f64),
//! but AdamW's, which is f32 only (master weights and moments are f32); the attention kernels
//! exist for the head sizes of [`flash_head_sizes`].
//!
//! The tests run the same sources on the CPU through a small emulator (`src/cuda/emu`: a
//! block's threads are OS threads meeting at a barrier), against `preftune-kernels`' CPU loops
//! and f64 references. That checks indexing, reductions and maths without a GPU; on a GPU,
//! `preftune check-kernels --device cuda` compares each op with its composed candle twin.

/// The PTX module's name in candle's per-device module cache.
pub const MODULE: &str = "preftune";

/// The kernels as PTX (target `compute_$CUDA_COMPUTE_CAP`, default 80).
#[cfg(feature = "cuda")]
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/preftune.ptx"));

/// The PTX target the kernels were built for (`CUDA_COMPUTE_CAP`: 80 is `compute_80`).
#[cfg(feature = "cuda")]
pub const COMPUTE_CAP: &str = env!("PREFTUNE_CUDA_COMPUTE_CAP");

/// Whether the PTX holds the tensor-core kernels: bf16 `wmma` needs `compute_80` or newer
/// (src/cuda/flash_tc.cuh leaves them out below).
#[cfg(feature = "cuda")]
pub fn tensor_core_kernels_built() -> bool {
    COMPUTE_CAP.parse::<u32>().is_ok_and(|c| c >= 80)
}

/// Element types with an entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F64,
}

impl Dtype {
    fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F64 => "f64",
        }
    }
}

/// The kernels' entry points, without their type suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    RmsNormFwd,
    RmsNormBwd,
    ColSum,
    SwigluFwd,
    SwigluBwd,
    Rope,
    LseGather,
    LseGatherBwd,
    /// Attention in tiles; entry points per head size ([`Kernel::name_for_head`]).
    FlashFwd,
    FlashBwdDq,
    FlashBwdDkdv,
    /// The attention forward and backward on tensor cores (bf16 products), head sizes 64 and 128.
    FlashFwdTc,
    FlashBwdDqTc,
    FlashBwdDkdvTc,
    /// A decoding step's attention in key chunks (flash-decoding), per head size; f32 and bf16.
    FlashDecode,
    /// Merges [`Kernel::FlashDecode`]'s partial results.
    FlashDecodeCombine,
    /// Inverted dropout with a mask from a counter-based stream (forward and backward).
    Dropout,
    /// AdamW's moment update in place (f32 only).
    AdamwEma,
    /// AdamW's parameter update in place from its moments (f32 only).
    AdamwParam,
}

impl Kernel {
    fn stem(self) -> &'static str {
        match self {
            Kernel::RmsNormFwd => "rmsnorm_fwd",
            Kernel::RmsNormBwd => "rmsnorm_bwd",
            Kernel::ColSum => "col_sum",
            Kernel::SwigluFwd => "swiglu_fwd",
            Kernel::SwigluBwd => "swiglu_bwd",
            Kernel::Rope => "rope",
            Kernel::LseGather => "lse_gather",
            Kernel::LseGatherBwd => "lse_gather_bwd",
            Kernel::FlashFwd => "flash_fwd",
            Kernel::FlashBwdDq => "flash_bwd_dq",
            Kernel::FlashBwdDkdv => "flash_bwd_dkdv",
            Kernel::FlashFwdTc => "flash_fwd_tc",
            Kernel::FlashBwdDqTc => "flash_bwd_dq_tc",
            Kernel::FlashBwdDkdvTc => "flash_bwd_dkdv_tc",
            Kernel::FlashDecode => "flash_decode",
            Kernel::FlashDecodeCombine => "flash_decode_combine",
            Kernel::Dropout => "dropout",
            Kernel::AdamwEma => "adamw_ema",
            Kernel::AdamwParam => "adamw_param",
        }
    }

    /// The PTX entry point, e.g. `rmsnorm_fwd_bf16`.
    pub fn name(self, t: Dtype) -> String {
        format!("{}_{}", self.stem(), t.suffix())
    }
}

/// Head sizes the attention kernels are built for, by element type (f64 only up to 64: its
/// shared tiles would not fit 48 KB).
pub fn flash_head_sizes(t: Dtype) -> &'static [usize] {
    match t {
        Dtype::F32 | Dtype::Bf16 => &[32, 64, 96, 128],
        Dtype::F64 => &[32, 64],
    }
}

impl Kernel {
    /// The attention kernels' entry point for head size `dh`, e.g. `flash_fwd_bf16_d64`.
    pub fn name_for_head(self, t: Dtype, dh: usize) -> String {
        format!("{}_d{dh}", self.name(t))
    }
}

/// Query rows a block of the attention forward and dQ kernels (one a thread), keys a block of
/// the dK/dV kernel (src/cuda/flash.cuh: `FLASH_BR`, `FLASH_BK`).
const FLASH_BR: usize = 64;
const FLASH_BK: usize = 32;

/// The attention forward or dQ kernel over `bg` groups of `r` query rows.
pub fn flash_rows(bg: usize, r: usize) -> Launch {
    Launch {
        grid: to_u32(r.div_ceil(FLASH_BR).max(1)),
        grid_y: to_u32(bg.max(1)),
        block: FLASH_BR as u32,
    }
}

/// Head sizes the tensor-core attention kernels are built for (f32 and bf16 inputs).
pub const FLASH_TC_HEAD_SIZES: [usize; 2] = [64, 128];

/// Query rows a block of the tensor-core forward and dQ kernels, and keys a block of their
/// dK/dV kernel, by head size (src/cuda/flash_tc.cuh: `TcShape`): 64 at head size 64, 32 at 128.
fn flash_tc_block(dh: usize) -> usize {
    if dh <= 64 {
        64
    } else {
        32
    }
}

/// The tensor-core attention forward and dQ kernels over `bg` groups of `r` query rows: warps
/// of 16 rows.
pub fn flash_tc_rows(bg: usize, r: usize, dh: usize) -> Launch {
    let rows = flash_tc_block(dh);
    Launch {
        grid: to_u32(r.div_ceil(rows).max(1)),
        grid_y: to_u32(bg.max(1)),
        block: to_u32(rows / 16 * 32),
    }
}

/// The tensor-core dK/dV kernel over `bg` groups of `tk` keys: warps of 16 keys.
pub fn flash_tc_keys(bg: usize, tk: usize, dh: usize) -> Launch {
    flash_tc_rows(bg, tk, dh)
}

/// The attention dK/dV kernel over `bg` groups of `tk` keys.
pub fn flash_keys(bg: usize, tk: usize) -> Launch {
    Launch {
        grid: to_u32(tk.div_ceil(FLASH_BK).max(1)),
        grid_y: to_u32(bg.max(1)),
        block: FLASH_BK as u32,
    }
}

/// Query heads a KV group at most for the decoding attention kernel (src/cuda/decode.cuh:
/// `DECODE_RMAX`), and its head sizes.
pub const DECODE_MAX_REP: usize = 8;
pub const DECODE_HEAD_SIZES: [usize; 4] = [32, 64, 96, 128];
/// Warps a block of the decoding attention kernel (`DECODE_WARPS`): a chunk is a multiple.
const DECODE_WARPS: usize = 4;
/// Blocks a decoding attention launch aims for: several per SM of the largest GPUs.
const DECODE_BLOCKS: usize = 1024;
/// Keys a block of the decoding attention kernel takes at least.
const DECODE_MIN_CHUNK: usize = 64;

/// The decoding attention kernel over `bg` groups of `tk` keys, and the keys each block takes
/// (its `chunk`): enough blocks to fill a GPU when the batch is small, chunks of at least 64 keys.
pub fn flash_decode(bg: usize, tk: usize) -> (Launch, u32) {
    let tk = tk.max(1);
    let splits = DECODE_BLOCKS
        .div_ceil(bg.max(1))
        .clamp(1, tk.div_ceil(DECODE_MIN_CHUNK));
    let chunk = tk.div_ceil(splits).div_ceil(DECODE_WARPS) * DECODE_WARPS;
    let launch = Launch {
        grid: to_u32(tk.div_ceil(chunk)),
        grid_y: to_u32(bg.max(1)),
        block: (DECODE_WARPS * 32) as u32,
    };
    (launch, to_u32(chunk))
}

/// The decoding attention's combine kernel over `rows` query rows (one block a row).
pub fn flash_decode_combine(rows: usize) -> Launch {
    Launch {
        grid: to_u32(rows.max(1)),
        grid_y: 1,
        block: 64,
    }
}

/// A launch of `grid` x `grid_y` blocks of `block` threads (a multiple of 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: u32,
    pub grid_y: u32,
    pub block: u32,
}

/// Threads a block for row kernels: enough for one value each up to 256, in whole warps.
const ROW_BLOCK: usize = 256;
/// Threads a block for elementwise kernels.
const ELEMENTWISE_BLOCK: usize = 256;
/// Blocks at most for grid-stride kernels (a few per SM on any current GPU).
const MAX_GRID: usize = 4096;
/// Blocks at most for RMSNorm's backward: each holds a partial `dw` of `d` values.
const MAX_NORM_BWD_GRID: usize = 512;

/// One block per row of `len` values (`rmsnorm_fwd`, `lse_gather`).
pub fn per_row(rows: usize, len: usize) -> Launch {
    Launch {
        grid: to_u32(rows.max(1)),
        grid_y: 1,
        block: to_u32(len.div_ceil(32).clamp(1, ROW_BLOCK / 32) * 32),
    }
}

/// A grid-stride launch over `n` elements.
pub fn elementwise(n: usize) -> Launch {
    Launch {
        grid: to_u32(n.div_ceil(ELEMENTWISE_BLOCK).clamp(1, MAX_GRID)),
        grid_y: 1,
        block: ELEMENTWISE_BLOCK as u32,
    }
}

/// `rmsnorm_bwd` over `rows` rows of `d`: its grid is also the number of partial `dw` rows
/// (`grid * d` accumulator values of scratch) that `col_sum` adds up.
pub fn rmsnorm_bwd(rows: usize, d: usize) -> Launch {
    Launch {
        grid: to_u32(rows.clamp(1, MAX_NORM_BWD_GRID)),
        grid_y: 1,
        block: per_row(1, d).block,
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_cover_their_work_in_whole_warps() {
        assert_eq!(
            per_row(3, 20),
            Launch {
                grid: 3,
                grid_y: 1,
                block: 32
            }
        );
        assert_eq!(
            per_row(3, 72),
            Launch {
                grid: 3,
                grid_y: 1,
                block: 96
            }
        );
        assert_eq!(per_row(3, 49152).block, 256);
        assert_eq!(
            elementwise(1),
            Launch {
                grid: 1,
                grid_y: 1,
                block: 256
            }
        );
        assert_eq!(elementwise(257).grid, 2);
        assert_eq!(elementwise(1 << 40).grid, 4096);
        assert_eq!(
            rmsnorm_bwd(10_000, 2048),
            Launch {
                grid: 512,
                grid_y: 1,
                block: 256
            }
        );
        assert_eq!(
            flash_rows(6, 65),
            Launch {
                grid: 2,
                grid_y: 6,
                block: 64
            }
        );
        assert_eq!(
            flash_keys(6, 65),
            Launch {
                grid: 3,
                grid_y: 6,
                block: 32
            }
        );
        // A small batch splits its keys over many blocks; a large one takes them whole.
        let (l, chunk) = flash_decode(6, 1000);
        assert_eq!((l.grid, l.grid_y, l.block, chunk), (16, 6, 128, 64));
        let (l, chunk) = flash_decode(4096, 301);
        assert_eq!((l.grid, chunk), (1, 304));
        let (l, chunk) = flash_decode(64, 150);
        assert_eq!((l.grid, chunk), (3, 52));
        assert_eq!(
            Kernel::FlashDecode.name_for_head(Dtype::Bf16, 128),
            "flash_decode_bf16_d128"
        );
        assert_eq!(
            Kernel::FlashBwdDq.name_for_head(Dtype::F32, 64),
            "flash_bwd_dq_f32_d64"
        );
        assert_eq!(
            Kernel::LseGatherBwd.name(Dtype::Bf16),
            "lse_gather_bwd_bf16"
        );
    }
}
