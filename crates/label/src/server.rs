//! The labelling web app: a static page plus a small JSON API over the [`Store`].
//!
//! Every route but the login form needs a token, as `Authorization: Bearer TOKEN` or the
//! `preftune_token` cookie the login form sets. Annotators only ever see items assigned to them;
//! an item id outside their queue answers 404, the same as one that does not exist. The page
//! puts model text in the DOM with `textContent` only, and the content security policy forbids
//! inline scripts, so a response holding `<script>` is shown as text.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::stats::stats;
use crate::store::{Annotator, Judgement, Mode, Store, Submission, Submitted, SCALE};

const LABEL_HTML: &str = include_str!("../assets/label.html");
const ADMIN_HTML: &str = include_str!("../assets/admin.html");
const LOGIN_HTML: &str = include_str!("../assets/login.html");
const APP_JS: &str = include_str!("../assets/app.js");
const COOKIE: &str = "preftune_token";

#[derive(Clone)]
struct App {
    store: Arc<Mutex<Store>>,
}

type Reply = Result<Response, Response>;

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
}

impl App {
    /// Runs `f` on the store off the async threads (SQLite calls block, fsync included).
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Response> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s)
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }

    async fn who(&self, headers: &HeaderMap) -> Result<Option<Annotator>, Response> {
        let Some(token) = token(headers) else {
            return Ok(None);
        };
        self.with(move |s| s.authenticate(&token)).await
    }

    /// The caller for an API route: 401 without a valid token.
    async fn api_user(&self, headers: &HeaderMap) -> Result<Annotator, Response> {
        self.who(headers).await?.ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "log in: send `Authorization: Bearer TOKEN` (preftune label add-annotator prints one)",
            )
        })
    }

    async fn api_admin(&self, headers: &HeaderMap) -> Result<Annotator, Response> {
        let who = self.api_user(headers).await?;
        if !who.is_admin {
            return Err(error(StatusCode::FORBIDDEN, "admin token required"));
        }
        Ok(who)
    }
}

/// The token from the `Authorization` header, else from the login cookie.
fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Pages send the browser to the login form instead of answering 401.
async fn page(app: &App, headers: &HeaderMap, admin: bool, body: &'static str) -> Reply {
    match app.who(headers).await? {
        None => Ok(Redirect::to("/login").into_response()),
        Some(w) if admin && !w.is_admin => {
            Err(error(StatusCode::FORBIDDEN, "admin token required"))
        }
        Some(_) => Ok(Html(body).into_response()),
    }
}

async fn label_page(State(app): State<App>, headers: HeaderMap) -> Reply {
    page(&app, &headers, false, LABEL_HTML).await
}

async fn admin_page(State(app): State<App>, headers: HeaderMap) -> Reply {
    page(&app, &headers, true, ADMIN_HTML).await
}

async fn app_js(State(app): State<App>, headers: HeaderMap) -> Reply {
    app.api_user(&headers).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response())
}

async fn login_page() -> Html<&'static str> {
    Html(LOGIN_HTML)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<App>, Form(f): Form<LoginForm>) -> Reply {
    let t = f.token.trim().to_string();
    let tc = t.clone();
    let who = app.with(move |s| s.authenticate(&tc)).await?;
    if who.is_none() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Ok((
            StatusCode::UNAUTHORIZED,
            Html(LOGIN_HTML.replace("<!--error-->", "<p class=\"error\">Unknown token.</p>")),
        )
            .into_response());
    }
    let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?,
    );
    Ok(r)
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("preftune_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

async fn me(State(app): State<App>, headers: HeaderMap) -> Reply {
    let who = app.api_user(&headers).await?;
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

async fn next(State(app): State<App>, headers: HeaderMap) -> Reply {
    let who = app.api_user(&headers).await?;
    let shown = app.with(move |s| s.next(&who)).await?;
    Ok(match shown {
        Some(s) => Json(json!({"done": false, "item": s})),
        None => Json(json!({"done": true})),
    }
    .into_response())
}

async fn item(State(app): State<App>, headers: HeaderMap, Path(id): Path<i64>) -> Reply {
    let who = app.api_user(&headers).await?;
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
    #[serde(default, rename = "unsafe")]
    unsafe_flag: bool,
    #[serde(default)]
    comment: String,
}

async fn submit(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Result<Json<LabelBody>, axum::extract::rejection::JsonRejection>,
) -> Reply {
    let who = app.api_user(&headers).await?;
    let Json(b) = body.map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.body_text()))?;
    let judgement = match (b.scale, b.ranking) {
        (Some(scale), None) => Judgement::Pair { scale },
        (None, Some(order)) => Judgement::Rank { order },
        _ => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "send exactly one of `scale` (pairs) or `ranking` (rankings)",
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
            format!("item {id} is not in your queue"),
        )),
        Submitted::AlreadyLabelled => Err(error(
            StatusCode::CONFLICT,
            format!("item {id} is labelled already; the first judgement stands"),
        )),
        Submitted::Invalid(m) => Err(error(StatusCode::UNPROCESSABLE_ENTITY, m)),
    }
}

async fn progress(State(app): State<App>, headers: HeaderMap) -> Reply {
    app.api_admin(&headers).await?;
    Ok(Json(app.with(|s| s.progress()).await?).into_response())
}

async fn admin_stats(State(app): State<App>, headers: HeaderMap) -> Reply {
    app.api_admin(&headers).await?;
    let s = app
        .with(|s| Ok(stats(&s.labels()?, s.mode()?.unwrap_or(Mode::Pair))))
        .await?;
    Ok(Json(s).into_response())
}

/// Unknown paths: 401 before 404, so the route list is not probed without a token.
async fn fallback(State(app): State<App>, headers: HeaderMap) -> Reply {
    app.api_user(&headers).await?;
    Err(error(StatusCode::NOT_FOUND, "no such route"))
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

/// The app's routes over an open store.
pub fn router(store: Store) -> Router {
    let app = App {
        store: Arc::new(Mutex::new(store)),
    };
    Router::new()
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
        .fallback(fallback)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve_on(
    store: Store,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(store))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves until Ctrl-C. Every judgement is committed before its request is
/// answered, so stopping the server at any time loses nothing that an annotator saw saved.
pub fn serve(store: Store, addr: SocketAddr) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!(
            "labelling at http://{} (Ctrl-C stops; judgements are saved as they are made)",
            listener.local_addr()?
        );
        serve_on(store, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
