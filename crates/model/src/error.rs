//! One error type for the model crate: every variant names the file (and tensor or field) at fault,
//! so a user can fix bad input without reading our source.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io error is shown, not chained, so `{:#}` does not print it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file that parses but holds something we cannot use; `field` names the key or tensor.
    #[error("{path}: {field}: {msg}")]
    Invalid {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error(
        "{path}: unknown architecture {arch:?} (supported: llama, mistral, qwen2, qwen3, phi3, smollm, gpt2)"
    )]
    UnknownArch { path: PathBuf, arch: String },
    #[error("{path}: tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: missing tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// The message a caught panic carried (`"panic"` when it was neither a `String` nor a `&str`):
/// for the dependencies that panic on bad input (cudarc without its libraries, the tokenizers
/// crate on some malformed files), whose panics preftune turns into errors.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("panic")
}
