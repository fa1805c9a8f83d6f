//! Errors of the training crate; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    /// Bad dataset rows: the first few rendered as `file:line: field: msg`, and the total.
    #[error("{count} invalid row(s) (set skip_invalid_rows = true to skip them):\n{first}")]
    Data { count: usize, first: String },
    #[error("step {step}: loss is {value}; stopping. The last checkpoint is intact; lower learning_rate or check the data")]
    NonFinite { step: usize, value: f64 },
    #[error("step {step}: {name} is no longer finite after the update; stopping before it is saved. The last checkpoint is intact; lower learning_rate or check the data")]
    NonFiniteParameter { step: usize, name: String },
    #[error("{path}: {err}")]
    Io {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    DataCrate(#[from] preftune_data::Error),
    #[error(transparent)]
    Model(#[from] preftune_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Eval(#[from] preftune_eval::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<std::path::PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}

/// Up to 10 bad rows as `file:line: field: msg`, for errors and data reports.
pub(crate) fn first_rows(errors: &[preftune_data::RowError]) -> Vec<String> {
    errors.iter().take(10).map(ToString::to_string).collect()
}

/// Refuses bad rows unless the run was told to skip them (`skip_invalid_rows`).
pub(crate) fn refuse_bad_rows(errors: &[preftune_data::RowError], skip: bool) -> Result<()> {
    if errors.is_empty() || skip {
        return Ok(());
    }
    Err(Error::Data {
        count: errors.len(),
        first: first_rows(errors).join("\n"),
    })
}

/// What every data report starts with: the file, its rows, and the rows skipped and why.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct RowCounts {
    pub file: String,
    pub rows: usize,
    pub skipped: usize,
    /// Up to 10 skipped rows as `file:line: field: msg`.
    pub skipped_examples: Vec<String>,
}

impl RowCounts {
    pub(crate) fn new(
        path: &std::path::Path,
        rows: usize,
        errors: &[preftune_data::RowError],
    ) -> Self {
        RowCounts {
            file: path.display().to_string(),
            rows,
            skipped: errors.len(),
            skipped_examples: first_rows(errors),
        }
    }

    /// Prints `data FILE: N rows, N skipped, <details>` and the skipped rows, on stderr.
    pub(crate) fn print(&self, details: &str) {
        eprintln!(
            "data {}: {} rows, {} skipped, {details}",
            self.file, self.rows, self.skipped
        );
        for e in &self.skipped_examples {
            eprintln!("  skipped {e}");
        }
    }
}
