//! Datasets for preftune: readers (JSONL, JSON arrays, Parquet; files or folders of shards), the
//! dataset formats TRL users already have (standard and conversational), validation that names
//! `file:line: field`, tokenisation with chat templates and loss masks, packing, and collation.
//!
//! API contract (used by the `train` crate; keep these signatures):
//! - [`read_rows`]: every row of a file or folder with its location.
//! - [`parse_examples`]: rows -> typed [`Example`]s of one [`Format`], with [`ColumnMap`] renaming;
//!   returns the good examples and one [`RowError`] per bad row (the caller decides to refuse or skip).
//! - [`tokenize_sft`]: an LM or prompt-completion example -> ids + loss mask, truncated to
//!   `max_length` per [`TruncationMode`], reporting whether it was truncated.
//! - [`pack`]: concatenates tokenized examples into rows of `max_length` with per-sequence position ids.
//! - [`collate`]: a batch of tokenized examples -> padded tensors.
//!
//! Modules: `read` (files), `format` (rows -> examples), `tokenize` (SFT), `batch` (pack, collate).
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use preftune_model::Message;
use serde_json::Value;

pub mod agreement;
mod batch;
pub mod clip;
mod format;
mod preference;
mod read;
mod tokenize;

pub use batch::{collate, pack};
pub use format::parse_examples;
pub use preference::{join_truncated, tokenize_preference, TokenizedRanking};
pub use read::{read_rows, MAX_LINE_BYTES};
pub use tokenize::tokenize_sft;

/// Where a row came from: file and 1-based line (JSONL) or 1-based row/element number (Parquet, JSON array).
#[derive(Clone, Debug, PartialEq)]
pub struct Location {
    pub file: Arc<PathBuf>,
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub loc: Location,
    pub value: Value,
}

/// A bad row: rendered as `file:line: field: what is wrong`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{loc}: {field}: {msg}")]
pub struct RowError {
    pub loc: Location,
    pub field: String,
    pub msg: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A row-level problem while reading (e.g. a JSONL line that is not JSON).
    #[error(transparent)]
    Row(#[from] RowError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error(transparent)]
    Model(#[from] preftune_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A text field: a plain string (standard format) or a list of chat messages (conversational).
#[derive(Clone, Debug, PartialEq)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
}

/// The dataset formats of TRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text` or `messages`.
    LanguageModeling,
    /// `prompt`.
    PromptOnly,
    /// `prompt`, `completion`.
    PromptCompletion,
    /// `prompt`, `chosen`, `rejected`, optional `margin`; or implicit prompt (no `prompt`; chosen and
    /// rejected are whole conversations sharing a prefix).
    Preference,
    /// `prompt`, `completion`, `label` (bool).
    Unpaired,
    /// `prompt`, `responses` (best first), or `responses` + `scores`.
    Ranking,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    LanguageModeling {
        text: Text,
    },
    PromptOnly {
        prompt: Text,
    },
    PromptCompletion {
        prompt: Text,
        completion: Text,
    },
    /// The implicit-prompt form (no `prompt` column) arrives here already split: `prompt` is the
    /// longest common message prefix of chosen and rejected, which then hold only what follows.
    Preference {
        prompt: Text,
        chosen: Text,
        rejected: Text,
        margin: Option<f64>,
    },
    Unpaired {
        prompt: Text,
        completion: Text,
        label: bool,
    },
    /// Responses sorted best first (sorted by `scores` descending when scores are given).
    Ranking {
        prompt: Text,
        responses: Vec<Text>,
        scores: Option<Vec<f64>>,
    },
}

/// Renames dataset columns to the canonical names: `ColumnMap::new([("prompt", "question")])` reads
/// the canonical `prompt` from the dataset's `question` column.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ColumnMap {
    pub map: std::collections::BTreeMap<String, String>,
}

/// Which end of a sequence longer than `max_length` is kept (`truncation_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    #[default]
    KeepStart,
    KeepEnd,
}

impl std::fmt::Display for TruncationMode {
    /// The config spelling, `keep_start` or `keep_end`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            TruncationMode::KeepStart => "keep_start",
            TruncationMode::KeepEnd => "keep_end",
        })
    }
}

#[derive(Clone, Debug)]
pub struct SftTokenizeOptions {
    pub max_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    /// Loss on completion tokens only (prompt-completion data). TRL's `completion_only_loss`.
    pub completion_only_loss: bool,
    /// Loss on assistant turns only (conversational data). TRL's `assistant_only_loss`.
    pub assistant_only_loss: bool,
}

/// One tokenized example. `loss_mask[i] = 1` means token `i` is a target (predicted from `< i`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// Per-token positions; `None` means 0..len. Packing restarts them at each sequence.
    pub position_ids: Option<Vec<u32>>,
    pub truncated: bool,
}

/// A padded batch (right padding for training). `attention_mask` is 1 on real tokens.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub loss_mask: Tensor,
    pub position_ids: Option<Tensor>,
    pub num_tokens: usize,
}
