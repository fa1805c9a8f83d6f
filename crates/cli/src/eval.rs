//! `preftune eval ...`: judge samples and policies on any models and prompts.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use preftune_data::read_rows;
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
    /// Win rate of samples against baseline samples of the same prompts (row by row), by a judge
    /// (any reward source; the higher score wins, ties count half).
    Winrate {
        #[arg(long)]
        judge: String,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        baseline: PathBuf,
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
        EvalCmd::Winrate {
            judge,
            data,
            baseline,
        } => {
            let src = RewardSource::parse(judge)?;
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
            let (ra, rb) = (src.score(&sa)?, src.score(&sb)?);
            let la: Vec<String> = sa.iter().map(|x| x.response.clone()).collect();
            let lb: Vec<String> = sb.iter().map(|x| x.response.clone()).collect();
            emit(
                &json!({"win_rate": win_rate(&ra, &rb), "reward": mean_ci(&ra),
                         "baseline_reward": mean_ci(&rb), "length": lengths(&la, Some(&ra)),
                         "baseline_length": lengths(&lb, Some(&rb))}),
            );
        }
        EvalCmd::Kl(a) => {
            let policy = load(&a.model)?;
            let reference = load(&ModelArgs {
                model: a.ref_model.clone(),
                dtype: a.model.dtype.clone(),
                adapter: None,
            })?;
            let (prompts, _) = load_prompts(&a.data, &policy.tokenizer, None)?;
            let args = RolloutArgs {
                reward: "(none)".into(),
                num_generations: a.n,
                max_completion_length: a.sampling.max_new_tokens,
                temperature: a.sampling.temperature,
                top_p: a.sampling.top_p,
                top_k: a.sampling.top_k,
                missing_eos_penalty: None,
                reward_clip: None,
            };
            let none = RewardSource::Function(Box::new(|_| 0.0));
            let mut kls = vec![];
            let mut texts = vec![];
            for (b, chunk) in prompts.chunks(4).enumerate() {
                let refs: Vec<_> = chunk.iter().collect();
                let cfg = sampling_config(
                    &args,
                    policy.eos_token_ids(),
                    policy.pad_token_id(),
                    a.sampling.seed.wrapping_add(b as u64),
                );
                let r = rollout(&policy.model, &policy.tokenizer, &refs, &args, &none, &cfg)?;
                let dev = policy.model.device();
                let pad = policy.pad_token_id();
                let (lp, _) = completion_logps(&policy.model, &r, pad, 1.0, dev)?;
                let (lr, _) = completion_logps(&reference.model, &r, pad, 1.0, dev)?;
                let d: Vec<f32> = (lp.sum - lr.sum)?.to_vec1()?;
                kls.extend(d.iter().map(|&x| x as f64));
                texts.extend(r.texts);
            }
            anyhow::ensure!(!kls.is_empty(), "{}: no prompts", a.data.display());
            emit(
                &json!({"kl": mean_ci(&kls), "length": lengths(&texts, None),
                         "samples_per_prompt": a.n, "temperature": a.sampling.temperature}),
            )
        }
    }
    Ok(())
}
