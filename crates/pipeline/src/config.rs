//! The pipeline's config (examples/imdb-sentiment.toml): its own keys, and one table per trainer
//! holding that trainer's keys (TRL's names).
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// A policy the pipeline trains or samples, in the order results are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Sft,
    Dpo,
    /// KTO (`[kto]`) on the same pairs, unpaired: chosen desirable, rejected undesirable.
    Kto,
    /// ORPO (`[orpo]`) on the same pairs, no reference model.
    Orpo,
    /// SimPO (`[simpo]`: `preftune cpo` with `loss_type = "simpo"`) on the same pairs.
    Simpo,
    /// Online DPO (`[online_dpo]`): rounds of sampling from the policy, labelling and DPO.
    OnlineDpo,
    Ppo,
    /// PPO against the gold judge itself (the DPO paper's PPO-GT).
    PpoGt,
    Grpo,
    /// Best-of-N over SFT samples, chosen by the reward model.
    Bon,
}

impl Method {
    pub const ALL: [Method; 10] = [
        Method::Sft,
        Method::Dpo,
        Method::Kto,
        Method::Orpo,
        Method::Simpo,
        Method::OnlineDpo,
        Method::Ppo,
        Method::PpoGt,
        Method::Grpo,
        Method::Bon,
    ];

    /// The name in configs, folders and results (`ppo-gt`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Kto => "kto",
            Method::Orpo => "orpo",
            Method::Simpo => "simpo",
            Method::OnlineDpo => "online-dpo",
            Method::Ppo => "ppo",
            Method::PpoGt => "ppo-gt",
            Method::Grpo => "grpo",
            Method::Bon => "bon",
        }
    }
}

/// Who labels online DPO's pairs (`online_dpo.labels`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labels {
    /// The gold judge itself.
    Gold,
    /// The reward model trained on the gold-labelled pairs.
    Rm,
    /// A judge: a pairwise one (`llm:PATH`, `openai:URL#MODEL`) or any reward source; `{base}`
    /// and `{sft}` in it name the base and SFT models.
    Judge(String),
}

impl std::str::FromStr for Labels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gold" => Ok(Labels::Gold),
            "rm" => Ok(Labels::Rm),
            _ => match s.strip_prefix("judge:") {
                Some(spec) if !spec.is_empty() => Ok(Labels::Judge(spec.to_string())),
                _ => Err(format!(
                    "online_dpo.labels: {s:?} (use \"gold\", \"rm\" or \"judge:SPEC\", e.g. \
                     \"judge:llm:{{base}}\")"
                )),
            },
        }
    }
}

/// What the reward model trains on (`data.rm_pairs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RmPairs {
    /// Each prompt's best and worst sample: the pairs DPO gets.
    #[default]
    BestWorst,
    /// Every ordered pair of the samples, weighted once per prompt.
    Rankings,
}

/// `bf16`: `true`, `false` or `"auto"` (on where the CPU multiplies in bf16 natively).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bf16Setting {
    On,
    Off,
    #[default]
    Auto,
}

impl Bf16Setting {
    pub fn resolve(self) -> bool {
        match self {
            Bf16Setting::On => true,
            Bf16Setting::Off => false,
            Bf16Setting::Auto => preftune_model::ops::bf16_gemm_available(),
        }
    }
}

impl<'de> Deserialize<'de> for Bf16Setting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Bf16Setting::On),
            Raw::Bool(false) => Ok(Bf16Setting::Off),
            Raw::Text(s) if s == "auto" => Ok(Bf16Setting::Auto),
            Raw::Text(s) => Err(serde::de::Error::custom(format!(
                "bf16: expected true, false or \"auto\", found \"{s}\""
            ))),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCfg {
    #[serde(default = "d_sft_reviews")]
    pub sft_reviews: usize,
    /// Words of each review kept for SFT.
    #[serde(default = "d_sft_words")]
    pub sft_words: usize,
    #[serde(default = "d_prompts")]
    pub prompts: usize,
    #[serde(default = "d_eval_prompts")]
    pub eval_prompts: usize,
    #[serde(default = "d_prefix_min")]
    pub prefix_min_tokens: usize,
    #[serde(default = "d_prefix_max")]
    pub prefix_max_tokens: usize,
    /// Continuations sampled per prompt to build preference pairs.
    #[serde(default = "d_samples")]
    pub samples_per_prompt: usize,
    #[serde(default = "d_new")]
    pub max_new_tokens: usize,
    /// The last this many prompts' scored samples are held out to measure the reward model's
    /// accuracy against the gold labels (the proxy-vs-gold gap); DPO still uses their pairs.
    #[serde(default = "d_rm_eval")]
    pub rm_eval_prompts: usize,
    /// What the reward model trains on: `best_worst` (each prompt's best and worst sample, the
    /// pairs DPO gets) or `rankings` (every ordered pair of the samples, weighted once per prompt;
    /// more pairs, but close ones are mostly judge noise).
    #[serde(default)]
    pub rm_pairs: RmPairs,
    /// Gold-labelled pairs of real review openings added to the reward model's training data
    /// (reviews disjoint from the others; the higher-scored half paired at random with the lower).
    /// The gold judge labels any text, and ~150 sampled pairs alone teach a 135M reward model no
    /// sentiment that carries to new prefixes.
    #[serde(default)]
    pub rm_review_pairs: usize,
}

fn d_rm_eval() -> usize {
    16
}

fn d_sft_reviews() -> usize {
    2000
}
fn d_sft_words() -> usize {
    48
}
fn d_prompts() -> usize {
    256
}
fn d_eval_prompts() -> usize {
    64
}
fn d_prefix_min() -> usize {
    2
}
fn d_prefix_max() -> usize {
    8
}
fn d_samples() -> usize {
    4
}
fn d_new() -> usize {
    32
}
fn d_n() -> usize {
    4
}
fn d_methods() -> Vec<Method> {
    vec![
        Method::Sft,
        Method::Dpo,
        Method::Ppo,
        Method::Grpo,
        Method::Bon,
    ]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub output_dir: PathBuf,
    /// An HF folder or a .gguf file (converted once into `output_dir/base`).
    pub model: PathBuf,
    pub reviews_csv: Option<PathBuf>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_methods")]
    pub methods: Vec<Method>,
    pub data: DataCfg,
    /// Each trainer's table holds its own config keys (TRL's names); paths are set by the pipeline.
    #[serde(default)]
    pub sft: toml::Table,
    #[serde(default)]
    pub rm: toml::Table,
    #[serde(default)]
    pub dpo: toml::Table,
    /// KTO, ORPO and SimPO on the DPO pairs (`preftune kto`, `orpo`, `cpo`'s keys).
    #[serde(default)]
    pub kto: toml::Table,
    #[serde(default)]
    pub orpo: toml::Table,
    #[serde(default)]
    pub simpo: toml::Table,
    #[serde(default)]
    pub ppo: toml::Table,
    #[serde(default)]
    pub grpo: toml::Table,
    /// Online DPO: `labels` ("gold", "rm" or "judge:SPEC"), the `[online_dpo]` options of
    /// `preftune online-dpo` (rounds, prompts_per_round, num_generations, ref_update...) and any
    /// DPO key, over `[dpo]`'s.
    #[serde(default)]
    pub online_dpo: toml::Table,
    /// Best-of-N over SFT samples, chosen by the reward model.
    #[serde(default = "d_n")]
    pub bon_n: usize,
    /// Samples per held-out prompt in the evaluation.
    #[serde(default = "d_eval_n")]
    pub eval_samples_per_prompt: usize,
    /// Extra DPO runs at these betas and PPO runs at these KL coefficients, evaluated like the
    /// others: the points of the reward-vs-KL frontier (`dpo-beta-B`, `ppo-kl-C`).
    #[serde(default)]
    pub frontier_dpo_betas: Vec<f64>,
    #[serde(default)]
    pub frontier_ppo_kl_coefs: Vec<f64>,
    /// Mixed precision for every trainer that does not set its own `bf16`: `"auto"` (on where the
    /// CPU has AMX or AVX-512 BF16, where it is faster), `true` or `false`.
    #[serde(default)]
    pub bf16: Bf16Setting,
    /// Keep each finished trainer stage's `checkpoint-*` folders (deleted by default; the final
    /// model is what later stages and the evaluation read).
    #[serde(default)]
    pub keep_checkpoints: bool,
}

fn d_eval_n() -> usize {
    2
}
