//! Judging sample files (rows with `prompt` and `response`): their mean reward, and their win
//! rate against a baseline's samples of the same prompts (`preftune eval reward|winrate`).
use std::path::Path;

use preftune_data::read_rows;
use serde_json::{json, Value};

use crate::bon::{sample_of, samples_of_file};
use crate::error::{Error, Result};
use crate::judge::Judge;
use crate::stats::{lengths, mean_ci, win_rate};
use crate::RewardSource;

/// The mean reward of the samples in `data` with a 95% interval, and their length statistics.
pub fn reward_of_file(reward: &RewardSource, data: &Path) -> Result<Value> {
    let s = samples_of_file(data)?;
    if s.is_empty() {
        return Err(Error::Msg(format!("{}: no rows", data.display())));
    }
    let r = reward.score(&s)?;
    let resp: Vec<String> = s.iter().map(|x| x.response.clone()).collect();
    Ok(
        json!({"reward": mean_ci(&r), "length": lengths(&resp, Some(&r)),
              "data": data.display().to_string()}),
    )
}

/// The win rate of `data`'s samples against `baseline`'s, row by row (the rows must pair up by
/// prompt), with both sides' lengths and, for reward judges, rewards.
pub fn winrate_of_files(judge: &Judge, data: &Path, baseline: &Path) -> Result<Value> {
    let (a, b) = (read_rows(data)?, read_rows(baseline)?);
    if a.len() != b.len() {
        return Err(Error::Msg(format!(
            "{} has {} rows, {} has {}: pair samples of the same prompts row by row",
            data.display(),
            a.len(),
            baseline.display(),
            b.len()
        )));
    }
    if let Some((x, y)) = a
        .iter()
        .zip(&b)
        .find(|(x, y)| x.value.get("prompt") != y.value.get("prompt"))
    {
        return Err(Error::Msg(format!(
            "{} and {}: prompt differs (rows must pair up)",
            x.loc, y.loc
        )));
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
    Ok(out)
}
