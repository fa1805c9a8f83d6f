//! Safety context distillation (Llama 2, section 4.2.4): the model answers risky prompts with a
//! safety preprompt, then learns to give those answers without it.
//!
//! 1. Each prompt is answered as a user message after a system message holding the preprompt.
//! 2. With `safety` (a reward source), the same prompt is also answered without the preprompt, and
//!    only answers the source scores higher with the preprompt are kept (targeted distillation).
//! 3. SFT on prompt-without-preprompt -> answer (`output_dir/distill.jsonl`, then `output_dir/sft`).
//!
//! `response_prefix` prefills every answer under the preprompt (Llama 2's answer templates: a
//! small model that ignores a safety preprompt still continues "I'm sorry, but" as a refusal), and
//! `benign` prompts, answered without preprompt or prefix, join the SFT data so that the model
//! does not learn to refuse everything.
use std::path::Path;

use preftune_eval::redteam::load_prompts_limited;
use preftune_eval::sources::{answer_conversations, RewardSource};
use preftune_model::{LoadOptions, Message, Pretrained, SamplingConfig};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::sft::SftArgs;

/// The default preprompt: the opening of Llama 2 Chat's default system prompt.
pub const LLAMA2_SAFETY_PREPROMPT: &str = "You are a helpful, respectful and honest assistant. \
Always answer as helpfully as possible, while being safe. Your answers should not include any \
harmful, unethical, racist, sexist, toxic, dangerous, or illegal content.";

/// `[distill]` of a distillation config; the rest is an SFT config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillOptions {
    /// Risky prompts: `donotanswer`, `harmbench`, `rtp`, or a prompt file (see `eval redteam`).
    pub prompts: String,
    /// Use only the first this many prompts (0: all).
    #[serde(default)]
    pub limit: usize,
    /// The system message answers are sampled under.
    #[serde(default = "preprompt")]
    pub preprompt: String,
    /// Targeted distillation: keep an answer only when this source scores it above the answer
    /// without the preprompt.
    pub safety: Option<String>,
    /// Text every answer under the preprompt starts with (prefilled); empty: none.
    #[serde(default)]
    pub response_prefix: String,
    /// Benign prompts (same formats), answered without the preprompt and added to the SFT data.
    pub benign: Option<String>,
    /// Use only the first this many benign prompts (0: all).
    #[serde(default)]
    pub benign_limit: usize,
    /// Text every benign answer starts with (prefilled; e.g. "Sure"): the refusal template's
    /// counterpart, so that the first token is learned on both sides. Empty: none.
    #[serde(default)]
    pub benign_prefix: String,
    /// How many times each benign answer appears in the SFT data (1: once). More weight on the
    /// benign side moves the distilled model from refusing benign prompts that resemble harmful
    /// ones towards answering them.
    #[serde(default = "crate::config::default::once")]
    pub benign_repeats: std::num::NonZeroUsize,
    #[serde(default = "crate::config::default::eight")]
    pub batch_size: usize,
    #[serde(default = "crate::config::default::max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "crate::config::default::unit")]
    pub temperature: f64,
    #[serde(default = "crate::config::default::unit")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
}

fn preprompt() -> String {
    LLAMA2_SAFETY_PREPROMPT.into()
}

/// Loads a distillation config: an SFT config plus its `[distill]` table.
pub fn load_config(
    file: Option<&Path>,
    set: &[String],
) -> Result<(RunConfig<SftArgs>, DistillOptions)> {
    crate::sft::load_with_table(file, set, "distill", "prompts, preprompt, safety")
}

/// Every prompt answered once as `messages(prompt)`; scored by `safety` when given.
fn answers(
    policy: &Pretrained,
    prompts: &[String],
    messages: &dyn Fn(&str) -> Vec<Message>,
    safety: Option<&RewardSource>,
    d: &DistillOptions,
    seed: u64,
    prefix: &str,
) -> Result<(Vec<String>, Vec<f64>)> {
    let conversations: Vec<Vec<Message>> = prompts.iter().map(|p| messages(p)).collect();
    let cfg = SamplingConfig {
        max_new_tokens: d.max_new_tokens,
        temperature: d.temperature,
        top_p: d.top_p,
        top_k: d.top_k,
        seed,
        eos_token_ids: policy.eos_token_ids(),
        pad_token_id: policy.pad_token_id(),
        ..Default::default()
    };
    Ok(answer_conversations(
        policy,
        &conversations,
        d.batch_size,
        safety,
        &cfg,
        prefix,
    )?)
}

/// The prompts of a set (see `eval redteam`), the first `limit` (0: all).
fn prompt_texts(spec: &str, limit: usize) -> Result<Vec<String>> {
    Ok(load_prompts_limited(spec, limit)?
        .into_iter()
        .map(|p| p.prompt)
        .collect())
}

/// Samples, filters and fine-tunes; returns the summary (`prompts`, `kept`, `sft`).
pub fn run(cfg: &RunConfig<SftArgs>, d: &DistillOptions, resume: bool) -> Result<Value> {
    let prompts = prompt_texts(&d.prompts, d.limit)?;
    let benign = match &d.benign {
        Some(spec) => prompt_texts(spec, d.benign_limit)?,
        None => vec![],
    };
    let safety = d.safety.as_deref().map(RewardSource::parse).transpose()?;
    let out = &cfg.args.output_dir;
    let data = out.join("distill.jsonl");
    let (kept, targeted_dropped) = {
        let policy = Pretrained::load(
            Path::new(&cfg.args.model_name_or_path),
            &LoadOptions {
                dtype: cfg.args.dtype.candle(),
                ..Default::default()
            },
        )?;
        let with = |p: &str| {
            vec![
                Message::new("system", &d.preprompt),
                Message::new("user", p),
            ]
        };
        let without = |p: &str| vec![Message::new("user", p)];
        let seed = cfg.args.seed;
        let prefix = d.response_prefix.as_str();
        let (a, sa) = answers(&policy, &prompts, &with, safety.as_ref(), d, seed, prefix)?;
        let keep: Vec<bool> = match &safety {
            Some(s) => {
                let (_, sb) = answers(&policy, &prompts, &without, Some(s), d, seed ^ 0x5afe, "")?;
                sa.iter().zip(&sb).map(|(x, y)| x > y).collect()
            }
            None => vec![true; prompts.len()],
        };
        let row = |p: &String, r: &String| {
            json!({"prompt": [{"role": "user", "content": p}],
                   "completion": [{"role": "assistant", "content": r}]})
        };
        let mut rows: Vec<Value> = prompts
            .iter()
            .zip(&a)
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|((p, r), _)| row(p, r))
            .collect();
        if rows.is_empty() {
            return Err(Error::Config(format!(
                "{}: no answer was kept (targeted distillation kept none of {} prompts)",
                d.prompts,
                prompts.len()
            )));
        }
        let kept = rows.len();
        if !benign.is_empty() {
            let (b, _) = answers(
                &policy,
                &benign,
                &without,
                None,
                d,
                seed ^ 0xbe9,
                &d.benign_prefix,
            )?;
            let benign_rows: Vec<Value> = benign.iter().zip(&b).map(|(p, r)| row(p, r)).collect();
            for _ in 0..d.benign_repeats.get() {
                rows.extend(benign_rows.iter().cloned());
            }
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        preftune_model::io::write_jsonl(&data, &rows)?;
        (kept, prompts.len() - kept)
    };
    let mut sft_cfg = cfg.clone();
    sft_cfg.args.train_file = Some(data.clone());
    sft_cfg.args.output_dir = out.join("sft");
    sft_cfg.algo.completion_only_loss = Some(true);
    let summary = crate::sft::run(&sft_cfg, resume, false)?;
    Ok(
        json!({"prompts": prompts.len(), "kept": kept, "dropped_by_safety": targeted_dropped,
              "benign": benign.len(), "benign_repeats": d.benign_repeats,
              "data": data.display().to_string(), "final_model": sft_cfg.args.output_dir.display().to_string(),
              "sft": summary}),
    )
}
