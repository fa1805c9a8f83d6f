//! `preftune serve`: an OpenAI-compatible server over a preftune model, so that any OpenAI client
//! (the `openai` Python package, curl, LLM-judge tools) can sample from it.
//!
//! - Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, with `stream`
//!   (server-sent events), `n`, `temperature`, `top_p`, `max_tokens`, `stop`, `seed` and
//!   `logprobs` / `top_logprobs`.
//! - Concurrent requests share one decode batch: sequences join it at the next step and leave it
//!   when they finish (continuous batching, [`preftune_model::batcher`]).
//! - Limits: tokens per answer, body size, choices per request, and sequences running or queued,
//!   past which requests get 429. Off loopback, API keys are required.
pub mod api;
pub mod engine;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use preftune_model::Pretrained;

/// What one request and all of them together may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Sequences running or queued; past it requests get 429.
    pub max_queue: usize,
    /// Largest request body, in bytes (413 past it).
    pub max_body_bytes: usize,
    /// Connections open at once (more wait in the kernel's queue).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tokens: 1024,
            max_n: 16,
            max_batch: 32,
            max_queue: 256,
            max_body_bytes: 1 << 20,
            max_connections: 256,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How the server runs.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    pub limits: Limits,
    /// Accepted API keys (`Authorization: Bearer KEY`). Required off loopback.
    pub keys: Vec<String>,
    /// The name `/v1/models` lists.
    pub model_id: String,
    /// bf16 products over f32 weights (`--bf16`), each weight packed or copied once for the
    /// server's life.
    pub bf16: bool,
}

/// Reads API keys, one per line (blank lines and `#` comments skipped).
pub fn read_keys(path: &std::path::Path) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if keys.is_empty() {
        return Err(Error::Config(format!(
            "{}: no API keys in it",
            path.display()
        )));
    }
    if let Some((i, _)) = keys.iter().enumerate().find(|(_, k)| k.len() < 16) {
        return Err(Error::Config(format!(
            "{}: key {} is shorter than 16 characters",
            path.display(),
            i + 1
        )));
    }
    Ok(keys)
}

/// Whether serving on `addr` with these keys is allowed: off loopback, keys are required.
pub fn check_bind(addr: SocketAddr, keys: &[String]) -> Result<(), Error> {
    if addr.ip().is_loopback() || !keys.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "refusing to serve {addr} without API keys: anyone who can reach it could use the model. \
         Pass --api-key-file, or bind 127.0.0.1"
    )))
}

/// Serves `model` on `listener` until `shutdown` resolves.
pub async fn serve_on(
    model: Pretrained,
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    check_bind(listener.local_addr()?, &opts.keys)?;
    let limits = opts.limits;
    let eos = model.eos_token_ids();
    let pad = model.pad_token_id();
    let context = model.model.cfg.max_position_embeddings.max(1);
    let engine = engine::Engine::start(
        model.model,
        pad,
        limits.max_batch,
        limits.max_queue,
        opts.bf16,
    );
    let app = server::App {
        engine,
        tokenizer: Arc::new(model.tokenizer),
        eos,
        model_id: opts.model_id.clone(),
        context,
        limits,
        keys: (!opts.keys.is_empty()).then(|| Arc::new(opts.keys.clone())),
    };
    let net = preftune_label::net::Limits {
        max_connections: limits.max_connections,
        max_body_bytes: limits.max_body_bytes,
        ..Default::default()
    };
    preftune_label::net::serve_router(server::router(app), listener, net, shutdown).await?;
    Ok(())
}

/// Binds `addr` and serves until Ctrl-C.
pub fn serve(model: Pretrained, addr: SocketAddr, opts: ServeOptions) -> Result<(), Error> {
    check_bind(addr, &opts.keys)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!(
            "serving {} at http://{}/v1 (OpenAI-compatible; Ctrl-C stops){}",
            opts.model_id,
            listener.local_addr()?,
            if opts.keys.is_empty() {
                ""
            } else {
                "; API keys required"
            }
        );
        serve_on(model, listener, opts, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
