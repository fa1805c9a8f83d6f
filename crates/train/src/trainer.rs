//! The one training loop every algorithm shares.
//!
//! An algorithm says how big each split is, how much each micro-batch weighs, and what its loss and
//! metrics are; the loop owns data order, gradient accumulation, clipping, the optimiser and its
//! schedule, logging, evaluation, checkpoints and resuming. Everything that varies from step to step
//! (data order, dropout masks) is derived from the seed and the step number, so `N` steps, a
//! checkpoint, a resume and `N` more give the same weights as `2N` straight steps.
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use preftune_model::{LoadOptions, LoraConfig, Model, Pretrained};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainingArguments;
use crate::error::{Error, Result};
use crate::optim::{lr_at, AdamW, AdamWConfig, Grads};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// Weighted sums of named metrics; a metric's value is `sum / weight` over whatever was merged.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    sums: BTreeMap<String, (f64, f64)>,
    /// Real (non-padding) tokens processed.
    pub tokens: usize,
}

impl Metrics {
    pub fn add(&mut self, name: &str, sum: f64, weight: f64) {
        let e = self.sums.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += weight;
    }

    pub fn merge(&mut self, other: &Metrics) {
        for (k, (s, w)) in &other.sums {
            self.add(k, *s, *w);
        }
        self.tokens += other.tokens;
    }

    /// Adds `delta` to the metric's mean over what was added so far (nothing if it has none).
    pub fn shift(&mut self, name: &str, delta: f64) {
        if let Some(e) = self.sums.get_mut(name) {
            e.0 += delta * e.1;
        }
    }

    pub fn means(&self) -> BTreeMap<String, f64> {
        self.sums
            .iter()
            .filter(|(_, (_, w))| *w > 0.0)
            .map(|(k, (s, w))| (k.clone(), s / w))
            .collect()
    }
}

/// What an algorithm plugs into the loop.
pub trait Algorithm {
    /// Examples in a split (0 for a missing eval split).
    fn len(&self, split: Split) -> usize;
    /// A micro-batch's share of its optimiser step (e.g. its number of target tokens). Losses are
    /// summed over micro-batches and divided by the step's total weight, as transformers does.
    fn weight(&self, split: Split, idx: &[usize]) -> f64;
    /// The micro-batch's loss, summed (not averaged) over its weight units, and its metrics.
    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)>;
    /// Trainable tensors the algorithm owns besides the policy's (PPO's value model), optimised
    /// with them; names must not clash with the policy's.
    fn extra_params(&self) -> Vec<(String, candle_core::Var)> {
        vec![]
    }
    /// Whether a mixture-of-experts model's load-balancing loss joins this algorithm's loss when
    /// `router_aux_loss_coef` is unset. TRL's trainers add it whenever the model declares a
    /// coefficient (the default); its CPO and ORPO only when the config sets
    /// `output_router_logits` (passed here); its reward trainer never.
    fn router_aux_by_default(&self, _output_router_logits: bool) -> bool {
        true
    }
    /// Multiplier of the learning rate for the parameter `name` (1 by default).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
    /// Before a step's updates, with the policy as it stands and the step's micro-batches:
    /// whatever the updates need from the current policy (PPO samples its rollout here). LoRA
    /// dropout is off while it runs.
    fn prepare(&mut self, _model: &Model, _batches: &[Vec<usize>]) -> Result<()> {
        Ok(())
    }
    /// Optimiser updates per batch of prompts (PPO's `num_ppo_epochs` over one rollout).
    fn updates_per_batch(&self) -> usize {
        1
    }
    /// Called before each of a step's updates (`update` in `0..updates_per_batch()`) and once
    /// after the last with `update == updates_per_batch()`: rollout caches and controllers live here.
    fn on_update(&mut self, _update: usize) -> Result<()> {
        Ok(())
    }
    /// Writes the algorithm's own state (extra models, controllers) into a checkpoint or the final
    /// output folder, and reads it back on resume.
    fn save_state(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    fn load_state(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The weight of a mixture-of-experts model's load-balancing loss in this run: the configured
/// `router_aux_loss_coef` (an error on a dense model, or when negative or not finite), else the
/// model config's own coefficient where [`Algorithm::router_aux_by_default`] says so, else 0.
pub fn router_aux_coef(
    args: &TrainingArguments,
    model: &Model,
    algo: &dyn Algorithm,
) -> Result<f64> {
    let moe = model.cfg.moe.as_ref();
    match args.router_aux_loss_coef {
        Some(c) if !c.is_finite() || c < 0.0 => Err(Error::Config(format!(
            "router_aux_loss_coef = {c}: must be a finite number >= 0"
        ))),
        Some(c) if c != 0.0 && moe.is_none() => Err(Error::Config(format!(
            "router_aux_loss_coef = {c}, but {} is not a mixture-of-experts model: it has no \
             load-balancing loss to weight",
            args.model_name_or_path
        ))),
        Some(c) => Ok(c),
        None => Ok(moe
            .filter(|m| algo.router_aux_by_default(m.output_router_logits))
            .map_or(0.0, |m| m.router_aux_loss_coef)),
    }
}

/// The mean of the load-balancing losses `model` recorded since the last take (one per training
/// pass; `None` if it made none), its value, and `loss`'s micro-batch metrics with the weighted
/// term added, as TRL logs them (`aux_loss`, and `loss` including `coef x aux_loss`).
fn take_router_aux(model: &Model, coef: f64, m: &mut Metrics) -> Result<Option<(Tensor, f64)>> {
    let losses = model.take_router_aux_losses();
    if coef == 0.0 || losses.is_empty() {
        return Ok(None);
    }
    let n = losses.len() as f64;
    let mean = (Tensor::stack(&losses, 0)?.sum_all()? / n)?;
    let value = mean.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    m.add("aux_loss", value, 1.0);
    m.shift("loss", coef * value);
    Ok(Some((mean, value)))
}

/// With `PREFTUNE_DUMP_FIRST_UPDATE=FILE`, writes the run's first update, before clipping, as
/// safetensors: its loss (`loss`, f32; the f64 value is in the metadata) and every parameter's
/// gradient under the parameter's name, and says the run stops there (`true`): nothing is
/// updated or saved. `scripts/gpu-check.sh` compares a CPU and a GPU run this way.
fn dump_first_update(
    loss: f64,
    params: &[(String, candle_core::Var)],
    grads: &Grads,
) -> Result<bool> {
    let Some(path) = std::env::var_os("PREFTUNE_DUMP_FIRST_UPDATE") else {
        return Ok(false);
    };
    let grads = grads.to_host()?;
    let loss32 = [loss as f32];
    let mut entries: Vec<(&str, preftune_model::weights::Data)> =
        vec![("loss", preftune_model::weights::Data::F32(&loss32))];
    for ((name, _), g) in params.iter().zip(grads.iter()) {
        entries.push((name.as_str(), preftune_model::weights::Data::F32(g)));
    }
    let meta = [("loss".to_string(), format!("{loss:e}"))].into();
    preftune_model::weights::write_safetensors(Path::new(&path), &entries, Some(&meta))?;
    Ok(true)
}

/// The first parameter holding a NaN or an infinity (its f32 sum is then not finite; finite
/// weights would need magnitudes near 1e32 to overflow it), on the parameter's device.
fn first_non_finite(params: &[(String, candle_core::Var)]) -> Result<Option<String>> {
    let sums = params
        .iter()
        .map(|(_, p)| p.as_tensor().detach().to_dtype(DType::F32)?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(None);
    }
    // One copy back for all of them (on a GPU, one wait instead of one per parameter).
    let sums: Vec<f32> = Tensor::stack(&sums, 0)?.to_vec1()?;
    Ok(sums
        .iter()
        .position(|s| !s.is_finite())
        .map(|i| params[i].0.clone()))
}

/// The run's device: the process's (`--device`), else the config's `device`, else the CPU.
pub fn run_device(args: &TrainingArguments) -> Result<candle_core::Device> {
    Ok(preftune_model::device::run_device(args.device).map_err(preftune_model::Error::from)?)
}

/// Loads the policy for training: full fine-tuning (every parameter a `Var`) or LoRA on a frozen
/// base. `resume_from` restores the weights (or adapter) of a checkpoint.
pub fn load_policy(
    args: &TrainingArguments,
    resume_from: Option<&Path>,
) -> Result<(Pretrained, Option<LoraConfig>)> {
    let dtype = args.dtype.candle();
    let base = Path::new(&args.model_name_or_path);
    if args.use_peft {
        let opts = LoadOptions {
            dtype,
            trainable: false,
            device: run_device(args)?,
        };
        let mut p = match args.base_quant() {
            Some(q) => Pretrained::load_quantized(base, &opts, q)?,
            None => Pretrained::load(base, &opts)?,
        };
        let cfg = LoraConfig {
            r: args.lora_r,
            alpha: args.lora_alpha,
            dropout: args.lora_dropout,
            target_modules: args.lora_target_modules.clone(),
            layers_to_transform: args.lora_layers_to_transform.clone(),
        };
        match resume_from {
            Some(dir) => {
                p.model.load_lora(dir, true)?;
            }
            None => {
                p.model.add_lora(&cfg, args.seed)?;
            }
        }
        p.model
            .set_gradient_checkpointing(args.gradient_checkpointing);
        Ok((p, Some(cfg)))
    } else {
        let from = resume_from.unwrap_or(base);
        let mut p = Pretrained::load(
            from,
            &LoadOptions {
                dtype,
                trainable: true,
                device: run_device(args)?,
            },
        )?;
        p.model
            .set_gradient_checkpointing(args.gradient_checkpointing);
        Ok((p, None))
    }
}

/// The policy of a run and where it resumes from: the newest checkpoint when `resume`; with
/// `eval_only`, the model at `model_name_or_path`, frozen.
#[allow(clippy::type_complexity)]
pub fn load_run_policy(
    args: &TrainingArguments,
    config: &toml::Table,
    resume: bool,
    eval_only: bool,
) -> Result<(
    Pretrained,
    Option<LoraConfig>,
    Option<(usize, std::path::PathBuf)>,
)> {
    if eval_only {
        return Ok((
            load_model(args, &args.model_name_or_path, false)?,
            None,
            None,
        ));
    }
    let ckpt = resume_point(args, config, resume)?;
    let (policy, lora) = load_policy(args, ckpt.as_ref().map(|(_, p)| p.as_path()))?;
    Ok((policy, lora, ckpt))
}

/// Loads a model in the run's dtype: frozen (references, evaluation) or with every parameter a
/// `Var` (PPO's value model).
pub fn load_model(args: &TrainingArguments, path: &str, trainable: bool) -> Result<Pretrained> {
    Ok(Pretrained::load(
        Path::new(path),
        &LoadOptions {
            dtype: args.dtype.candle(),
            trainable,
            device: run_device(args)?,
        },
    )?)
}

/// Writes the model (or adapter) and tokenizer into `dir`.
fn save_weights(
    policy: &Pretrained,
    lora: Option<&LoraConfig>,
    base: &str,
    dir: &Path,
) -> Result<()> {
    match lora {
        Some(cfg) => {
            policy.model.save_lora(dir, cfg, base)?;
            policy.tokenizer.save(dir)?;
        }
        None => policy.save(dir)?,
    }
    Ok(())
}

/// Data order: a fresh shuffle per epoch, from the seed and the epoch number alone, or the file's
/// order under `train_sampling_strategy = "sequential"`.
struct Order {
    n: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    cached: Option<(usize, Vec<usize>)>,
}

impl Order {
    fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch)
    }

    /// The `k`-th micro-batch of the endless stream of epochs.
    fn micro_batch(&mut self, k: usize) -> Vec<usize> {
        let nb = self.batches_per_epoch();
        let (epoch, b) = (k / nb, k % nb);
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            if self.shuffle {
                perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                    self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
            }
            self.cached = Some((epoch, perm));
        }
        let perm = &self.cached.as_ref().expect("just filled").1;
        perm[b * self.batch..((b + 1) * self.batch).min(self.n)].to_vec()
    }
}

/// Appends one JSON object per logged step to `metrics.jsonl`.
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log; on resume, first drops entries past the resumed step (they will be redone).
    fn open(output_dir: &Path, resumed_step: Option<usize>) -> Result<Self> {
        let path = output_dir.join("metrics.jsonl");
        if let Some(step) = resumed_step {
            let kept: String = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            preftune_model::io::atomic_write(&path, kept.as_bytes())?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { file })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::Msg(format!("metrics.jsonl: {e}")))
    }
}

/// Progress on a terminal (bar with loss, tokens/s and ETA) or plain lines in logs.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: usize, start: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            ) {
                b.set_style(style);
            }
            b.set_position(start as u64);
            b
        });
        Progress { bar }
    }

    fn update(&self, step: usize, total: usize, line: &str, eta_s: f64) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(line.to_string());
            }
            None => eprintln!("step {step}/{total} {line} eta {:.0}s", eta_s),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub output_dir: std::path::PathBuf,
    pub global_step: usize,
    pub train_loss: Option<f64>,
    pub eval: BTreeMap<String, f64>,
    pub num_tokens: usize,
    pub train_runtime_s: f64,
    pub resumed_from: Option<usize>,
}

/// Evaluates on the eval split (no dropout, outside autograd); metric names get an `eval_` prefix.
pub fn evaluate(
    args: &TrainingArguments,
    model: &Model,
    algo: &mut dyn Algorithm,
) -> Result<BTreeMap<String, f64>> {
    let n = algo.len(Split::Eval);
    let mut total = Metrics::default();
    if n == 0 {
        return Ok(BTreeMap::new());
    }
    let coef = router_aux_coef(args, model, algo)?;
    let mut frozen = model.detached()?;
    frozen.set_lora_dropout_seed(None);
    // Outside autograd too, as TRL's evaluation adds it to the loss it reports.
    frozen.set_router_aux_loss(coef != 0.0);
    // The training pass's products, as the references' (an unchanged policy's rewards are 0).
    let _same = preftune_model::ops::TrainingProducts::new();
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(args.per_device_eval_batch_size) {
        frozen.take_router_aux_losses();
        let (_, mut m) = algo.loss(&frozen, Split::Eval, chunk)?;
        take_router_aux(&frozen, coef, &mut m)?;
        total.merge(&m);
    }
    let mut out: BTreeMap<String, f64> = total
        .means()
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    out.insert("eval_num_tokens".into(), total.tokens as f64);
    Ok(out)
}

/// The checkpoint to resume from: the newest in `output_dir` when `resume` is set. A checkpoint
/// written under a configuration that `config` changes is refused here, before any model or data
/// loads.
pub fn resume_point(
    args: &TrainingArguments,
    config: &toml::Table,
    resume: bool,
) -> Result<Option<(usize, std::path::PathBuf)>> {
    if !resume {
        fresh_output_dir(args)?;
        return Ok(None);
    }
    let found = checkpoint::latest(&args.output_dir);
    match &found {
        Some((_, dir)) => checkpoint::check_resume_config(dir, config)?,
        None => eprintln!(
            "resume: no checkpoint in {}; starting from the beginning",
            args.output_dir.display()
        ),
    }
    Ok(found)
}

/// A run without `--resume` starts in an empty `output_dir`, as transformers' example scripts
/// require: an old run's checkpoints would otherwise outnumber the new run's (rotation deleted the
/// new ones, and a later `--resume` took up the old run). With `overwrite_output_dir` (TRL's
/// name) the old run's checkpoints, logs, samples and final model are deleted first, so two runs
/// never mix.
pub(crate) fn fresh_output_dir(args: &TrainingArguments) -> Result<()> {
    let dir = &args.output_dir;
    let entries: Vec<std::path::PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !args.overwrite_output_dir {
        return Err(Error::Config(format!(
            "{}: output_dir is not empty (an earlier run?). Continue it with --resume, start over \
             with overwrite_output_dir = true (--set overwrite_output_dir=true), or pick another \
             output_dir",
            dir.display()
        )));
    }
    // What a run writes into its output_dir (checkpoints, logs, samples, the final model or
    // adapter); anything else a user put there stays.
    const RUN_FILES: &[&str] = &[
        "metrics.jsonl",
        "samples.jsonl",
        "data_report.json",
        "config.toml",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_model.safetensors",
        "adapter_config.json",
        "value_model",
    ];
    for path in entries {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let run_file = checkpoint::step_of(&name).is_some()
            || (name.starts_with(".checkpoint-") && name.ends_with(".tmp"))
            || RUN_FILES.contains(&name.as_str());
        if run_file {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Runs training to the end. `policy` and `lora` come from [`load_policy`] with the same `ckpt`
/// (from [`resume_point`], which has checked that `config` may resume it), whose optimiser and
/// trainer state are restored here.
pub fn train(
    args: &TrainingArguments,
    config: &toml::Table,
    mut policy: Pretrained,
    lora: Option<LoraConfig>,
    ckpt: Option<(usize, std::path::PathBuf)>,
    algo: &mut dyn Algorithm,
) -> Result<TrainSummary> {
    let out = &args.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
    if args.bf16 && !preftune_model::ops::bf16_gemm_available() {
        eprintln!(
            "bf16: this CPU has neither AMX nor AVX-512 BF16 (or PREFTUNE_NO_BF16_GEMM is set): \
             products are rounded to bf16 but run as f32 GEMMs, slower than f32 mode"
        );
    }
    preftune_model::mem::trace("training starts");
    // Off the CPU kernels (a GPU), gradients, moments and updates stay on the device.
    let on_device = !preftune_model::kernels::cpu_kernels(policy.model.device());
    let mut params = policy.model.trainable_params();
    params.extend(algo.extra_params());
    if params.is_empty() {
        return Err(Error::Msg("no trainable parameters".into()));
    }
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: args.learning_rate,
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        },
        &params,
    );
    opt.lr_scale = params.iter().map(|(n, _)| algo.lr_scale(n)).collect();
    let aux_coef = router_aux_coef(args, &policy.model, algo)?;
    policy.model.set_router_aux_loss(aux_coef != 0.0);
    let jitter = policy.model.cfg.raw.get("router_jitter_noise");
    if let Some(j) = jitter.and_then(|j| j.as_f64()).filter(|j| *j > 0.0) {
        eprintln!(
            "warning: config.json sets router_jitter_noise = {j}: transformers multiplies each \
             mixture layer's input by noise while training, preftune does not"
        );
    }
    let n = algo.len(Split::Train);
    if n == 0 {
        let file = args
            .train_file
            .as_ref()
            .map_or("train_file".into(), |f| f.display().to_string());
        return Err(Error::Msg(format!(
            "the training set is empty: {file} has no usable rows (the data report above says why)"
        )));
    }
    let mut order = Order {
        n,
        batch: args.per_device_train_batch_size,
        seed: args.seed,
        shuffle: args.train_sampling_strategy == crate::config::SamplingStrategy::Random,
        cached: None,
    };
    let accum = args.gradient_accumulation_steps;
    let nb = order.batches_per_epoch();
    let total_steps = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        ((args.num_train_epochs * nb as f64) / accum as f64)
            .ceil()
            .max(1.0) as usize
    };
    let warmup = if args.warmup_steps > 0 {
        args.warmup_steps
    } else {
        (args.warmup_ratio * total_steps as f64).ceil() as usize
    };
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0.0,
        total_steps,
        num_tokens: 0,
        seed: args.seed,
        router_aux_loss_coef: policy.model.cfg.moe.is_some().then_some(aux_coef),
    };
    if let Some((step, dir)) = &ckpt {
        let saved = checkpoint::load(dir, &mut opt)?;
        algo.load_state(dir)?;
        eprintln!("resumed from {} (step {step})", dir.display());
        let moe = policy.model.cfg.moe.is_some();
        if let Some(why) = checkpoint::aux_loss_change(saved.router_aux_loss_coef, aux_coef, moe) {
            eprintln!("warning: resuming {}: {why}", dir.display());
        }
        state = TrainerState {
            router_aux_loss_coef: state.router_aux_loss_coef,
            ..saved
        };
    }
    preftune_model::io::atomic_write(
        &out.join("config.toml"),
        toml::to_string(config).unwrap_or_default().as_bytes(),
    )?;
    let mut log = MetricsLog::open(out, ckpt.as_ref().map(|(s, _)| *s))?;
    let progress = Progress::new(total_steps, state.global_step);
    let started = Instant::now();
    let start_step = state.global_step;
    let (mut window, mut run_loss) = (Metrics::default(), Metrics::default());
    // Host<->device bytes per step on a GPU, logged so a check can see no silent round trips.
    let gpu = policy.model.device().is_cuda();
    let mut copies_at_log = (preftune_model::device::transfer_counts(), state.global_step);
    let mut last_eval = BTreeMap::new();

    while state.global_step < total_steps {
        let step = state.global_step;
        let batches: Vec<Vec<usize>> = (0..accum)
            .map(|k| order.micro_batch(step * accum + k))
            .collect();
        let total_weight: f64 = batches.iter().map(|b| algo.weight(Split::Train, b)).sum();
        if total_weight <= 0.0 {
            return Err(Error::Msg(format!(
                "step {step}: the batch has nothing to learn from (zero weight)"
            )));
        }
        policy.model.set_lora_dropout_seed(None);
        algo.prepare(&policy.model, &batches)?;
        let updates = algo.updates_per_batch().max(1);
        let mut step_metrics = Metrics::default();
        let (mut grad_norm, mut lr) = (0.0, 0.0);
        for update in 0..updates {
            algo.on_update(update)?;
            let mut update_loss = 0.0;
            let mut grads = Grads::new(params.len(), on_device);
            for (k, b) in batches.iter().enumerate() {
                policy.model.set_lora_dropout_seed(Some(
                    args.seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add(((step * updates + update) * accum + k) as u64),
                ));
                preftune_model::mem::trace("before forward");
                // Passes before the loss's (a rollout's scoring) do not count.
                policy.model.take_router_aux_losses();
                let (loss, mut m) = algo.loss(&policy.model, Split::Train, b)?;
                preftune_model::mem::trace("forward");
                let mut value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / total_weight;
                let mut objective = (loss / total_weight)?;
                // The load-balancing loss, per micro-batch and averaged over the accumulation
                // steps, as TRL adds it.
                if let Some((aux, v)) = take_router_aux(&policy.model, aux_coef, &mut m)? {
                    let w = aux_coef / batches.len() as f64;
                    let term = (aux * w)?.to_dtype(objective.dtype())?;
                    objective = (objective + term)?;
                    value += w * v;
                }
                if !value.is_finite() {
                    return Err(Error::NonFinite {
                        step: step + 1,
                        value,
                    });
                }
                update_loss += value;
                let mut g = policy.model.backward(&objective)?;
                preftune_model::mem::trace("backward");
                for (i, (_, p)) in params.iter().enumerate() {
                    // Taken out of the store so each gradient tensor is freed once accumulated.
                    if let Some(gt) = g.remove(p.as_tensor()) {
                        grads.add(i, gt)?;
                    }
                }
                step_metrics.merge(&m);
                preftune_model::mem::trace("gradients taken");
            }
            grads.fill_missing(&params)?;
            policy.model.set_lora_dropout_seed(None);
            if step == start_step && update == 0 && dump_first_update(update_loss, &params, &grads)?
            {
                // A check, not training: nothing is updated or saved.
                progress.finish();
                return Ok(TrainSummary {
                    output_dir: out.clone(),
                    global_step: start_step,
                    train_loss: Some(update_loss),
                    eval: BTreeMap::new(),
                    num_tokens: state.num_tokens,
                    train_runtime_s: started.elapsed().as_secs_f64(),
                    resumed_from: ckpt.map(|(s, _)| s),
                });
            }
            grad_norm = grads.clip(args.max_grad_norm)?;
            if !grad_norm.is_finite() {
                return Err(Error::NonFinite {
                    step: step + 1,
                    value: grad_norm,
                });
            }
            lr = lr_at(
                args.lr_scheduler_type,
                args.learning_rate,
                step,
                warmup,
                total_steps,
            );
            opt.apply(&params, &grads, lr)?;
            preftune_model::mem::trace("optimizer step");
        }
        algo.on_update(updates)?;
        state.global_step += 1;
        state.num_tokens += step_metrics.tokens;
        state.epoch = (state.global_step * accum) as f64 / nb as f64;
        window.merge(&step_metrics);
        run_loss.merge(&step_metrics);

        let done = state.global_step == total_steps;
        let elapsed = started.elapsed().as_secs_f64();
        let steps_done = (state.global_step - start_step) as f64;
        if state.global_step.is_multiple_of(args.logging_steps) || done {
            let mut rec = serde_json::json!({
                "step": state.global_step, "epoch": state.epoch, "learning_rate": lr, "grad_norm": grad_norm,
                "num_tokens": state.num_tokens,
                "train_tokens_per_second": if elapsed > 0.0 { run_loss.tokens as f64 / elapsed } else { 0.0 },
            });
            for (k, v) in window.means() {
                rec[k] = v.into();
            }
            if gpu {
                let (now, steps) = (preftune_model::device::transfer_counts(), state.global_step);
                let per_step = |a: u64, b: u64| (a - b) as f64 / (steps - copies_at_log.1) as f64;
                rec["device/h2d_bytes_per_step"] = per_step(now.1, copies_at_log.0 .1).into();
                rec["device/d2h_bytes_per_step"] = per_step(now.3, copies_at_log.0 .3).into();
                copies_at_log = (now, steps);
            }
            log.write(&rec)?;
            let loss = window.means().get("loss").copied().unwrap_or(f64::NAN);
            let eta = elapsed / steps_done.max(1.0) * (total_steps - state.global_step) as f64;
            progress.update(
                state.global_step,
                total_steps,
                &format!(
                    "loss {loss:.4} lr {lr:.2e} tok/s {:.0}",
                    run_loss.tokens as f64 / elapsed.max(1e-9)
                ),
                eta,
            );
            window = Metrics::default();
        }
        if args
            .eval_steps
            .is_some_and(|e| state.global_step.is_multiple_of(e))
            && algo.len(Split::Eval) > 0
            && !done
        {
            last_eval = evaluate(args, &policy.model, algo)?;
            let mut rec = serde_json::json!({"step": state.global_step, "epoch": state.epoch});
            for (k, v) in &last_eval {
                rec[k] = (*v).into();
            }
            log.write(&rec)?;
        }
        if state.global_step.is_multiple_of(args.save_steps) || done {
            // Nothing non-finite is ever saved: the loss and gradient norm were finite, but a
            // huge step can still overflow the weights.
            if let Some(name) = first_non_finite(&params)? {
                return Err(Error::NonFiniteParameter {
                    step: state.global_step,
                    name,
                });
            }
            opt.sync_to_host()?;
            checkpoint::save(out, &state, &opt, config, |dir| {
                save_weights(&policy, lora.as_ref(), &args.model_name_or_path, dir)?;
                algo.save_state(dir)
            })?;
            checkpoint::rotate(out, args.save_total_limit)?;
            preftune_model::mem::trace("checkpoint");
        }
    }
    progress.finish();
    if algo.len(Split::Eval) > 0 {
        last_eval = evaluate(args, &policy.model, algo)?;
        let mut rec = serde_json::json!({"step": state.global_step, "epoch": state.epoch});
        for (k, v) in &last_eval {
            rec[k] = (*v).into();
        }
        log.write(&rec)?;
    }
    // The final model at the root of output_dir, as TRL leaves it.
    save_weights(&policy, lora.as_ref(), &args.model_name_or_path, out)?;
    algo.save_state(out)?;
    Ok(TrainSummary {
        output_dir: out.clone(),
        global_step: state.global_step,
        train_loss: run_loss.means().get("loss").copied(),
        eval: last_eval,
        num_tokens: state.num_tokens,
        train_runtime_s: started.elapsed().as_secs_f64(),
        resumed_from: ckpt.map(|(s, _)| s),
    })
}

/// Writes the data reports to `output_dir/data_report.json`, trains, and returns the summary with
/// the reports attached: what `preftune sft` and `preftune dpo` print.
pub fn train_with_report<R: serde::Serialize>(
    args: &TrainingArguments,
    config: &toml::Table,
    policy: Pretrained,
    lora: Option<LoraConfig>,
    ckpt: Option<(usize, std::path::PathBuf)>,
    algo: &mut dyn Algorithm,
    reports: &[R],
) -> Result<serde_json::Value> {
    let reports = serde_json::to_value(reports).unwrap_or_default();
    std::fs::create_dir_all(&args.output_dir).map_err(|e| Error::io(&args.output_dir, e))?;
    preftune_model::io::write_json(&args.output_dir.join("data_report.json"), &reports)?;
    let summary = train(args, config, policy, lora, ckpt, algo)?;
    let mut v = serde_json::to_value(&summary).unwrap_or_default();
    v["data"] = reports;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::Order;

    fn epoch(order: &mut Order, e: usize) -> Vec<usize> {
        let nb = order.batches_per_epoch();
        (e * nb..(e + 1) * nb)
            .flat_map(|k| order.micro_batch(k))
            .collect()
    }

    #[test]
    fn random_order_reshuffles_each_epoch_and_sequential_keeps_the_file_order() {
        let mut random = Order {
            n: 10,
            batch: 4,
            seed: 3,
            shuffle: true,
            cached: None,
        };
        let (e0, e1) = (epoch(&mut random, 0), epoch(&mut random, 1));
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..10).collect::<Vec<_>>(),
            "each epoch is a permutation"
        );
        assert_ne!(e0, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1, "a fresh shuffle per epoch");
        let mut again = Order {
            n: 10,
            batch: 4,
            seed: 3,
            shuffle: true,
            cached: None,
        };
        assert_eq!(
            epoch(&mut again, 1),
            e1,
            "the order depends on the seed and epoch alone"
        );

        let mut seq = Order {
            n: 10,
            batch: 4,
            seed: 3,
            shuffle: false,
            cached: None,
        };
        assert_eq!(seq.micro_batch(2), vec![8, 9], "the last batch is short");
        for e in 0..2 {
            assert_eq!(epoch(&mut seq, e), (0..10).collect::<Vec<_>>());
        }
    }
}
