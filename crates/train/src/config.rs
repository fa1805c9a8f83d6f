//! Run configuration: TOML files with TRL's parameter names, `--set key=value` overrides, and
//! unknown keys refused with their line, so a typo never silently trains with a default.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use preftune_data::TruncationMode;

use crate::error::{Error, Result};

/// The order training rows are drawn in (transformers' `train_sampling_strategy`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SamplingStrategy {
    /// A fresh shuffle each epoch, from `seed` and the epoch number.
    #[default]
    Random,
    /// The training file's order, every epoch.
    Sequential,
}

/// transformers' `lr_scheduler_type`: how the learning rate moves after warm-up.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Down to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
    /// The base rate throughout, without warm-up.
    Constant,
    /// The base rate after warm-up.
    ConstantWithWarmup,
}

/// The dtype model weights are loaded and trained in.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Dtype {
    #[default]
    #[serde(rename = "f32", alias = "float32")]
    F32,
    #[serde(rename = "bf16", alias = "bfloat16")]
    Bf16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The config spelling (`linear`, `keep_end`, `bf16`, ...): cache keys and messages use it.
macro_rules! display_as_serde {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(s)) => f.write_str(&s),
                    _ => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}
display_as_serde!(LrSchedulerType, Dtype, SamplingStrategy);

/// Options every trainer shares (transformers' `TrainingArguments` names, and TRL's `ModelConfig`
/// names for LoRA).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainingArguments {
    pub model_name_or_path: String,
    pub train_file: Option<PathBuf>,
    pub eval_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// Overrides `num_train_epochs` when > 0.
    pub max_steps: i64,
    /// `linear`, `cosine`, `constant` or `constant_with_warmup`.
    pub lr_scheduler_type: LrSchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// transformers' `train_sampling_strategy`: `random` (a fresh shuffle of the training set
    /// each epoch, from `seed`) or `sequential` (the file's order, to replay a given order).
    pub train_sampling_strategy: SamplingStrategy,
    pub logging_steps: usize,
    pub save_steps: usize,
    /// Keep only this many newest checkpoints.
    pub save_total_limit: Option<usize>,
    /// Evaluate every this many steps (and at the end) when `eval_file` is set.
    pub eval_steps: Option<usize>,
    pub max_length: Option<usize>,
    /// `keep_start` or `keep_end`.
    pub truncation_mode: TruncationMode,
    /// `f32` or `bf16`.
    pub dtype: Dtype,
    /// Skip rows that fail validation (and report how many and why) instead of refusing the data.
    pub skip_invalid_rows: bool,
    /// Canonical column name -> the dataset's column name.
    pub columns: BTreeMap<String, String>,
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Option<Vec<String>>,
    /// PEFT's `layers_to_transform`: the decoder layers that get adapters (default: all).
    pub lora_layers_to_transform: Option<Vec<usize>>,
    /// TRL's `load_in_4bit` (QLoRA): the frozen base of a LoRA run stays 4-bit in memory
    /// (llama.cpp's Q4_K, or Q4_0 for rows not a multiple of 256; a GGUF file's quantised
    /// weights stay as stored), dequantised one layer at a time. CPU only.
    pub load_in_4bit: bool,
    /// TRL's `load_in_8bit`: the same with llama.cpp's Q8_0.
    pub load_in_8bit: bool,
    /// Recompute each decoder layer in backward instead of storing its activations: less memory
    /// for about a third more compute.
    pub gradient_checkpointing: bool,
    /// Mixed precision (transformers' `bf16`): linears multiply in bf16 with f32 sums, on AMX or
    /// AVX-512 BF16 where the CPU has them; master weights, gradients, optimiser state, norms and softmax stay
    /// f32. Needs `dtype = "f32"`.
    pub bf16: bool,
    /// `cpu`, `cuda`, `cuda:N` or `auto`; the command line's `--device` overrides it.
    pub device: Option<preftune_model::DeviceSpec>,
    /// Start over in a used `output_dir` (its checkpoints and log are deleted first). Without it
    /// a run that does not `--resume` needs an empty or new `output_dir`.
    pub overwrite_output_dir: bool,
    /// TRL's `router_aux_loss_coef`: the weight of a mixture-of-experts model's load-balancing
    /// loss in the training loss. Unset: the model config's own (0.001 for Mixtral and the Qwen
    /// MoEs) where TRL's trainer of the algorithm adds it; 0 turns it off; an error on a dense
    /// model.
    pub router_aux_loss_coef: Option<f64>,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            model_name_or_path: String::new(),
            train_file: None,
            eval_file: None,
            output_dir: PathBuf::from("output"),
            learning_rate: 5e-5,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: LrSchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            train_sampling_strategy: SamplingStrategy::Random,
            logging_steps: 10,
            save_steps: 500,
            save_total_limit: None,
            eval_steps: None,
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            dtype: Dtype::F32,
            skip_invalid_rows: false,
            columns: BTreeMap::new(),
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: None,
            lora_layers_to_transform: None,
            load_in_4bit: false,
            load_in_8bit: false,
            gradient_checkpointing: false,
            bf16: false,
            device: None,
            overwrite_output_dir: false,
            router_aux_loss_coef: None,
        }
    }
}

impl TrainingArguments {
    /// Checks values that deserialise fine but cannot run.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::Config(format!("{origin}: {key}: {msg}")));
        if self.model_name_or_path.is_empty() {
            return bad("model_name_or_path", "required");
        }
        if self.per_device_train_batch_size == 0 || self.per_device_eval_batch_size == 0 {
            return bad("per_device_train_batch_size", "must be > 0");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be > 0");
        }
        if !(self.learning_rate >= 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate", "must be a finite number >= 0");
        }
        if self.logging_steps == 0 || self.save_steps == 0 || self.eval_steps == Some(0) {
            return bad(
                "logging_steps",
                "logging_steps, save_steps and eval_steps must be > 0",
            );
        }
        if self.bf16 && self.dtype != Dtype::F32 {
            return bad(
                "bf16",
                "mixed precision keeps f32 master weights: set dtype = \"f32\" (dtype = \"bf16\" \
                 alone stores the weights themselves in bf16)",
            );
        }
        if self.use_peft && (self.lora_r == 0 || !(0.0..1.0).contains(&self.lora_dropout)) {
            return bad("lora_r", "LoRA needs lora_r > 0 and 0 <= lora_dropout < 1");
        }
        if self.load_in_4bit && self.load_in_8bit {
            return bad("load_in_4bit", "set load_in_4bit or load_in_8bit, not both");
        }
        if self.base_quant().is_some() && !self.use_peft {
            return bad(
                "load_in_4bit",
                "a quantised base is frozen: it trains LoRA adapters (set use_peft = true)",
            );
        }
        Ok(())
    }

    /// The quantised base `load_in_4bit` / `load_in_8bit` ask for.
    pub fn base_quant(&self) -> Option<preftune_model::ops::BaseQuant> {
        use preftune_model::ops::BaseQuant;
        match (self.load_in_4bit, self.load_in_8bit) {
            (true, _) => Some(BaseQuant::Q4),
            (false, true) => Some(BaseQuant::Q8),
            _ => None,
        }
    }
}

/// A loaded configuration: the shared arguments, the algorithm's own, and the merged table (the
/// snapshot written to the run folder).
#[derive(Clone, Debug)]
pub struct RunConfig<A> {
    pub args: TrainingArguments,
    pub algo: A,
    pub table: toml::Table,
}

/// Parses `value` of `--set key=value` as TOML, falling back to a plain string (`--set output_dir=runs/a`).
fn parse_value(value: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.into()),
    }
}

/// Applies `key=value` (dotted keys reach into tables: `columns.prompt=question`).
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set {set}: expected key=value")))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set {set}: {p} is not a table")))?;
    }
    t.insert(
        parts[parts.len() - 1].to_string(),
        parse_value(value.trim()),
    );
    Ok(())
}

/// The line of `key = ...` in a TOML text, for error messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(leaf)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// Loads `path` (TOML) over the algorithm's `defaults`, applies `sets`, and deserialises both the
/// shared and the algorithm arguments. A key that neither knows is an error naming it and its line.
pub fn load<A: DeserializeOwned>(
    path: Option<&Path>,
    defaults: toml::Table,
    sets: &[String],
) -> Result<RunConfig<A>> {
    Ok(load_with_sections(path, defaults, sets, &[])?.0)
}

/// [`load`], with the named top-level tables taken out first and returned as they are (a command
/// that runs a trainer as one of its steps keeps its own options there, e.g. `[rejection_sampling]`).
pub fn load_with_sections<A: DeserializeOwned>(
    path: Option<&Path>,
    defaults: toml::Table,
    sets: &[String],
    sections: &[&str],
) -> Result<(RunConfig<A>, toml::Table)> {
    let (src, taken) = Source::merge(path, defaults, sets, sections)?;
    let (mut u1, mut u2) = (vec![], vec![]);
    let args: TrainingArguments = src.read(&mut u1)?;
    let algo: A = src.read(&mut u2)?;
    src.refuse_unknown(&[u1, u2])?;
    args.validate(&src.origin)?;
    Ok((
        RunConfig {
            args,
            algo,
            table: src.table,
        },
        taken,
    ))
}

/// Defaults of the fields that several options tables share (`#[serde(default = "...")]`).
pub(crate) mod default {
    pub fn one() -> usize {
        1
    }
    pub fn once() -> std::num::NonZeroUsize {
        std::num::NonZeroUsize::MIN
    }
    pub fn two() -> usize {
        2
    }
    pub fn four() -> usize {
        4
    }
    pub fn eight() -> usize {
        8
    }
    pub fn unit() -> f64 {
        1.0
    }
    /// `max_new_tokens` of the commands that sample before they train (transformers' 128 is
    /// theirs too).
    pub fn max_new_tokens() -> usize {
        128
    }
}

/// A trainer's config (its defaults, the file, `--set`) plus the `[name]` table of a command that
/// runs the trainer as one of its steps (`keys`: what the table needs, for the error when it is
/// missing).
pub fn load_with_table<A: DeserializeOwned, T: DeserializeOwned>(
    file: Option<&Path>,
    defaults: toml::Table,
    set: &[String],
    name: &str,
    keys: &str,
) -> Result<(RunConfig<A>, T)> {
    let (cfg, sections) = load_with_sections::<A>(file, defaults, set, &[name])?;
    let section = sections
        .get(name)
        .cloned()
        .ok_or_else(|| Error::Config(format!("the config needs a [{name}] table ({keys})")))?;
    let own: T = section
        .try_into()
        .map_err(|e| Error::Config(format!("[{name}]: {e}")))?;
    Ok((cfg, own))
}

/// An algorithm's options in two structs read from the same keys: the part it shares with sibling
/// trainers (GRPO and RLOO share [`crate::rl::online::OnlineArgs`]) and its own. Not
/// `#[serde(flatten)]`: through a flattened struct a misspelt key goes unreported.
#[derive(Clone, Debug, PartialEq)]
pub struct Parts<C, X> {
    pub common: C,
    pub own: X,
}

/// [`load`] for options in [`Parts`]: a key that none of the three structs knows is an error.
pub fn load_parts<C: DeserializeOwned, X: DeserializeOwned>(
    path: Option<&Path>,
    defaults: toml::Table,
    sets: &[String],
) -> Result<RunConfig<Parts<C, X>>> {
    let (src, _) = Source::merge(path, defaults, sets, &[])?;
    let (mut u1, mut u2, mut u3) = (vec![], vec![], vec![]);
    let args: TrainingArguments = src.read(&mut u1)?;
    let common: C = src.read(&mut u2)?;
    let own: X = src.read(&mut u3)?;
    src.refuse_unknown(&[u1, u2, u3])?;
    args.validate(&src.origin)?;
    Ok(RunConfig {
        args,
        algo: Parts { common, own },
        table: src.table,
    })
}

/// A trainer's options, loadable from a config file and `--set` overrides.
pub trait Options: Sized {
    fn load_config(
        path: Option<&Path>,
        defaults: toml::Table,
        sets: &[String],
    ) -> Result<RunConfig<Self>>;
}

impl<C: DeserializeOwned, X: DeserializeOwned> Options for Parts<C, X> {
    fn load_config(
        path: Option<&Path>,
        defaults: toml::Table,
        sets: &[String],
    ) -> Result<RunConfig<Self>> {
        load_parts(path, defaults, sets)
    }
}

/// [`Options`] for options in one struct.
#[macro_export]
macro_rules! one_struct_options {
    ($($t:ty),*) => {$(
        impl $crate::config::Options for $t {
            fn load_config(
                path: Option<&std::path::Path>,
                defaults: toml::Table,
                sets: &[String],
            ) -> $crate::Result<$crate::config::RunConfig<Self>> {
                $crate::config::load(path, defaults, sets)
            }
        }
    )*};
}

/// The merged configuration (defaults, then the file, then `--set`) and where it came from.
struct Source {
    table: toml::Table,
    /// `table` as TOML text, what each struct is read from (error spans point into it).
    merged: String,
    /// The `--set` overrides, as given.
    sets: Vec<String>,
    /// The file's text (empty without a file), to find a key's line.
    text: String,
    origin: String,
    from_file: bool,
}

impl Source {
    /// Merges the layers; the named top-level tables are taken out and returned as they are.
    fn merge(
        path: Option<&Path>,
        defaults: toml::Table,
        sets: &[String],
        sections: &[&str],
    ) -> Result<(Source, toml::Table)> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
                p.display().to_string(),
            ),
            None => (String::new(), "<no config file>".to_string()),
        };
        let file: toml::Table =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        let mut table = defaults;
        for (k, v) in file {
            table.insert(k, v);
        }
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let mut taken = toml::Table::new();
        for name in sections {
            if let Some(v) = table.remove(*name) {
                taken.insert(name.to_string(), v);
            }
        }
        let merged = toml::to_string(&table).expect("a toml::Table always serialises");
        let src = Source {
            table,
            merged,
            sets: sets.to_vec(),
            text,
            origin,
            from_file: path.is_some(),
        };
        Ok((src, taken))
    }

    /// Deserialises the merged config into `T`, noting the keys `T` does not know in `unknown`.
    /// A value of the wrong type or spelling is an error naming its key and, when it came from
    /// the file, its line.
    fn read<T: DeserializeOwned>(&self, unknown: &mut Vec<String>) -> Result<T> {
        let text = &self.merged;
        let fail = |e: toml::de::Error| {
            // The span points into the merged text; the key on that line names the field.
            let key = e.span().and_then(|sp| {
                let at = sp.start.min(text.len());
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                text[start..end]
                    .split_once('=')
                    .map(|(k, _)| k.trim().trim_matches('"').to_string())
            });
            let place = match &key {
                Some(k) => self.place_of(k),
                None => self.origin.clone(),
            };
            let field = key.map(|k| format!("{k}: ")).unwrap_or_default();
            Error::Config(format!("{place}: {field}{}", e.message()))
        };
        let de = toml::Deserializer::parse(text).map_err(fail)?;
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string())).map_err(fail)
    }

    /// Where `key` was set: `--set`, else `FILE:LINE`, else the file or `--set`.
    fn place_of(&self, key: &str) -> String {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let by_set = self.sets.iter().any(|s| {
            s.split_once('=')
                .is_some_and(|(k, _)| k.trim() == key || k.trim() == leaf)
        });
        match line_of(&self.text, key) {
            _ if by_set => "--set".to_string(),
            Some(l) if self.from_file => format!("{}:{l}", self.origin),
            _ => format!("{} or --set", self.origin),
        }
    }

    /// Each struct ignores the others' keys: only a key that all of them ignore is unknown. Keys
    /// inside `columns` are free-form.
    fn refuse_unknown(&self, ignored: &[Vec<String>]) -> Result<()> {
        let Some((first, rest)) = ignored.split_first() else {
            return Ok(());
        };
        if let Some(key) = first
            .iter()
            .find(|k| rest.iter().all(|u| u.contains(k)) && !k.starts_with("columns."))
        {
            let place = self.place_of(key);
            return Err(Error::Config(format!("{place}: unknown key `{key}`")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(default)]
    struct Algo {
        beta: f64,
        packing: bool,
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn file_defaults_and_sets_layer_in_order() {
        let f = write("model_name_or_path = \"m\"\nlearning_rate = 1e-4\nbeta = 0.5\n[columns]\nprompt = \"question\"\n");
        let defaults: toml::Table =
            toml::from_str("learning_rate = 2e-5\nmax_length = 512").unwrap();
        let sets = vec![
            "per_device_train_batch_size=2".into(),
            "output_dir=runs/x".into(),
            "packing=true".into(),
            "columns.completion=answer".into(),
        ];
        let c: RunConfig<Algo> = load(Some(f.path()), defaults, &sets).unwrap();
        assert_eq!(c.args.learning_rate, 1e-4, "file beats defaults");
        assert_eq!(c.args.max_length, Some(512), "algorithm default");
        assert_eq!(c.args.per_device_train_batch_size, 2);
        assert_eq!(c.args.output_dir, PathBuf::from("runs/x"));
        assert_eq!(
            c.algo,
            Algo {
                beta: 0.5,
                packing: true
            }
        );
        assert_eq!(c.args.columns["prompt"], "question");
        assert_eq!(c.args.columns["completion"], "answer");
        assert_eq!(c.args.seed, 42);
        assert_eq!(c.args.train_sampling_strategy, SamplingStrategy::Random);
        let c: RunConfig<Algo> = load(
            Some(f.path()),
            Default::default(),
            &["train_sampling_strategy=sequential".into()],
        )
        .unwrap();
        assert_eq!(c.args.train_sampling_strategy, SamplingStrategy::Sequential);
        let e = load::<Algo>(
            Some(f.path()),
            Default::default(),
            &["train_sampling_strategy=sorted".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `sorted`"), "{e}");
    }

    #[test]
    fn device_parses_from_files_and_sets_and_bad_names_are_named() {
        use preftune_model::DeviceSpec;
        let f = write("model_name_or_path = \"m\"\ndevice = \"cuda:1\"\n");
        let c: RunConfig<Algo> = load(Some(f.path()), Default::default(), &[]).unwrap();
        assert_eq!(c.args.device, Some(DeviceSpec::Cuda(1)));
        let c: RunConfig<Algo> =
            load(Some(f.path()), Default::default(), &["device=auto".into()]).unwrap();
        assert_eq!(c.args.device, Some(DeviceSpec::Auto));
        let f = write("model_name_or_path = \"m\"\n");
        let c: RunConfig<Algo> = load(Some(f.path()), Default::default(), &[]).unwrap();
        assert_eq!(
            c.args.device, None,
            "unset: the command line's --device, else the CPU"
        );
        let f = write("model_name_or_path = \"m\"\n\ndevice = \"tpu\"\n");
        let e = load::<Algo>(Some(f.path()), Default::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device: unknown device \"tpu\" (use cpu, cuda, cuda:N or auto)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = write("model_name_or_path = \"m\"\n\nlerning_rate = 1e-4\n");
        let e = load::<Algo>(Some(f.path()), Default::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(":3: unknown key `lerning_rate`"), "{e}");
        let f = write("model_name_or_path = \"m\"\n");
        let e = load::<Algo>(Some(f.path()), Default::default(), &["betta=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `betta`") && e.contains("--set"),
            "{e}"
        );
        let f = write("model_name_or_path = \"m\"\nlearning_rate = \"fast\"\n");
        let e = load::<Algo>(Some(f.path()), Default::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid type") && e.contains("learning_rate") || e.contains("f64"),
            "{e}"
        );
        let f = write("learning_rate = 1e-4\n");
        let e = load::<Algo>(Some(f.path()), Default::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_name_or_path: required"), "{e}");
        let e = load::<Algo>(
            Some(f.path()),
            Default::default(),
            &[
                "model_name_or_path=m".into(),
                "lr_scheduler_type=cosinus".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lr_scheduler_type"), "{e}");
    }

    #[test]
    fn a_misspelt_closed_set_value_names_its_key_and_line() {
        let f = write(
            "model_name_or_path = \"m\"\nlearning_rate = 1e-4\ntruncation_mode = \"keep_middle\"\n",
        );
        let e = load::<Algo>(Some(f.path()), Default::default(), &[])
            .unwrap_err()
            .to_string();
        let at = format!("{}:3: truncation_mode: ", f.path().display());
        assert!(e.starts_with(&at) && e.contains("keep_middle"), "{e}");
        // The closed sets deserialise to their enums, spelled as transformers spells them.
        let cfg = load::<Algo>(
            Some(f.path()),
            Default::default(),
            &[
                "truncation_mode=keep_end".into(),
                "lr_scheduler_type=constant_with_warmup".into(),
                "dtype=bfloat16".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.args.truncation_mode, TruncationMode::KeepEnd);
        assert_eq!(
            cfg.args.lr_scheduler_type,
            LrSchedulerType::ConstantWithWarmup
        );
        assert_eq!(cfg.args.dtype, Dtype::Bf16);
        assert_eq!(cfg.args.dtype.to_string(), "bf16");
        assert_eq!(cfg.args.truncation_mode.to_string(), "keep_end");
    }
}
