//! Rejection-sampling fine-tuning (Llama 2's recipe): each round samples `n` responses per prompt
//! from the current model, keeps the best under the reward (Best-of-N) and fine-tunes on them
//! (SFT); the next round starts from that model.
use std::path::PathBuf;

use preftune_eval::bon::{best_of_n, BonSettings, SafetyFilter};
use preftune_eval::RewardSource;
use preftune_model::{LoadOptions, Pretrained, SamplingConfig};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::sft::SftArgs;

/// `[rejection_sampling]` of a rejection-sampling config; the rest is an SFT config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsOptions {
    pub prompts_file: PathBuf,
    pub reward: String,
    #[serde(default = "crate::config::default::four")]
    pub n: usize,
    #[serde(default = "crate::config::default::one")]
    pub rounds: usize,
    #[serde(default = "crate::config::default::four")]
    pub batch_size: usize,
    #[serde(default = "crate::config::default::max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "crate::config::default::unit")]
    pub temperature: f64,
    #[serde(default = "crate::config::default::unit")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Llama 2's safety filter: a reward source scoring safety, and the score under which a
    /// sample is dropped before the best is chosen.
    pub safety: Option<String>,
    #[serde(default = "safety_threshold")]
    pub safety_threshold: f64,
}

fn safety_threshold() -> f64 {
    0.15
}

/// Loads a rejection-sampling config: an SFT config (defaults, the file, `--set` overrides) plus
/// its `[rejection_sampling]` table.
pub fn load_config(
    file: Option<&std::path::Path>,
    set: &[String],
) -> Result<(RunConfig<SftArgs>, RsOptions)> {
    crate::sft::load_with_table(
        file,
        set,
        "rejection_sampling",
        "prompts_file, reward, n, rounds",
    )
}

/// Runs every round: `output_dir/round-K/` holds `best.jsonl` and the SFT run (`sft/`). With
/// `resume`, a round's sampling or training continues where it stopped. Returns the summary
/// (`rounds`, `final_model`).
pub fn run(cfg: &RunConfig<SftArgs>, rs: &RsOptions, resume: bool) -> Result<Value> {
    if cfg.args.use_peft && rs.rounds > 1 {
        return Err(Error::Config(
            "rejection sampling with use_peft runs one round (a round's adapter is not a model \
             the next round can sample from); set rounds = 1 or train fully"
                .into(),
        ));
    }
    let reward = RewardSource::parse(&rs.reward)?;
    let safety = match &rs.safety {
        Some(s) => Some(SafetyFilter {
            source: RewardSource::parse(s)?,
            threshold: rs.safety_threshold,
        }),
        None => None,
    };
    let mut model = cfg.args.model_name_or_path.clone();
    let mut rounds = vec![];
    for round in 0..rs.rounds {
        let dir = cfg.args.output_dir.join(format!("round-{round}"));
        let best = dir.join("best.jsonl");
        let policy = Pretrained::load(
            std::path::Path::new(&model),
            &LoadOptions {
                dtype: cfg.args.dtype.candle(),
                ..Default::default()
            },
        )?;
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
        let bon = best_of_n(
            &policy,
            &reward,
            &rs.prompts_file,
            &best,
            &BonSettings {
                n: rs.n,
                batch_size: rs.batch_size,
                keep_all: false,
                sampling,
            },
            safety.as_ref(),
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
        let summary = crate::sft::run(&sft_cfg, resume, false)?;
        eprintln!(
            "round {round}: best-of-{} reward {:.4} (sample mean {:.4})",
            rs.n, bon.mean_best_reward, bon.mean_sample_reward
        );
        rounds.push(
            json!({"round": round, "samples": best.display().to_string(),
                           "mean_best_reward": bon.mean_best_reward,
                           "mean_sample_reward": bon.mean_sample_reward,
                           "unsafe_samples": bon.unsafe_samples,
                           "rows_all_unsafe": bon.rows_all_unsafe, "sft": summary}),
        );
        model = sft_cfg.args.output_dir.display().to_string();
    }
    Ok(json!({"rounds": rounds, "final_model": model}))
}
