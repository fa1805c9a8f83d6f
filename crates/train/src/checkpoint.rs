//! Checkpoints: `output_dir/checkpoint-STEP/` with the weights (a full HF model, or a PEFT adapter),
//! the optimiser state and the trainer state. Written into a hidden temporary folder and renamed,
//! so a killed run never leaves a half-written checkpoint under the final name.
use std::collections::BTreeMap;
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
    /// The weight of a mixture-of-experts model's load-balancing loss in the run that wrote the
    /// checkpoint (absent for dense models, and in checkpoints from before preftune added it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
}

/// What to tell a user resuming a mixture-of-experts run whose objective changes at the resume:
/// the checkpoint's run weighted the load-balancing loss by `saved` (`None`: it predates the
/// term, or the model is dense), this one by `now`. `None` when nothing changes.
pub fn aux_loss_change(saved: Option<f64>, now: f64, moe: bool) -> Option<String> {
    match saved {
        _ if !moe => None,
        Some(c) if c == now => None,
        None if now == 0.0 => None,
        Some(c) => Some(format!(
            "the checkpoint's run weighted the load-balancing loss by router_aux_loss_coef = {c}, \
             this one by {now}: the loss and its gradients change from here on"
        )),
        None => Some(format!(
            "the checkpoint was written by a preftune without the load-balancing loss: from here \
             on the loss includes {now} x aux_loss, as TRL's does, and the curve steps at the \
             resume"
        )),
    }
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// The step of a `checkpoint-N` folder name.
pub(crate) fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// Every `checkpoint-N` folder in `output_dir` with its step, oldest first.
fn checkpoints(output_dir: &Path) -> std::io::Result<Vec<(usize, PathBuf)>> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((step_of(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    all.sort();
    Ok(all)
}

/// Deletes a finished run's `checkpoint-N` folders (weights plus optimizer state): once a run is
/// done its final model stays, and nothing resumes it.
pub fn remove_all(output_dir: &Path) -> crate::error::Result<()> {
    for (_, dir) in checkpoints(output_dir).map_err(|e| Error::io(output_dir, e))? {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// The newest complete `checkpoint-N` in `output_dir`: a trainer state that parses, for step N,
/// the optimiser state and the weights (a model or an adapter). An incomplete one (emptied,
/// copied in part) is skipped with a warning, so resuming never takes up half a checkpoint.
pub fn latest(output_dir: &Path) -> Option<(usize, PathBuf)> {
    restore_aside(output_dir);
    let found = checkpoints(output_dir).ok()?;
    found
        .into_iter()
        .rev()
        .find(|(step, dir)| match incomplete(*step, dir) {
            None => true,
            Some(why) => {
                eprintln!("resume: skipping {}: {why}", dir.display());
                false
            }
        })
}

/// What a checkpoint folder lacks, if anything.
fn incomplete(step: usize, dir: &Path) -> Option<String> {
    let state = std::fs::read_to_string(dir.join("trainer_state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<TrainerState>(&t).ok());
    match state {
        None => return Some("no readable trainer_state.json".into()),
        Some(s) if s.global_step != step => {
            return Some(format!("trainer_state.json says step {}", s.global_step))
        }
        Some(_) => {}
    }
    if !dir.join("optimizer.safetensors").exists() {
        return Some("no optimizer.safetensors".into());
    }
    let weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_model.safetensors",
    ];
    if !weights.iter().any(|w| dir.join(w).exists()) {
        return Some("no model or adapter weights".into());
    }
    None
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
    let written = write_into(&tmp, state, opt, config, write_weights);
    if written.is_err() {
        // A failed save leaves nothing behind (the last complete checkpoint stays as it was).
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    replace_dir(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    preftune_model::io::sync_dir(output_dir).map_err(|e| Error::io(output_dir, e))?;
    Ok(final_dir)
}

/// Where a folder being replaced waits while its successor is renamed in (the fallback of
/// [`replace_dir`]); [`latest`] puts it back if a crash left it there.
fn aside(dst: &Path) -> PathBuf {
    let name = dst.file_name().unwrap_or_default().to_string_lossy();
    dst.with_file_name(format!(".{name}.old"))
}

/// Puts the complete folder `tmp` at `dst`, replacing what is there, so that `dst` always names
/// a complete folder: deleting first left a window with no checkpoint at all. On Linux the two
/// are swapped in one step (`renameat2(RENAME_EXCHANGE)`) and the old one, now at `tmp`, is
/// deleted. Where that is not available the old folder is renamed aside first.
fn replace_dir(tmp: &Path, dst: &Path) -> std::io::Result<()> {
    if !dst.exists() {
        return std::fs::rename(tmp, dst);
    }
    #[cfg(target_os = "linux")]
    if exchange(tmp, dst).is_ok() {
        return std::fs::remove_dir_all(tmp);
    }
    let old = aside(dst);
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    std::fs::rename(dst, &old)?;
    std::fs::rename(tmp, dst)?;
    std::fs::remove_dir_all(&old)
}

/// Swaps two paths atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are NUL-terminated strings that outlive the call; AT_FDCWD resolves relative
    // paths against the working directory, as `std::fs::rename` does.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts back a checkpoint that a crash left aside (see [`replace_dir`]) when its name is free.
fn restore_aside(output_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(orig) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".old")) else {
            continue;
        };
        if step_of(orig).is_some() && !output_dir.join(orig).exists() {
            let _ = std::fs::rename(e.path(), output_dir.join(orig));
        }
    }
}

/// The checkpoint's files, each written and fsynced, then the folder itself.
fn write_into(
    tmp: &Path,
    state: &TrainerState,
    opt: &AdamW,
    config: &toml::Table,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_weights(tmp)?;
    let names: Vec<(String, String)> = opt
        .names
        .iter()
        .map(|n| (format!("exp_avg.{n}"), format!("exp_avg_sq.{n}")))
        .collect();
    let moments = (0..names.len())
        .map(|i| opt.checkpoint_moments(i))
        .collect::<Result<Vec<_>>>()?;
    let mut entries = Vec::with_capacity(2 * names.len());
    for ((m, v), (mv, vv)) in names.iter().zip(&moments) {
        entries.push((m.as_str(), Data::F32(mv)));
        entries.push((v.as_str(), Data::F32(vv)));
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &entries, None)?;
    let opt_state = serde_json::json!({"step": opt.t});
    let mut st = serde_json::to_value(state).map_err(|e| Error::Msg(e.to_string()))?;
    st["optimizer"] = opt_state;
    preftune_model::io::atomic_write(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&st)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    preftune_model::io::atomic_write(
        &tmp.join("config.toml"),
        toml::to_string(config).unwrap_or_default().as_bytes(),
    )?;
    preftune_model::io::sync_dir(tmp).map_err(|e| Error::io(tmp, e))
}

/// Keys a resumed run may change without breaking exactness: where and how often it logs, saves
/// and evaluates, how long it trains (`max_steps`, `num_train_epochs`: the schedule is then the
/// new length's), the device (a GPU run resumes on the CPU) and recomputation (same gradients).
const RESUME_SAFE_KEYS: &[&str] = &[
    "output_dir",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "eval_file",
    "per_device_eval_batch_size",
    "max_steps",
    "num_train_epochs",
    "device",
    "overwrite_output_dir",
    "gradient_checkpointing",
];

/// Refuses to resume `dir` with a configuration that changes what the checkpoint's run computed
/// (data, batch, learning rate, loss...): the error names each changed key with both values.
pub fn check_resume_config(dir: &Path, now: &toml::Table) -> Result<()> {
    let path = dir.join("config.toml");
    let saved: toml::Table = match std::fs::read_to_string(&path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        // Checkpoints written before config.toml was kept cannot be checked.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    // Effective values: a key left to its default equals the default written out.
    let defaults =
        toml::Table::try_from(crate::config::TrainingArguments::default()).unwrap_or_default();
    let effective = |t: &toml::Table| {
        let mut full = defaults.clone();
        full.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut flat = BTreeMap::new();
        flatten("", &full, &mut flat);
        flat
    };
    let (a, b) = (effective(&saved), effective(now));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| !RESUME_SAFE_KEYS.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k))))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{}: resuming with a different configuration would not continue the same run; changed: {}. \
         Keep these as they were, or start over with overwrite_output_dir = true",
        path.display(),
        changed.join("; ")
    )))
}

/// `table` as dotted key -> TOML text.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            // `1` and `1.0` are the same setting.
            toml::Value::Integer(i) => {
                out.insert(key, format!("{:?}", *i as f64));
            }
            toml::Value::Float(f) => {
                out.insert(key, format!("{f:?}"));
            }
            v => {
                out.insert(key, v.to_string());
            }
        }
    }
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
        let size = opt.sizes[i];
        for (key, slot) in [
            (format!("exp_avg.{name}"), &mut opt.m[i]),
            (format!("exp_avg_sq.{name}"), &mut opt.v[i]),
        ] {
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::Msg(format!("{}: missing {key}", op.display())))?;
            let v: Vec<f32> = t.to_vec1()?;
            if v.len() != size {
                return Err(Error::Msg(format!(
                    "{}: {key} has {} values, the parameter {size}",
                    op.display(),
                    v.len(),
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
    // Only complete checkpoints count: an incomplete newer one must not push out the last
    // checkpoint a resume could use (it stays, and resuming skips it).
    let all: Vec<(usize, PathBuf)> = checkpoints(output_dir)
        .map_err(|e| Error::io(output_dir, e))?
        .into_iter()
        .filter(|(step, dir)| incomplete(*step, dir).is_none())
        .collect();
    let excess = all.len().saturating_sub(limit.max(1));
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mixture's objective that changes at a resume is said; a dense model's, or an unchanged
    /// one, is not. An old checkpoint (no coefficient recorded) took no load-balancing loss.
    #[test]
    fn a_changed_load_balancing_loss_is_said_at_resume() {
        assert_eq!(aux_loss_change(Some(0.001), 0.001, true), None);
        assert_eq!(aux_loss_change(None, 0.0, true), None);
        assert_eq!(aux_loss_change(None, 0.5, false), None);
        let old = aux_loss_change(None, 0.001, true).unwrap();
        assert!(
            old.contains("without the load-balancing loss") && old.contains("0.001"),
            "{old}"
        );
        let changed = aux_loss_change(Some(0.001), 0.5, true).unwrap();
        assert!(
            changed.contains("= 0.001") && changed.contains("by 0.5"),
            "{changed}"
        );
        // Written for mixtures only, and read back from older files without it.
        let dense = TrainerState {
            global_step: 3,
            epoch: 0.5,
            total_steps: 6,
            num_tokens: 10,
            seed: 1,
            router_aux_loss_coef: None,
        };
        let text = serde_json::to_string(&dense).unwrap();
        assert!(!text.contains("router_aux"), "{text}");
        let back: TrainerState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, dense);
        let moe = TrainerState {
            router_aux_loss_coef: Some(0.001),
            ..dense
        };
        let back: TrainerState =
            serde_json::from_str(&serde_json::to_string(&moe).unwrap()).unwrap();
        assert_eq!(back.router_aux_loss_coef, Some(0.001));
    }
    use crate::optim::AdamWConfig;

    fn state(step: usize) -> String {
        serde_json::json!({"global_step": step, "epoch": 1.0, "total_steps": 9, "num_tokens": 0,
                           "seed": 1, "optimizer": {"step": step}})
        .to_string()
    }

    /// Resuming takes the newest complete checkpoint: one with an unreadable or mismatched state,
    /// or without its optimiser state or weights, is skipped.
    #[test]
    fn latest_skips_incomplete_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let make = |step: usize, files: &[(&str, String)]| {
            let d = checkpoint_dir(dir.path(), step);
            std::fs::create_dir_all(&d).unwrap();
            for (name, text) in files {
                std::fs::write(d.join(name), text).unwrap();
            }
        };
        let full = |step: usize| {
            vec![
                ("trainer_state.json", state(step)),
                ("optimizer.safetensors", String::new()),
                ("model.safetensors", String::new()),
            ]
        };
        make(2, &full(2));
        make(4, &[("trainer_state.json", "{}".into())]);
        make(5, &full(5)[..2]);
        make(6, &full(3));
        make(
            7,
            &[
                ("trainer_state.json", state(7)),
                ("optimizer.safetensors", String::new()),
            ],
        );
        assert_eq!(latest(dir.path()).unwrap().0, 2);
        make(
            8,
            &[
                ("trainer_state.json", state(8)),
                ("optimizer.safetensors", String::new()),
                ("adapter_model.safetensors", String::new()),
            ],
        );
        assert_eq!(
            latest(dir.path()).unwrap().0,
            8,
            "an adapter checkpoint is complete"
        );
    }

    /// Resuming with changed data, batch or learning rate is refused naming each key; logging,
    /// saving, evaluation cadence, length and device may change.
    #[test]
    fn resume_refuses_changed_keys_and_allows_safe_ones() {
        let dir = tempfile::tempdir().unwrap();
        let saved = "model_name_or_path = \"m\"\nlearning_rate = 1e-4\nlogging_steps = 10\n\
                     max_steps = 10\n[columns]\nprompt = \"q\"\n";
        std::fs::write(dir.path().join("config.toml"), saved).unwrap();
        let now = |text: &str| -> toml::Table { toml::from_str(text).unwrap() };
        check_resume_config(dir.path(), &now(saved)).unwrap();
        // A default written out, or an integer written as a float, is the same setting.
        check_resume_config(
            dir.path(),
            &now(&format!(
                "seed = 42\n{}",
                saved.replace("max_steps = 10", "max_steps = 10.0")
            )),
        )
        .unwrap();
        check_resume_config(
            dir.path(),
            &now(&saved
                .replace("logging_steps = 10", "logging_steps = 1\ndevice = \"cuda\"")
                .replace("max_steps = 10", "max_steps = 20")),
        )
        .unwrap();
        let e = check_resume_config(
            dir.path(),
            &now(&format!(
                "{}train_file = \"other.jsonl\"\n",
                saved
                    .replace("1e-4", "2e-4")
                    .replace("\"q\"", "\"question\"")
            )),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("learning_rate: 0.0001 -> 0.0002")
                && e.contains("columns.prompt: \"q\" -> \"question\"")
                && e.contains("train_file: (unset) -> \"other.jsonl\""),
            "{e}"
        );
    }

    /// A save that fails part-way leaves neither its temporary folder nor a checkpoint behind.
    #[test]
    fn a_failed_save_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let opt = AdamW::new(cfg, &[]);
        let st: TrainerState = serde_json::from_str(&state(3)).unwrap();
        let e = save(dir.path(), &st, &opt, &toml::Table::new(), |_| {
            Err(Error::Msg("disk full".into()))
        });
        assert!(e.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(
            left.is_empty(),
            "{:?}",
            left.iter().map(|e| e.file_name()).collect::<Vec<_>>()
        );
        save(dir.path(), &st, &opt, &toml::Table::new(), |d| {
            std::fs::write(d.join("model.safetensors"), b"").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert_eq!(latest(dir.path()).unwrap().0, 3);
    }

    /// Replacing a checkpoint never leaves its name empty: a reader polling it during 100
    /// replacements always finds a complete folder (deleting first, it found none).
    #[test]
    fn a_replaced_checkpoint_is_never_missing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("checkpoint-3");
        let fill = |d: &Path, gen: usize| {
            std::fs::create_dir_all(d).unwrap();
            for i in 0..40 {
                std::fs::write(d.join(format!("shard-{i}")), [0u8; 4096]).unwrap();
            }
            std::fs::write(d.join("gen"), gen.to_string()).unwrap();
        };
        fill(&dst, 0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (dst, stop) = (dst.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut missing = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::fs::read_to_string(dst.join("gen")).is_err() {
                        missing += 1;
                    }
                }
                missing
            })
        };
        for gen in 1..=100 {
            let tmp = dir.path().join(".checkpoint-3.tmp");
            fill(&tmp, gen);
            replace_dir(&tmp, &dst).unwrap();
            assert!(!tmp.exists());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(watcher.join().unwrap(), 0, "the checkpoint was missing");
        assert_eq!(std::fs::read_to_string(dst.join("gen")).unwrap(), "100");
    }

    /// A checkpoint left aside by a crash mid-replacement is put back before resuming.
    #[test]
    fn a_checkpoint_left_aside_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".checkpoint-4.old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("trainer_state.json"), state(4)).unwrap();
        std::fs::write(old.join("optimizer.safetensors"), "").unwrap();
        std::fs::write(old.join("model.safetensors"), "").unwrap();
        let (step, path) = latest(dir.path()).unwrap();
        assert_eq!((step, path), (4, dir.path().join("checkpoint-4")));
        assert!(!old.exists());
    }
}
