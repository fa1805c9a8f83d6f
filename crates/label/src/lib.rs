//! Collecting human preferences: candidates (from `preftune generate --n`) become items in a
//! SQLite store, annotators judge them in a web app (pairs on a nuanced scale, or rankings), and
//! the judgements leave as preference or ranking JSONL for `rm`, `dpo` and PRO, with agreement
//! statistics on the items that several annotators saw.
pub mod error;
pub mod export;
pub mod net;
pub mod server;
pub mod stats;
pub mod store;

pub use error::{Error, Result};
pub use store::{ImportOptions, Label, Mode, Store};
