//! Small differentiable helpers the losses share, composed from candle ops that have a backward.
use candle_core::{Result, Tensor};

pub use preftune_model::ops::{log_sigmoid, sigmoid};

/// `logsumexp` over the last dimension of `[1, n]`, as a scalar.
pub fn logsumexp_vec(x: &Tensor) -> Result<Tensor> {
    preftune_model::ops::logsumexp_last(x)?
        .flatten_all()?
        .get(0)
}
