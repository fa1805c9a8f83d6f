//! Rotary position embeddings.
use super::*;

/// Rotate-half RoPE (transformers' layout). `x`: `[B, H, T, Dh]`; `cos`, `sin`: `[B, 1, T, Dh/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if kernels::elementwise_applies(x) && cos.dtype() == x.dtype() {
        return kernels::rope(x, cos, sin);
    }
    rope_composed(x, cos, sin)
}

/// [`rope`] from candle ops.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let out2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[out1, out2], D::Minus1)
}
