//! Softmax, log-sum-exp, RMSNorm and LayerNorm, in f32 whatever the weights' dtype.
use super::*;

/// Half-precision inputs are computed in f32 (as transformers does); f32 and f64 stay as they are.
pub(super) fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 | DType::F32 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// Softmax over the last dimension, in at least f32. The max is detached: it only stabilises.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log(sum(exp(x)))` over the last dimension, kept as size 1, in at least f32.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: normalise in at least f32, cast back, then scale.
/// The fused kernel when it applies, else composed.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::elementwise_applies(x) && weight.dtype() == x.dtype() {
        return kernels::rms_norm(x, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
}

/// [`rms_norm`] from candle ops.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centered
        .broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}
