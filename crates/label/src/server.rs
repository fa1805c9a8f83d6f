//! The labelling web app: a static page plus a small JSON API over the [`Store`].
//!
//! Every route but the login form needs a caller, checked by one middleware before any route
//! runs, so that no body is read, no path parsed and no method matched for a stranger: an API
//! client sends `Authorization: Bearer TOKEN`; a browser logs in once with its token and then
//! carries a session cookie (`preftune_session`: a random id with an expiry, ended by logout,
//! and never the token itself). Annotators only ever see items assigned to them; an item id
//! outside their queue answers 404, the same as one that does not exist. The page puts model
//! text in the DOM with `textContent` only, and the content security policy forbids inline
//! scripts, so a response holding `<script>` is shown as text. State-changing requests from
//! another origin are refused (the `Origin` check OWASP recommends, on top of `SameSite=Strict`).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, Form, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::net::ServeOptions;
use crate::stats::stats;
use crate::store::{Annotator, Judgement, Mode, Store, Submission, Submitted, SCALE};

pub use crate::net::{serve, serve_on};

const LABEL_HTML: &str = include_str!("../assets/label.html");
const ADMIN_HTML: &str = include_str!("../assets/admin.html");
const LOGIN_HTML: &str = include_str!("../assets/login.html");
const APP_JS: &str = include_str!("../assets/app.js");
const COOKIE: &str = "preftune_session";

#[derive(Clone)]
struct App {
    store: Arc<Mutex<Store>>,
    session_ttl: Duration,
    release_after: Option<Duration>,
}

type Reply = Result<Response, Response>;

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
}

impl App {
    /// Runs `f` on the store off the async threads (SQLite calls block, fsync included). A
    /// failure is logged in full and answered without detail: file paths and SQL stay private.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Response> {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s)
        })
        .await;
        let e = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!("label server: internal error: {e}");
        Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the server's log has the details",
        ))
    }
}

/// The caller's credential: a bearer token, else the session cookie.
enum Credential {
    Token(String),
    Session(String),
}

fn credential(headers: &HeaderMap) -> Option<Credential> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v
            .strip_prefix("Bearer ")
            .map(|t| Credential::Token(t.trim().to_string()));
    }
    session_cookie(headers).map(Credential::Session)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Routes anyone may call: the login form and logout.
fn public(path: &str) -> bool {
    matches!(path, "/login" | "/logout")
}

/// Finds the caller before any route runs: strangers get a redirect to the login form (pages)
/// or 401 (everything else), before the body is read, the path parsed or the method matched.
async fn authenticate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    if public(req.uri().path()) {
        return next.run(req).await;
    }
    let who = match credential(req.headers()) {
        None => Ok(None),
        Some(Credential::Token(t)) => app.with(move |s| s.authenticate(&t)).await,
        Some(Credential::Session(id)) => app.with(move |s| s.session(&id)).await,
    };
    match who {
        Ok(Some(w)) => {
            req.extensions_mut().insert(w);
            next.run(req).await
        }
        Err(resp) => resp,
        Ok(None) if req.method() == Method::GET && matches!(req.uri().path(), "/" | "/admin") => {
            Redirect::to("/login").into_response()
        }
        Ok(None) => error(
            StatusCode::UNAUTHORIZED,
            "log in: send `Authorization: Bearer TOKEN` (preftune label add-annotator prints one)",
        ),
    }
}

/// Refuses a state-changing request from another origin, so a page elsewhere cannot post the
/// login form or a judgement with a user's cookie. The policy of Go's `CrossOriginProtection`:
/// trust `Sec-Fetch-Site` where the browser sends it (`same-origin` or `none` pass); otherwise
/// `Origin` must name this host; a request with neither (curl, scripts) is not a browser riding
/// a cookie, and passes.
async fn same_origin(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let h = req.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    let ok = match (text("sec-fetch-site"), text("origin")) {
        (Some(site), _) => matches!(site, "same-origin" | "none"),
        (None, Some(origin)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| Some(authority) == text("host")),
        (None, None) => true,
    };
    if ok {
        return next.run(req).await;
    }
    error(StatusCode::FORBIDDEN, "cross-origin request refused")
}

/// Answers 408 when a request (its body included) takes longer than `limit`.
async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request not completed within {} s", limit.as_secs_f64()),
        ),
    }
}

// An error reply is a whole response, as every handler returns.
#[allow(clippy::result_large_err)]
fn admin(who: &Annotator) -> Result<(), Response> {
    match who.is_admin {
        true => Ok(()),
        false => Err(error(StatusCode::FORBIDDEN, "admin token required")),
    }
}

async fn label_page() -> Html<&'static str> {
    Html(LABEL_HTML)
}

async fn admin_page(Extension(who): Extension<Annotator>) -> Reply {
    admin(&who)?;
    Ok(Html(ADMIN_HTML).into_response())
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn login_page() -> Html<&'static str> {
    Html(LOGIN_HTML)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

// An error reply is a whole response, as every handler returns.
#[allow(clippy::result_large_err)]
fn set_cookie(r: &mut Response, value: &str) -> Result<(), Response> {
    let v = HeaderValue::from_str(value)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    r.headers_mut().insert(header::SET_COOKIE, v);
    Ok(())
}

/// Trades a token for a session: the cookie holds a new random id that expires, not the token.
async fn login(State(app): State<App>, Form(f): Form<LoginForm>) -> Reply {
    let t = f.token.trim().to_string();
    let ttl = app.session_ttl;
    let session = app
        .with(move |s| match s.authenticate(&t)? {
            Some(who) => s.start_session(&who, ttl).map(Some),
            None => Ok(None),
        })
        .await?;
    let Some(id) = session else {
        return Ok((
            StatusCode::UNAUTHORIZED,
            Html(LOGIN_HTML.replace("<!--error-->", "<p class=\"error\">Unknown token.</p>")),
        )
            .into_response());
    };
    let mut r = Redirect::to("/").into_response();
    set_cookie(
        &mut r,
        &format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            ttl.as_secs()
        ),
    )?;
    Ok(r)
}

/// Ends the session on the server as well as in the browser.
async fn logout(State(app): State<App>, headers: HeaderMap) -> Reply {
    if let Some(id) = session_cookie(&headers) {
        app.with(move |s| s.end_session(&id)).await?;
    }
    let mut r = Redirect::to("/login").into_response();
    set_cookie(
        &mut r,
        &format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    )?;
    Ok(r)
}

async fn me(State(app): State<App>, Extension(who): Extension<Annotator>) -> Reply {
    let p = app.with(|s| s.progress()).await?;
    let mine = p.annotators.iter().find(|a| a.name == who.name);
    let scale: Vec<_> = SCALE
        .iter()
        .map(|(v, t)| json!({"scale": v, "text": t}))
        .collect();
    Ok(Json(json!({
        "name": who.name, "is_admin": who.is_admin, "mode": p.mode.unwrap_or(Mode::Pair),
        "labelled": mine.map_or(0, |a| a.labelled), "scale": scale,
    }))
    .into_response())
}

async fn next(State(app): State<App>, Extension(who): Extension<Annotator>) -> Reply {
    let release_after = app.release_after;
    let shown = app
        .with(move |s| {
            if release_after.is_some() {
                s.release(None, release_after)?;
            }
            s.next(&who)
        })
        .await?;
    Ok(match shown {
        Some(s) => Json(json!({"done": false, "item": s})),
        None => Json(json!({"done": true})),
    }
    .into_response())
}

async fn item(
    State(app): State<App>,
    Extension(who): Extension<Annotator>,
    Path(id): Path<i64>,
) -> Reply {
    match app.with(move |s| s.shown(&who, id)).await? {
        Some(s) => Ok(Json(s).into_response()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("item {id} is not in your queue"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    /// Pairwise: left minus right, -3..=3.
    scale: Option<i64>,
    /// Ranking: display positions, best first.
    ranking: Option<Vec<usize>>,
    /// Thumbs: up (true) or down.
    up: Option<bool>,
    #[serde(default, rename = "unsafe")]
    unsafe_flag: bool,
    #[serde(default)]
    comment: String,
}

async fn submit(
    State(app): State<App>,
    Extension(who): Extension<Annotator>,
    Path(id): Path<i64>,
    body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>,
) -> Reply {
    // axum's codes: 400 malformed JSON, 413 too large, 415 not JSON, 422 wrong fields.
    let Json(b) = body.map_err(|e| error(e.status(), e.body_text()))?;
    let judgement = match (b.scale, b.ranking, b.up) {
        (Some(scale), None, None) => Judgement::Pair { scale },
        (None, Some(order), None) => Judgement::Rank { order },
        (None, None, Some(up)) => Judgement::Thumbs { up },
        _ => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "send exactly one of `scale` (pairs), `ranking` (rankings) or `up` (thumbs)",
            ))
        }
    };
    let sub = Submission {
        judgement,
        unsafe_flag: b.unsafe_flag,
        comment: b.comment,
    };
    match app.with(move |s| s.submit(&who, id, &sub)).await? {
        Submitted::Saved => Ok(Json(json!({"saved": true})).into_response()),
        Submitted::NotYours => Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "item {id} is not in your queue (if it was, it was released to others after \
                 waiting too long): go on to the next item"
            ),
        )),
        Submitted::AlreadyLabelled => Err(error(
            StatusCode::CONFLICT,
            format!("item {id} is labelled already; the first judgement stands"),
        )),
        Submitted::Invalid(m) => Err(error(StatusCode::UNPROCESSABLE_ENTITY, m)),
    }
}

async fn progress(State(app): State<App>, Extension(who): Extension<Annotator>) -> Reply {
    admin(&who)?;
    Ok(Json(app.with(|s| s.progress()).await?).into_response())
}

async fn admin_stats(State(app): State<App>, Extension(who): Extension<Annotator>) -> Reply {
    admin(&who)?;
    let s = app
        .with(|s| Ok(stats(&s.labels()?, s.mode()?.unwrap_or(Mode::Pair))))
        .await?;
    Ok(Json(s).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    /// Only this annotator's items (everyone's when absent).
    annotator: Option<String>,
    /// Only items assigned longer ago than this (any when absent).
    older_than_hours: Option<f64>,
}

/// Hands back items assigned and never judged (`Store::release`): an admin's remedy for an
/// annotator who left. Answers `{"released": {name: count}}`.
async fn admin_release(
    State(app): State<App>,
    Extension(who): Extension<Annotator>,
    body: Result<Json<ReleaseBody>, axum::extract::rejection::JsonRejection>,
) -> Reply {
    admin(&who)?;
    let Json(b) = body.map_err(|e| error(e.status(), e.body_text()))?;
    let older_than = b
        .older_than_hours
        .map(|h| crate::net::hours("older_than_hours", h))
        .transpose()
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    // An unknown name answers 404 with the name alone (the error's text holds the file path).
    let released = app
        .with(
            move |s| match s.release(b.annotator.as_deref(), older_than) {
                Err(crate::Error::UnknownAnnotator { name, .. }) => Ok(Err(name)),
                r => r.map(Ok),
            },
        )
        .await?
        .map_err(|name| {
            error(
                StatusCode::NOT_FOUND,
                format!("no annotator named `{name}`"),
            )
        })?;
    let released: serde_json::Map<String, Value> =
        released.into_iter().map(|(n, c)| (n, json!(c))).collect();
    Ok(Json(json!({ "released": released })).into_response())
}

/// Unknown paths (reached only with a login: strangers cannot probe the route list).
async fn fallback() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The app's routes over an open store. Layers run outermost first: security headers, the
/// request deadline, the origin check, then authentication, and only then routing, extraction
/// (the body limit) and the handler.
pub fn router(store: Store, opts: &ServeOptions) -> Router {
    let app = App {
        store: Arc::new(Mutex::new(store)),
        session_ttl: opts.session_ttl,
        release_after: opts.release_after,
    };
    let routes = Router::new()
        .route("/", get(label_page))
        .route("/admin", get(admin_page))
        .route("/app.js", get(app_js))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/next", get(next))
        .route("/api/items/{id}", get(item))
        .route("/api/items/{id}/label", post(submit))
        .route("/api/admin/progress", get(progress))
        .route("/api/admin/stats", get(admin_stats))
        .route("/api/admin/release", post(admin_release))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(opts.limits.max_body_bytes))
        .with_state(app.clone());
    // Middleware on the outer router runs before routing, so a stranger's wrong method or
    // malformed path gets 401, not 405 or 400.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(app, authenticate))
        .layer(axum::middleware::from_fn(same_origin))
        .layer(axum::middleware::from_fn_with_state(
            opts.limits.request_timeout,
            deadline,
        ))
        .layer(axum::middleware::map_response(security_headers))
}
