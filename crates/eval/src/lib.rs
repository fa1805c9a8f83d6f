//! Judging model outputs: reward sources every command shares (reward models, external commands,
//! combinations, gold scorers), the gold IMDb sentiment classifier, and Best-of-N sampling.
pub mod agreement;
pub mod bon;
pub mod error;
pub mod files;
pub mod gold;
pub mod judge;
pub mod redteam;
pub mod safety;
pub mod sources;
pub mod stats;

pub use error::{Error, Result};
pub use sources::{RewardSource, Sample};
