//! The pipeline's error: the stage crates' errors as they are, or a message with the context that
//! led to it (file, stage, field), as the command line prints it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
    /// `context`: what was being done, e.g. `reading runs/x/results.json`.
    #[error("{context}: {source}")]
    Context { context: String, source: Box<Error> },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Train(#[from] preftune_train::Error),
    #[error(transparent)]
    Eval(#[from] preftune_eval::Error),
    #[error(transparent)]
    Model(#[from] preftune_model::Error),
    #[error(transparent)]
    Data(#[from] preftune_data::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(m: impl std::fmt::Display) -> Self {
        Error::Msg(m.to_string())
    }

    /// The model crate's error inside, if any (a device that cannot be had, for one).
    pub fn model_error(&self) -> Option<&preftune_model::Error> {
        match self {
            Error::Model(e) => Some(e),
            Error::Train(preftune_train::Error::Model(e)) => Some(e),
            Error::Eval(preftune_eval::Error::Model(e)) => Some(e),
            Error::Context { source, .. } => source.model_error(),
            _ => None,
        }
    }
}

/// `.context(..)` and `.with_context(..)` on results and options, as `anyhow` spells them.
pub trait Context<T> {
    fn context(self, c: impl std::fmt::Display) -> Result<T>;
    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, c: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: c.to_string(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, c: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(c))
    }
    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

/// Returns early with a formatted [`Error::Msg`].
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::Error::msg(format!($($t)*)))
    };
}

/// Returns early with a formatted [`Error::Msg`] unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            $crate::error::bail!($($t)*);
        }
    };
}

pub(crate) use {bail, ensure};
