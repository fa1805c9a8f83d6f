//! preftune's CPU kernels, on plain slices: no tensors, no autograd, no candle. The model crate
//! wraps them as candle ops (with hand-written backward where they train).
//!
//! - [`bf16gemm`]: bf16 products with f32 sums (Intel AMX, AVX-512 BF16; an f32 GEMM otherwise).
//! - [`f32gemm`]: f32 products over strided views (a weight's gradient in its own layout).
//! - [`gemv`]: `x W^T` for a few rows of `x` (decoding), streaming each weight row once.
//! - [`vmath`]: vectorised `exp`, max, sigmoid and softmax pieces over slices.
//! - [`attention`]: decoding attention for one KV group, scores never stored.
//! - [`flash`]: training attention in tiles (forward and backward), scores never stored and
//!   tiles the mask hides skipped.
//! - [`fused`]: the inner loops of the model's fused ops (RMSNorm, SwiGLU, RoPE, attention
//!   probabilities, softmax backward), generic over f32 and f64.
//! - [`lm_head`]: the fused LM head's row loops: each row's log-probability of its label, and its
//!   gradient in place.
//! - [`rng`]: counter-based random numbers (LoRA dropout masks), the same bits on a GPU.
//! - [`adamw`]: AdamW's elementwise update, in one pass or in the GPU kernels' two.
//!
//! Each kernel picks its instruction set at run time and has a portable path; `benches/` holds one
//! micro-benchmark per kernel (`cargo bench -p preftune-kernels`).
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod adamw;
pub mod attention;
pub mod bf16gemm;
pub mod f32gemm;
pub mod flash;
pub mod fused;
pub mod gemv;
pub mod lm_head;
pub mod rng;
pub mod vmath;

/// The AVX-512 mask of the first `min(n, 16)` of 16 lanes: a partial vector at a slice's end.
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// Deterministic values in [-1, 1), for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// [`test_values`] as f32.
#[cfg(test)]
pub(crate) fn test_values_f32(n: usize, seed: u64) -> Vec<f32> {
    test_values(n, seed).into_iter().map(|x| x as f32).collect()
}
