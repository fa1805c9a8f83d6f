//! Checkpoints: `output_dir/checkpoint-STEP/` with the weights (a full HF model, or a PEFT adapter),
//! the optimiser state and the trainer state. Written into a hidden temporary folder and renamed,
//! so a killed run never leaves a half-written checkpoint under the final name.
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::AdamW;
use preftune_model::weights::{write_safetensors, Data};

/// What resuming needs besides weights and optimiser moments. Data position and dropout seeds are
/// derived from `global_step`, so they need no state of their own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub global_step: usize,
    pub epoch: f64,
    pub total_steps: usize,
    pub num_tokens: usize,
    pub seed: u64,
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// The newest `checkpoint-N` in `output_dir` that holds a trainer state.
pub fn latest(output_dir: &Path) -> Option<(usize, PathBuf)> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// Writes a checkpoint: `write_weights` fills the folder with the model (or adapter) files.
pub fn save(
    output_dir: &Path,
    state: &TrainerState,
    opt: &AdamW,
    config: &toml::Table,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let tmp = output_dir.join(format!(".checkpoint-{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_weights(&tmp)?;
    let names: Vec<(String, String)> = opt
        .names
        .iter()
        .map(|n| (format!("exp_avg.{n}"), format!("exp_avg_sq.{n}")))
        .collect();
    let mut entries = Vec::with_capacity(2 * names.len());
    for (i, (m, v)) in names.iter().enumerate() {
        entries.push((m.as_str(), Data::F32(&opt.m[i])));
        entries.push((v.as_str(), Data::F32(&opt.v[i])));
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &entries, None)?;
    let opt_state = serde_json::json!({"step": opt.t});
    let mut st = serde_json::to_value(state).map_err(|e| Error::Msg(e.to_string()))?;
    st["optimizer"] = opt_state;
    std::fs::write(
        tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&st).unwrap_or_default(),
    )
    .map_err(|e| Error::io(tmp.join("trainer_state.json"), e))?;
    std::fs::write(
        tmp.join("config.toml"),
        toml::to_string(config).unwrap_or_default(),
    )
    .map_err(|e| Error::io(tmp.join("config.toml"), e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

/// Reads the trainer state and restores the optimiser moments and step count.
pub fn load(dir: &Path, opt: &mut AdamW) -> Result<TrainerState> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", sp.display())))?;
    let state: TrainerState = serde_json::from_value(v.clone())
        .map_err(|e| Error::Msg(format!("{}: {e}", sp.display())))?;
    opt.t = v["optimizer"]["step"]
        .as_u64()
        .ok_or_else(|| Error::Msg(format!("{}: optimizer.step missing", sp.display())))?;
    let op = dir.join("optimizer.safetensors");
    let tensors = candle_core::safetensors::load(&op, &Device::Cpu)
        .map_err(|e| Error::Msg(format!("{}: {e}", op.display())))?;
    for (i, name) in opt.names.iter().enumerate() {
        for (key, slot) in [
            (format!("exp_avg.{name}"), &mut opt.m[i]),
            (format!("exp_avg_sq.{name}"), &mut opt.v[i]),
        ] {
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::Msg(format!("{}: missing {key}", op.display())))?;
            let v: Vec<f32> = t.to_vec1()?;
            if v.len() != slot.len() {
                return Err(Error::Msg(format!(
                    "{}: {key} has {} values, the parameter {}",
                    op.display(),
                    v.len(),
                    slot.len()
                )));
            }
            *slot = v;
        }
    }
    opt.reset_device_state();
    Ok(state)
}

/// Deletes the oldest checkpoints beyond `limit`.
pub fn rotate(output_dir: &Path, limit: Option<usize>) -> Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .map_err(|e| Error::io(output_dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse::<usize>()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(limit.max(1));
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
