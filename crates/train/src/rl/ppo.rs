//! PPO for RLHF as TRL's (experimental) `PPOTrainer` computes it: one response per prompt from the
//! policy, a frozen reference, a reward source and a value model on its own backbone (initialised
//! from the reward model when the reward is `model:PATH`, else from the policy with a fresh head).
//! Per-token KL penalty (`kl_coef`, k1 or k3) with the score at the end of the response, GAE
//! (`gamma`, `lam`), whitened advantages, optional reward whitening, the clipped surrogate
//! (`cliprange`) and clipped value loss (`cliprange_value`, `vf_coef`), `num_ppo_epochs` updates
//! per rollout, and a fixed or adaptive KL coefficient. `loss_variant = "kl_penalty"` swaps the
//! clipping for a KL term to the rollout policy (`kl_penalty_coef`).
//!
//! The maths lives in `ppo_loss.rs`; this module only gathers what it needs per response position.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use preftune_model::{Model, Pretrained, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::rl::kl::KlEstimator;
use crate::rl::online::OnlineReference;
use crate::rl::ppo_loss::{ppo_batch, ppo_loss, PpoBatch, PpoRollout};
use crate::rl::rollout::{batch_seed, Prompt, Rollout, RolloutArgs, Sampler};
use crate::trainer::{Algorithm, Metrics, Split};
use preftune_eval::sources::RewardSource;

/// PPO's policy loss: the clipped surrogate, or the KL-penalised one (`kl_penalty_coef`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossVariant {
    #[default]
    Clip,
    KlPenalty,
}

/// PPO's options (TRL's `PPOConfig` names where it has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PpoArgs {
    pub reward: String,
    /// Response length (TRL: `response_length`).
    pub max_completion_length: usize,
    pub max_prompt_length: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// At most this many sequences decode at once (vLLM's name); the others join as sequences
    /// finish (continuous batching). Bounds the KV cache's memory; 0: all at once.
    pub max_num_seqs: usize,
    pub missing_eos_penalty: Option<f64>,
    pub reward_clip: Option<f64>,
    pub num_ppo_epochs: usize,
    /// Minibatches each rollout splits into per epoch (shuffled each epoch); one optimiser step each.
    pub num_mini_batches: usize,
    /// Initial KL coefficient (fixed unless `adap_kl_ctrl`).
    pub kl_coef: f64,
    /// `k1` or `k3`.
    pub kl_estimator: KlEstimator,
    /// Adaptive KL controller (Ziegler et al.): moves `kl_coef` towards `kl_target` over
    /// `kl_horizon` samples.
    pub adap_kl_ctrl: bool,
    pub kl_target: f64,
    pub kl_horizon: f64,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub whiten_rewards: bool,
    /// `clip` (PPO-clip) or `kl_penalty` (PPO with a KL term to the rollout policy, no clipping).
    pub loss_variant: LossVariant,
    pub kl_penalty_coef: f64,
    /// Value model initialisation; default: the reward model (for `model:` rewards) or the policy.
    pub value_model_path: Option<String>,
    /// A value head on the policy's own hidden states instead of a separate value model: one
    /// backbone less in memory and one forward pass less per update.
    pub shared_value_head: bool,
    pub ref_model: Option<String>,
    /// PPO-ptx (InstructGPT): adds `ptx_coef` times the mean token NLL of a batch of `ptx_file`
    /// (pretraining or SFT data, read as `preftune sft` reads it) to every update's loss.
    pub ptx_coef: f64,
    pub ptx_file: Option<PathBuf>,
    /// Rows of `ptx_file` per update (default: `per_device_train_batch_size`).
    pub ptx_batch_size: Option<usize>,
}

impl Default for PpoArgs {
    fn default() -> Self {
        PpoArgs {
            reward: String::new(),
            max_completion_length: 53,
            max_prompt_length: Some(512),
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            max_num_seqs: 0,
            missing_eos_penalty: None,
            reward_clip: None,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adap_kl_ctrl: false,
            kl_target: 6.0,
            kl_horizon: 10000.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            whiten_rewards: false,
            loss_variant: LossVariant::Clip,
            kl_penalty_coef: 0.05,
            value_model_path: None,
            shared_value_head: false,
            ref_model: None,
            ptx_coef: 0.0,
            ptx_file: None,
            ptx_batch_size: None,
        }
    }
}

/// TRL's `PPOConfig` defaults over the shared ones.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 3e-6\nlogging_steps = 10").expect("static TOML")
}

/// Where PPO's values come from.
pub enum ValueModel {
    /// A backbone of its own with a score head (TRL's layout).
    Separate(Box<Model>),
    /// A value head `[1, H]` on the policy's hidden states.
    Shared(Var),
}

/// The value source of one forward pass.
enum Values<'a> {
    Separate(&'a Model),
    Head(&'a Tensor),
}

/// One micro-batch's rollout, kept for the `num_ppo_epochs` updates that reuse it.
struct Cached {
    rollout: Rollout,
    batch: PpoBatch,
    old_logprobs: Vec<Vec<f64>>,
    prompt_lens: Vec<usize>,
}

pub struct Ppo {
    pub train: Vec<Prompt>,
    pub eval: Vec<Prompt>,
    pub args: PpoArgs,
    pub reward: RewardSource,
    pub reference: OnlineReference,
    pub value: ValueModel,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    pub device: Device,
    pub seed: u64,
    pub samples_path: Option<PathBuf>,
    /// The current KL coefficient.
    pub kl_coef: f64,
    cache: HashMap<Vec<usize>, Cached>,
    /// Mean sequence KL of this step's rollouts, for the adaptive controller.
    step_kl: Vec<f64>,
    /// The update under way within the step (`epoch * num_mini_batches + minibatch`).
    update: usize,
    /// PPO-ptx's data (tokenized as SFT) and rows per update.
    pub ptx: Vec<preftune_data::TokenizedExample>,
    pub ptx_batch: usize,
}

/// `rows[i][t] = per_token[i, offset_i + t]` for `t < width` (positions past a row's end read its
/// last position; they are masked downstream). `per_token`: `[B, L]`.
fn gather(per_token: &Tensor, offsets: &[usize], width: usize) -> Result<Tensor> {
    let (b, l) = per_token.dims2()?;
    let idx: Vec<u32> = (0..b)
        .flat_map(|i| (0..width).map(move |t| (i * l + (offsets[i] + t).min(l - 1)) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, b * width, per_token.device())?;
    Ok(per_token
        .flatten_all()?
        .index_select(&idx, 0)?
        .reshape((b, width))?)
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?)
}

impl Ppo {
    /// A PPO run over `train` prompts; `value` must carry a score head (the value head).
    pub fn new(
        policy: &Pretrained,
        args: PpoArgs,
        reward: RewardSource,
        reference: OnlineReference,
        value: ValueModel,
        train: Vec<Prompt>,
        seed: u64,
    ) -> Self {
        Ppo {
            train,
            eval: vec![],
            kl_coef: args.kl_coef,
            args,
            reward,
            reference,
            value,
            tokenizer: policy.tokenizer.clone(),
            eos_token_ids: policy.eos_token_ids(),
            pad_token_id: policy.pad_token_id(),
            device: policy.model.device().clone(),
            seed,
            samples_path: None,
            cache: HashMap::new(),
            step_kl: vec![],
            update: 0,
            ptx: vec![],
            ptx_batch: 0,
        }
    }

    /// PPO-ptx: the mean token NLL of this update's rows of the ptx data (a deterministic choice
    /// of the micro-batch and the update, so a resumed run takes the same rows), or `None`.
    fn ptx_nll(&self, model: &Model, idx: &[usize]) -> Result<Option<Tensor>> {
        if self.ptx.is_empty() || self.args.ptx_coef == 0.0 {
            return Ok(None);
        }
        let (len, k) = (self.ptx.len(), self.ptx_batch.max(1));
        let start = (batch_seed(self.seed, idx) as usize).wrapping_add(self.update * k) % len;
        let refs: Vec<&preftune_data::TokenizedExample> = (0..k.min(len))
            .map(|i| &self.ptx[(start + i) % len])
            .collect();
        let (nll, _, _) = crate::sft::nll_sum(model, &refs, self.pad_token_id, &self.device)?;
        let tokens: f64 = refs
            .iter()
            .map(|r| r.loss_mask.iter().map(|&m| m as f64).sum::<f64>())
            .sum();
        Ok(Some((nll / tokens.max(1.0))?))
    }

    fn rollout_args(&self) -> RolloutArgs {
        RolloutArgs {
            reward: self.args.reward.clone(),
            num_generations: 1,
            max_completion_length: self.args.max_completion_length,
            temperature: self.args.temperature,
            top_p: self.args.top_p,
            top_k: self.args.top_k,
            max_num_seqs: self.args.max_num_seqs,
            missing_eos_penalty: self.args.missing_eos_penalty,
            reward_clip: self.args.reward_clip,
        }
    }

    fn temperature(&self) -> f64 {
        self.args.temperature.max(1e-6)
    }

    /// Log-probs of each response token `[B, T]` and (with `value`) values at each response
    /// position, read from the state before the token as TRL does.
    fn response_stats(
        &self,
        model: &Model,
        value: Option<Values>,
        r: &Rollout,
        plens: &[usize],
        width: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        use candle_core::DType;
        let refs: Vec<&preftune_data::TokenizedExample> = r.seqs.iter().collect();
        let b = preftune_data::collate(&refs, self.pad_token_id, &self.device)?;
        let hidden = model.forward(&b.input_ids, Some(&b.attention_mask), None, None)?;
        let lp = preftune_model::token_logprobs(
            model,
            &hidden,
            &b.input_ids,
            &b.loss_mask,
            self.temperature(),
        )?;
        let logps = gather(&lp.per_token.to_dtype(DType::F32)?, plens, width)?;
        let before: Vec<usize> = plens.iter().map(|p| p.saturating_sub(1)).collect();
        let values = match value {
            None => None,
            Some(Values::Head(h)) => {
                let (bs, l, hd) = hidden.dims3()?;
                let all = hidden
                    .reshape((bs * l, hd))?
                    .matmul(&h.t()?)?
                    .reshape((bs, l))?
                    .to_dtype(DType::F32)?;
                Some(gather(&all, &before, width)?)
            }
            Some(Values::Separate(v)) => {
                let hv = v.forward(&b.input_ids, Some(&b.attention_mask), None, None)?;
                Some(gather(&v.scores_all(&hv)?, &before, width)?)
            }
        };
        Ok((logps, values))
    }

    fn new_rollout(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<Cached> {
        let sampler = Sampler {
            tokenizer: &self.tokenizer,
            eos_token_ids: &self.eos_token_ids,
            pad_token_id: self.pad_token_id,
            seed: self.seed,
            reward: &self.reward,
            samples_path: self.samples_path.as_deref(),
        };
        let args = self.rollout_args();
        let (prompts, r) = sampler.step(model, &self.train, &self.eval, split, idx, &args)?;
        let plens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
        let width = r.completion_lens.iter().copied().max().unwrap_or(1).max(1);
        let frozen = model.detached()?;
        // Old and reference log-probs with the policy's training products: the first update's
        // ratio is exactly 1 and an unchanged policy's KL exactly 0.
        let _same = preftune_model::ops::TrainingProducts::new();
        let (old, vals) = match &self.value {
            ValueModel::Separate(v) => {
                let v = v.detached()?;
                self.response_stats(&frozen, Some(Values::Separate(&v)), &r, &plens, width)?
            }
            ValueModel::Shared(h) => {
                let h = h.as_tensor().detach();
                self.response_stats(&frozen, Some(Values::Head(&h)), &r, &plens, width)?
            }
        };
        let reference = match &self.reference {
            OnlineReference::Model(m) => m.as_ref().clone(),
            OnlineReference::LoraBase => model.without_lora().detached()?,
        };
        let (refl, _) = self.response_stats(&reference, None, &r, &plens, width)?;
        let old_logprobs = rows(&old)?;
        let seq_lens: Vec<usize> = r
            .completion_lens
            .iter()
            .map(|l| l.saturating_sub(1))
            .collect();
        let est = self.args.kl_estimator;
        let batch = ppo_batch(
            &PpoRollout {
                logprobs: &old_logprobs,
                ref_logprobs: &rows(&refl)?,
                values: &rows(&vals.expect("values requested"))?,
                scores: &r.rewards,
                seq_lens: &seq_lens,
            },
            self.kl_coef,
            est,
            self.args.whiten_rewards,
            self.args.gamma,
            self.args.lam,
        );
        Ok(Cached {
            rollout: r,
            batch,
            old_logprobs,
            prompt_lens: plens,
        })
    }
}

impl Algorithm for Ppo {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    fn weight(&self, _: Split, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    /// The step's rollout: samples, rewards, old log-probs, values and advantages of every
    /// micro-batch, from the policy before this step's updates.
    fn prepare(&mut self, model: &Model, batches: &[Vec<usize>]) -> Result<()> {
        self.cache.clear();
        self.step_kl.clear();
        for b in batches {
            let c = self.new_rollout(model, Split::Train, b)?;
            self.cache.insert(b.clone(), c);
        }
        Ok(())
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        if split == Split::Eval {
            // Evaluation: rewards and KL of fresh samples; nothing to optimise.
            let c = self.new_rollout(model, split, idx)?;
            return Ok((
                Tensor::zeros((), candle_core::DType::F32, &self.device)?,
                rollout_metrics(&c, self.kl_coef),
            ));
        }
        let c = self.cache.get(idx).ok_or_else(|| {
            Error::Msg("PPO: no rollout for this micro-batch (prepare did not run)".into())
        })?;
        let width = c.old_logprobs.first().map_or(1, Vec::len);
        // This update's minibatch: a seeded shuffle of the rollout per epoch, cut in
        // `num_mini_batches` parts (all rows when 1).
        let nmb = self.args.num_mini_batches.max(1);
        let all = c.rollout.rewards.len();
        let rows: Vec<usize> = if nmb == 1 {
            (0..all).collect()
        } else {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let epoch = self.update / nmb;
            let mut perm: Vec<usize> = (0..all).collect();
            perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                batch_seed(self.seed, idx) ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9),
            ));
            let per = all.div_ceil(nmb);
            let mb = self.update % nmb;
            perm[(mb * per).min(all)..((mb + 1) * per).min(all)].to_vec()
        };
        let sub_rollout = c.rollout.select(&rows);
        let sub_batch = c.batch.select(&rows);
        let sub_old: Vec<Vec<f64>> = rows.iter().map(|&i| c.old_logprobs[i].clone()).collect();
        let sub_plens: Vec<usize> = rows.iter().map(|&i| c.prompt_lens[i]).collect();
        let values = match &self.value {
            ValueModel::Separate(v) => Values::Separate(v),
            ValueModel::Shared(h) => Values::Head(h.as_tensor()),
        };
        let (new, vpred) =
            self.response_stats(model, Some(values), &sub_rollout, &sub_plens, width)?;
        let vpred = vpred.expect("values requested");
        let kl_penalty = self.args.loss_variant == LossVariant::KlPenalty;
        let cliprange = if kl_penalty {
            f64::INFINITY
        } else {
            self.args.cliprange
        };
        let l = ppo_loss(
            &new,
            &vpred,
            &sub_batch,
            &sub_old,
            cliprange,
            self.args.cliprange_value,
            self.args.vf_coef,
        )?;
        let mut loss = l.loss;
        if kl_penalty {
            // k3 estimate of KL(rollout policy || current policy) over response tokens.
            let keep: Vec<f32> = sub_batch
                .padding_mask
                .iter()
                .flatten()
                .map(|&m| (!m) as u8 as f32)
                .collect();
            let keep = Tensor::from_vec(keep, new.dims(), &self.device)?;
            let old = Tensor::from_vec(
                sub_old
                    .iter()
                    .flatten()
                    .map(|&x| x as f32)
                    .collect::<Vec<_>>(),
                new.dims(),
                &self.device,
            )?;
            let d = (&old - &new)?;
            let k3 = ((d.exp()? - 1.0)? - &d)?;
            let kl =
                ((k3 * &keep)?.sum_all()? / keep.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
            loss = (loss + (kl * self.args.kl_penalty_coef)?)?;
        }
        let n = idx.len() as f64;
        let ptx = self.ptx_nll(model, idx)?;
        if let Some(nll) = &ptx {
            loss = (loss + (nll * self.args.ptx_coef)?)?;
        }
        let mut m = rollout_metrics(c, self.kl_coef);
        if let Some(nll) = ptx {
            m.add("loss/ptx", nll.to_scalar::<f32>()? as f64 * n, n);
        }
        m.add("policy/approxkl_avg", l.approxkl * n, n);
        m.add("policy/clipfrac_avg", l.pg_clipfrac * n, n);
        m.add("loss/policy_avg", l.pg_loss * n, n);
        m.add("loss/value_avg", l.vf_loss * n, n);
        m.add("val/clipfrac_avg", l.vf_clipfrac * n, n);
        m.add("val/ratio", l.ratio_mean * n, n);
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        m.add("loss", value * n, n);
        // Each rollout's KL, once (at the first of its updates), for the adaptive controller.
        if self.update == 0 {
            let kl: f64 = c
                .batch
                .rewards
                .kl
                .iter()
                .map(|r| r.iter().sum::<f64>())
                .sum::<f64>()
                / n;
            self.step_kl.push(kl);
        }
        Ok(((loss * n)?, m))
    }

    fn extra_params(&self) -> Vec<(String, Var)> {
        match &self.value {
            ValueModel::Separate(v) => v
                .trainable_params()
                .into_iter()
                .map(|(n, v)| (format!("value_model.{n}"), v))
                .collect(),
            ValueModel::Shared(h) => vec![("value_head.weight".into(), h.clone())],
        }
    }

    fn updates_per_batch(&self) -> usize {
        self.args.num_ppo_epochs.max(1) * self.args.num_mini_batches.max(1)
    }

    fn on_update(&mut self, update: usize) -> Result<()> {
        self.update = update;
        if update == self.updates_per_batch() && self.args.adap_kl_ctrl && !self.step_kl.is_empty()
        {
            // Ziegler et al.'s controller, as TRL's AdaptiveKLController.
            let kl = self.step_kl.iter().sum::<f64>() / self.step_kl.len() as f64;
            let n_steps = self
                .cache
                .values()
                .map(|c| c.rollout.rewards.len())
                .sum::<usize>() as f64;
            self.kl_coef = crate::rl::ppo_loss::adaptive_kl_coef(
                self.kl_coef,
                kl,
                self.args.kl_target,
                n_steps,
                self.args.kl_horizon,
            );
        }
        Ok(())
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        match &self.value {
            ValueModel::Separate(v) => {
                let vdir = dir.join("value_model");
                std::fs::create_dir_all(&vdir).map_err(|e| Error::io(&vdir, e))?;
                preftune_model::weights::save_safetensors(
                    &vdir.join("model.safetensors"),
                    v.cfg.arch,
                    &v.named_params(),
                )?;
            }
            ValueModel::Shared(h) => preftune_model::weights::save_safetensors(
                &dir.join("value_head.safetensors"),
                preftune_model::Arch::Llama,
                &[("value_head.weight".into(), h.as_tensor().clone())],
            )?,
        }
        preftune_model::io::write_json(
            &dir.join("ppo_state.json"),
            &serde_json::json!({"kl_coef": self.kl_coef}),
        )?;
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        match &self.value {
            ValueModel::Separate(v) => {
                let vdir = dir.join("value_model");
                // Through the HF reader: it undoes GPT-2's Conv1D layout as the writer applied it.
                let saved =
                    preftune_model::weights::load_hf_weights(&vdir, v.cfg.arch, &self.device)?;
                for (name, var) in v.trainable_params() {
                    let t = saved.get(&name).ok_or_else(|| {
                        Error::Msg(format!("{}: no tensor {name}", vdir.display()))
                    })?;
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
            }
            ValueModel::Shared(h) => {
                let path = dir.join("value_head.safetensors");
                let saved = candle_core::safetensors::load(&path, &self.device)
                    .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
                let t = saved.get("value_head.weight").ok_or_else(|| {
                    Error::Msg(format!("{}: no value_head.weight", path.display()))
                })?;
                h.set(&t.to_dtype(h.dtype())?)?;
            }
        }
        let sp = dir.join("ppo_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: {e}", sp.display())))?;
        self.kl_coef = v["kl_coef"].as_f64().unwrap_or(self.kl_coef);
        Ok(())
    }
}

/// TRL's PPO metric names for one rollout.
fn rollout_metrics(c: &Cached, kl_coef: f64) -> Metrics {
    let mut m = Metrics::default();
    let r = &c.rollout;
    let n = r.rewards.len() as f64;
    let kl_sum: f64 = c
        .batch
        .rewards
        .kl
        .iter()
        .map(|k| k.iter().sum::<f64>())
        .sum();
    let nsr: f64 = c
        .batch
        .rewards
        .non_score_reward
        .iter()
        .map(|k| k.iter().sum::<f64>())
        .sum();
    let scores: f64 = r.rewards.iter().sum();
    // As TRL's PPO logs it: the sampled responses' negative log-probability, summed per response
    // (a one-sample estimate of the sequence entropy).
    let entropy: f64 = c
        .old_logprobs
        .iter()
        .zip(&c.batch.padding_mask)
        .map(|(lp, pad)| {
            lp.iter()
                .zip(pad)
                .filter(|(_, p)| !**p)
                .map(|(l, _)| -l)
                .sum::<f64>()
        })
        .sum();
    m.add("objective/entropy", entropy, n);
    m.add("objective/kl", kl_sum, n);
    m.add("objective/non_score_reward", nsr, n);
    m.add("objective/scores", scores, n);
    m.add("objective/rlhf_reward", scores + nsr, n);
    m.add(
        "val/num_eos_tokens",
        r.finished.iter().filter(|f| **f).count() as f64,
        1.0,
    );
    m.add(
        "completions/mean_length",
        r.completion_lens.iter().sum::<usize>() as f64,
        n,
    );
    m.add("kl_coef", kl_coef * n, n);
    m.tokens = r.seqs.iter().map(|s| s.input_ids.len()).sum();
    m
}

/// `preftune ppo`.
pub fn run(cfg: &RunConfig<PpoArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    use crate::trainer::{evaluate, train_with_report};
    let args = &cfg.args;
    let a = &cfg.algo;
    if a.reward.is_empty() {
        return Err(Error::Config(
            "reward is required (model:PATH, command:CMD or combine:FILE.toml)".into(),
        ));
    }
    let reward = RewardSource::parse(&a.reward)?;
    let load = |path: &str, trainable: bool| crate::trainer::load_model(args, path, trainable);
    let (policy, lora, ckpt) =
        crate::trainer::load_run_policy(args, &cfg.table, resume, eval_only)?;
    let reference = match (&a.ref_model, &lora) {
        (Some(r), _) => OnlineReference::Model(Box::new(load(r, false)?.model)),
        (None, Some(_)) => OnlineReference::LoraBase,
        (None, None) => {
            OnlineReference::Model(Box::new(load(&args.model_name_or_path, false)?.model))
        }
    };
    let value = if a.shared_value_head {
        // preftune's own head (TRL has no shared value head): N(0, 1/sqrt(H + 1)).
        let hidden = policy.model.cfg.hidden_size;
        let h = preftune_model::reward::init_score_head(
            hidden,
            1.0 / ((hidden + 1) as f64).sqrt(),
            args.seed,
            policy.model.dtype(),
            policy.model.device(),
        )?;
        ValueModel::Shared(Var::from_tensor(&h)?)
    } else {
        let value_path = a
            .value_model_path
            .clone()
            .or_else(|| a.reward.strip_prefix("model:").map(str::to_string))
            .unwrap_or_else(|| args.model_name_or_path.clone());
        let mut value = load(&value_path, !eval_only)?.model;
        if !value.has_score_head() {
            value.add_score_head(args.seed)?;
        }
        ValueModel::Separate(Box::new(value))
    };
    let (train, eval, reports) = crate::rl::rollout::load_prompt_splits(
        args,
        &policy.tokenizer,
        a.max_prompt_length,
        eval_only,
    )?;
    std::fs::create_dir_all(&args.output_dir).map_err(|e| Error::io(&args.output_dir, e))?;
    let mut algo = Ppo::new(
        &policy,
        a.clone(),
        reward,
        reference,
        value,
        train,
        args.seed,
    );
    algo.eval = eval;
    algo.samples_path = (!eval_only).then(|| args.output_dir.join("samples.jsonl"));
    let mut reports = reports;
    if !a.ptx_coef.is_finite() || a.ptx_coef < 0.0 {
        return Err(Error::Config(format!(
            "ptx_coef must be a finite number >= 0, found {}",
            a.ptx_coef
        )));
    }
    match (&a.ptx_file, a.ptx_coef) {
        (Some(f), c) if c != 0.0 => {
            // Read as `preftune sft` reads data, without PPO's column mapping (that names the
            // prompt data's columns).
            let mut ptx_args = args.clone();
            ptx_args.columns.clear();
            let (ptx, r) = crate::sft::load_split(
                f,
                &ptx_args,
                &crate::sft::SftArgs::default(),
                &policy.tokenizer,
            )?;
            if ptx.is_empty() {
                return Err(Error::Config(format!(
                    "{}: ptx_file has no rows",
                    f.display()
                )));
            }
            eprintln!("ptx data {}: {} examples", f.display(), ptx.len());
            reports.push(serde_json::to_value(&r).unwrap_or_default());
            algo.ptx = ptx;
            algo.ptx_batch = a.ptx_batch_size.unwrap_or(args.per_device_train_batch_size);
        }
        (Some(f), _) => eprintln!(
            "warning: ptx_file {} is not used: ptx_coef is 0",
            f.display()
        ),
        (None, c) if c != 0.0 => {
            return Err(Error::Config(
                "ptx_coef needs ptx_file (the pretraining or SFT data to mix in)".into(),
            ))
        }
        _ => {}
    }
    if eval_only {
        let mut v =
            serde_json::to_value(evaluate(args, &policy.model, &mut algo)?).unwrap_or_default();
        v["data"] = serde_json::Value::Array(reports);
        return Ok(v);
    }
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut algo, &reports)
}
