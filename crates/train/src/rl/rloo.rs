//! RLOO (TRL's `RLOOConfig` names): each of `num_generations` samples is judged against the mean
//! reward of the others (leave-one-out), after a k1 KL to the reference summed over the sequence
//! comes off its reward (`beta`); a clipped sequence-level ratio (`epsilon`). REINFORCE with this
//! baseline is RLOO with one update per rollout, which is what runs here; `preftune reinforce`
//! swaps the leave-one-out baseline for the batch mean (one sample per prompt is enough).
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::rl::online::{run_online, Objective, OnlineArgs};

/// TRL's `RLOOConfig` defaults over the shared ones.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nlogging_steps = 10\nbeta = 0.05\nnum_generations = 2")
        .expect("static TOML")
}

/// `preftune rloo`.
pub fn run(
    cfg: &RunConfig<OnlineArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let a = &cfg.algo;
    for (key, set) in [
        ("loss_type", a.loss_type.is_some()),
        ("scale_rewards", a.scale_rewards.is_some()),
        ("epsilon_high", a.epsilon_high.is_some()),
    ] {
        if set {
            return Err(Error::Config(format!(
                "{key} is a GRPO option; RLOO does not use it"
            )));
        }
    }
    let objective = Objective::Rloo {
        beta: a.beta,
        epsilon: a.epsilon,
        normalize_advantages: a.normalize_advantages,
        leave_one_out: true,
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
    cfg: &RunConfig<OnlineArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let a = &cfg.algo;
    let objective = Objective::Rloo {
        beta: a.beta,
        epsilon: a.epsilon,
        normalize_advantages: a.normalize_advantages,
        leave_one_out: false,
    };
    run_online(&cfg.args, &cfg.table, a, objective, resume, eval_only)
}
