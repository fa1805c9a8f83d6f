//! GRPO (TRL's `GRPOConfig` names): group-normalised advantages over `num_generations` samples of
//! each prompt, a clipped ratio (`epsilon`, `epsilon_high`), a k3 KL to the reference (`beta`), and
//! the loss aggregations `grpo`, `bnpo`, `dr_grpo`, `dapo`. One update per rollout.
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::rl::grpo_loss::GrpoParams;
use crate::rl::online::{run_online, Objective, OnlineArgs};

/// TRL's `GRPOConfig` defaults over the shared ones.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nlogging_steps = 10").expect("static TOML")
}

/// `preftune grpo`.
pub fn run(
    cfg: &RunConfig<OnlineArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let a = &cfg.algo;
    let objective = Objective::Grpo {
        params: GrpoParams {
            beta: a.beta,
            epsilon_low: a.epsilon,
            epsilon_high: a.epsilon_high.unwrap_or(a.epsilon),
            loss_type: a
                .loss_type
                .as_deref()
                .unwrap_or("dapo")
                .parse()
                .map_err(Error::Config)?,
            max_completion_length: a.max_completion_length,
        },
        scale: a
            .scale_rewards
            .as_deref()
            .unwrap_or("group")
            .parse()
            .map_err(Error::Config)?,
    };
    run_online(&cfg.args, &cfg.table, a, objective, resume, eval_only)
}
