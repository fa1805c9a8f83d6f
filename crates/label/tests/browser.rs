//! The labelling page in headless Chromium, driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`): log in with a token, check that a response holding `<script>` renders as
//! text, label the pair with the keyboard, see the judgement land and the page move on, and take
//! a screenshot (`PREFTUNE_SCREENSHOT_DIR` keeps a copy, e.g. for the README).
//!
//! Without chromedriver the test says so and passes, except under `CI=true`, where it fails:
//! CI installs the browser (scripts/install-browser.sh).
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::Server;
use preftune_label::{ImportOptions, Mode, Store};
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    url: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(chromedriver: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let t = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chromedriver did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut d = Driver {
            child,
            url,
            session: String::new(),
            http,
        };
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("/usr/bin/chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": binary, "args": ["--headless=new", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860"]}}}});
        let v = d.call("POST", "/session", caps).await;
        d.session = v["sessionId"].as_str().expect("a session").to_string();
        d
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.url);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(
            r["value"].get("error").is_none(),
            "webdriver {method} {path}: {}",
            r["value"]
        );
        r["value"].clone()
    }

    async fn s(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .s(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn script(&self, js: &str) -> Value {
        self.s("POST", "/execute/sync", json!({"script": js, "args": []}))
            .await
    }

    /// Polls a script until it returns a truthy value.
    async fn wait_for(&self, js: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.script(js).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "timed out on {js}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens the page, is sent to the login form (not logged in), and logs in with `token`.
    async fn log_in(&self, url: &str, token: &str) {
        self.s("POST", "/url", json!({"url": format!("{url}/")}))
            .await;
        self.wait_for("return location.pathname === '/login'").await;
        let input = self.find("#token").await;
        self.s(
            "POST",
            &format!("/element/{input}/value"),
            json!({"text": token}),
        )
        .await;
        let button = self.find("#login").await;
        self.s("POST", &format!("/element/{button}/click"), json!({}))
            .await;
    }

    async fn press(&self, key: &str) {
        self.s(
            "POST",
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]}),
        )
        .await;
    }
}

fn chromedriver() -> Option<std::path::PathBuf> {
    let found = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("chromedriver not found: CI needs Debian's chromium and chromium-driver (scripts/install-browser.sh)");
        }
        eprintln!("SKIPPED: no chromedriver (apt-get install chromium chromium-driver)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_a_pair_with_the_keyboard_in_chromium() {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let cands = dir.path().join("candidates.jsonl");
    let rows = [
        json!({"prompt": "Write one sentence about what the HTML <script> tag does.",
               "responses": [
                   "<script>window.__pwned = true; document.title = 'pwned'</script><img src=x onerror=\"window.__pwned = true\"> This response tries to run code; it must show as plain text.",
                   "The <script> element embeds or references executable code, usually JavaScript, that the browser runs while it parses the page.\n\nIt can load an external file with the src attribute or hold the code inline."]}),
        json!({"prompt": [{"role": "system", "content": "You are a film critic."},
                          {"role": "user", "content": "Is Casablanca worth watching?"}],
               "responses": ["Yes: it is sharp, funny and sad, and it has aged remarkably well.",
                             "No."]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&cands, text).unwrap();
    let token = {
        let mut s = Store::open(&db).unwrap();
        s.import(
            &cands,
            &ImportOptions {
                mode: Mode::Pair,
                ..Default::default()
            },
        )
        .unwrap();
        s.add_annotator("ann", false).unwrap()
    };
    let srv = Server::start(&db).await;
    let d = Driver::start(&driver_bin).await;

    d.log_in(&srv.url, &token).await;
    d.wait_for(
        "return document.getElementById('left') && document.getElementById('left').textContent",
    )
    .await;

    let shown = d
        .script(
            "const l = document.getElementById('left'), r = document.getElementById('right');
             return {left: l.textContent, right: r.textContent,
                     children: l.children.length + r.children.length,
                     pwned: window.__pwned === true, title: document.title,
                     prompt: document.getElementById('prompt').textContent,
                     who: document.getElementById('who').textContent};",
        )
        .await;
    let both = format!("{}{}", shown["left"], shown["right"]);
    assert!(both.contains("<script>window.__pwned"), "{shown}");
    assert_eq!(shown["children"], 0, "model text became markup: {shown}");
    assert_eq!(shown["pwned"], false);
    assert_ne!(shown["title"], "pwned");
    assert_eq!(shown["who"], "ann");
    let first_prompt = shown["prompt"].as_str().unwrap().to_string();

    let png = d.s("GET", "/screenshot", json!({})).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("label-page.png");
    std::fs::write(&out, &png).unwrap();
    if let Ok(keep) = std::env::var("PREFTUNE_SCREENSHOT_DIR") {
        std::fs::write(Path::new(&keep).join("label-page.png"), &png).unwrap();
    }

    // "u" flags it unsafe, "2" is "Left better": saved, then the next item appears.
    d.press("u").await;
    d.press("2").await;
    d.wait_for(&format!(
        "return document.getElementById('prompt').textContent !== {}",
        json!(first_prompt)
    ))
    .await;
    let labels = Store::open(&db).unwrap().labels().unwrap();
    assert_eq!(labels.len(), 1);
    assert!(labels[0].unsafe_flag);
    let left = shown["left"].as_str().unwrap();
    let chosen = if labels[0].choice.unwrap() > 0 {
        &labels[0].responses[0]
    } else {
        &labels[0].responses[1]
    };
    assert_eq!(chosen, left, "the left response was chosen");
    assert_eq!(labels[0].choice.unwrap().abs(), 2);
    // The conversational prompt shows each message with its role.
    let p = d
        .script("return document.getElementById('prompt').textContent")
        .await;
    assert!(
        p.as_str().unwrap().contains("systemYou are a film critic."),
        "{p}"
    );

    d.s("DELETE", "", json!({})).await;
    srv.stop().await;
}

/// Thumbs mode in the page: one response at a time, "1" saves a thumbs up and "2" a thumbs down,
/// each response of a row being an item of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbs_up_and_down_with_the_keyboard_in_chromium() {
    let Some(driver_bin) = chromedriver() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let cands = dir.path().join("candidates.jsonl");
    let row = json!({"prompt": "Is Casablanca worth watching?",
                     "responses": ["Yes: it is sharp, funny and sad.", "No."]});
    std::fs::write(&cands, format!("{row}\n")).unwrap();
    let token = {
        let mut s = Store::open(&db).unwrap();
        let opts = ImportOptions {
            mode: Mode::Thumbs,
            ..Default::default()
        };
        s.import(&cands, &opts).unwrap();
        s.add_annotator("ann", false).unwrap()
    };
    let srv = Server::start(&db).await;
    let d = Driver::start(&driver_bin).await;
    d.log_in(&srv.url, &token).await;
    let single = "return document.getElementById('thumbsview') \
                  && !document.getElementById('thumbsview').classList.contains('hidden') \
                  && document.getElementById('single').textContent";
    let first = d.wait_for(single).await.as_str().unwrap().to_string();
    // Good when it is the long answer, bad when it is "No.", whichever comes first.
    let key = |text: &str| if text.starts_with("Yes") { "1" } else { "2" };
    d.press(key(&first)).await;
    let second = d
        .wait_for(&format!(
            "const t = document.getElementById('single').textContent; return t !== {} && t",
            json!(first)
        ))
        .await
        .as_str()
        .unwrap()
        .to_string();
    d.press(key(&second)).await;
    d.wait_for("return !document.getElementById('done').classList.contains('hidden')")
        .await;
    let labels = Store::open(&db).unwrap().labels().unwrap();
    assert_eq!(labels.len(), 2);
    for l in &labels {
        assert_eq!(l.responses.len(), 1);
        let up = l.responses[0].starts_with("Yes");
        assert_eq!(l.choice, Some(if up { 1 } else { -1 }), "{l:?}");
    }
    d.s("DELETE", "", json!({})).await;
    srv.stop().await;
}
