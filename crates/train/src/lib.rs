//! preftune's training machinery: configuration, the AdamW optimiser and schedules, the one
//! training loop (accumulation, clipping, logging, evaluation, checkpoints, resume), and one module
//! per algorithm.
pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod dpo_loss;
pub mod error;
pub mod evaluate;
pub mod grpo;
pub mod online;
mod ops_ext;
pub mod optim;
pub mod ppo;
pub mod rejection;
pub mod reward;
pub mod rl_loss;
pub mod rloo;
pub mod rollout;
pub mod sft;
pub mod trainer;

pub use config::{RunConfig, TrainingArguments};
pub use error::{Error, Result};
pub use trainer::{evaluate, train, Algorithm, Metrics, Split, TrainSummary};
