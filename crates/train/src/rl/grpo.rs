//! GRPO (TRL's `GRPOConfig` names): group-normalised advantages over `num_generations` samples of
//! each prompt, a clipped ratio (`epsilon`, `epsilon_high`), a k3 KL to the reference (`beta`), and
//! the loss aggregations `grpo`, `bnpo`, `dr_grpo`, `dapo`. One update per rollout.
use serde::{Deserialize, Serialize};

use crate::config::{Parts, RunConfig};
use crate::error::Result;
use crate::rl::grpo_loss::{GrpoLossType, GrpoParams, ScaleRewards};
use crate::rl::online::{run_online, Objective, OnlineArgs};

/// GRPO's own options, beside the shared [`OnlineArgs`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GrpoOwn {
    /// Upper clip (DAPO's clip-higher); defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    pub loss_type: GrpoLossType,
    pub scale_rewards: ScaleRewards,
}

/// Everything `preftune grpo` reads besides the training arguments.
pub type GrpoArgs = Parts<OnlineArgs, GrpoOwn>;

/// TRL's `GRPOConfig` defaults over the shared ones.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nlogging_steps = 10").expect("static TOML")
}

/// `preftune grpo`.
pub fn run(cfg: &RunConfig<GrpoArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    let (a, own) = (&cfg.algo.common, &cfg.algo.own);
    let objective = Objective::Grpo {
        params: GrpoParams {
            beta: a.beta,
            epsilon_low: a.epsilon,
            epsilon_high: own.epsilon_high.unwrap_or(a.epsilon),
            loss_type: own.loss_type,
            max_completion_length: a.max_completion_length,
        },
        scale: own.scale_rewards,
    };
    run_online(&cfg.args, &cfg.table, a, objective, resume, eval_only)
}
