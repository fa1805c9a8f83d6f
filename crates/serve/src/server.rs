//! The routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, with API keys, limits
//! and errors in OpenAI's shape.
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use preftune_model::batcher::{RowSampling, Step};
use preftune_model::{Message, Tokenizer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{
    chat_logprobs, completion_logprobs, ChatRequest, Choice, CompletionRequest, SamplingFields,
};
use crate::engine::{Engine, Job};
use crate::Limits;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub eos: Vec<u32>,
    pub model_id: String,
    pub context: usize,
    pub limits: Limits,
    /// Accepted keys; `None`: no key is asked for (loopback only).
    pub keys: Option<Arc<Vec<String>>>,
}

/// An error as OpenAI sends it.
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
        }
    }
    fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind,
                                    "param": self.param, "code": Value::Null}});
        (self.status, Json(body)).into_response()
    }
}

pub(crate) fn router(app: App) -> Router {
    let limit = app.limits.max_body_bytes;
    let routes = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such route: /v1/models, /v1/chat/completions, /v1/completions".into(),
                kind: "invalid_request_error",
                param: None,
            }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app.clone());
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(app, authenticate))
}

async fn authenticate(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(keys) = &app.keys {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every key compared in full, so timing does not say how much of one matched.
        let ok = keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq(k.as_bytes(), given.as_bytes())
        });
        if !ok {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "a valid API key is required: Authorization: Bearer KEY".into(),
                kind: "invalid_request_error",
                param: None,
            }
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<App>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": app.model_id, "object": "model", "created": 0, "owned_by": "preftune"}]}))
}

/// Parses a JSON body into the route's fields and the sampling fields, naming the field that is
/// wrong.
fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(T, SamplingFields), ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        return Err(ApiError::bad(
            "send the body as Content-Type: application/json",
            None,
        ));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}"), None))?;
    fn field<U: DeserializeOwned>(v: &Value) -> Result<U, ApiError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let at = e.path().to_string();
            ApiError::bad(format!("invalid request body at {at}: {}", e.inner()), None)
        })
    }
    Ok((field(&v)?, field(&v)?))
}

/// A request's sequences, checked against the limits.
struct Plan {
    prompt: Vec<u32>,
    settings: Vec<RowSampling>,
    stops: Vec<String>,
    stream: bool,
}

fn plan(
    app: &App,
    prompt: Vec<u32>,
    f: &SamplingFields,
    max_tokens: Option<usize>,
    default_max: usize,
    top_logprobs: usize,
) -> Result<Plan, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt has no tokens", Some("prompt")));
    }
    let n = f.n.unwrap_or(1);
    if n == 0 || n > app.limits.max_n {
        return Err(ApiError::bad(
            format!("n must be in 1..={}", app.limits.max_n),
            Some("n"),
        ));
    }
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature must be in [0, 2]",
            Some("temperature"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
    }
    let room = app.context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            format!(
                "the prompt has {} tokens; this model's context is {}",
                prompt.len(),
                app.context
            ),
            Some("messages"),
        ));
    }
    let max_new = max_tokens.unwrap_or(default_max.min(room));
    if max_new == 0 || max_new > app.limits.max_tokens || max_new > room {
        return Err(ApiError::bad(
            format!(
                "max_tokens must be in 1..={} (the server's limit {}; the context leaves {room})",
                app.limits.max_tokens.min(room),
                app.limits.max_tokens
            ),
            Some("max_tokens"),
        ));
    }
    let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::bad("at most 4 stop sequences", Some("stop")));
    }
    let seed = f.seed.unwrap_or_else(rand::random);
    let settings = (0..n as u64)
        .map(|i| RowSampling {
            max_new_tokens: max_new,
            temperature,
            top_p,
            top_k: 0,
            seed: seed.wrapping_add(i),
            eos_token_ids: app.eos.clone(),
            top_logprobs,
        })
        .collect();
    Ok(Plan {
        prompt,
        settings,
        stops,
        stream: f.stream.unwrap_or(false),
    })
}

/// A request's tokens: one channel for all its choices, each token told apart by its
/// sequence's id.
struct Tokens {
    rx: UnboundedReceiver<Step>,
    /// Sequence ids, by choice index.
    ids: Vec<u64>,
}

impl Tokens {
    /// The next token with its choice index; `None` once decoding stopped.
    async fn next(&mut self) -> Option<(usize, Step)> {
        let s = self.rx.recv().await?;
        let i = self.ids.iter().position(|&id| id == s.id)?;
        Some((i, s))
    }
}

/// Queues a plan's sequences.
fn submit(app: &App, p: &Plan) -> Result<Tokens, ApiError> {
    let (tx, rx) = unbounded_channel();
    let jobs = p
        .settings
        .iter()
        .map(|s| Job {
            prompt: p.prompt.clone(),
            sampling: s.clone(),
            tokens: tx.clone(),
        })
        .collect();
    let ids = app.engine.submit(jobs).map_err(|f| ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "the server is full ({} sequences running or queued); retry later",
            f.capacity
        ),
        kind: "rate_limit_error",
        param: None,
    })?;
    Ok(Tokens { rx, ids })
}

/// What differs between the two routes' bodies.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    Chat { logprobs: bool },
    Text { logprobs: bool },
}

async fn chat(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    respond(app, headers, body, true).await
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    respond(app, headers, body, false).await
}

async fn respond(app: App, headers: HeaderMap, body: Bytes, is_chat: bool) -> Response {
    let built = if is_chat {
        build_chat(&app, &headers, &body)
    } else {
        build_text(&app, &headers, &body)
    };
    let (plan, route, echo) = match built {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let tokens = match submit(&app, &plan) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let id = format!(
        "{}-{:016x}",
        if is_chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    if plan.stream {
        Sse::new(stream_events(app, plan, route, tokens, id)).into_response()
    } else {
        match collect(&app, &plan, route, tokens).await {
            Ok(choices) => Json(body_of(&app, &plan, route, &choices, &id, &echo)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

fn build_chat(
    app: &App,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Plan, Route, String), ApiError> {
    let (r, sampling): (ChatRequest, _) = parse(headers, body)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad("messages is empty", Some("messages")));
    }
    let msgs = r
        .messages
        .iter()
        .map(|m| {
            Ok(Message::new(
                &m.role,
                &m.text().map_err(|e| ApiError::bad(e, Some("messages")))?,
            ))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt = app
        .tokenizer
        .encode_chat(&msgs, true)
        .map_err(|e| ApiError::bad(format!("the chat template failed: {e}"), Some("messages")))?;
    let logprobs = r.logprobs.unwrap_or(false);
    let top = r.top_logprobs.unwrap_or(0);
    if top > 20 || (top > 0 && !logprobs) {
        return Err(ApiError::bad(
            "top_logprobs must be in 0..=20, with logprobs: true",
            Some("top_logprobs"),
        ));
    }
    let max = r.max_completion_tokens.or(sampling.max_tokens);
    let plan = plan(app, prompt, &sampling, max, app.limits.max_tokens, top)?;
    Ok((plan, Route::Chat { logprobs }, String::new()))
}

fn build_text(
    app: &App,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Plan, Route, String), ApiError> {
    let (r, sampling): (CompletionRequest, _) = parse(headers, body)?;
    let mut prompts = r.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::bad(
            "one prompt per request (send several requests: they are batched together)",
            Some("prompt"),
        ));
    }
    let text = prompts.remove(0);
    let ids = app
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}"), Some("prompt")))?;
    let lp = r.logprobs;
    if lp.is_some_and(|k| k > 5) {
        return Err(ApiError::bad("logprobs must be in 0..=5", Some("logprobs")));
    }
    let echo = if r.echo.unwrap_or(false) {
        text
    } else {
        String::new()
    };
    // OpenAI's default for this route is 16 tokens.
    let plan = plan(
        app,
        ids,
        &sampling,
        sampling.max_tokens,
        16,
        lp.unwrap_or(0),
    )?;
    Ok((
        plan,
        Route::Text {
            logprobs: lp.is_some(),
        },
        echo,
    ))
}

fn wants_logprobs(route: Route) -> bool {
    match route {
        Route::Chat { logprobs } | Route::Text { logprobs, .. } => logprobs,
    }
}

async fn collect(
    app: &App,
    p: &Plan,
    route: Route,
    mut tokens: Tokens,
) -> Result<Vec<Choice>, ApiError> {
    let mut choices: Vec<Choice> = (0..p.settings.len()).map(|_| Choice::default()).collect();
    let mut open = choices.len();
    while open > 0 {
        let Some((i, s)) = tokens.next().await else {
            return Err(ApiError::internal(
                "decoding stopped before the answer was complete",
            ));
        };
        let c = &mut choices[i];
        let was_open = c.finish.is_none();
        let ended = c
            .push(&app.tokenizer, &s, &p.stops, wants_logprobs(route))
            .map_err(ApiError::internal)?;
        if was_open && ended {
            open -= 1;
        }
    }
    Ok(choices)
}

fn usage(p: &Plan, choices: &[Choice]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    json!({"prompt_tokens": p.prompt.len(), "completion_tokens": completion,
           "total_tokens": p.prompt.len() + completion})
}

fn body_of(app: &App, p: &Plan, route: Route, choices: &[Choice], id: &str, echo: &str) -> Value {
    let list: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match route {
            Route::Chat { logprobs } => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": if logprobs { chat_logprobs(&c.logprobs) } else { Value::Null },
                "finish_reason": c.finish,
            }),
            Route::Text { logprobs } => json!({
                "index": i,
                "text": format!("{echo}{}", c.text),
                "logprobs": if logprobs { completion_logprobs(&c.logprobs, echo.len()) } else { Value::Null },
                "finish_reason": c.finish,
            }),
        })
        .collect();
    let object = match route {
        Route::Chat { .. } => "chat.completion",
        Route::Text { .. } => "text_completion",
    };
    json!({"id": id, "object": object, "created": now(), "model": app.model_id,
           "choices": list, "usage": usage(p, choices)})
}

/// Server-sent events: a chunk per token that adds text (per choice), a final chunk per choice
/// with its finish reason, then `[DONE]`.
fn stream_events(
    app: App,
    p: Plan,
    route: Route,
    tokens: Tokens,
    id: String,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let n = p.settings.len();
    let created = now();
    let chunk =
        move |app: &App, i: usize, delta: Value, lp: Value, finish: Option<&str>| -> Event {
            let choice = match route {
                Route::Chat { .. } => {
                    json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
                }
                Route::Text { .. } => {
                    json!({"index": i, "text": delta["content"].as_str().unwrap_or(""),
                       "logprobs": lp, "finish_reason": finish})
                }
            };
            let object = match route {
                Route::Chat { .. } => "chat.completion.chunk",
                Route::Text { .. } => "text_completion",
            };
            Event::default().data(
                json!({"id": id, "object": object, "created": created, "model": app.model_id,
                   "choices": [choice]})
                .to_string(),
            )
        };
    struct St {
        choices: Vec<Choice>,
        open: usize,
        tokens: Tokens,
        started: Vec<bool>,
        done: bool,
    }
    let st = St {
        choices: (0..n).map(|_| Choice::default()).collect(),
        open: n,
        tokens,
        started: vec![false; n],
        done: false,
    };
    stream::unfold((st, app, p), move |(mut st, app, p)| {
        let chunk = chunk.clone();
        async move {
            if st.done {
                return None;
            }
            loop {
                if st.open == 0 {
                    st.done = true;
                    return Some((vec![Event::default().data("[DONE]")], (st, app, p)));
                }
                let Some((i, s)) = st.tokens.next().await else {
                    // Decoding failed: end the stream without [DONE], as a broken one.
                    return None;
                };
                let c = &mut st.choices[i];
                if c.finish.is_some() {
                    continue;
                }
                let before = c.logprobs.len();
                let ended = match c.push(&app.tokenizer, &s, &p.stops, wants_logprobs(route)) {
                    Ok(e) => e,
                    Err(_) => return None,
                };
                let text = c.ready(&p.stops);
                let lp = if wants_logprobs(route) {
                    let new = &c.logprobs[before..];
                    match route {
                        Route::Chat { .. } => chat_logprobs(new),
                        Route::Text { .. } => completion_logprobs(new, 0),
                    }
                } else {
                    Value::Null
                };
                let mut events = vec![];
                if matches!(route, Route::Chat { .. }) && !st.started[i] {
                    st.started[i] = true;
                    events.push(chunk(
                        &app,
                        i,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                        None,
                    ));
                }
                if !text.is_empty() || (wants_logprobs(route) && !ended) {
                    events.push(chunk(&app, i, json!({"content": text}), lp, None));
                }
                if ended {
                    st.open -= 1;
                    events.push(chunk(&app, i, json!({}), Value::Null, c.finish));
                }
                if !events.is_empty() {
                    return Some((events, (st, app, p)));
                }
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}
