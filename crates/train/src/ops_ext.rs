//! Small differentiable helpers the losses share, composed from candle ops that have a backward.
use candle_core::{Result, Tensor};

/// `log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`, stable for large `|x|`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    x.minimum(0.0)? - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// `logsumexp` over the last dimension of `[1, n]`, as a scalar.
pub fn logsumexp_vec(x: &Tensor) -> Result<Tensor> {
    preftune_model::ops::logsumexp_last(x)?
        .flatten_all()?
        .get(0)
}
