//! `preftune eval ...`: judge samples and policies on any models and prompts.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use preftune_data::read_rows;
use preftune_eval::judge::Judge;
use preftune_eval::stats::{lengths, mean_ci, win_rate};
use preftune_eval::{RewardSource, Sample};
use preftune_train::rollout::{
    completion_logps, load_prompts, rollout, sampling_config, RolloutArgs,
};
use serde_json::json;

use crate::commands::{emit, load};
use crate::rewards::sample_of;
use crate::{ModelArgs, SamplingArgs};

#[derive(Subcommand, Clone, Debug)]
pub enum EvalCmd {
    /// Mean reward of samples (rows with `prompt` and `response`) with a 95% interval, and the
    /// responses' length statistics.
    Reward {
        /// Any reward source: model:PATH, command:CMD, combine:FILE.toml, gold:sentiment.
        #[arg(long)]
        reward: String,
        #[arg(long)]
        data: PathBuf,
    },
    /// Win rate of samples against baseline samples of the same prompts (row by row), by a judge:
    /// any reward source (the higher score wins, ties count half), or `llm:PATH`, a local model
    /// asked which response is better in both orders (the order-averaged probability decides).
    Winrate {
        #[arg(long)]
        judge: String,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        baseline: PathBuf,
        /// The LLM judge's question (default: "Which response is better?").
        #[arg(long)]
        question: Option<String>,
    },
    /// The reward-vs-KL frontier (the DPO paper's figure): runs a pipeline config with DPO at
    /// each beta and PPO at each KL coefficient (cached stages are reused), evaluates every
    /// policy, and writes OUTPUT_DIR/frontier.svg and frontier.json.
    Frontier {
        /// A pipeline config (e.g. examples/imdb-sentiment.toml).
        config: PathBuf,
        /// Comma-separated DPO betas.
        #[arg(long, value_delimiter = ',')]
        dpo_betas: Vec<f64>,
        /// Comma-separated PPO KL coefficients.
        #[arg(long, value_delimiter = ',')]
        ppo_kl_coefs: Vec<f64>,
        /// Pipeline overrides, as for `preftune pipeline`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Sequence-level KL(policy || reference) estimated on the policy's own samples (k1, summed
    /// over each response, T = 1 scoring).
    Kl(KlArgs),
}

#[derive(Args, Clone, Debug)]
pub struct KlArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The reference model (e.g. the SFT policy).
    #[arg(long)]
    ref_model: PathBuf,
    /// Rows with `prompt`.
    #[arg(long)]
    data: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn samples(path: &std::path::Path) -> Result<Vec<Sample>> {
    read_rows(path)?.iter().map(sample_of).collect()
}

pub fn run(cmd: &EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Reward { reward, data } => {
            let src = RewardSource::parse(reward)?;
            let s = samples(data)?;
            anyhow::ensure!(!s.is_empty(), "{}: no rows", data.display());
            let r = src.score(&s)?;
            let resp: Vec<String> = s.iter().map(|x| x.response.clone()).collect();
            emit(
                &json!({"reward": mean_ci(&r), "length": lengths(&resp, Some(&r)),
                         "data": data.display().to_string()}),
            );
        }
        EvalCmd::Frontier {
            config,
            dpo_betas,
            ppo_kl_coefs,
            set,
        } => {
            let mut sets = set.clone();
            sets.push(format!("frontier_dpo_betas={dpo_betas:?}"));
            sets.push(format!("frontier_ppo_kl_coefs={ppo_kl_coefs:?}"));
            let (out, _) = crate::pipeline::run(config, &sets, &[])?;
            let points = crate::report::write_frontier(&out)?;
            emit(
                &json!({"frontier": points, "svg": out.join("frontier.svg").display().to_string()}),
            );
        }
        EvalCmd::Winrate {
            judge,
            data,
            baseline,
            question,
        } => {
            let judge = Judge::parse(judge, question.as_deref())?;
            let (a, b) = (read_rows(data)?, read_rows(baseline)?);
            anyhow::ensure!(
                a.len() == b.len(),
                "{} has {} rows, {} has {}: pair samples of the same prompts row by row",
                data.display(),
                a.len(),
                baseline.display(),
                b.len()
            );
            for (x, y) in a.iter().zip(&b) {
                anyhow::ensure!(
                    x.value.get("prompt") == y.value.get("prompt"),
                    "{} and {}: prompt differs (rows must pair up)",
                    x.loc,
                    y.loc
                );
            }
            let sa = a.iter().map(sample_of).collect::<Result<Vec<_>>>()?;
            let sb = b.iter().map(sample_of).collect::<Result<Vec<_>>>()?;
            let (pref, rewards) = judge.compare(&sa, &sb)?;
            let la: Vec<String> = sa.iter().map(|x| x.response.clone()).collect();
            let lb: Vec<String> = sb.iter().map(|x| x.response.clone()).collect();
            let other: Vec<f64> = pref.iter().map(|p| 1.0 - p).collect();
            let mut out = json!({"win_rate": win_rate(&pref, &other),
                                 "length": lengths(&la, rewards.as_ref().map(|r| r.0.as_slice())),
                                 "baseline_length": lengths(&lb, rewards.as_ref().map(|r| r.1.as_slice()))});
            match rewards {
                Some((ra, rb)) => {
                    out["reward"] = json!(mean_ci(&ra));
                    out["baseline_reward"] = json!(mean_ci(&rb));
                }
                None => out["mean_preference"] = json!(mean_ci(&pref)),
            }
            emit(&out);
        }
        EvalCmd::Kl(a) => {
            let policy = load(&a.model)?;
            let reference = load(&ModelArgs {
                model: a.ref_model.clone(),
                dtype: a.model.dtype.clone(),
                adapter: None,
            })?;
            let (prompts, _) = load_prompts(&a.data, &policy.tokenizer, None)?;
            let none = RewardSource::Function(Box::new(|_| 0.0));
            let s = policy_samples(&policy, &reference, &prompts, a.n, &a.sampling, &none)?;
            anyhow::ensure!(!s.is_empty(), "{}: no prompts", a.data.display());
            let kls: Vec<f64> = s.iter().map(|x| x.kl).collect();
            let texts: Vec<String> = s.iter().map(|x| x.response.clone()).collect();
            emit(
                &json!({"kl": mean_ci(&kls), "length": lengths(&texts, None),
                         "samples_per_prompt": a.n, "temperature": a.sampling.temperature}),
            )
        }
    }
    Ok(())
}

/// Prompts per sampling batch when each gets `n` samples: up to 32 rows decode together (8 rows
/// ran at 0.4x the tokens/s of 32 here).
pub fn prompts_per_batch(n: usize) -> usize {
    (32 / n.max(1)).max(1)
}

/// One sample of a policy: its prompt index, response, reward and sequence KL to the reference.
pub struct PolicySample {
    pub prompt: usize,
    pub response: String,
    pub reward: f64,
    pub kl: f64,
}

/// `n` samples per prompt from `policy`, each scored by `reward` and with its k1 sequence KL to
/// `reference` (log-probs at T = 1), prompt-major; seeded per sampling batch.
pub fn policy_samples(
    policy: &preftune_model::Pretrained,
    reference: &preftune_model::Pretrained,
    prompts: &[preftune_train::rollout::Prompt],
    n: usize,
    sampling: &SamplingArgs,
    reward: &RewardSource,
) -> Result<Vec<PolicySample>> {
    let args = RolloutArgs {
        reward: "(eval)".into(),
        num_generations: n,
        max_completion_length: sampling.max_new_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        missing_eos_penalty: None,
        reward_clip: None,
    };
    let mut out = vec![];
    let per = prompts_per_batch(n);
    for (b, chunk) in prompts.chunks(per).enumerate() {
        let refs: Vec<_> = chunk.iter().collect();
        let cfg = sampling_config(
            &args,
            policy.eos_token_ids(),
            policy.pad_token_id(),
            sampling.seed.wrapping_add(b as u64),
        );
        let r = rollout(&policy.model, &policy.tokenizer, &refs, &args, reward, &cfg)?;
        let dev = policy.model.device();
        let pad = policy.pad_token_id();
        let (lp, _) = completion_logps(&policy.model.detached()?, &r, pad, 1.0, dev)?;
        let (lr, _) = completion_logps(&reference.model, &r, pad, 1.0, dev)?;
        let d: Vec<f32> = (lp.sum - lr.sum)?.to_vec1()?;
        for (i, text) in r.texts.into_iter().enumerate() {
            out.push(PolicySample {
                prompt: b * per + i / n,
                response: text,
                reward: r.rewards[i],
                kl: d[i] as f64,
            });
        }
    }
    Ok(out)
}
