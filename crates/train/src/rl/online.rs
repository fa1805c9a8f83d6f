//! Online training on the shared loop: each micro-batch of prompts is a fresh rollout (sampled
//! from the current policy, scored), then one policy-gradient update. GRPO and RLOO differ only in
//! their advantages and loss (`grpo_loss.rs`, `rloo_loss.rs`); `grpo.rs` and `rloo.rs` hold their options.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use preftune_model::{Model, Tokenizer};

use crate::config::TrainingArguments;
use crate::error::{Error, Result};
use crate::rl::grpo_loss::{grpo_advantages, grpo_loss, GrpoParams, ScaleRewards};
use crate::rl::rloo_loss::{reinforce_advantages, rloo_advantages, rloo_loss};
use crate::rl::rollout::{completion_logps, rollout_metrics, Prompt, RolloutArgs, Sampler};
use crate::trainer::{Algorithm, Metrics, Split};
use preftune_eval::sources::RewardSource;

/// The options GRPO, RLOO and REINFORCE share, flat as TRL names them (`GRPOConfig`,
/// `RLOOConfig`); each trainer's own are in `GrpoOwn` and `RlooOwn`, read from the same keys
/// ([`crate::config::Parts`]), and each trainer's `defaults()` sets its own defaults (RLOO:
/// `beta = 0.05`, `num_generations = 2`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct OnlineArgs {
    /// A reward source: `model:PATH`, `command:CMD`, `combine:FILE.toml` or `gold:sentiment`.
    pub reward: String,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub max_prompt_length: Option<usize>,
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
    /// KL coefficient (GRPO: k3 per token; RLOO: k1 per sequence, off the reward).
    pub beta: f64,
    pub epsilon: f64,
    pub ref_model: Option<String>,
}

impl Default for OnlineArgs {
    fn default() -> Self {
        OnlineArgs {
            reward: String::new(),
            num_generations: 8,
            max_completion_length: 256,
            max_prompt_length: Some(512),
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_num_seqs: 0,
            missing_eos_penalty: None,
            reward_clip: None,
            beta: 0.0,
            epsilon: 0.2,
            ref_model: None,
        }
    }
}

impl OnlineArgs {
    pub fn rollout(&self) -> RolloutArgs {
        RolloutArgs {
            reward: self.reward.clone(),
            num_generations: self.num_generations,
            max_completion_length: self.max_completion_length,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_num_seqs: self.max_num_seqs,
            missing_eos_penalty: self.missing_eos_penalty,
            reward_clip: self.reward_clip,
        }
    }
}

pub enum Objective {
    Grpo {
        params: GrpoParams,
        scale: ScaleRewards,
    },
    /// RLOO, or REINFORCE with the batch-mean baseline when `leave_one_out` is false.
    Rloo {
        beta: f64,
        epsilon: f64,
        normalize_advantages: bool,
        leave_one_out: bool,
    },
}

impl Objective {
    fn beta(&self) -> f64 {
        match self {
            Objective::Grpo { params, .. } => params.beta,
            Objective::Rloo { beta, .. } => *beta,
        }
    }
}

/// Where reference log-probs come from (only needed when `beta != 0`).
pub enum OnlineReference {
    Model(Box<Model>),
    /// The policy without its LoRA adapters.
    LoraBase,
}

pub struct OnlineTrainer {
    pub train: Vec<Prompt>,
    pub eval: Vec<Prompt>,
    pub rollout: RolloutArgs,
    pub objective: Objective,
    pub reward: RewardSource,
    pub reference: Option<OnlineReference>,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    pub device: Device,
    pub seed: u64,
    /// `samples.jsonl` in the run folder: what the policy wrote at each step, with its reward.
    pub samples_path: Option<PathBuf>,
}

fn vec_tensor(v: &[f64], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        v.len(),
        dev,
    )?)
}

impl Algorithm for OnlineTrainer {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    fn weight(&self, _: Split, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let sampler = Sampler {
            tokenizer: &self.tokenizer,
            eos_token_ids: &self.eos_token_ids,
            pad_token_id: self.pad_token_id,
            seed: self.seed,
            reward: &self.reward,
            samples_path: self.samples_path.as_deref(),
        };
        let (prompts, r) =
            sampler.step(model, &self.train, &self.eval, split, idx, &self.rollout)?;
        let n = self.rollout.num_generations;
        let temp = self.rollout.temperature.max(1e-6);
        let (lp, mask) = completion_logps(model, &r, self.pad_token_id, temp, &self.device)?;
        let reference = if self.objective.beta() != 0.0 {
            // Scored with the policy's training products: equal weights give a KL of exactly 0.
            let _same = preftune_model::ops::TrainingProducts::new();
            let m = match &self.reference {
                Some(OnlineReference::Model(m)) => m.as_ref().clone(),
                Some(OnlineReference::LoraBase) => model.without_lora().detached()?,
                None => {
                    return Err(crate::error::Error::Config(
                        "beta != 0 needs a reference model".into(),
                    ))
                }
            };
            let (rl, _) = completion_logps(&m, &r, self.pad_token_id, temp, &self.device)?;
            Some((rl.per_token.detach(), rl.sum.detach()))
        } else {
            None
        };
        let mut metrics = rollout_metrics(&r, prompts.len(), n);
        let w = prompts.len() as f64;
        let loss = match &self.objective {
            Objective::Grpo { params, scale } => {
                let adv = grpo_advantages(&r.rewards, n, *scale);
                let l = grpo_loss(
                    &lp.per_token,
                    None,
                    reference.as_ref().map(|(t, _)| t),
                    &vec_tensor(&adv, &self.device)?,
                    &mask,
                    params,
                )?;
                metrics.add("clip_ratio/region_mean", l.clip_ratio * w, w);
                if let Some(kl) = l.kl {
                    metrics.add("kl", kl * w, w);
                }
                l.loss
            }
            Objective::Rloo {
                beta,
                epsilon,
                normalize_advantages,
                leave_one_out,
            } => {
                let old = lp.sum.detach();
                let seq_kl: Option<Vec<f64>> = reference
                    .as_ref()
                    .map(|(_, rs)| -> Result<Vec<f64>> {
                        Ok((&old - rs)?
                            .to_vec1::<f32>()?
                            .iter()
                            .map(|&x| x as f64)
                            .collect())
                    })
                    .transpose()?;
                let a = if *leave_one_out {
                    rloo_advantages(
                        &r.rewards,
                        seq_kl.as_deref(),
                        *beta,
                        n,
                        *normalize_advantages,
                    )
                } else {
                    reinforce_advantages(
                        &r.rewards,
                        seq_kl.as_deref(),
                        *beta,
                        *normalize_advantages,
                    )
                };
                if let Some(kl) = &seq_kl {
                    metrics.add("kl", kl.iter().sum::<f64>() / kl.len() as f64 * w, w);
                }
                rloo_loss(
                    &lp.sum,
                    &old,
                    &vec_tensor(&a.advantages, &self.device)?,
                    *epsilon,
                )?
            }
        };
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        metrics.add("loss", value * w, w);
        Ok(((loss * w)?, metrics))
    }
}

/// Loads policy, reference (when `beta != 0`), reward source and prompts, then trains (or
/// evaluates: the rewards of fresh samples on `eval_file`).
pub fn run_online(
    args: &TrainingArguments,
    table: &toml::Table,
    online: &OnlineArgs,
    objective: Objective,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let rollout_args = &online.rollout();
    let ref_model = online.ref_model.as_deref();
    let max_prompt_length = online.max_prompt_length;
    use crate::trainer::{evaluate, train_with_report};
    if rollout_args.reward.is_empty() {
        return Err(Error::Config(
            "reward is required (model:PATH, command:CMD or combine:FILE.toml)".into(),
        ));
    }
    let needs_group = !matches!(
        objective,
        Objective::Rloo {
            leave_one_out: false,
            ..
        }
    );
    if needs_group && rollout_args.num_generations < 2 {
        return Err(Error::Config(
            "num_generations must be >= 2 (advantages compare completions of one prompt)".into(),
        ));
    }
    let reward = RewardSource::parse(&rollout_args.reward)?;
    let frozen = |path: &str| crate::trainer::load_model(args, path, false);
    let (policy, lora, ckpt) = crate::trainer::load_run_policy(args, table, resume, eval_only)?;
    let reference = if objective.beta() == 0.0 || eval_only {
        None
    } else if let Some(r) = ref_model {
        Some(OnlineReference::Model(Box::new(frozen(r)?.model)))
    } else if lora.is_some() {
        Some(OnlineReference::LoraBase)
    } else {
        // The policy's starting weights, even when resuming.
        Some(OnlineReference::Model(Box::new(
            frozen(&args.model_name_or_path)?.model,
        )))
    };
    let objective = match (objective, eval_only) {
        // Evaluation reports rewards; the KL term needs no reference there.
        (Objective::Grpo { mut params, scale }, true) => {
            params.beta = 0.0;
            Objective::Grpo { params, scale }
        }
        (
            Objective::Rloo {
                epsilon,
                normalize_advantages,
                leave_one_out,
                ..
            },
            true,
        ) => Objective::Rloo {
            beta: 0.0,
            epsilon,
            normalize_advantages,
            leave_one_out,
        },
        (o, false) => o,
    };
    let (train, eval, reports) = crate::rl::rollout::load_prompt_splits(
        args,
        &policy.tokenizer,
        max_prompt_length,
        eval_only,
    )?;
    std::fs::create_dir_all(&args.output_dir).map_err(|e| Error::io(&args.output_dir, e))?;
    let mut algo = OnlineTrainer {
        train,
        eval,
        rollout: rollout_args.clone(),
        objective,
        reward,
        reference,
        tokenizer: policy.tokenizer.clone(),
        eos_token_ids: policy.eos_token_ids(),
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
        seed: args.seed,
        samples_path: (!eval_only).then(|| args.output_dir.join("samples.jsonl")),
    };
    if eval_only {
        let mut v =
            serde_json::to_value(evaluate(args, &policy.model, &mut algo)?).unwrap_or_default();
        v["data"] = serde_json::Value::Array(reports);
        return Ok(v);
    }
    train_with_report(args, table, policy, lora, ckpt, &mut algo, &reports)
}
