//! Log-probabilities of given tokens: the quantity DPO, PPO, GRPO and reward scoring all start from.
//!
//! Only the scored positions go through the LM head, so prompt and padding tokens never produce a
//! `[T, V]` logits row, and rows are processed in chunks so that, outside autograd, at most
//! `CHUNK x V` logits exist at once.
use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::ops::logsumexp_last;

/// Rows of logits materialised at a time.
const CHUNK: usize = 512;

/// Per-token log-probs `[B, T]` (0 where not scored) and their per-sequence sums `[B]`, in f32 (f64
/// for an f64 model).
pub struct TokenLogprobs {
    pub per_token: Tensor,
    pub sum: Tensor,
    /// Per row: scored tokens that are the model's top-1 prediction (`mean_token_accuracy`).
    pub row_hits: Vec<usize>,
    /// Per row: sum over scored tokens of the mean logit over the vocabulary (TRL's `logits/*`).
    pub row_mean_logit_sum: Vec<f32>,
}

impl TokenLogprobs {
    /// Scored tokens that are the model's top-1 prediction, over all rows.
    pub fn argmax_hits(&self) -> usize {
        self.row_hits.iter().sum()
    }
}

/// `log p(input_ids[b, t] | input_ids[b, <t])` for every `t >= 1` with `mask[b, t] = 1`, from the
/// model's final hidden states `[B, T, H]`. Logits are divided by `temperature` first (as samplers
/// do, so recomputed log-probs match sampling log-probs). Differentiable w.r.t. `hidden` and the
/// LM head.
pub fn token_logprobs(
    model: &Model,
    hidden: &Tensor,
    input_ids: &Tensor,
    mask: &Tensor,
    temperature: f64,
) -> Result<TokenLogprobs> {
    let (b, t, h) = hidden.dims3()?;
    if input_ids.dims() != [b, t] || mask.dims() != [b, t] {
        return Err(Error::Msg(format!(
            "token_logprobs: hidden {:?}, input_ids {:?} and mask {:?} disagree",
            hidden.dims(),
            input_ids.dims(),
            mask.dims()
        )));
    }
    if temperature <= 0.0 {
        return Err(Error::Msg(format!(
            "temperature must be > 0, got {temperature}"
        )));
    }
    let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let m = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut src, mut dst, mut labels) = (vec![], vec![], vec![]);
    for row in 0..b {
        for pos in 1..t {
            if m[row][pos] != 0.0 {
                src.push((row * t + pos - 1) as u32);
                dst.push((row * t + pos) as u32);
                labels.push(ids[row][pos]);
            }
        }
    }
    let dev = hidden.device();
    // f64 models (gradient checks) keep f64; everything else is scored in f32.
    let dtype = if hidden.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut per_token = Tensor::zeros(b * t, dtype, dev)?;
    let mut row_hits = vec![0usize; b];
    let mut row_mean_logit_sum = vec![0f32; b];
    if !src.is_empty() {
        let flat = hidden.reshape((b * t, h))?;
        let mut pieces = vec![];
        for start in (0..src.len()).step_by(CHUNK) {
            let n = CHUNK.min(src.len() - start);
            let idx = Tensor::from_slice(&src[start..start + n], n, dev)?;
            let lab = Tensor::from_slice(&labels[start..start + n], (n, 1), dev)?;
            let mut logits = model
                .logits(&flat.index_select(&idx, 0)?)?
                .to_dtype(dtype)?;
            if temperature != 1.0 {
                logits = (logits / temperature)?;
            }
            let stats = logits.detach();
            let hits = stats
                .argmax_keepdim(1)?
                .eq(&lab)?
                .flatten_all()?
                .to_vec1::<u8>()?;
            let means = stats.mean(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for (k, (&h, &mu)) in hits.iter().zip(&means).enumerate() {
                let row = dst[start + k] as usize / t;
                row_hits[row] += h as usize;
                row_mean_logit_sum[row] += mu;
            }
            let picked = logits.gather(&lab, 1)?;
            pieces.push((picked - logsumexp_last(&logits)?)?.squeeze(1)?);
        }
        let lp = Tensor::cat(&pieces, 0)?;
        let dst = Tensor::from_vec(dst.clone(), src.len(), dev)?;
        per_token = per_token.index_add(&dst, &lp, 0)?;
    }
    let per_token = per_token.reshape((b, t))?;
    let sum = per_token.sum(1)?;
    Ok(TokenLogprobs {
        per_token,
        sum,
        row_hits,
        row_mean_logit_sum,
    })
}
