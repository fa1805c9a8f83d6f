//! The end-to-end experiment behind `preftune pipeline` (examples/imdb-sentiment.toml): a gold
//! sentiment judge, SFT, gold-labelled preference pairs, a reward model, DPO, PPO, GRPO, Best-of-N
//! and their evaluation against SFT, one stage at a time, each cached in its own folder; and the
//! HTML report of a run (`preftune report`).
pub mod config;
pub mod error;
pub mod experiment;
pub mod report;
pub mod safety;

pub use error::{Error, Result};
pub use experiment::run;
