//! preftune's training machinery: configuration, the AdamW optimiser and schedules, the one
//! training loop (accumulation, clipping, logging, evaluation, checkpoints, resume), and one module
//! per algorithm.
pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod dpo;
pub mod error;
pub mod evaluate;
mod ops_ext;
pub mod optim;
pub mod rejection;
pub mod reward;
pub mod rl;
pub mod sft;
pub mod trainer;

pub use config::{Options, Parts, RunConfig, TrainingArguments};

one_struct_options!(
    sft::SftArgs,
    dpo::DpoArgs,
    dpo::kto::KtoArgs,
    dpo::cpo::CpoArgs,
    dpo::cpo::OrpoArgs,
    reward::RewardArgs,
    rl::ppo::PpoArgs
);
pub use error::{Error, Result};
pub use trainer::{evaluate, train, Algorithm, Metrics, Split, TrainSummary};
