//! Errors of the labelling crate; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the file, line and field where there is one.
    #[error("{0}")]
    Input(String),
    #[error("{path}: {err}")]
    Io {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
    #[error("{path}: {err}")]
    Db {
        path: std::path::PathBuf,
        err: rusqlite::Error,
    },
    #[error(transparent)]
    Data(#[from] preftune_data::Error),
    /// A command named an annotator the database does not have.
    #[error("{}: no annotator named `{name}`", path.display())]
    UnknownAnnotator {
        path: std::path::PathBuf,
        name: String,
    },
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
