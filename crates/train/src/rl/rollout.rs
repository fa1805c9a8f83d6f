//! The rollout engine every online algorithm shares: sample `num_generations` completions per
//! prompt from the current policy (outside autograd), score them with a reward source
//! (`missing_eos_penalty`, clipping), and recompute per-token log-probs of the completions, with
//! gradients for the policy and without for the reference. Logits are divided by the sampling
//! temperature when log-probs are recomputed, so they match the sampler's.
use std::path::Path;

use candle_core::{Device, Tensor};
use preftune_data::{collate, read_rows, Text, TokenizedExample};
use preftune_model::{token_logprobs, Model, SamplingConfig, TokenLogprobs, Tokenizer};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::trainer::Metrics;
use preftune_eval::sources::{row_prompt, sample_and_score_ids, PromptRef, RewardSource};

/// What the rollout engine needs (from [`crate::rl::online::OnlineArgs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutArgs {
    /// A reward source spec, for messages (the source itself is parsed once by the caller).
    pub reward: String,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// At most this many sequences decode at once (vLLM's name); the others join as sequences
    /// finish (continuous batching). Bounds the KV cache's memory; 0: all at once.
    pub max_num_seqs: usize,
    /// Subtracted from the reward of completions that end without EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Rewards are clipped to `[-reward_clip, reward_clip]`.
    pub reward_clip: Option<f64>,
}

impl Default for RolloutArgs {
    fn default() -> Self {
        RolloutArgs {
            reward: String::new(),
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_num_seqs: 0,
            missing_eos_penalty: None,
            reward_clip: None,
        }
    }
}

/// A prompt row: the prompt, whether it is flagged risky, and the row as read (for sample logs).
#[derive(Clone, Debug)]
pub struct Prompt {
    pub text: Text,
    pub risky: bool,
    pub ids: Vec<u32>,
}

/// Reads rows with `prompt` (text or messages) and tokenizes them for sampling; prompts longer than
/// `max_prompt_length` keep their end (as TRL truncates on the left) and are counted.
pub fn load_prompts(
    path: &Path,
    tok: &Tokenizer,
    max_prompt_length: Option<usize>,
) -> Result<(Vec<Prompt>, usize)> {
    let rows = read_rows(path)?;
    let mut out = vec![];
    let mut truncated = 0;
    for r in &rows {
        let text = row_prompt(r)?;
        let risky = r
            .value
            .get("risky")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut ids = match &text {
            Text::Plain(s) => tok.encode(s, true)?,
            Text::Messages(m) => tok.encode_chat(m, true)?,
        };
        if let Some(m) = max_prompt_length.filter(|&m| ids.len() > m) {
            ids = ids[ids.len() - m..].to_vec();
            truncated += 1;
        }
        out.push(Prompt { text, risky, ids });
    }
    if out.is_empty() {
        return Err(Error::Config(format!("{}: no prompts", path.display())));
    }
    Ok((out, truncated))
}

/// The train and eval prompts of an online run (train only when training, eval required with
/// `eval_only`), each split reported on stderr and in the returned data report.
pub fn load_prompt_splits(
    args: &crate::config::TrainingArguments,
    tok: &Tokenizer,
    max_prompt_length: Option<usize>,
    eval_only: bool,
) -> Result<(Vec<Prompt>, Vec<Prompt>, Vec<Value>)> {
    let mut reports = vec![];
    let mut read = |path: &Path| -> Result<Vec<Prompt>> {
        let (p, truncated) = load_prompts(path, tok, max_prompt_length)?;
        eprintln!(
            "data {}: {} prompts, {truncated} truncated to max_prompt_length",
            path.display(),
            p.len()
        );
        reports.push(
            json!({"file": path.display().to_string(), "prompts": p.len(), "truncated": truncated}),
        );
        Ok(p)
    };
    let train = match (&args.train_file, eval_only) {
        (Some(f), false) => read(f)?,
        (None, false) => return Err(Error::Config("train_file is required".into())),
        (_, true) => vec![],
    };
    let eval = match &args.eval_file {
        Some(f) => read(f)?,
        None if eval_only => return Err(Error::Config("--eval-only needs eval_file".into())),
        None => vec![],
    };
    Ok((train, eval, reports))
}

/// One batch of sampled completions, `n` per prompt, prompt-major.
#[derive(Clone)]
pub struct Rollout {
    /// Prompt + completion, with the loss mask on the completion tokens.
    pub seqs: Vec<TokenizedExample>,
    pub texts: Vec<String>,
    pub finished: Vec<bool>,
    pub completion_lens: Vec<usize>,
    /// Rewards after the EOS penalty and clipping.
    pub rewards: Vec<f64>,
}

impl Rollout {
    /// The completions `rows` (a minibatch).
    pub fn select(&self, rows: &[usize]) -> Rollout {
        fn pick<T: Clone>(v: &[T], rows: &[usize]) -> Vec<T> {
            rows.iter().map(|&i| v[i].clone()).collect()
        }
        Rollout {
            seqs: pick(&self.seqs, rows),
            texts: pick(&self.texts, rows),
            finished: pick(&self.finished, rows),
            completion_lens: pick(&self.completion_lens, rows),
            rewards: pick(&self.rewards, rows),
        }
    }
}

/// Samples and scores `n` completions for each prompt with the policy `model` (used detached).
pub fn rollout(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[&Prompt],
    args: &RolloutArgs,
    reward: &RewardSource,
    sampling: &SamplingConfig,
) -> Result<Rollout> {
    let n = args.num_generations;
    let refs: Vec<PromptRef> = prompts
        .iter()
        .map(|p| PromptRef {
            ids: &p.ids,
            text: &p.text,
            risky: p.risky,
        })
        .collect();
    let out = sample_and_score_ids(model, tok, &refs, n, Some(reward), sampling)?;
    let seqs = out
        .tokens
        .iter()
        .enumerate()
        .map(|(i, toks)| {
            let p = prompts[i / n];
            let ids: Vec<u32> = p.ids.iter().chain(toks).copied().collect();
            let mut mask = vec![0u8; ids.len()];
            mask[p.ids.len()..].iter_mut().for_each(|m| *m = 1);
            TokenizedExample {
                input_ids: ids,
                loss_mask: mask,
                position_ids: None,
                truncated: false,
            }
        })
        .collect();
    let texts = out.texts;
    let mut rewards = out.rewards;
    for (r, fin) in rewards.iter_mut().zip(&out.finished) {
        if let (Some(pen), false) = (args.missing_eos_penalty, fin) {
            *r -= pen;
        }
        if let Some(c) = args.reward_clip {
            *r = r.clamp(-c, c);
        }
    }
    Ok(Rollout {
        completion_lens: out.tokens.iter().map(Vec::len).collect(),
        finished: out.finished,
        seqs,
        texts,
        rewards,
    })
}

/// Per-token log-probs of the completions under `model` (`per_token`: `[B, L]`, 0 outside the
/// completions) and the completion mask `[B, L]` (f32).
pub fn completion_logps(
    model: &Model,
    r: &Rollout,
    pad: u32,
    temperature: f64,
    device: &Device,
) -> Result<(TokenLogprobs, Tensor)> {
    let refs: Vec<&TokenizedExample> = r.seqs.iter().collect();
    let b = collate(&refs, pad, device)?;
    let hidden = model.forward(&b.input_ids, Some(&b.attention_mask), None, None)?;
    let lp = token_logprobs(model, &hidden, &b.input_ids, &b.loss_mask, temperature)?;
    let mask = b.loss_mask.to_dtype(candle_core::DType::F32)?;
    Ok((lp, mask))
}

/// Metrics every online trainer logs, with TRL's names.
pub fn rollout_metrics(r: &Rollout, n_prompts: usize, n: usize) -> Metrics {
    let mut m = Metrics::default();
    let k = r.rewards.len() as f64;
    let mean = r.rewards.iter().sum::<f64>() / k;
    let std =
        (r.rewards.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0).max(1.0)).sqrt();
    m.add("reward", mean * n_prompts as f64, n_prompts as f64);
    m.add("reward_std", std * n_prompts as f64, n_prompts as f64);
    let lens: f64 = r.completion_lens.iter().map(|&l| l as f64).sum();
    m.add("completions/mean_length", lens, k);
    let clipped = r.finished.iter().filter(|f| !**f).count() as f64;
    m.add("completions/clipped_ratio", clipped, k);
    let zero_std = r
        .rewards
        .chunks(n)
        .filter(|g| g.iter().all(|x| *x == g[0]))
        .count() as f64;
    m.add("frac_reward_zero_std", zero_std, n_prompts as f64);
    m.tokens = r.seqs.iter().map(|s| s.input_ids.len()).sum();
    m
}

/// Appends what the policy wrote, with its reward, to `samples.jsonl` so a person can read it.
pub fn log_samples(path: Option<&Path>, prompts: &[&Prompt], n: usize, r: &Rollout) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut buf = String::new();
    for (i, t) in r.texts.iter().enumerate() {
        let prompt = match &prompts[i / n].text {
            Text::Plain(s) => json!(s),
            Text::Messages(m) => json!(m
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect::<Vec<_>>()),
        };
        buf.push_str(&json!({"prompt": prompt, "response": t, "reward": r.rewards[i]}).to_string());
        buf.push('\n');
    }
    f.write_all(buf.as_bytes()).map_err(|e| Error::io(path, e))
}

/// What a trainer fixes once and every rollout step reuses.
pub struct Sampler<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos_token_ids: &'a [u32],
    pub pad_token_id: u32,
    pub seed: u64,
    pub reward: &'a RewardSource,
    /// `samples.jsonl`, appended to by training (not evaluation) rollouts.
    pub samples_path: Option<&'a Path>,
}

impl Sampler<'_> {
    /// One step's rollout: the prompts `idx` of the split, sampled with a seed derived from them
    /// (so a resumed run samples what the straight run did), scored, and logged when training.
    pub fn step<'p>(
        &self,
        model: &Model,
        train: &'p [Prompt],
        eval: &'p [Prompt],
        split: crate::trainer::Split,
        idx: &[usize],
        args: &RolloutArgs,
    ) -> Result<(Vec<&'p Prompt>, Rollout)> {
        use crate::trainer::Split;
        let set = match split {
            Split::Train => train,
            Split::Eval => eval,
        };
        let prompts: Vec<&Prompt> = idx.iter().map(|&i| &set[i]).collect();
        let seed = batch_seed(self.seed ^ (split == Split::Eval) as u64, idx);
        let cfg = sampling_config(args, self.eos_token_ids.to_vec(), self.pad_token_id, seed);
        let r = rollout(model, self.tokenizer, &prompts, args, self.reward, &cfg)?;
        if split == Split::Train {
            log_samples(self.samples_path, &prompts, args.num_generations, &r)?;
        }
        Ok((prompts, r))
    }
}

/// A seed for a batch of prompt indices: resuming re-samples exactly what the straight run did.
pub fn batch_seed(seed: u64, idx: &[usize]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &i in idx {
        h = (h ^ i as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Sampling settings for a rollout.
pub fn sampling_config(args: &RolloutArgs, eos: Vec<u32>, pad: u32, seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: args.max_completion_length,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        max_num_seqs: args.max_num_seqs,
        seed,
        eos_token_ids: eos,
        pad_token_id: pad,
        ..Default::default()
    }
}
