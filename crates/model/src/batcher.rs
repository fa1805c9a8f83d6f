//! Continuous batching: sequences join a running decode batch at any step and leave it as soon as
//! they finish, so a server answers many clients with one forward pass per token.
//!
//! Each sequence has its own sampling settings and its own random stream, seeded per sequence:
//! what it draws does not depend on which others share the batch. A sequence that joins is
//! prefilled on its own batch and its keys and values appended to the running cache
//! ([`KvCache::join`]); the one holding fewer positions is padded on the left and masked. When
//! sequences leave, their rows go ([`KvCache::select`]) and so do leading positions that only
//! padding held.
//!
//! The keys and values of the last few prompts prefilled alone are kept: sequences whose prompts
//! start the same way as one of them (a system prompt, 16 tokens or more) copy those positions
//! and run only the rest.
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::generate::{SamplingConfig, MIN_SHARED_PREFIX};
use crate::model::{KvCache, Model};
use crate::sampling::sample_token;

/// One sequence's sampling settings.
#[derive(Clone, Debug)]
pub struct RowSampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 1 disables nucleus sampling.
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: u64,
    /// The sequence ends after any of these.
    pub eos_token_ids: Vec<u32>,
    /// How many of the most likely tokens to report at each step, with their log-probabilities.
    pub top_logprobs: usize,
}

/// Why a sequence ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One token of one sequence. Log-probabilities are the model's own (temperature 1, no
/// filtering), as OpenAI's `logprobs` report them.
#[derive(Clone, Debug)]
pub struct Step {
    pub id: u64,
    pub token: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
    /// Set on the sequence's last token.
    pub finish: Option<Finish>,
}

struct Row {
    id: u64,
    cfg: SamplingConfig,
    top_logprobs: usize,
    rng: rand::rngs::StdRng,
    /// Position of the next token.
    pos: u32,
    made: usize,
    /// The distribution of the next token.
    logits: Vec<f32>,
    /// 1 for this row's cached positions, 0 for padding; as wide as the cache.
    mask: Vec<u32>,
}

/// A running decode batch.
pub struct Batcher {
    model: Model,
    pad: u32,
    rows: Vec<Row>,
    cache: KvCache,
    /// Prompts prefilled alone and their keys and values (one row, no padding), most recent last.
    prefixes: Vec<(Vec<u32>, KvCache)>,
    /// Prompt tokens whose keys and values came from `prefixes` instead of a forward pass.
    reused: usize,
}

/// A sequence to admit: its id, prompt ids and settings.
pub type Admission = (u64, Vec<u32>, RowSampling);

/// At most this many bytes of kept prompts' keys and values (SmolLM2-135M in f32: about 5,700
/// tokens), the oldest dropped first.
const KEPT_PREFIX_BYTES: usize = 256 << 20;

impl Batcher {
    /// A batch over `model` (sampled outside autograd); `pad` fills positions no row reads.
    pub fn new(model: &Model, pad: u32) -> Result<Self> {
        let model = if model.is_trainable() {
            model.detached()?
        } else {
            model.clone()
        };
        let layers = model.cfg.num_layers;
        Ok(Batcher {
            model,
            pad,
            rows: vec![],
            cache: KvCache::new(layers),
            prefixes: vec![],
            reused: 0,
        })
    }

    /// Prompt tokens so far whose keys and values were reused from an earlier prompt.
    pub fn reused_prompt_tokens(&self) -> usize {
        self.reused
    }

    /// The kept prompt sharing the longest prefix with every one of `prompts` (short of each
    /// prompt's last token), if that prefix is worth reusing: its index and length.
    fn reusable_prefix(&self, prompts: &[&Vec<u32>]) -> Option<(usize, usize)> {
        self.prefixes
            .iter()
            .enumerate()
            .map(|(i, (kept, _))| {
                let n = prompts
                    .iter()
                    .map(|p| {
                        let same = kept.iter().zip(p.iter()).take_while(|(a, b)| a == b);
                        same.count().min(p.len().saturating_sub(1))
                    })
                    .min()
                    .unwrap_or(0);
                (i, n)
            })
            .filter(|&(_, n)| n >= MIN_SHARED_PREFIX)
            .max_by_key(|&(i, n)| (n, i))
    }

    /// Keeps `prompt`'s keys and values (a copy of `cache`, one row) for later prompts, within
    /// [`KEPT_PREFIX_BYTES`].
    fn keep_prefix(&mut self, prompt: &[u32], cache: &KvCache) -> Result<()> {
        if prompt.len() < MIN_SHARED_PREFIX || cache.bytes() > KEPT_PREFIX_BYTES {
            return Ok(());
        }
        self.prefixes.retain(|(p, _)| p != prompt);
        self.prefixes
            .push((prompt.to_vec(), cache.prefix_copy(usize::MAX)?));
        while self.prefixes.iter().map(|(_, c)| c.bytes()).sum::<usize>() > KEPT_PREFIX_BYTES {
            self.prefixes.remove(0);
        }
        Ok(())
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Positions each row holds, padding included.
    pub fn width(&self) -> usize {
        self.rows.first().map_or(0, |r| r.mask.len())
    }

    /// Adds sequences `(id, prompt ids, settings)`: one prefill for those that start as the same
    /// kept prompt does, one for the others, then they decode with the rest from the next
    /// [`Batcher::step`].
    pub fn admit(&mut self, seqs: Vec<Admission>) -> Result<()> {
        let mut groups: Vec<(Option<usize>, Vec<Admission>)> = vec![];
        for s in seqs {
            let kept = self.reusable_prefix(&[&s.1]).map(|(i, _)| i);
            match groups.iter_mut().find(|(k, _)| *k == kept) {
                Some((_, g)) => g.push(s),
                None => groups.push((kept, vec![s])),
            }
        }
        for (_, g) in groups {
            self.admit_group(g)?;
        }
        Ok(())
    }

    /// One prefill over `seqs`, reusing the kept prompt they all start as, if any.
    fn admit_group(&mut self, seqs: Vec<Admission>) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::with_capacity(seqs.len());
        for (id, prompt, s) in &seqs {
            if prompt.is_empty() {
                return Err(Error::Msg(format!("sequence {id}: empty prompt")));
            }
            let cfg = SamplingConfig {
                max_new_tokens: s.max_new_tokens,
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                seed: s.seed,
                eos_token_ids: s.eos_token_ids.clone(),
                pad_token_id: self.pad,
                ..Default::default()
            };
            cfg.validate()?;
            fresh.push(cfg);
        }
        let dev = self.model.device().clone();
        let t = seqs.iter().map(|(_, p, _)| p.len()).max().unwrap_or(0);
        let b = seqs.len();
        // Each row holds `[reused prefix][padding][rest of its prompt]`.
        let prompts: Vec<&Vec<u32>> = seqs.iter().map(|(_, p, _)| p).collect();
        let mut cache = KvCache::new(self.model.cfg.num_layers);
        let shared = match self.reusable_prefix(&prompts) {
            Some((i, n)) => {
                cache = self.prefixes[i].1.prefix_copy(n)?;
                cache.select(&vec![0; b], 0)?;
                self.reused += n * b;
                n
            }
            None => 0,
        };
        let (mut ids, mut mask) = (vec![], vec![]);
        for p in &prompts {
            let padding = t - p.len();
            ids.extend(std::iter::repeat_n(self.pad, padding).chain(p[shared..].iter().copied()));
            mask.push(
                std::iter::repeat_n(1u32, shared)
                    .chain(std::iter::repeat_n(0, padding))
                    .chain(std::iter::repeat_n(1, p.len() - shared))
                    .collect::<Vec<_>>(),
            );
        }
        let hidden = self.model.forward(
            &Tensor::from_vec(ids, (b, t - shared), &dev)?,
            // Masks and positions are read on the host by the forward pass.
            Some(&Tensor::from_vec(mask.concat(), (b, t), &Device::Cpu)?),
            None,
            Some(&mut cache),
        )?;
        if b == 1 && self.keep_prefix(prompts[0], &cache).is_err() {
            // One row, no padding: its cache is exactly its prompt's keys and values. Keeping
            // them is an optimisation: a failed copy forgets the kept ones, not the sequence.
            self.prefixes.clear();
        }
        let last = hidden.narrow(1, t - shared - 1, 1)?.squeeze(1)?;
        let logits = self
            .model
            .logits(&last)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        // Pad the narrower side on the left, in the masks as in the caches.
        let width = self.width().max(t);
        let grow = |m: &mut Vec<u32>| {
            let extra = width - m.len();
            m.splice(0..0, std::iter::repeat_n(0, extra));
        };
        self.rows.iter_mut().for_each(|r| grow(&mut r.mask));
        self.cache.join(cache)?;
        for (((id, p, s), cfg), (mut m, lg)) in seqs
            .into_iter()
            .zip(fresh)
            .zip(mask.into_iter().zip(logits))
        {
            grow(&mut m);
            self.rows.push(Row {
                id,
                rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
                cfg,
                top_logprobs: s.top_logprobs,
                pos: p.len() as u32,
                made: 0,
                logits: lg,
                mask: m,
            });
        }
        Ok(())
    }

    /// Draws one token for every sequence, drops the sequences that finished, and runs the
    /// forward pass of the rest. Sequences with `max_new_tokens` 0 finish without a token.
    pub fn step(&mut self) -> Result<Vec<Step>> {
        let steps: Vec<Option<Step>> = {
            use rayon::prelude::*;
            self.rows
                .par_iter_mut()
                .map(|r| {
                    if r.cfg.max_new_tokens == 0 {
                        return None;
                    }
                    let draw: f32 = if r.cfg.temperature > 0.0 {
                        r.rng.gen()
                    } else {
                        0.0
                    };
                    let raw = &r.logits;
                    let max = preftune_kernels::vmath::max(raw);
                    let lse = max + preftune_kernels::vmath::sum_exp_shifted(raw, max).ln() as f32;
                    let top = top_n(raw, r.top_logprobs)
                        .into_iter()
                        .map(|i| (i as u32, raw[i] - lse))
                        .collect();
                    let mut work = raw.clone();
                    let (token, _) = sample_token(&mut work, &r.cfg, draw);
                    let logprob = raw[token as usize] - lse;
                    r.made += 1;
                    let finish = if r.cfg.eos_token_ids.contains(&token) {
                        Some(Finish::Stop)
                    } else if r.made >= r.cfg.max_new_tokens {
                        Some(Finish::Length)
                    } else {
                        None
                    };
                    Some(Step {
                        id: r.id,
                        token,
                        logprob,
                        top,
                        finish,
                    })
                })
                .collect()
        };
        let live: Vec<bool> = steps
            .iter()
            .map(|s| s.as_ref().is_some_and(|s| s.finish.is_none()))
            .collect();
        let tokens: Vec<u32> = steps
            .iter()
            .zip(&live)
            .filter(|(_, &l)| l)
            .filter_map(|(s, _)| s.as_ref().map(|s| s.token))
            .collect();
        self.keep(&live)?;
        let steps: Vec<Step> = steps.into_iter().flatten().collect();
        if self.rows.is_empty() {
            return Ok(steps);
        }
        let dev = self.model.device().clone();
        let b = self.rows.len();
        for r in &mut self.rows {
            r.mask.push(1);
        }
        let pos: Vec<u32> = self.rows.iter().map(|r| r.pos).collect();
        let mask: Vec<u32> = self.rows.iter().flat_map(|r| r.mask.clone()).collect();
        let w = self.width();
        let hidden = self.model.forward(
            &Tensor::from_vec(tokens, (b, 1), &dev)?,
            Some(&Tensor::from_vec(mask, (b, w), &Device::Cpu)?),
            Some(&Tensor::from_vec(pos, (b, 1), &Device::Cpu)?),
            Some(&mut self.cache),
        )?;
        let logits = self
            .model
            .logits(&hidden.squeeze(1)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (r, lg) in self.rows.iter_mut().zip(logits) {
            r.logits = lg;
            r.pos += 1;
        }
        Ok(steps)
    }

    /// Removes a sequence (its client went away); unknown ids are ignored.
    pub fn cancel(&mut self, id: u64) -> Result<()> {
        let keep: Vec<bool> = self.rows.iter().map(|r| r.id != id).collect();
        self.keep(&keep)
    }

    /// Keeps the rows marked true, and drops leading positions that are padding in every row kept.
    fn keep(&mut self, keep: &[bool]) -> Result<()> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let idx: Vec<u32> = (0..keep.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        let mut i = 0;
        self.rows.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        if self.rows.is_empty() {
            self.cache = KvCache::new(self.model.cfg.num_layers);
            return Ok(());
        }
        let drop = self
            .rows
            .iter()
            .map(|r| r.mask.iter().take_while(|&&m| m == 0).count())
            .min()
            .unwrap_or(0);
        for r in &mut self.rows {
            r.mask.drain(..drop);
        }
        self.cache.select(&idx, drop)?;
        Ok(())
    }
}

/// Indices of the `n` largest values, largest first.
fn top_n(x: &[f32], n: usize) -> Vec<usize> {
    if n == 0 {
        return vec![];
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let n = n.min(x.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| x[b].total_cmp(&x[a]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, LoadOptions, Pretrained};

    fn tiny() -> Pretrained {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-llama");
        Pretrained::load(&dir, &LoadOptions::default()).unwrap()
    }

    fn settings(n: usize, temperature: f64, seed: u64) -> RowSampling {
        RowSampling {
            max_new_tokens: n,
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed,
            eos_token_ids: vec![],
            top_logprobs: 3,
        }
    }

    /// Sequences that join a running batch at different steps, with different lengths, and
    /// leave it at different steps, get the tokens each gets when sampled alone.
    #[test]
    fn joining_and_leaving_matches_sampling_alone() {
        let p = tiny();
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 9, 13, 200, 7],
            vec![3, 4],
            vec![100, 101, 102, 103, 104, 105, 106, 107, 108],
            vec![42],
        ];
        // (joins at step, new tokens, temperature)
        let plan = [(0, 12, 0.0), (0, 5, 0.9), (3, 10, 0.0), (6, 8, 0.7)];
        let mut b = Batcher::new(&p.model, 0).unwrap();
        let mut got: Vec<Vec<(u32, f32)>> = vec![vec![]; prompts.len()];
        let mut finishes = vec![None; prompts.len()];
        for step in 0..40 {
            let joining: Vec<_> = plan
                .iter()
                .enumerate()
                .filter(|(_, (at, _, _))| *at == step)
                .map(|(i, &(_, n, t))| {
                    (i as u64, prompts[i].clone(), settings(n, t, 17 + i as u64))
                })
                .collect();
            b.admit(joining).unwrap();
            if b.is_empty() && step > 6 {
                break;
            }
            for s in b.step().unwrap() {
                assert_eq!(s.top.len(), 3);
                assert!(s.top[0].1 >= s.top[1].1 && s.top[1].1 >= s.top[2].1);
                if s.token == s.top[0].0 {
                    assert!((s.logprob - s.top[0].1).abs() < 1e-6);
                }
                got[s.id as usize].push((s.token, s.logprob));
                if let Some(f) = s.finish {
                    finishes[s.id as usize] = Some(f);
                }
            }
        }
        assert!(b.is_empty());
        let plan: Vec<(usize, f64)> = plan.iter().map(|&(_, n, t)| (n, t)).collect();
        assert_sampled_as_alone(&p, &prompts, &plan, 17, &got);
        assert!(finishes.iter().all(|f| *f == Some(Finish::Length)));
    }

    /// On the GPU's code path under bf16 the batch's KV cache is bf16: sequences join (the
    /// caches' rows concatenated) and leave (rows selected) through it, and each greedy one
    /// matches its own `generate` up to bf16's near ties (at least its first 3 tokens; a padded
    /// batch rounds differently from a lone row).
    #[test]
    fn joining_and_leaving_works_on_a_bf16_cache() {
        let p = tiny();
        let _portable = crate::kernels::PortableScope::new(true);
        let _bf16 = crate::ops::Bf16Scope::new(true);
        let _packed = crate::ops::PackedWeights::new();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 13, 200, 7], vec![3, 4], vec![42]];
        let plan = [(0, 10), (2, 6), (4, 8)];
        let mut b = Batcher::new(&p.model, 0).unwrap();
        let mut got: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
        for step in 0..30 {
            let joining: Vec<_> = plan
                .iter()
                .enumerate()
                .filter(|(_, (at, _))| *at == step)
                .map(|(i, &(_, n))| (i as u64, prompts[i].clone(), settings(n, 0.0, 1)))
                .collect();
            b.admit(joining).unwrap();
            if b.is_empty() && step > 4 {
                break;
            }
            for s in b.step().unwrap() {
                got[s.id as usize].push(s.token);
            }
            let dtype = b.cache.dtype();
            assert!(
                b.is_empty() || dtype == Some(DType::BF16),
                "step {step}: the batch's cache is {dtype:?}"
            );
        }
        for (i, &(_, n)) in plan.iter().enumerate() {
            let alone = generate(
                &p.model,
                &prompts[i..=i],
                &SamplingConfig {
                    max_new_tokens: n,
                    temperature: 0.0,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(got[i].len(), n, "sequence {i}");
            assert_eq!(got[i][..3], alone.tokens[0][..3], "sequence {i}");
        }
    }

    /// Sequence `i` (`prompts[i]`, `plan[i]` = (new tokens, temperature), seed `seed + i`) got
    /// the tokens `generate` gives it alone, and greedily the same log-probs (the model's own).
    fn assert_sampled_as_alone(
        p: &Pretrained,
        prompts: &[Vec<u32>],
        plan: &[(usize, f64)],
        seed: u64,
        got: &[Vec<(u32, f32)>],
    ) {
        for (i, &(n, t)) in plan.iter().enumerate() {
            let alone = generate(
                &p.model,
                &prompts[i..=i],
                &SamplingConfig {
                    max_new_tokens: n,
                    temperature: t,
                    seed: seed + i as u64,
                    ..Default::default()
                },
            )
            .unwrap();
            let tokens: Vec<u32> = got[i].iter().map(|x| x.0).collect();
            assert_eq!(tokens, alone.tokens[0], "sequence {i}");
            if t == 0.0 {
                for (a, b) in got[i].iter().zip(&alone.logprobs[0]) {
                    assert!((a.1 - b).abs() < 1e-4, "sequence {i}: {} vs {b}", a.1);
                }
            }
        }
    }

    /// Prompts that start as an earlier one did (16 tokens or more: a system prompt) reuse its
    /// keys and values, joining a running batch, and sample as they would alone.
    #[test]
    fn a_kept_prompt_prefix_is_reused_with_the_same_samples() {
        let p = tiny();
        let system: Vec<u32> = (40..60).collect();
        let prompts: Vec<Vec<u32>> = vec![
            [&system[..], &[7, 8]].concat(),
            vec![5, 9, 13],
            [&system[..], &[9, 10, 11]].concat(),
            [&system[..], &[12]].concat(),
            [&system[..10], &[1, 2]].concat(),
        ];
        let plan = [(3, 0.0), (12, 0.0), (6, 0.0), (6, 0.8), (2, 0.0)];
        let mut b = Batcher::new(&p.model, 0).unwrap();
        let mut got: Vec<Vec<(u32, f32)>> = vec![vec![]; prompts.len()];
        let admit = |b: &mut Batcher, ids: &[usize]| {
            let seqs = ids
                .iter()
                .map(|&i| {
                    (
                        i as u64,
                        prompts[i].clone(),
                        settings(plan[i].0, plan[i].1, 9 + i as u64),
                    )
                })
                .collect();
            b.admit(seqs).unwrap();
        };
        admit(&mut b, &[0]);
        admit(&mut b, &[1]);
        let mut step = 0;
        while !b.is_empty() {
            if step == 4 {
                assert_eq!(b.reused_prompt_tokens(), 0);
                // 2 and 3 share the first prompt's 20 system tokens, 4 only ten of them (too few
                // to reuse); admitted together, they join row 1 mid-decode.
                admit(&mut b, &[2, 4, 3]);
                assert_eq!(b.reused_prompt_tokens(), 2 * 20);
            }
            for s in b.step().unwrap() {
                got[s.id as usize].push((s.token, s.logprob));
            }
            step += 1;
        }
        assert_sampled_as_alone(&p, &prompts, &plan, 9, &got);
    }

    #[test]
    fn eos_and_cancel_end_sequences() {
        let p = tiny();
        let mut b = Batcher::new(&p.model, 0).unwrap();
        let first = generate(
            &p.model,
            &[vec![5, 9, 13]],
            &SamplingConfig {
                max_new_tokens: 3,
                temperature: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let mut s = settings(50, 0.0, 0);
        // The second greedy token is an end of sequence: it ends there, as "stop".
        s.eos_token_ids = vec![first.tokens[0][1]];
        b.admit(vec![
            (1, vec![5, 9, 13], s),
            (2, vec![8, 8], settings(50, 0.0, 0)),
        ])
        .unwrap();
        let a = b.step().unwrap();
        assert_eq!(a.len(), 2);
        let a = b.step().unwrap();
        assert_eq!(a[0].finish, Some(Finish::Stop));
        assert_eq!(b.len(), 1);
        b.cancel(2).unwrap();
        assert!(b.is_empty());
        assert!(b.step().unwrap().is_empty());
    }
}
