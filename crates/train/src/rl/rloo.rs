//! RLOO (TRL's `RLOOConfig` names): each of `num_generations` samples is judged against the mean
//! reward of the others (leave-one-out), after a k1 KL to the reference summed over the sequence
//! comes off its reward (`beta`); a clipped sequence-level ratio (`epsilon`). REINFORCE with this
//! baseline is RLOO with one update per rollout, which is what runs here; `preftune reinforce`
//! swaps the leave-one-out baseline for the batch mean (one sample per prompt is enough).
use serde::{Deserialize, Serialize};

use crate::config::{Parts, RunConfig};
use crate::error::Result;
use crate::rl::online::{run_online, Objective, OnlineArgs};

/// RLOO's (and REINFORCE's) own options, beside the shared [`OnlineArgs`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RlooOwn {
    /// Whiten advantages over the batch.
    pub normalize_advantages: bool,
}

/// Everything `preftune rloo` and `reinforce` read besides the training arguments. GRPO's own
/// keys (`loss_type`, `scale_rewards`, `epsilon_high`) are unknown here, so a config that sets
/// them is refused with their line.
pub type RlooArgs = Parts<OnlineArgs, RlooOwn>;

/// TRL's `RLOOConfig` defaults over the shared ones.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nlogging_steps = 10\nbeta = 0.05\nnum_generations = 2")
        .expect("static TOML")
}

/// `preftune rloo`.
pub fn run(cfg: &RunConfig<RlooArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    run_with(cfg, resume, eval_only, true)
}

/// RLOO's loop with the leave-one-out baseline, or with the batch mean (REINFORCE).
fn run_with(
    cfg: &RunConfig<RlooArgs>,
    resume: bool,
    eval_only: bool,
    leave_one_out: bool,
) -> Result<serde_json::Value> {
    let a = &cfg.algo.common;
    let objective = Objective::Rloo {
        beta: a.beta,
        epsilon: a.epsilon,
        normalize_advantages: cfg.algo.own.normalize_advantages,
        leave_one_out,
    };
    run_online(&cfg.args, &cfg.table, a, objective, resume, eval_only)
}

/// REINFORCE's defaults: as RLOO's, with one sample per prompt (the baseline is the batch mean).
pub fn reinforce_defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nlogging_steps = 10\nbeta = 0.05\nnum_generations = 1")
        .expect("static TOML")
}

/// `preftune reinforce`: REINFORCE with the batch-mean baseline, on RLOO's machinery.
pub fn run_reinforce(
    cfg: &RunConfig<RlooArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    run_with(cfg, resume, eval_only, false)
}
