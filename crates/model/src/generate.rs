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
    /// At most this many sequences decode at once (vLLM's name); the other prompts wait, in
    /// order, and join the running batch as sequences finish (continuous batching), which bounds
    /// the KV cache's memory. 0: every prompt at once. The draws depend on it, as they depend on
    /// the batch.
    pub max_num_seqs: usize,
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
            max_num_seqs: 0,
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
    /// Decoding steps run as fixed-shape steps ([`crate::decode_graph`]), replayed from a CUDA
    /// graph on a GPU.
    pub fixed_steps: usize,
    /// The most rows one decoding step ran (at most [`SamplingConfig::max_num_seqs`]).
    pub peak_rows: usize,
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

/// Where [`generate_on`] draws each token from the last position's logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrawOn {
    /// The host for a model on the CPU; the device for one on a GPU, unless top-k or top-p asks
    /// for a sort of the vocabulary (then the host).
    Auto,
    /// Every step's logits are copied to the host and drawn there.
    Host,
    /// Exponentials and block sums stay where the logits are; the host reads the block sums,
    /// picks a block per row with the same draw, and reads back that block alone. The same
    /// tokens as [`DrawOn::Host`] up to rounding. Not with top-k or top-p.
    Device,
}

/// The last position's logits of each batch row: on the host, or where the model is.
enum StepLogits {
    Host(Vec<Vec<f32>>),
    Device(Tensor),
}

impl StepLogits {
    /// `self`'s rows, then `other`'s.
    fn cat(self, other: StepLogits) -> Result<StepLogits> {
        Ok(match (self, other) {
            (StepLogits::Host(mut a), StepLogits::Host(b)) => {
                a.extend(b);
                StepLogits::Host(a)
            }
            (StepLogits::Device(a), StepLogits::Device(b)) => {
                StepLogits::Device(Tensor::cat(&[&a, &b], 0)?)
            }
            _ => return Err(Error::Msg("generate: logits on two sides".into())),
        })
    }
}

/// Rows prefilled together by [`generate_on`]: their cache, masks (`[prefix][padding][rest]`),
/// ids (read again only without the cache) and last logits, and the prompt positions run.
struct Admission {
    cache: KvCache,
    mask: Vec<Vec<u32>>,
    ids: Vec<Vec<u32>>,
    logits: StepLogits,
    positions: usize,
}

/// [`generate_on`] with [`DrawOn::Auto`].
pub fn generate(model: &Model, prompts: &[Vec<u32>], cfg: &SamplingConfig) -> Result<Generation> {
    generate_on(model, prompts, cfg, DrawOn::Auto)
}

/// Samples continuations of `prompts` (token ids, unpadded) in one left-padded batch.
///
/// Work a rollout need not repeat is skipped: a long prefix every prompt shares is run once,
/// identical prompts (the `n` samples of GRPO, RLOO or Best-of-N) are prefilled once, and
/// finished sequences leave the batch. None of this changes what is drawn: each step takes one
/// uniform draw per unfinished sequence, in prompt order, as the whole batch would. (Products
/// over fewer rows may round differently, which can flip a near tie.)
///
/// With [`SamplingConfig::max_num_seqs`] below the number of prompts, the first ones start and
/// the others wait, in order; when finished rows leave, waiting prompts are prefilled and join
/// the batch (continuous batching). Draws then follow the rows' order in that batch.
pub fn generate_on(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    draw_on: DrawOn,
) -> Result<Generation> {
    cfg.validate()?;
    let unfiltered = cfg.top_k == 0 && cfg.top_p >= 1.0;
    let on_device = match draw_on {
        DrawOn::Auto => unfiltered && !model.device().is_cpu(),
        DrawOn::Host => false,
        DrawOn::Device if unfiltered => true,
        DrawOn::Device => {
            return Err(Error::Msg(
                "generate: drawing on the device does not do top-k or top-p; draw on the host"
                    .into(),
            ))
        }
    };
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
        // Its passes are no training pass's (an evaluation's model records its routing).
        let mut m = model.clone();
        m.set_router_aux_loss(false);
        m
    };
    // Under bf16 with a bf16 GEMM: every weight packed once for the whole loop (a no-op otherwise).
    let _packed = crate::ops::PackedWeights::new();
    let dev = model.device().clone();
    let on = |rows: &[Vec<u32>], dev: &candle_core::Device| -> Result<Tensor> {
        let cols = rows.first().map_or(0, Vec::len);
        Ok(Tensor::from_vec(rows.concat(), (rows.len(), cols), dev)?)
    };
    let to_tensor = |rows: &[Vec<u32>]| on(rows, &dev);
    // Masks and positions stay on the host: the forward pass reads them there (on a GPU, a copy
    // up and one back down per step otherwise).
    let host = |rows: &[Vec<u32>]| on(rows, &candle_core::Device::Cpu);
    // At most `cap` rows decode at once (continuous batching): the other prompts wait, in order,
    // and join as rows finish. Without the cache every step reruns the whole batch: the
    // reference the cached path is checked against, so it keeps every row and pads finished ones.
    let cap = match cfg.max_num_seqs {
        n if n > 0 && cfg.use_cache => n.min(b),
        _ => b,
    };
    // A prefix every prompt shares (a system prompt, a preprompt) is run once, and its keys and
    // values copied to each admission's rows, which then hold `[prefix][padding][rest]`.
    let shared = match cfg.use_cache {
        true => shared_prefix(prompts),
        false => 0,
    };
    let prefix = match shared {
        0 => None,
        _ => {
            let mut c = KvCache::new(model.cfg.num_layers);
            let t = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), &dev)?;
            model.forward(&t, None, None, Some(&mut c))?;
            out.prompt_positions += shared;
            Some(c)
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);

    let step_logits = |logits: Tensor| -> Result<StepLogits> {
        Ok(match on_device {
            true => StepLogits::Device(logits),
            false => StepLogits::Host(logits.to_vec2::<f32>()?),
        })
    };
    let last_logits = |hidden: &Tensor| -> Result<StepLogits> {
        let t = hidden.dim(1)?;
        let h = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        step_logits(model.logits(&h)?.to_dtype(DType::F32)?)
    };
    // Prefills the prompts `rows` (indices into `prompts`) in one left-padded batch on a cache of
    // their own, identical prompts once (with the cache).
    let prefill = |rows: &[usize]| -> Result<Admission> {
        let subset: Vec<&[u32]> = rows.iter().map(|&r| prompts[r].as_slice()).collect();
        let (distinct, of_row) = match cfg.use_cache {
            true => distinct_prompts(&subset),
            false => ((0..rows.len()).collect(), (0..rows.len()).collect()),
        };
        let width = subset.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut cache = KvCache::new(model.cfg.num_layers);
        if let Some(p) = &prefix {
            cache = p.prefix_copy(usize::MAX)?;
            cache.select(&vec![0; distinct.len()], 0)?;
        }
        let ids: Vec<Vec<u32>> = distinct
            .iter()
            .map(|&i| {
                let p = subset[i];
                std::iter::repeat_n(cfg.pad_token_id, width - p.len())
                    .chain(p[shared..].iter().copied())
                    .collect()
            })
            .collect();
        let mut mask: Vec<Vec<u32>> = distinct
            .iter()
            .map(|&i| {
                let p = subset[i];
                std::iter::repeat_n(1, shared)
                    .chain(std::iter::repeat_n(0, width - p.len()))
                    .chain(std::iter::repeat_n(1, p.len() - shared))
                    .collect()
            })
            .collect();
        let hidden = model.forward(
            &to_tensor(&ids)?,
            Some(&host(&mask)?),
            None,
            cfg.use_cache.then_some(&mut cache),
        )?;
        let positions = distinct.len() * (width - shared);
        let mut logits = last_logits(&hidden)?;
        // Repeated prompts only with the cache, whose path reads `ids` no more after the prefill.
        if distinct.len() < rows.len() {
            let idx: Vec<u32> = of_row.iter().map(|&d| d as u32).collect();
            logits = match logits {
                StepLogits::Host(l) => {
                    StepLogits::Host(of_row.iter().map(|&d| l[d].clone()).collect())
                }
                StepLogits::Device(t) => {
                    StepLogits::Device(t.index_select(&Tensor::new(idx.as_slice(), &dev)?, 0)?)
                }
            };
            cache.select(&idx, 0)?;
            mask = of_row.iter().map(|&d| mask[d].clone()).collect();
        }
        Ok(Admission {
            cache,
            mask,
            ids,
            logits,
            positions,
        })
    };
    // Under `min_new_tokens` on the device, `[2, vocab]`: a row of zeros and a row with `-inf` at
    // the EOS tokens, one of them added to each row's logits.
    let mut suppress_eos: Option<Tensor> = None;
    // The first `cap` prompts; the rest wait.
    let mut slots: Vec<usize> = (0..cap).collect();
    let mut waiting = cap..b;
    let first = prefill(&slots)?;
    out.prompt_positions += first.positions;
    let (mut cache, mut mask, mut ids, mut logits) =
        (first.cache, first.mask, first.ids, first.logits);
    // Fixed-shape decoding steps (CUDA graphs on a GPU) take over the prefill's cache, when every
    // row starts at once (a row that joins changes the batch's shape).
    let fixed_steps = cfg.use_cache
        && cfg.max_new_tokens > 1
        && cap == b
        && crate::decode_graph::applies(&model, b);
    let mut fixed = match fixed_steps {
        true => {
            let cap = cache.len() + cfg.max_new_tokens;
            let f = crate::decode_graph::FixedDecode::new(&model, &cache, cap)?;
            cache = KvCache::new(model.cfg.num_layers);
            Some(f)
        }
        false => None,
    };
    // The position of each batch row's next token.
    let mut next_pos: Vec<u32> = slots.iter().map(|&r| prompts[r].len() as u32).collect();
    // A row is done once it ended with EOS or made `max_new_tokens`.
    let done = |out: &Generation, row: usize| {
        out.finished[row] || out.tokens[row].len() >= cfg.max_new_tokens
    };

    loop {
        // One uniform draw per live row, in row order, then the rows in parallel (softmax over
        // the vocabulary is most of a step's non-matmul time); the result does not depend on
        // the thread count.
        let draws: Vec<Option<f32>> = slots
            .iter()
            .map(|&row| (!done(&out, row) && cfg.temperature > 0.0).then(|| rng.gen()))
            .collect();
        // Rows still short of `min_new_tokens`, whose EOS is held back.
        let holding: Vec<bool> = slots
            .iter()
            .map(|&row| out.tokens[row].len() < cfg.min_new_tokens)
            .collect();
        let picked: Vec<Option<(u32, f32)>> = match &mut logits {
            StepLogits::Device(t) => {
                let live: Vec<bool> = slots.iter().map(|&row| !done(&out, row)).collect();
                let suppressing = holding.contains(&true) && !cfg.eos_token_ids.is_empty();
                if suppressing && suppress_eos.is_none() {
                    let m = eos_mask(t, &cfg.eos_token_ids)?;
                    suppress_eos = Some(Tensor::cat(&[&m.zeros_like()?, &m], 0)?);
                }
                let suppress = match (&suppress_eos, suppressing) {
                    (Some(m), true) if holding.iter().all(|&h| h) => Some(m.narrow(0, 1, 1)?),
                    // Rows that joined later hold back EOS for longer: a row of the two each.
                    (Some(m), true) => {
                        let pick: Vec<u32> = holding.iter().map(|&h| u32::from(h)).collect();
                        Some(m.index_select(&Tensor::new(pick.as_slice(), t.device())?, 0)?)
                    }
                    _ => None,
                };
                crate::sampling::sample_rows_on_device(t, &draws, &live, cfg, suppress.as_ref())?
            }
            StepLogits::Host(logits) => {
                use rayon::prelude::*;
                logits
                    .par_iter_mut()
                    .zip(draws)
                    .zip(slots.par_iter().zip(&holding))
                    .map(|((lg, r), (&row, &hold))| {
                        if done(&out, row) {
                            return None;
                        }
                        if hold {
                            hold_back(lg, &cfg.eos_token_ids);
                        }
                        Some(crate::sampling::sample_token(lg, cfg, r.unwrap_or(0.0)))
                    })
                    .collect()
            }
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
        // Done rows leave once they are an eighth of the batch (each leave copies the cache),
        // with the leading positions that only their padding held.
        let live: Vec<usize> = (0..slots.len())
            .filter(|&s| !done(&out, slots[s]))
            .collect();
        if live.is_empty() && waiting.is_empty() {
            break;
        }
        if live.is_empty() {
            // Every running row is done and prompts wait: the batch starts over with them (an
            // index_select of no rows fails on CUDA). Only without fixed-shape steps, which never
            // have prompts waiting.
            cache = KvCache::new(model.cfg.num_layers);
            (slots, mask, next_pos, new_col) = (vec![], vec![], vec![], vec![]);
        } else if cfg.use_cache && (slots.len() - live.len()) * 8 >= slots.len() {
            let width = mask.first().map_or(0, Vec::len);
            let drop = (0..width)
                .take_while(|&c| live.iter().all(|&s| mask[s][c] == 0))
                .count();
            let rows: Vec<u32> = live.iter().map(|&s| s as u32).collect();
            match fixed.as_mut() {
                Some(f) => f.select(&model, &rows, drop)?,
                None => cache.select(&rows, drop)?,
            }
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
        let running = match fixed.as_mut() {
            _ if slots.is_empty() => None,
            Some(f) => {
                out.fixed_steps += 1;
                Some(step_logits(f.step(&model, &new_col, &mask, &next_pos)?)?)
            }
            None if cfg.use_cache => {
                let rows = slots.len();
                let step_ids = Tensor::from_vec(new_col, (rows, 1), &dev)?;
                let pos = Tensor::from_vec(next_pos.clone(), (rows, 1), &candle_core::Device::Cpu)?;
                Some(last_logits(&model.forward(
                    &step_ids,
                    Some(&host(&mask)?),
                    Some(&pos),
                    Some(&mut cache),
                )?)?)
            }
            None => Some(last_logits(&model.forward(
                &to_tensor(&ids)?,
                Some(&host(&mask)?),
                None,
                None,
            )?)?),
        };
        out.decode_rows += slots.len();
        out.peak_rows = out.peak_rows.max(slots.len());
        next_pos.iter_mut().for_each(|p| *p += 1);
        // Waiting prompts take the free rows: prefilled on their own, their keys and values go
        // after the running rows'. The side holding fewer positions is padded on the left, in
        // the masks as in the cache.
        let room = cap - slots.len();
        let joining: Vec<usize> = waiting.by_ref().take(room).collect();
        logits = match (running, joining.is_empty()) {
            (Some(r), true) => r,
            (running, false) => {
                let a = prefill(&joining)?;
                out.prompt_positions += a.positions;
                let width = a.cache.len().max(cache.len());
                let pad = |m: &mut Vec<u32>| {
                    m.splice(0..0, std::iter::repeat_n(0, width - m.len()));
                };
                mask.iter_mut().for_each(pad);
                mask.extend(a.mask.into_iter().map(|mut m| {
                    pad(&mut m);
                    m
                }));
                // After a start-over the cache is empty, and joining replaces it.
                cache.join(a.cache)?;
                next_pos.extend(joining.iter().map(|&r| prompts[r].len() as u32));
                slots.extend(joining);
                match running {
                    Some(r) => r.cat(a.logits)?,
                    None => a.logits,
                }
            }
            (None, true) => {
                return Err(Error::Msg(
                    "generate: no row left to decode while prompts wait".into(),
                ))
            }
        };
    }
    Ok(out)
}

/// Keeps `eos` out of a row of logits (`min_new_tokens`): `-inf` at each (ids past the vocabulary
/// ignored).
fn hold_back(row: &mut [f32], eos: &[u32]) {
    for &e in eos {
        if let Some(x) = row.get_mut(e as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// [`hold_back`] as a `[1, vocab]` tensor to add to the logits where they are: `-inf` at `eos`,
/// 0 elsewhere.
fn eos_mask(logits: &Tensor, eos: &[u32]) -> Result<Tensor> {
    let vocab = logits.dim(1)?;
    let mut m = vec![0f32; vocab];
    hold_back(&mut m, eos);
    Ok(Tensor::from_vec(m, (1, vocab), logits.device())?)
}

/// The distinct prompts (the index of each one's first appearance) and, for every prompt, which
/// of them it is.
fn distinct_prompts<P: AsRef<[u32]>>(prompts: &[P]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&[u32], usize> = Default::default();
    let mut distinct = vec![];
    let of_row = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            *first.entry(p.as_ref()).or_insert_with(|| {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
