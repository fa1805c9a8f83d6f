//! The server on the tiny model, over real HTTP: answers equal what `generate` samples for the same
//! prompt, streaming equals the whole answer, concurrent clients get their own answers, and the
//! limits and keys hold.
use std::path::PathBuf;

use preftune_model::{generate, LoadOptions, Message, Pretrained, SamplingConfig};
use preftune_serve::{serve_on, Limits, ServeOptions};
use serde_json::{json, Value};

fn tiny() -> Pretrained {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-llama");
    Pretrained::load(&dir, &LoadOptions::default()).unwrap()
}

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(limits: Limits, keys: Vec<String>) -> Server {
    start_with(limits, keys, false).await
}

async fn start_with(limits: Limits, keys: Vec<String>, bf16: bool) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        limits,
        keys,
        model_id: "tiny-llama".into(),
        bf16,
    };
    tokio::spawn(async move {
        serve_on(tiny(), listener, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        base,
        stop: Some(tx),
    }
}

async fn post(base: &str, route: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{route}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Greedy text of a chat prompt, sampled by `generate` alone.
fn greedy_chat(p: &Pretrained, user: &str, n: usize) -> (String, usize) {
    let ids = p
        .tokenizer
        .encode_chat(&[Message::new("user", user)], true)
        .unwrap();
    let g = generate(
        &p.model,
        &[ids],
        &SamplingConfig {
            max_new_tokens: n,
            temperature: 0.0,
            eos_token_ids: p.eos_token_ids(),
            ..Default::default()
        },
    )
    .unwrap();
    (
        p.tokenizer.decode(&g.tokens[0], true).unwrap(),
        g.tokens[0].len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_match_generate_and_stream_the_same_text() {
    let s = start(Limits::default(), vec![]).await;
    let p = tiny();
    let models: Value = reqwest::get(format!("{}/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-llama");

    let (want, made) = greedy_chat(&p, "Say something.", 12);
    let req = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "Say something."}],
                     "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 2});
    let (status, v) = post(&s.base, "/chat/completions", req.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], made);
    let lps = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len(), made);
    for l in lps {
        // Greedy: the chosen token is the most likely one.
        assert_eq!(l["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(l["logprob"], l["top_logprobs"][0]["logprob"]);
        assert!(l["logprob"].as_f64().unwrap() <= 0.0);
    }
    if made == 12 {
        assert_eq!(c["finish_reason"], "length");
    }

    // The same request streamed: a role delta first, the same text in pieces, then [DONE].
    let mut req = req;
    req["stream"] = json!(true);
    let body = reqwest::Client::new()
        .post(format!("{}/chat/completions", s.base))
        .json(&req)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        c["finish_reason"]
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

/// With `bf16` the server multiplies as `generate` does under a bf16 scope: the same greedy
/// answer, which differs from the f32 one's log-probs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_server_answers_as_generate_does_in_bf16() {
    let s = start_with(Limits::default(), vec![], true).await;
    let p = tiny();
    let (want, made) = {
        let _bf16 = preftune_model::ops::Bf16Scope::new(true);
        greedy_chat(&p, "Say something.", 12)
    };
    let req = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "Say something."}],
                     "temperature": 0, "max_tokens": 12, "logprobs": true});
    let (status, v) = post(&s.base, "/chat/completions", req.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], made);
    let lp = |v: &Value| -> Vec<f64> {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["logprob"].as_f64().unwrap())
            .collect()
    };
    let f32_server = start(Limits::default(), vec![]).await;
    let (_, plain) = post(&f32_server.base, "/chat/completions", req).await;
    let (a, b) = (lp(&v), lp(&plain));
    let differ = a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-6);
    assert!(
        differ || !preftune_model::ops::bf16_gemm_available(),
        "{a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_with_n_seed_stop_and_logprobs() {
    let s = start(Limits::default(), vec![]).await;
    let req = json!({"prompt": "Once upon a time", "max_tokens": 10, "n": 3, "seed": 5,
                     "temperature": 1.0, "logprobs": 2});
    let (status, a) = post(&s.base, "/completions", req.clone()).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["object"], "text_completion");
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    // Seeded: the same request gives the same choices; the choices differ from one another.
    let (_, b) = post(&s.base, "/completions", req).await;
    assert_eq!(texts(&a), texts(&b));
    assert!(texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2]);
    let lp = &a["choices"][0]["logprobs"];
    let n = a["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len().min(2), 2);
    assert_eq!(
        a["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        {
            a["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["logprobs"]["tokens"].as_array().unwrap().len())
                .sum::<usize>()
        }
    );

    // A stop string cuts the text before it.
    let greedy = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let (_, g) = post(&s.base, "/completions", greedy.clone()).await;
    let full = g["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[3..5].iter().collect();
    let at = full.find(&stop).unwrap();
    let mut with_stop = greedy;
    with_stop["stop"] = json!([stop]);
    let (_, cut) = post(&s.base, "/completions", with_stop).await;
    assert_eq!(cut["choices"][0]["text"], &full[..at]);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_their_own_answers() {
    let s = start(Limits::default(), vec![]).await;
    let p = tiny();
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Client {i} asks about the number {}.", i * 7))
        .collect();
    let want: Vec<String> = prompts.iter().map(|q| greedy_chat(&p, q, 8).0).collect();
    let ask = |q: String| {
        let base = s.base.clone();
        async move {
            let (status, v) = post(
                &base,
                "/chat/completions",
                json!({"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let t = std::time::Instant::now();
    let mut sequential = vec![];
    for q in prompts.iter().take(8) {
        sequential.push(ask(q.clone()).await);
    }
    let per_request_sequential = t.elapsed().as_secs_f64() / 8.0;
    let t = std::time::Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|q| tokio::spawn(ask(q.clone())))
        .collect();
    let mut got = vec![];
    for h in handles {
        got.push(h.await.unwrap());
    }
    let per_request_concurrent = t.elapsed().as_secs_f64() / 32.0;
    assert_eq!(
        got, want,
        "an answer went to the wrong client or changed in the batch"
    );
    assert_eq!(sequential, want[..8]);
    eprintln!(
        "32 concurrent clients: {:.1} ms a request; sequential: {:.1} ms ({:.1}x)",
        per_request_concurrent * 1e3,
        per_request_sequential * 1e3,
        per_request_sequential / per_request_concurrent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_requests_get_clear_errors() {
    let limits = Limits {
        max_tokens: 32,
        max_queue: 2,
        max_body_bytes: 4096,
        ..Default::default()
    };
    let s = start(limits, vec![]).await;
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, v) = post(
        &s.base,
        "/chat/completions",
        chat(json!({"max_tokens": 33})),
    )
    .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    let (st, v) = post(
        &s.base,
        "/chat/completions",
        chat(json!({"temperature": "hot"})),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{v}"
    );
    let (st, v) = post(&s.base, "/chat/completions", json!({"messages": []})).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("messages")));
    // More sequences than the server holds: 429, and the server still answers after.
    let (st, v) = post(
        &s.base,
        "/chat/completions",
        chat(json!({"n": 3, "max_tokens": 4})),
    )
    .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let (st, _) = post(
        &s.base,
        "/chat/completions",
        chat(json!({"n": 2, "max_tokens": 4})),
    )
    .await;
    assert_eq!(st, 200);
    let big = "x".repeat(8000);
    let (st, _) = post(&s.base, "/completions", json!({"prompt": big})).await;
    assert_eq!(st, 413);
    let r = reqwest::get(format!("{}/nothing", s.base)).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_when_given_and_off_loopback() {
    let key = "k-0123456789abcdef".to_string();
    let s = start(Limits::default(), vec![key.clone()]).await;
    let r = reqwest::get(format!("{}/models", s.base)).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = reqwest::Client::new()
        .get(format!("{}/models", s.base))
        .bearer_auth("k-0123456789abcdeX")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = reqwest::Client::new()
        .get(format!("{}/models", s.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let public: std::net::SocketAddr = "0.0.0.0:8000".parse().unwrap();
    let e = preftune_serve::check_bind(public, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--api-key-file"), "{e}");
    assert!(preftune_serve::check_bind(public, &[key]).is_ok());
}
