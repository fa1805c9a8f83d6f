//! Pairwise judges: the LLM judge asks in both orders, so swapping the two responses gives
//! exactly the complementary preference (its position bias cancels); reward judges compare
//! scores.
use preftune_data::Text;
use preftune_eval::judge::Judge;
use preftune_eval::{RewardSource, Sample};

fn s(prompt: &str, response: &str) -> Sample {
    Sample {
        prompt: Text::Plain(prompt.into()),
        response: response.into(),
        risky: false,
    }
}

#[test]
fn llm_judge_is_order_symmetric_and_a_probability() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/tiny-llama"
    );
    let judge = Judge::parse(&format!("llm:{model}"), Some("Which reply is kinder?")).unwrap();
    let a = vec![
        s("Say hi.", "Hello there, friend!"),
        s("2+2?", "4"),
        s("Name a colour.", "blue"),
    ];
    let b = vec![
        s("Say hi.", "Go away."),
        s("2+2?", "five, probably"),
        s("Name a colour.", "blue"),
    ];
    let (ab, r) = judge.compare(&a, &b).unwrap();
    assert!(r.is_none());
    let (ba, _) = judge.compare(&b, &a).unwrap();
    for i in 0..a.len() {
        assert!(ab[i] > 0.0 && ab[i] < 1.0, "{ab:?}");
        assert!(
            (ab[i] + ba[i] - 1.0).abs() < 1e-9,
            "pair {i}: {} + {} != 1",
            ab[i],
            ba[i]
        );
    }
    // Identical responses are an exact tie whatever the model's position bias.
    assert!((ab[2] - 0.5).abs() < 1e-9, "{}", ab[2]);
}

#[test]
fn reward_judge_compares_scores() {
    let judge = Judge::Reward(RewardSource::Function(Box::new(|x: &Sample| {
        x.response.len() as f64
    })));
    let a = vec![s("p", "long answer"), s("p", "ab"), s("p", "x")];
    let b = vec![s("p", "short"), s("p", "abc"), s("p", "y")];
    let (p, r) = judge.compare(&a, &b).unwrap();
    assert_eq!(p, vec![1.0, 0.0, 0.5]);
    assert_eq!(r.unwrap().0, vec![11.0, 2.0, 1.0]);
}

/// A stand-in for an OpenAI-compatible server: P("A") is 0.7 when the response "Hello there,
/// friend!" is listed first, else 0.4, in the answer's top log-probabilities.
fn fake_server() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let text = req["messages"][0]["content"].as_str().unwrap();
            let a = if text.contains("Response A:\nHello there") {
                0.7f64
            } else {
                0.4
            };
            let out = serde_json::json!({"choices": [{"message": {"content": "A"}, "logprobs": {
                "content": [{"token": "A", "logprob": a.ln(), "top_logprobs": [
                    {"token": "A", "logprob": a.ln()}, {"token": "B", "logprob": (1.0 - a).ln()}]}]}}]})
            .to_string();
            let mut w = r.into_inner();
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{out}",
                out.len()
            );
        }
    });
    url
}

/// `openai:URL#MODEL` asks in both orders and averages, as the local judge does; a server that
/// refuses (our own, with keys) is named in the error.
#[test]
fn api_judge_asks_both_orders_and_names_a_failing_server() {
    let url = fake_server();
    let a = vec![s("Say hi.", "Hello there, friend!")];
    let b = vec![s("Say hi.", "Go away.")];
    let api = Judge::parse(&format!("openai:{url}#judge"), None).unwrap();
    // Listed first: 0.7 for A; listed second: P(A) = 0.4 for the other, so 0.6 for it.
    let (p, _) = api.compare(&a, &b).unwrap();
    assert!((p[0] - 0.65).abs() < 1e-9, "{p:?}");
    let (q, _) = api.compare(&b, &a).unwrap();
    assert!((p[0] + q[0] - 1.0).abs() < 1e-9);

    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/tiny-llama"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let locked = format!("http://{}/v1", listener.local_addr().unwrap());
    let p =
        preftune_model::Pretrained::load(std::path::Path::new(model), &Default::default()).unwrap();
    let opts = preftune_serve::ServeOptions {
        keys: vec!["k-0123456789abcdef".into()],
        model_id: "tiny".into(),
        ..Default::default()
    };
    rt.spawn(preftune_serve::serve_on(
        p,
        listener,
        opts,
        std::future::pending(),
    ));
    let e = Judge::parse(&format!("openai:{locked}#tiny"), None)
        .unwrap()
        .compare(&a, &b)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&locked) && e.contains("401"), "{e}");
    for bad in ["openai:http://x/v1", "openai:https://api.openai.com/v1#gpt"] {
        assert!(Judge::parse(bad, None).is_err(), "{bad}");
    }
}

#[test]
fn api_answers_read_from_logprobs_else_from_the_text() {
    use preftune_eval::judge::answer_from_response;
    use serde_json::json;
    let with = json!({"choices": [{"message": {"content": "A"}, "logprobs": {"content": [
        {"token": "A", "logprob": -0.5, "top_logprobs": [
            {"token": "A", "logprob": (0.6f64).ln()}, {"token": " B", "logprob": (0.2f64).ln()},
            {"token": "The", "logprob": (0.1f64).ln()}]}]}}]});
    assert!((answer_from_response(&with).unwrap() - 0.75).abs() < 1e-12);
    let plain = json!({"choices": [{"message": {"content": " B."}}]});
    assert_eq!(answer_from_response(&plain).unwrap(), 0.0);
    let neither = json!({"choices": [{"message": {"content": "Maybe"}}]});
    assert!(answer_from_response(&neither)
        .unwrap_err()
        .contains("neither A nor B"));
}
