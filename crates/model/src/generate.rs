//! Batched sampling with left padding and a KV cache.
//!
//! Returns each new token with its log-probability under the distribution it was drawn from
//! (after temperature, top-k and top-p), which is what PPO and GRPO need as "old" log-probs.
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{KvCache, Model};

#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens have been generated.
    pub min_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables nucleus sampling.
    pub top_p: f64,
    pub seed: u64,
    /// Generation of a sequence stops after any of these (empty: never stop early).
    pub eos_token_ids: Vec<u32>,
    /// Fills the left padding and the slots of finished sequences.
    pub pad_token_id: u32,
    /// Off recomputes the whole sequence each step; only useful to check the cache.
    pub use_cache: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: vec![],
            pad_token_id: 0,
            use_cache: true,
        }
    }
}

/// Per prompt: the new token ids (EOS included when hit), their log-probs, and whether EOS ended it.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub tokens: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
    pub finished: Vec<bool>,
    /// Prompt positions (left padding included) the model ran: a prefix every prompt shares
    /// counts once, and so does each set of identical prompts.
    pub prompt_positions: usize,
    /// Batch rows summed over the decoding steps: finished sequences leave the batch.
    pub decode_rows: usize,
}

impl SamplingConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Msg(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Msg(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(Error::Msg("min_new_tokens exceeds max_new_tokens".into()));
        }
        Ok(())
    }
}

/// Samples continuations of `prompts` (token ids, unpadded) in one left-padded batch.
///
/// Work a rollout need not repeat is skipped: a long prefix every prompt shares is run once,
/// identical prompts (the `n` samples of GRPO, RLOO or Best-of-N) are prefilled once, and
/// finished sequences leave the batch. None of this changes what is drawn: each step takes one
/// uniform draw per unfinished sequence, in prompt order, as the whole batch would. (Products
/// over fewer rows may round differently, which can flip a near tie.)
pub fn generate(model: &Model, prompts: &[Vec<u32>], cfg: &SamplingConfig) -> Result<Generation> {
    cfg.validate()?;
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Msg(
            "generate: empty prompt (it needs at least one token, e.g. BOS)".into(),
        ));
    }
    let b = prompts.len();
    let mut out = Generation {
        tokens: vec![vec![]; b],
        logprobs: vec![vec![]; b],
        finished: vec![false; b],
        ..Default::default()
    };
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    // A recorded autograd graph would pin every step's activations; sample outside it.
    let model = if model.is_trainable() {
        model.detached()?
    } else {
        model.clone()
    };
    // Under bf16 with a bf16 GEMM: every weight packed once for the whole loop (a no-op otherwise).
    let _packed = crate::ops::PackedWeights::new();
    let dev = model.device().clone();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let to_tensor = |rows: &[Vec<u32>]| -> Result<Tensor> {
        let cols = rows.first().map_or(0, Vec::len);
        Ok(Tensor::from_vec(rows.concat(), (rows.len(), cols), &dev)?)
    };
    let mut cache = KvCache::new(model.cfg.num_layers);
    // Without the cache every step reruns the whole batch: the reference the cached path is
    // checked against, so it keeps every row and pads finished ones.
    let (distinct, of_row) = match cfg.use_cache {
        true => distinct_prompts(prompts),
        false => ((0..b).collect(), (0..b).collect()),
    };
    // A prefix every prompt shares (a system prompt, a preprompt) is run once and its keys and
    // values copied to every row; each row then holds `[prefix][padding][rest]`.
    let shared = match cfg.use_cache {
        true => shared_prefix(prompts),
        false => 0,
    };
    if shared > 0 {
        let prefix = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), &dev)?;
        model.forward(&prefix, None, None, Some(&mut cache))?;
        cache.select(&vec![0; distinct.len()], 0)?;
        out.prompt_positions += shared;
    }
    let mut ids: Vec<Vec<u32>> = distinct
        .iter()
        .map(|&i| {
            let p = &prompts[i];
            std::iter::repeat_n(cfg.pad_token_id, max_len - p.len())
                .chain(p[shared..].iter().copied())
                .collect()
        })
        .collect();
    let mut mask: Vec<Vec<u32>> = distinct
        .iter()
        .map(|&i| {
            let p = &prompts[i];
            std::iter::repeat_n(1, shared)
                .chain(std::iter::repeat_n(0, max_len - p.len()))
                .chain(std::iter::repeat_n(1, p.len() - shared))
                .collect()
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);

    let last_logits = |hidden: &Tensor| -> Result<Vec<Vec<f32>>> {
        let t = hidden.dim(1)?;
        let h = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(model.logits(&h)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    let hidden = model.forward(
        &to_tensor(&ids)?,
        Some(&to_tensor(&mask)?),
        None,
        cfg.use_cache.then_some(&mut cache),
    )?;
    out.prompt_positions += distinct.len() * (max_len - shared);
    let mut logits = last_logits(&hidden)?;
    // Repeated prompts only with the cache, whose path reads `ids` no more after the prefill.
    if distinct.len() < b {
        let rows: Vec<u32> = of_row.iter().map(|&d| d as u32).collect();
        cache.select(&rows, 0)?;
        logits = of_row.iter().map(|&d| logits[d].clone()).collect();
        mask = of_row.iter().map(|&d| mask[d].clone()).collect();
    }
    // The prompt (`out` row) of each batch row, in prompt order.
    let mut slots: Vec<usize> = (0..b).collect();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();

    for step in 0..cfg.max_new_tokens {
        // One uniform draw per live row, in row order, then the rows in parallel (softmax over
        // the vocabulary is most of a step's non-matmul time); the result does not depend on
        // the thread count.
        let draws: Vec<Option<f32>> = slots
            .iter()
            .map(|&row| (!out.finished[row] && cfg.temperature > 0.0).then(|| rng.gen()))
            .collect();
        let picked: Vec<Option<(u32, f32)>> = {
            use rayon::prelude::*;
            logits
                .par_iter_mut()
                .zip(draws)
                .zip(&slots)
                .map(|((lg, r), &row)| {
                    if out.finished[row] {
                        return None;
                    }
                    if step < cfg.min_new_tokens {
                        for &e in &cfg.eos_token_ids {
                            if let Some(x) = lg.get_mut(e as usize) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    Some(sample_token(lg, cfg, r.unwrap_or(0.0)))
                })
                .collect()
        };
        let mut new_col = Vec::with_capacity(slots.len());
        for (&row, p) in slots.iter().zip(picked) {
            let Some((tok, lp)) = p else {
                new_col.push(cfg.pad_token_id);
                continue;
            };
            out.tokens[row].push(tok);
            out.logprobs[row].push(lp);
            if cfg.eos_token_ids.contains(&tok) {
                out.finished[row] = true;
            }
            new_col.push(tok);
        }
        if out.finished.iter().all(|&f| f) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Finished sequences leave once they are an eighth of the batch (each leave copies the
        // cache), with the leading positions that only their padding held.
        let live: Vec<usize> = (0..slots.len())
            .filter(|&s| !out.finished[slots[s]])
            .collect();
        if cfg.use_cache && (slots.len() - live.len()) * 8 >= slots.len() {
            let width = mask.first().map_or(0, Vec::len);
            let drop = (0..width)
                .take_while(|&c| live.iter().all(|&s| mask[s][c] == 0))
                .count();
            let rows: Vec<u32> = live.iter().map(|&s| s as u32).collect();
            cache.select(&rows, drop)?;
            slots = live.iter().map(|&s| slots[s]).collect();
            mask = live.iter().map(|&s| mask[s][drop..].to_vec()).collect();
            next_pos = live.iter().map(|&s| next_pos[s]).collect();
            new_col = live.iter().map(|&s| new_col[s]).collect();
        }
        for (s, &tok) in new_col.iter().enumerate() {
            mask[s].push(1);
            if !cfg.use_cache {
                ids[s].push(tok);
            }
        }
        let hidden = if cfg.use_cache {
            let rows = slots.len();
            let step_ids = Tensor::from_vec(new_col, (rows, 1), &dev)?;
            let pos = Tensor::from_vec(next_pos.clone(), (rows, 1), &dev)?;
            model.forward(
                &step_ids,
                Some(&to_tensor(&mask)?),
                Some(&pos),
                Some(&mut cache),
            )?
        } else {
            model.forward(&to_tensor(&ids)?, Some(&to_tensor(&mask)?), None, None)?
        };
        out.decode_rows += slots.len();
        next_pos.iter_mut().for_each(|p| *p += 1);
        logits = last_logits(&hidden)?;
    }
    Ok(out)
}

/// The distinct prompts (the index of each one's first appearance) and, for every prompt, which
/// of them it is.
fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&[u32], usize> = Default::default();
    let mut distinct = vec![];
    let of_row = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            *first.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(i);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, of_row)
}

/// How many leading tokens every prompt shares, when it is worth running them once: at least
/// [`MIN_SHARED_PREFIX`], leaving every prompt a token of its own.
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    if prompts.len() < 2 {
        return 0;
    }
    let common = common_prefix(prompts);
    match common >= MIN_SHARED_PREFIX {
        true => common,
        false => 0,
    }
}

/// The length of the prefix every prompt shares, short of each prompt's last token.
fn common_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let min_len = prompts.iter().map(Vec::len).min().unwrap_or(0);
    (0..min_len.saturating_sub(1))
        .take_while(|&i| prompts.iter().all(|p| p[i] == first[i]))
        .count()
}

/// Shorter shared prefixes are left in the batch (an extra forward pass is not worth it).
pub(crate) const MIN_SHARED_PREFIX: usize = 16;

/// Draws one token from `logits` (modified in place) with the uniform draw `r` in [0, 1) and
/// returns it with its log-probability under the filtered, renormalised distribution. Temperature 0
/// takes the argmax of the raw distribution (and ignores `r`).
pub(crate) fn sample_token(logits: &mut [f32], cfg: &SamplingConfig, r: f32) -> (u32, f32) {
    if cfg.temperature == 0.0 {
        let (best, _) = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            );
        return (best as u32, log_softmax_at(logits, best));
    }
    let inv_t = (1.0 / cfg.temperature) as f32;
    logits.iter_mut().for_each(|x| *x *= inv_t);
    if cfg.top_k > 0 && cfg.top_k < logits.len() {
        let mut sorted: Vec<f32> = logits.to_vec();
        let kth_idx = logits.len() - cfg.top_k;
        let (_, kth, _) = sorted.select_nth_unstable_by(kth_idx, |a, b| a.total_cmp(b));
        let kth = *kth;
        logits
            .iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // As transformers' TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p,
        // always keeping the most likely token.
        let probs = softmax(logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cum = 0.0f32;
        for &i in &order[..order.len() - 1] {
            cum += probs[i];
            if cum > (1.0 - cfg.top_p) as f32 {
                break;
            }
            logits[i] = f32::NEG_INFINITY;
        }
    }
    // Inverse-CDF draw over the unnormalised weights `e^(x - max)`, block sums first: no
    // normalising pass, and only the drawn block is scanned value by value.
    let max = preftune_kernels::vmath::max(logits);
    let mut blocks = Vec::with_capacity(logits.len().div_ceil(preftune_kernels::vmath::BLOCK));
    preftune_kernels::vmath::exp_shifted_blocks(logits, max, |s| blocks.push(s));
    let total: f64 = blocks.iter().sum();
    let target = r as f64 * total;
    let mut chosen = logits.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    let mut cum = 0f64;
    for (block, &s) in blocks.iter().enumerate() {
        if cum + s <= target {
            cum += s;
            continue;
        }
        let es = logits
            .chunks(preftune_kernels::vmath::BLOCK)
            .nth(block)
            .unwrap_or(&[]);
        // Rounding may leave the running sum short of the target at the block's end: then its
        // last token with weight is drawn.
        let mut pick = es.iter().rposition(|&e| e > 0.0);
        for (i, &e) in es.iter().enumerate() {
            cum += e as f64;
            if target < cum {
                pick = Some(i);
                break;
            }
        }
        if let Some(i) = pick {
            chosen = block * preftune_kernels::vmath::BLOCK + i;
        }
        break;
    }
    (chosen as u32, (logits[chosen] as f64 / total).ln() as f32)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let mut e = x.to_vec();
    let max = preftune_kernels::vmath::max(&e);
    let inv = (1.0 / preftune_kernels::vmath::exp_shifted(&mut e, max)) as f32;
    e.iter_mut().for_each(|v| *v *= inv);
    e
}

fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    let max = preftune_kernels::vmath::max(x);
    x[i] - max - preftune_kernels::vmath::sum_exp_shifted(x, max).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let base = vec![1.0f32, 3.0, 2.0, 0.5, 2.9];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cfg = SamplingConfig {
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            let (t, lp) = sample_token(&mut base.clone(), &cfg, rng.gen());
            assert!(t == 1 || t == 4, "top-2 sampled {t}");
            // Renormalised over the two survivors.
            let z = (3.0f32).exp() + (2.9f32).exp();
            assert!((lp - (base[t as usize].exp() / z).ln()).abs() < 1e-5);
        }
        // top_p 0.5: token 1 alone holds < 50% mass, so tokens 1 and 4 survive, as in transformers.
        let cfg = SamplingConfig {
            top_p: 0.5,
            ..Default::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(sample_token(&mut base.clone(), &cfg, rng.gen()).0);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn the_common_prefix_leaves_every_prompt_a_token() {
        assert_eq!(common_prefix(&[vec![1, 2, 3, 4], vec![1, 2, 3, 5, 6]]), 3);
        // Identical prompts keep their last token for the batch.
        assert_eq!(common_prefix(&[vec![1, 2, 3], vec![1, 2, 3]]), 2);
        assert_eq!(common_prefix(&[vec![1, 2, 3], vec![1, 2]]), 1);
        assert_eq!(common_prefix(&[vec![7, 2], vec![1, 2]]), 0);
        assert_eq!(common_prefix(&[vec![1, 2, 3]]), 2);
        assert_eq!(common_prefix(&[]), 0);
    }

    #[test]
    fn greedy_picks_argmax_with_raw_logprob() {
        let mut x = vec![0.0f32, 1.0, 5.0, 2.0];
        let cfg = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (t, lp) = sample_token(&mut x, &cfg, rng.gen());
        assert_eq!(t, 2);
        let z: f32 = [0.0f32, 1.0, 5.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((lp - (5.0f32.exp() / z).ln()).abs() < 1e-6);
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let cfg = SamplingConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[sample_token(&mut logits.to_vec(), &cfg, rng.gen()).0 as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }
}
