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
        let idx = Tensor::from_slice(&src, src.len(), dev)?;
        let rows = flat.index_select(&idx, 0)?;
        // The fused LM-head op knows no soft-capping (Gemma 2): those logits compose.
        let composed_only = model.cfg.final_logit_softcapping.is_some();
        let (lp, hits, means) = if dtype == DType::F64 || composed_only {
            composed(model, &rows, &labels, temperature, dtype)?
        } else if crate::kernels::cpu_kernels(dev) {
            fused(model, &rows, &labels, temperature)?
        } else if crate::kernels::cuda_kernels_apply(dev) {
            lse_chunks(model, &rows, &labels, temperature)?
        } else {
            composed(model, &rows, &labels, temperature, dtype)?
        };
        for (k, (&hit, &mu)) in hits.iter().zip(&means).enumerate() {
            let row = dst[k] as usize / t;
            row_hits[row] += hit as usize;
            row_mean_logit_sum[row] += mu;
        }
        let dst = Tensor::from_vec(dst, src.len(), dev)?;
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

/// Log-probs of `labels` from hidden rows `[N, H]`, with per-row top-1 hits and mean logits, through
/// the fused LM-head op (f32).
pub(crate) fn fused(
    model: &Model,
    rows: &Tensor,
    labels: &[u32],
    temperature: f64,
) -> Result<(Tensor, Vec<u8>, Vec<f32>)> {
    let op = crate::fused::LmHeadLogprob::new(
        rows,
        model.lm_head_weight(),
        labels.to_vec(),
        temperature,
    )?;
    let stats = op.stats.clone();
    let lab = Tensor::from_slice(labels, labels.len(), rows.device())?;
    let lp = rows.apply_op3(model.lm_head_weight(), &lab, op)?;
    let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((lp, s.hits, s.mean_logit))
}

/// The same through [`crate::lse_gather::lm_head_logprobs`] (the GPU's log-softmax + gather
/// kernels): no logits are kept for backward, which computes them again a chunk at a time.
pub(crate) fn lse_chunks(
    model: &Model,
    rows: &Tensor,
    labels: &[u32],
    temperature: f64,
) -> Result<(Tensor, Vec<u8>, Vec<f32>)> {
    let (lp, stats) = crate::lse_gather::lm_head_logprobs(
        rows,
        model.lm_head_weight(),
        labels,
        temperature,
        CHUNK,
    )?;
    Ok((lp, stats.hits, stats.mean_logit))
}

/// The same from composed candle ops, in chunks of `CHUNK` rows: the reference the fused op is
/// tested against, and the f64 path of gradient checks.
pub(crate) fn composed(
    model: &Model,
    rows: &Tensor,
    labels: &[u32],
    temperature: f64,
    dtype: DType,
) -> Result<(Tensor, Vec<u8>, Vec<f32>)> {
    let (mut pieces, mut hits, mut means) = (vec![], vec![], vec![]);
    let dev = rows.device();
    for start in (0..labels.len()).step_by(CHUNK) {
        let n = CHUNK.min(labels.len() - start);
        let lab = Tensor::from_slice(&labels[start..start + n], (n, 1), dev)?;
        let mut logits = model.logits(&rows.narrow(0, start, n)?)?.to_dtype(dtype)?;
        if temperature != 1.0 {
            logits = (logits / temperature)?;
        }
        let stats = logits.detach();
        hits.extend(
            stats
                .argmax_keepdim(1)?
                .eq(&lab)?
                .flatten_all()?
                .to_vec1::<u8>()?,
        );
        means.extend(stats.mean(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        pieces.push((logits.gather(&lab, 1)? - logsumexp_last(&logits)?)?.squeeze(1)?);
    }
    Ok((Tensor::cat(&pieces, 0)?, hits, means))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadOptions, Pretrained};
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// `max |a - b|` over `max |b|`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_diff(a, b) / max_diff(b, &b.zeros_like().unwrap())
    }

    /// A tiny fixture model, loaded with its weights as `Var`s.
    fn trainable(name: &str, dtype: DType) -> Pretrained {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models")
            .join(name);
        let opts = LoadOptions {
            trainable: true,
            dtype,
            ..Default::default()
        };
        Pretrained::load(&dir, &opts).unwrap()
    }

    /// Fused (f32) and the log-softmax + gather op (f32, as the GPU runs it) against composed
    /// (f64, itself checked against finite differences in ops.rs): log-probs, top-1 hits, mean
    /// logits, and gradients w.r.t. the hidden rows and the LM head.
    #[test]
    fn fused_lm_head_logprob_matches_composed_values_and_gradients() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let (p32, p64) = (trainable(name, DType::F32), trainable(name, DType::F64));
            // 300 rows: more than one chunk of the fused op (256).
            let h = Tensor::randn(0f32, 1.0, (300, 64), &Device::Cpu).unwrap();
            let labels: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 512).collect();
            type Path = fn(&Model, &Tensor, &[u32], f64) -> Result<(Tensor, Vec<u8>, Vec<f32>)>;
            // The LM head without kept logits, in 5 chunks of 64 rows (the last one short).
            let chunked: Path = |m, r, l, t| {
                let (lp, s) = crate::lse_gather::lm_head_logprobs(r, m.lm_head_weight(), l, t, 64)?;
                Ok((lp, s.hits, s.mean_logit))
            };
            let paths: [(&str, Path); 3] = [
                ("fused", fused),
                ("lse_gather", lse_chunks),
                ("lse_gather in chunks", chunked),
            ];
            for ((path, under_test), temperature) in
                paths.into_iter().flat_map(|p| [(p, 1.0), (p, 0.7)])
            {
                let name = format!("{name} {path}");
                let h32 = Var::from_tensor(&h).unwrap();
                let h64 = Var::from_tensor(&h.to_dtype(DType::F64).unwrap()).unwrap();
                let (a, hits_a, mean_a) =
                    under_test(&p32.model, h32.as_tensor(), &labels, temperature).unwrap();
                let (b, hits_b, mean_b) = composed(
                    &p64.model,
                    h64.as_tensor(),
                    &labels,
                    temperature,
                    DType::F64,
                )
                .unwrap();
                assert!(
                    max_diff(&a, &b) < 1e-4,
                    "{name} T={temperature}: log-probs differ by {}",
                    max_diff(&a, &b)
                );
                assert_eq!(hits_a, hits_b);
                assert!(mean_a
                    .iter()
                    .zip(&mean_b)
                    .all(|(x, y)| (x - y).abs() < 1e-4));
                // A weighted sum, so every row's gradient differs.
                let w: Vec<f32> = (0..300).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
                let w = Tensor::new(w, &Device::Cpu).unwrap();
                let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (b * w.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let dh = max_diff(
                    ga.get(h32.as_tensor()).unwrap(),
                    gb.get(h64.as_tensor()).unwrap(),
                );
                assert!(dh < 1e-4, "{name}: d/d hidden differs by {dh}");
                let (wa, wb) = (p32.model.lm_head_weight(), p64.model.lm_head_weight());
                let dw = max_diff(ga.get(wa).unwrap(), gb.get(wb).unwrap());
                assert!(dw < 1e-4, "{name}: d/d lm_head differs by {dw}");
                assert!(
                    ga.get(wa)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 1e-3
                );
            }
        }
    }

    /// A frozen LM head (LoRA) gets no gradient from the LM head without kept logits, and the
    /// hidden states' gradient is the same as with a trained head.
    #[test]
    fn lm_head_logprobs_skips_a_frozen_heads_gradient() {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (50, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (40, 16), &dev).unwrap();
        let labels: Vec<u32> = (0..50u32).map(|i| i % 40).collect();
        let grads = |w: &Tensor| {
            let hv = Var::from_tensor(&h).unwrap();
            let (lp, _) =
                crate::lse_gather::lm_head_logprobs(hv.as_tensor(), w, &labels, 1.0, 16).unwrap();
            let g = lp.sum_all().unwrap().backward().unwrap();
            (g.get(hv.as_tensor()).unwrap().clone(), g.get(w).cloned())
        };
        let wv = Var::from_tensor(&w).unwrap();
        let (dh_trained, dw) = grads(wv.as_tensor());
        let (dh_frozen, none) = grads(&w);
        assert!(dw.is_some() && none.is_none());
        assert_eq!(max_diff(&dh_trained, &dh_frozen), 0.0);
    }

    /// Under bf16 products the LM head without kept logits multiplies in bf16 (as on a GPU):
    /// log-probs and gradients stay within bf16's rounding of the f32 values, and differ from them.
    #[test]
    fn lm_head_logprobs_under_bf16_products_stays_within_rounding() {
        let p = trainable("tiny-llama", DType::F32);
        let h = Tensor::randn(0f32, 1.0, (100, 64), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 512).collect();
        let w = p.model.lm_head_weight();
        let run = |bf16: bool| {
            let _scope = crate::ops::Bf16Scope::new(bf16);
            let hv = Var::from_tensor(&h).unwrap();
            let (lp, _) =
                crate::lse_gather::lm_head_logprobs(hv.as_tensor(), w, &labels, 1.0, 32).unwrap();
            let g = lp.sum_all().unwrap().backward().unwrap();
            (
                lp,
                g.get(hv.as_tensor()).unwrap().clone(),
                g.get(w).unwrap().clone(),
            )
        };
        let (a, b) = (run(true), run(false));
        let (dl, dh, dw) = (
            rel_diff(&a.0, &b.0),
            rel_diff(&a.1, &b.1),
            rel_diff(&a.2, &b.2),
        );
        assert!(
            dl < 2e-2 && dh < 3e-2 && dw < 3e-2,
            "log-probs {dl}, d hidden {dh}, d weight {dw}"
        );
        assert!(dl > 0.0 && dh > 0.0, "bf16 products should round");
    }

    /// Under a bf16 scope the fused op runs its four products in bf16 (`preftune_kernels::bf16gemm`, itself
    /// checked exactly): log-probs and both gradients stay within bf16's rounding of the f32 op,
    /// and do differ from it, over more than one chunk.
    #[test]
    fn fused_lm_head_logprob_in_bf16_stays_within_rounding_of_f32() {
        let p = trainable("tiny-llama", DType::F32);
        let h = Tensor::randn(0f32, 1.0, (300, 64), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 512).collect();
        let w = Tensor::new(
            (0..300)
                .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let run = |bf16: bool| {
            let _scope = crate::ops::Bf16Scope::new(bf16);
            let hv = Var::from_tensor(&h).unwrap();
            let (lp, _, _) = fused(&p.model, hv.as_tensor(), &labels, 0.7).unwrap();
            let g = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let dh = g.get(hv.as_tensor()).unwrap().clone();
            let dw = g.get(p.model.lm_head_weight()).unwrap().clone();
            (lp, dh, dw)
        };
        let (a, dha, dwa) = run(false);
        let (b, dhb, dwb) = run(true);
        let d = max_diff(&a, &b);
        assert!(d < 0.05 && d > 0.0, "log-probs: bf16 vs f32 differ by {d}");
        for (what, x, y) in [("d/d hidden", &dhb, &dha), ("d/d lm_head", &dwb, &dwa)] {
            let rel = rel_diff(x, y);
            assert!(rel < 0.02 && rel > 0.0, "{what}: relative difference {rel}");
        }
    }

    #[test]
    fn fused_lm_head_logprob_matches_finite_differences() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-qwen2");
        let p = Pretrained::load(&dir, &LoadOptions::default()).unwrap();
        let base = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let labels = [5u32, 100, 400];
        let f = |h: &Tensor| {
            fused(&p.model, h, &labels, 1.3)
                .unwrap()
                .0
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let hv = Var::from_tensor(&base).unwrap();
        let g = fused(&p.model, hv.as_tensor(), &labels, 1.3)
            .unwrap()
            .0
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(hv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x = base.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in [0, 17, 70, 191] {
            let eps = 1e-2f32;
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += eps;
            b[i] -= eps;
            let fd = (f(&Tensor::from_vec(a, (3, 64), &Device::Cpu).unwrap())
                - f(&Tensor::from_vec(b, (3, 64), &Device::Cpu).unwrap()))
                / (2.0 * eps as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "element {i}: {} vs fd {fd}",
                g[i]
            );
        }
    }
}

/// What `preftune inspect` prints of one prompt: per position the `k` most likely next tokens
/// with their logits (best first), the last position's logits and the sequence log-probability.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub top_k: Vec<Vec<(u32, f32)>>,
    pub last_logits: Vec<f32>,
    pub sum_logprob: f32,
}

/// Runs `ids` through `p` once and reads off an [`Inspection`].
pub fn inspect(p: &crate::Pretrained, ids: &[u32], k: usize) -> Result<Inspection> {
    let x = Tensor::new(ids, p.model.device())?.unsqueeze(0)?;
    let hidden = p.model.forward(&x, None, None, None)?;
    let logits = p
        .model
        .logits(&hidden)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let top_k = logits
        .iter()
        .map(|row| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            let k = k.min(row.len());
            idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| row[b].total_cmp(&row[a]));
            idx.truncate(k);
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx.into_iter().map(|i| (i as u32, row[i])).collect()
        })
        .collect();
    let mask = Tensor::ones((1, ids.len()), DType::U32, p.model.device())?;
    let sum_logprob = token_logprobs(&p.model, &hidden, &x, &mask, 1.0)?
        .sum
        .to_vec1::<f32>()?[0];
    Ok(Inspection {
        top_k,
        last_logits: logits.last().cloned().unwrap_or_default(),
        sum_logprob,
    })
}
