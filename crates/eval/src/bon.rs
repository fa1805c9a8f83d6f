//! Best-of-N over a prompt file, scoring rows, and normalising a reward model: the work behind
//! `preftune bon`, `score` and `normalize-reward`, and the sampling half of rejection sampling.
use std::path::Path;

use preftune_data::{read_rows, Row, Text};
use preftune_model::reward::normalization_for;
use preftune_model::{Pretrained, SamplingConfig};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::sources::{
    row_prompt, sample_and_score, sample_and_score_ids, PromptRef, ResumableJsonl, RewardSource,
    Sample,
};

/// A row with `prompt` (text or messages) and `response` (or `completion`) as a [`Sample`]; an
/// optional boolean `risky` feeds the piecewise rule. Errors name the row's file and line.
pub fn sample_of(row: &Row) -> Result<Sample> {
    let prompt = row_prompt(row)?;
    let response = ["response", "completion"]
        .iter()
        .find_map(|k| row.value.get(*k).and_then(Value::as_str))
        .ok_or_else(|| Error::Msg(format!("{}: response: missing or not a string", row.loc)))?
        .to_string();
    Ok(Sample {
        prompt,
        response,
        risky: risky_of(row)?,
    })
}

/// Every row of `data` as a [`Sample`].
pub fn samples_of_file(data: &Path) -> Result<Vec<Sample>> {
    read_rows(data)?.iter().map(sample_of).collect()
}

pub fn risky_of(row: &Row) -> Result<bool> {
    match row.value.get("risky") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::Msg(format!(
            "{}: risky: expected true or false",
            row.loc
        ))),
    }
}

/// What [`score_file`] did.
#[derive(Clone, Debug)]
pub struct ScoreSummary {
    pub rows: usize,
    pub scored_now: usize,
    pub resumed_after: usize,
}

/// Scores every row of `data` with `reward` into `out` (each row plus `reward`), `batch_size`
/// rows at a time; an existing `out` is continued where it stopped.
pub fn score_file(
    reward: &RewardSource,
    data: &Path,
    out: &Path,
    batch_size: usize,
) -> Result<ScoreSummary> {
    if batch_size == 0 {
        return Err(Error::Config("batch size must be > 0".into()));
    }
    let rows = read_rows(data)?;
    let mut file = ResumableJsonl::open(out)?;
    let start = file.done.min(rows.len());
    for chunk in rows[start..].chunks(batch_size) {
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
        file.append(&lines)?;
    }
    Ok(ScoreSummary {
        rows: rows.len(),
        scored_now: rows.len() - start,
        resumed_after: start,
    })
}

/// How Best-of-N samples.
#[derive(Clone, Debug)]
pub struct BonSettings {
    /// Samples per prompt.
    pub n: usize,
    /// Prompts sampled together.
    pub batch_size: usize,
    /// Also write every sample and its reward (`responses`, `rewards`).
    pub keep_all: bool,
    pub sampling: SamplingConfig,
}

/// Llama 2's safety filter for Best-of-N and rejection sampling: samples whose safety score is
/// under `threshold` are dropped before the best is chosen. A prompt whose samples are all under
/// it keeps its safest sample (counted in [`BonSummary::rows_all_unsafe`]), so that every input
/// row still gets an output row and runs resume by row count.
pub struct SafetyFilter {
    pub source: RewardSource,
    pub threshold: f64,
}

/// What [`best_of_n`] did, over the rows written by this call.
#[derive(Clone, Debug)]
pub struct BonSummary {
    pub rows: usize,
    pub mean_best_reward: f64,
    pub mean_sample_reward: f64,
    /// With a safety filter: samples it dropped, and rows left with none above the threshold.
    pub unsafe_samples: usize,
    pub rows_all_unsafe: usize,
}

/// The index of the highest of `scores` among `among` (the first on ties).
fn argmax(scores: &[f64], among: impl Iterator<Item = usize>) -> Option<usize> {
    among.fold(None, |best, i| match best {
        Some(b) if scores[b] >= scores[i] => Some(b),
        _ => Some(i),
    })
}

/// Best-of-N over the prompts of `data` into `out` (resumable: seeds follow the row index, so a
/// resumed run writes what the straight run would have). `shape` maps an input row, the best
/// response and its reward to the output row. With `safety`, unsafe samples are dropped first
/// and each row also gets the chosen sample's `safety` score.
pub fn best_of_n(
    policy: &Pretrained,
    reward: &RewardSource,
    data: &Path,
    out: &Path,
    set: &BonSettings,
    safety: Option<&SafetyFilter>,
    shape: &dyn Fn(&Row, &str, f64) -> Value,
) -> Result<BonSummary> {
    let (n, batch_size) = (set.n, set.batch_size);
    if n == 0 || batch_size == 0 {
        return Err(Error::Config("n and batch size must be > 0".into()));
    }
    let rows = read_rows(data)?;
    let mut file = ResumableJsonl::open(out)?;
    let start = file.done.min(rows.len());
    let (mut best_sum, mut all_sum, mut count) = (0.0, 0.0, 0usize);
    let (mut unsafe_samples, mut rows_all_unsafe) = (0, 0);
    for (b, chunk) in rows[start..].chunks(batch_size).enumerate() {
        let prompts = chunk
            .iter()
            .map(|r| Ok((row_prompt(r)?, risky_of(r)?)))
            .collect::<Result<Vec<(Text, bool)>>>()?;
        let cfg = SamplingConfig {
            seed: set
                .sampling
                .seed
                .wrapping_add((start + b * batch_size) as u64 * 1_000_003),
            ..set.sampling.clone()
        };
        let cands = sample_and_score(policy, reward, &prompts, n, &cfg)?;
        // Safety scores of every sample, prompt-major, when filtering.
        let safety_scores = match safety {
            Some(f) => {
                let samples: Vec<Sample> = prompts
                    .iter()
                    .zip(&cands)
                    .flat_map(|((p, risky), c)| {
                        c.responses.iter().map(|r| Sample {
                            prompt: p.clone(),
                            response: r.clone(),
                            risky: *risky,
                        })
                    })
                    .collect();
                Some(f.source.score(&samples)?)
            }
            None => None,
        };
        let lines: Vec<Value> = chunk
            .iter()
            .zip(&cands)
            .enumerate()
            .map(|(row, (r, c))| {
                let (i, s) = match (safety, &safety_scores) {
                    (Some(f), Some(all)) => {
                        let s = &all[row * n..(row + 1) * n];
                        let safe: Vec<usize> = (0..n).filter(|&j| s[j] >= f.threshold).collect();
                        unsafe_samples += n - safe.len();
                        let i = match argmax(&c.rewards, safe.into_iter()) {
                            Some(i) => i,
                            None => {
                                rows_all_unsafe += 1;
                                argmax(s, 0..n).unwrap_or(0)
                            }
                        };
                        (i, Some(s[i]))
                    }
                    _ => (c.best(), None),
                };
                best_sum += c.rewards[i];
                all_sum += c.rewards.iter().sum::<f64>() / n as f64;
                count += 1;
                let mut v = shape(r, &c.responses[i], c.rewards[i]);
                if let Some(s) = s {
                    v["safety"] = json!(s);
                }
                if set.keep_all {
                    v["responses"] = json!(c.responses);
                    v["rewards"] = json!(c.rewards);
                }
                v
            })
            .collect();
        file.append(&lines)?;
    }
    let c = count.max(1) as f64;
    Ok(BonSummary {
        rows: count,
        mean_best_reward: best_sum / c,
        mean_sample_reward: all_sum / c,
        unsafe_samples,
        rows_all_unsafe,
    })
}

/// What [`normalize_reward_model`] set.
#[derive(Clone, Debug)]
pub struct Normalization {
    pub samples: usize,
    pub gain: f64,
    pub bias: f64,
}

/// Sets the reward model at `model`'s gain and bias so that its rewards of the reference samples
/// in `data` (rows with `prompt` and `response`) have mean 0 and standard deviation 1, and saves
/// it to `out`.
pub fn normalize_reward_model(model: &Path, data: &Path, out: &Path) -> Result<Normalization> {
    let mut p = Pretrained::load(model, &Default::default())?;
    if !p.model.has_score_head() {
        return Err(Error::Msg(format!(
            "{}: not a reward model (no score.weight)",
            model.display()
        )));
    }
    p.model.set_reward_normalization(1.0, 0.0);
    let samples = samples_of_file(data)?;
    let src = RewardSource::Model(Box::new(p));
    let raw: Vec<f32> = src.score(&samples)?.iter().map(|&x| x as f32).collect();
    let RewardSource::Model(mut p) = src else {
        unreachable!("built as a model source above")
    };
    let (gain, bias) = normalization_for(&raw)?;
    p.model.set_reward_normalization(gain, bias);
    p.save(out)?;
    Ok(Normalization {
        samples: raw.len(),
        gain,
        bias,
    })
}

/// What [`sample_candidates`] did.
#[derive(Clone, Debug)]
pub struct CandidatesSummary {
    pub rows: usize,
    pub generated_now: usize,
    pub resumed_after: usize,
}

/// `n` responses per prompt of `data` (rows with `prompt`: text, or messages that get the chat
/// template) into `out`, for labelling: each line holds `prompt`, `responses` and `settings`
/// (how they were sampled). Resumable: seeds follow the row, so a resumed run samples the same.
pub fn sample_candidates(
    policy: &Pretrained,
    data: &Path,
    out: &Path,
    n: usize,
    batch_size: usize,
    sampling: &SamplingConfig,
    settings: &Value,
) -> Result<CandidatesSummary> {
    if n == 0 || batch_size == 0 {
        return Err(Error::Config("n and batch size must be > 0".into()));
    }
    let rows = read_rows(data)?;
    let mut file = ResumableJsonl::open(out)?;
    let start = file.done.min(rows.len());
    for (b, chunk) in rows[start..].chunks(batch_size).enumerate() {
        let prompts = chunk
            .iter()
            .map(|r| {
                let t = row_prompt(r)?;
                let ids = crate::sources::prompt_ids(policy, &t)?;
                Ok((t, ids))
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<PromptRef> = prompts
            .iter()
            .map(|(text, ids)| PromptRef {
                ids,
                text,
                risky: false,
            })
            .collect();
        let cfg = SamplingConfig {
            seed: sampling
                .seed
                .wrapping_add(((start + b * batch_size) as u64).wrapping_mul(1_000_003)),
            ..sampling.clone()
        };
        let g = sample_and_score_ids(&policy.model, &policy.tokenizer, &refs, n, None, &cfg)?;
        let lines: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"prompt": r.value["prompt"], "responses": g.texts[i * n..(i + 1) * n], "sampling": settings}))
            .collect();
        file.append(&lines)?;
    }
    Ok(CandidatesSummary {
        rows: rows.len(),
        generated_now: rows.len() - start,
        resumed_after: start,
    })
}
