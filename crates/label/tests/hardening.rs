//! The labelling server against hostile or careless clients: where it may listen, sessions that
//! are not the token, revocation, a private database file, HTTP status codes, no body or route
//! work for strangers, cross-origin posts, and slow clients (the audit of issue 23, items 9-11).
mod common;

use std::time::{Duration, Instant};

use common::{fresh, Server};
use preftune_label::net::{check_bind, connection_cap, ServeOptions};
use preftune_label::{Mode, Store};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn host(srv: &Server) -> String {
    srv.url.trim_start_matches("http://").to_string()
}

/// Sends raw bytes and returns what the server answers before it closes or `wait` passes.
async fn raw(addr: &str, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).to_string()
}

async fn login(c: &reqwest::Client, srv: &Server, token: &str) -> reqwest::Response {
    c.post(format!("{}/login", srv.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

/// The `name=value` part of a login's cookie, and the whole header.
fn session(r: &reqwest::Response) -> (String, String) {
    let full = r.headers()["set-cookie"].to_str().unwrap().to_string();
    (full.split(';').next().unwrap().to_string(), full)
}

async fn page_with(c: &reqwest::Client, srv: &Server, cookie: &str) -> StatusCode {
    c.get(format!("{}/", srv.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
}

async fn me(c: &reqwest::Client, srv: &Server, token: &str) -> StatusCode {
    c.get(format!("{}/api/me", srv.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

#[test]
fn plain_http_listens_on_loopback_unless_told_otherwise() {
    for ok in ["127.0.0.1:8080", "[::1]:8080"] {
        assert!(check_bind(ok.parse().unwrap(), false).is_ok(), "{ok}");
    }
    for public in ["0.0.0.0:8080", "192.168.1.5:80", "[::]:8080"] {
        let e = check_bind(public.parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        assert!(check_bind(public.parse().unwrap(), true).is_ok());
    }
    // The cap never exceeds what the open-file limit leaves, and honours a smaller wish.
    assert_eq!(connection_cap(8), 8);
    assert!(connection_cap(usize::MAX) < usize::MAX);
}

#[cfg(unix)]
#[test]
fn the_database_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, db, _) = fresh(2, 2, Mode::Pair, 0.0, &["admin"]);
    let mut s = Store::open(&db).unwrap();
    s.add_annotator("ann", false).unwrap();
    for f in [db.clone(), db.with_extension("sqlite-wal")] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_not_tokens_and_end_at_logout_or_expiry() {
    let (_dir, db, t) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let opts = ServeOptions {
        session_ttl: Duration::from_secs(2),
        ..Default::default()
    };
    let srv = Server::start_with(&db, opts).await;
    let c = client();

    let r = login(&c, &srv, &t[1]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (cookie, full) = session(&r);
    assert!(cookie.starts_with("preftune_session=ps_"), "{cookie}");
    assert!(
        !full.contains(&t[1]),
        "the cookie carries the token: {full}"
    );
    assert!(
        full.contains("Max-Age=2") && full.contains("HttpOnly"),
        "{full}"
    );
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::OK);
    // The token itself is no session id.
    let forged = format!("preftune_session={}", t[1]);
    assert_eq!(page_with(&c, &srv, &forged).await, StatusCode::SEE_OTHER);

    // Logout ends the session on the server: a copied cookie stops working too.
    let r = c
        .post(format!("{}/logout", srv.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::SEE_OTHER);

    // A session expires on the server, whatever the browser keeps.
    let (cookie, _) = session(&login(&c, &srv, &t[1]).await);
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::SEE_OTHER);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_or_revoking_a_token_locks_out_the_old_one_and_its_sessions() {
    let (_dir, db, t) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let srv = Server::start(&db).await;
    let c = client();
    let (cookie, _) = session(&login(&c, &srv, &t[1]).await);
    // One judgement, which must survive both.
    let next: Value = c
        .get(format!("{}/api/next", srv.url))
        .bearer_auth(&t[1])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = next["item"]["item_id"].as_i64().unwrap();
    let r = c
        .post(format!("{}/api/items/{id}/label", srv.url))
        .bearer_auth(&t[1])
        .json(&json!({"scale": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The CLI's commands act on the file while the server runs.
    let new = Store::open(&db).unwrap().rotate_token("ann").unwrap();
    assert_ne!(new, t[1]);
    assert_eq!(me(&c, &srv, &t[1]).await, StatusCode::UNAUTHORIZED);
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::SEE_OTHER);
    assert_eq!(me(&c, &srv, &new).await, StatusCode::OK);

    let (cookie, _) = session(&login(&c, &srv, &new).await);
    Store::open(&db).unwrap().revoke_token("ann").unwrap();
    assert_eq!(me(&c, &srv, &new).await, StatusCode::UNAUTHORIZED);
    assert_eq!(page_with(&c, &srv, &cookie).await, StatusCode::SEE_OTHER);
    assert_eq!(
        me(&c, &srv, &t[0]).await,
        StatusCode::OK,
        "others unaffected"
    );
    let e = Store::open(&db)
        .unwrap()
        .revoke_token("nobody")
        .unwrap_err();
    assert!(e.to_string().contains("no annotator named `nobody`"), "{e}");
    srv.stop().await;
    assert_eq!(Store::open(&db).unwrap().labels().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_401_before_any_body_method_or_path_is_handled() {
    let (_dir, db, _) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let srv = Server::start(&db).await;
    let c = client();
    let u = |p: &str| format!("{}{p}", srv.url);
    // A wrong method and a malformed path: 401, not 405 or 400.
    let r = c.delete(u("/api/me")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.get(u("/api/items/not-a-number")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A 2 MB body announced but never sent: the answer comes at once, without reading it.
    let t0 = Instant::now();
    let head = format!(
        "POST /api/items/1/label HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 2000000\r\n\r\n{{\"scale\":",
        host(&srv)
    );
    let reply = raw(&host(&srv), head.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_carry_their_own_status_and_no_file_paths() {
    let (_dir, db, t) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let srv = Server::start(&db).await;
    let c = client();
    let u = |p: &str| format!("{}{p}", srv.url);
    let send = |body: Vec<u8>, ctype: &'static str| {
        c.post(u("/api/items/1/label"))
            .bearer_auth(&t[1])
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let json = "application/json";
    let cases = [
        (b"{\"scale\": ".to_vec(), json, StatusCode::BAD_REQUEST),
        (
            b"{\"scale\": \"much\"}".to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            b"{\"scale\": 1}".to_vec(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            format!("{{\"scale\": 1, \"comment\": \"{}\"}}", "x".repeat(100_000)).into_bytes(),
            json,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (body, ctype, want) in cases {
        let n = body.len();
        assert_eq!(send(body, ctype).await.unwrap().status(), want, "{n} bytes");
    }
    // With a login: a wrong method is 405 and a malformed id 400.
    let r = c
        .delete(u("/api/me"))
        .bearer_auth(&t[1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = c
        .get(u("/api/items/x"))
        .bearer_auth(&t[1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A database failure answers 500 without the database's path or SQL.
    let raw_db = rusqlite::Connection::open(&db).unwrap();
    raw_db.execute_batch("DROP TABLE labels").unwrap();
    let r = c
        .get(u("/api/admin/stats"))
        .bearer_auth(&t[0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = r.text().await.unwrap();
    let name = db.file_name().unwrap().to_str().unwrap();
    assert!(!text.contains(name) && !text.contains("labels"), "{text}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_posts_are_refused() {
    let (_dir, db, t) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let srv = Server::start(&db).await;
    let c = client();
    let here = srv.url.clone();
    let post = |headers: Vec<(&'static str, String)>| {
        let mut r = c
            .post(format!("{here}/login"))
            .form(&[("token", t[1].as_str())]);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    let refused = [
        vec![("origin", "http://evil.example".to_string())],
        vec![("origin", "null".to_string())],
        vec![("sec-fetch-site", "cross-site".to_string())],
        // The browser's own verdict wins over a matching Origin.
        vec![
            ("sec-fetch-site", "cross-site".to_string()),
            ("origin", here.clone()),
        ],
    ];
    for h in refused {
        let r = post(h.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{h:?}");
        assert!(r.headers().get("set-cookie").is_none());
    }
    let allowed = [
        vec![],
        vec![("origin", here.clone())],
        vec![("sec-fetch-site", "same-origin".to_string())],
    ];
    for h in allowed {
        assert_eq!(
            post(h.clone()).await.unwrap().status(),
            StatusCode::SEE_OTHER,
            "{h:?}"
        );
    }
    srv.stop().await;
}

/// Slowloris on loopback: 100 connections that send headers a piece at a time and never finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_neither_starve_real_requests_nor_stay_open() {
    let (_dir, db, t) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let mut opts = ServeOptions::default();
    opts.limits.header_timeout = Duration::from_secs(1);
    opts.limits.request_timeout = Duration::from_secs(1);
    // Fewer slots than slow clients: the timeouts must free them for the real request.
    opts.limits.max_connections = 40;
    let srv = Server::start_with(&db, opts).await;
    let addr = host(&srv);
    let c = client();

    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(me(&c, &srv, &t[1]).await, StatusCode::OK);
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "real requests took {took:?}");

    // Every slow connection was closed by the server; none still holds a slot.
    for s in &mut slow {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(8), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(_)) | Ok(Err(_))),
            "a slow connection is still open"
        );
    }

    // A request whose body trickles in gets 408 once its time is up.
    let head = format!(
        "POST /api/items/1/label HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{{\"scale\":",
        t[1]
    );
    let t0 = Instant::now();
    let reply = raw(&addr, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(t0.elapsed() < Duration::from_secs(4));
    srv.stop().await;
}
