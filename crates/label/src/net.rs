//! Serving the app: where it may listen, and an accept loop that bounds what one client can hold.
//!
//! - **Where.** Tokens, session cookies and judgements cross the network in plain HTTP, so the
//!   server listens on loopback only (put a TLS proxy such as Caddy or nginx in front for
//!   remote annotators), unless `insecure` says the network is trusted. As with Jupyter, a
//!   public bind is an explicit choice, and it is warned about.
//! - **How long.** A connection has [`Limits::header_timeout`] to send each request's headers,
//!   counted from when it connects or its last response went out, so clients that send headers
//!   a byte at a time, or idle keep-alive connections, are closed. Once its headers are in, a
//!   request has [`Limits::request_timeout`] to send its body and be answered (408 otherwise).
//! - **How many.** At most [`Limits::max_connections`] connections are open, and never more than
//!   the process's file limit allows; further clients wait in the kernel's queue until one
//!   closes, as nginx's `worker_connections` does. With the timeouts, a flood of slow clients
//!   delays a real request by at most one header timeout.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::store::Store;

/// What one client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to send a request's headers, from connecting or from the previous response.
    pub header_timeout: Duration,
    /// Time to send a request's body and be answered, once its headers are in.
    pub request_timeout: Duration,
    /// Connections open at once, at most (fewer if the file limit is lower).
    pub max_connections: usize,
    /// The largest request body accepted; a larger one is refused with 413, unread.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// How the app is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Listen on a non-loopback address in plain HTTP.
    pub insecure: bool,
    pub limits: Limits,
    /// How long a browser login lasts.
    pub session_ttl: Duration,
    /// Items assigned longer ago than this and never judged go back to the pool whenever
    /// someone asks for their next item (`Store::release`); `None` keeps them with their
    /// annotator for good.
    pub release_after: Option<Duration>,
}

/// `value` hours as a duration, for the option `flag`: a number in (0, 8760].
pub fn hours(flag: &str, value: f64) -> std::io::Result<Duration> {
    if !(value.is_finite() && value > 0.0 && value <= 24.0 * 365.0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{flag}: expected a number of hours in (0, 8760], found {value}"),
        ));
    }
    Ok(Duration::from_secs_f64(value * 3600.0))
}

impl ServeOptions {
    /// Options for `label serve`: plain HTTP off loopback only with `insecure`, logins lasting
    /// `session_hours`, unjudged items released after `release_after_hours` (both in
    /// (0, 8760]), at most `max_connections` at once.
    pub fn new(
        insecure: bool,
        session_hours: f64,
        release_after_hours: Option<f64>,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let mut o = ServeOptions {
            insecure,
            session_ttl: hours("--session-hours", session_hours)?,
            release_after: release_after_hours
                .map(|h| hours("--release-after-hours", h))
                .transpose()?,
            ..Default::default()
        };
        o.limits.max_connections = max_connections;
        Ok(o)
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            insecure: false,
            limits: Limits::default(),
            session_ttl: Duration::from_secs(12 * 3600),
            release_after: None,
        }
    }
}

/// Descriptors kept free for the database, its WAL, the listener and the standard streams.
const SPARE_FILES: usize = 16;

/// `wanted` connections, or fewer where the soft limit on open files would run out first (each
/// connection holds one descriptor; running out makes `accept` fail for everyone).
pub fn connection_cap(wanted: usize) -> usize {
    let files = open_file_limit().unwrap_or(usize::MAX);
    wanted.min(files.saturating_sub(SPARE_FILES)).max(1)
}

#[cfg(unix)]
fn open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local of that type.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then(|| usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<usize> {
    None
}

/// Whether serving on `addr` is allowed: loopback always, anything else only with `insecure`.
pub fn check_bind(addr: SocketAddr, insecure: bool) -> std::io::Result<()> {
    if addr.ip().is_loopback() || insecure {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "refusing to serve on {addr} in plain HTTP: annotators' tokens and judgements would \
             cross the network unencrypted. Bind 127.0.0.1 behind a TLS proxy (Caddy, nginx), or \
             pass --insecure on a network you trust"
        ),
    ))
}

/// Serves the app on `listener` until `shutdown` resolves, then lets open requests finish (each
/// within the request timeout) before returning.
pub async fn serve_on(
    store: Store,
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = crate::server::router(store, &opts);
    serve_router(app, listener, opts.limits, shutdown).await
}

/// Serves `app` on `listener` within `limits` (the accept loop of every preftune server) until
/// `shutdown` resolves, then lets open requests finish, each within the request timeout.
pub async fn serve_router(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = connection_cap(limits.max_connections);
    let slots = Arc::new(Semaphore::new(cap));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // A slot first: past the cap, clients wait in the kernel's accept queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    eprintln!("server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = permit;
            let _ = stream.set_nodelay(true);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.changed() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.request_timeout, conn).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Binds `addr` (see [`check_bind`]) and serves until Ctrl-C. Every judgement is committed
/// before its request is answered, so stopping the server at any time loses nothing that an
/// annotator saw saved.
pub fn serve(store: Store, addr: SocketAddr, opts: ServeOptions) -> std::io::Result<()> {
    check_bind(addr, opts.insecure)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let at = listener.local_addr()?;
        if !at.ip().is_loopback() {
            eprintln!(
                "WARNING: serving on {at} in plain HTTP (--insecure): anyone on the network path \
                 can read tokens, session cookies and judgements"
            );
        }
        eprintln!(
            "labelling at http://{at} (Ctrl-C stops; judgements are saved as they are made; at \
             most {} connections)",
            connection_cap(opts.limits.max_connections)
        );
        serve_on(store, listener, opts, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
