//! The labelling app over HTTP on loopback: authentication on every route, per-annotator queues,
//! concurrent submissions, overlap, restarts, and what export makes of the judgements.
mod common;

use std::collections::{HashMap, HashSet};

use common::{fresh, Server};
use preftune_label::export::{export, ExportOptions};
use preftune_label::{Mode, Store};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(c: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn post(c: &reqwest::Client, url: &str, token: &str, body: Value) -> reqwest::Response {
    c.post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Posts a judgement of item `id` as `token`'s annotator.
async fn judge(
    c: &reqwest::Client,
    s: &str,
    token: &str,
    id: i64,
    body: Value,
) -> reqwest::Response {
    post(c, &format!("{s}/api/items/{id}/label"), token, body).await
}

async fn next(c: &reqwest::Client, s: &str, token: &str) -> Value {
    let r = get(c, &format!("{s}/api/next"), Some(token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_token_and_admin_routes_an_admin() {
    let (_dir, db, tokens) = fresh(4, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let srv = Server::start(&db).await;
    let c = client();
    let u = |p: &str| format!("{}{p}", srv.url);

    let pages = ["/", "/admin"];
    let api = [
        "/app.js",
        "/api/me",
        "/api/next",
        "/api/items/1",
        "/api/admin/progress",
        "/api/admin/stats",
        "/no/such/route",
    ];
    for bad in [None, Some("pt_not-a-token"), Some("")] {
        for p in pages {
            let r = get(&c, &u(p), bad).await;
            assert_eq!(r.status(), StatusCode::SEE_OTHER, "{p} with {bad:?}");
            assert_eq!(r.headers()["location"], "/login");
        }
        for p in api {
            let r = get(&c, &u(p), bad).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{p} with {bad:?}");
        }
        let mut req = c.post(u("/api/items/1/label")).json(&json!({"scale": 1}));
        if let Some(t) = bad {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    // Nothing was assigned or labelled by those attempts.
    assert_eq!(Store::open(&db).unwrap().progress().unwrap().labelled, 0);

    // The login form is the one public page; it sets an HttpOnly cookie that works like the token.
    assert_eq!(get(&c, &u("/login"), None).await.status(), StatusCode::OK);
    let r = c
        .post(u("/login"))
        .form(&[("token", tokens[1].as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let cookie = cookie.split(';').next().unwrap().to_string();
    let r = c
        .get(u("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let r = c
        .post(u("/login"))
        .form(&[("token", "pt_wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A valid annotator without admin rights.
    for p in ["/api/admin/progress", "/api/admin/stats", "/admin"] {
        assert_eq!(
            get(&c, &u(p), Some(&tokens[1])).await.status(),
            StatusCode::FORBIDDEN,
            "{p}"
        );
    }
    for p in ["/", "/app.js", "/api/me", "/api/next"] {
        assert_eq!(
            get(&c, &u(p), Some(&tokens[1])).await.status(),
            StatusCode::OK,
            "{p}"
        );
    }
    let r = get(&c, &u("/api/admin/progress"), Some(&tokens[0])).await;
    assert_eq!(r.status(), StatusCode::OK);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["items"], 4);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotator_cannot_read_or_write_another_annotators_items() {
    let (_dir, db, t) = fresh(6, 2, Mode::Pair, 0.0, &["admin", "ann", "bob"]);
    let srv = Server::start(&db).await;
    let c = client();
    let s = srv.url.clone();

    let a = next(&c, &s, &t[1]).await;
    let id = a["item"]["item_id"].as_i64().unwrap();
    // The same item again on reload, not a second assignment.
    assert_eq!(next(&c, &s, &t[1]).await["item"]["item_id"], id);
    let r = get(&c, &format!("{s}/api/items/{id}"), Some(&t[1])).await;
    assert_eq!(r.status(), StatusCode::OK);

    let r = get(&c, &format!("{s}/api/items/{id}"), Some(&t[2])).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body = r.text().await.unwrap();
    assert!(!body.contains("response"), "{body}");
    let r = judge(&c, &s, &t[2], id, json!({"scale": 3})).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Bob's own queue never contains ann's item.
    let b = next(&c, &s, &t[2]).await;
    assert_ne!(b["item"]["item_id"], id);

    // Bad judgements are refused and change nothing.
    for bad in [
        json!({"scale": 4}),
        json!({"ranking": [0, 1]}),
        json!({}),
        json!({"scale": 1, "extra": true}),
    ] {
        let r = judge(&c, &s, &t[1], id, bad.clone()).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let r = judge(
        &c,
        &s,
        &t[1],
        id,
        json!({"scale": 2, "unsafe": true, "comment": "rude"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = judge(&c, &s, &t[1], id, json!({"scale": -2})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    srv.stop().await;

    let store = Store::open(&db).unwrap();
    let labels = store.labels().unwrap();
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].annotator, "ann");
    assert!(labels[0].unsafe_flag);
    assert_eq!(labels[0].comment, "rude");
    // The left response got "left better": export picks it as chosen, whatever the shuffle was.
    let left = a["item"]["responses"][0].as_str().unwrap();
    let (rows, _) = export(&labels, &ExportOptions::default());
    assert_eq!(rows[0]["chosen"], left);
    assert_eq!(rows[0]["margin"], 2.0);
}

/// 8 clients x 200 judgements at once: every one lands exactly once, no item goes to two
/// annotators, and a duplicated request counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_all_land_exactly_once() {
    let names: Vec<String> = (0..9).map(|i| format!("a{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_dir, db, tokens) = fresh(1600, 2, Mode::Pair, 0.0, &refs);
    let srv = Server::start(&db).await;
    let mut tasks = vec![];
    for t in &tokens[1..] {
        let t = t.clone();
        let s = srv.url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut mine = vec![];
            for i in 0..200i64 {
                let n = next(&c, &s, &t).await;
                let id = n["item"]["item_id"].as_i64().expect("an item");
                let url = format!("{s}/api/items/{id}/label");
                let body = json!({"scale": (i % 7) - 3});
                if i % 50 == 0 {
                    // The same judgement sent twice at once (a double submit).
                    let (r1, r2) =
                        tokio::join!(post(&c, &url, &t, body.clone()), post(&c, &url, &t, body));
                    let mut codes = [r1.status(), r2.status()];
                    codes.sort();
                    assert_eq!(codes, [StatusCode::OK, StatusCode::CONFLICT]);
                } else {
                    assert_eq!(post(&c, &url, &t, body).await.status(), StatusCode::OK);
                }
                mine.push(id);
            }
            mine
        }));
    }
    let mut all = vec![];
    for t in tasks {
        let mine = t.await.unwrap();
        let distinct: HashSet<_> = mine.iter().collect();
        assert_eq!(distinct.len(), 200);
        all.extend(mine);
    }
    // Every queue is empty now: all 1600 items are taken.
    for t in &tokens[1..] {
        assert_eq!(next(&client(), &srv.url, t).await["done"], true);
    }
    srv.stop().await;
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), distinct.len()), (1600, 1600));
    let store = Store::open(&db).unwrap();
    let labels = store.labels().unwrap();
    assert_eq!(labels.len(), 1600);
    let mut per_item: HashMap<i64, usize> = HashMap::new();
    for l in &labels {
        *per_item.entry(l.item_id).or_default() += 1;
    }
    assert!(per_item.values().all(|&n| n == 1));
    let p = store.progress().unwrap();
    assert!(p
        .annotators
        .iter()
        .filter(|a| a.name != "a0")
        .all(|a| a.labelled == 200));
}

/// Overlapping items go to exactly `overlap_copies` different annotators, never more, and the
/// statistics see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlap_is_honoured_under_concurrency() {
    let (_dir, db, tokens) = fresh(120, 2, Mode::Pair, 0.3, &["admin", "a", "b", "c", "d"]);
    let srv = Server::start(&db).await;
    let mut tasks = vec![];
    for t in &tokens[1..] {
        let t = t.clone();
        let s = srv.url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            loop {
                let n = next(&c, &s, &t).await;
                if n["done"] == true {
                    break;
                }
                let id = n["item"]["item_id"].as_i64().unwrap();
                let r = post(
                    &c,
                    &format!("{s}/api/items/{id}/label"),
                    &t,
                    json!({"scale": 1}),
                )
                .await;
                assert_eq!(r.status(), StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client();
    let st: Value = get(
        &c,
        &format!("{}/api/admin/stats", srv.url),
        Some(&tokens[0]),
    )
    .await
    .json()
    .await
    .unwrap();
    srv.stop().await;
    let store = Store::open(&db).unwrap();
    let p = store.progress().unwrap();
    assert!(
        p.overlapping_items > 20 && p.overlapping_items < 60,
        "{p:?}"
    );
    assert_eq!(p.labelled, p.wanted);
    assert_eq!(p.wanted, 120 + p.overlapping_items);
    let mut per_item: HashMap<i64, HashSet<String>> = HashMap::new();
    for l in store.labels().unwrap() {
        assert!(per_item.entry(l.item_id).or_default().insert(l.annotator));
    }
    assert_eq!(per_item.len(), 120);
    assert!(per_item.values().all(|v| v.len() <= 2));
    assert_eq!(st["overlapping_items"], p.overlapping_items);
    // Everyone said "left slightly better" on items in random left/right order.
    assert_eq!(st["position_bias"]["rate"], 1.0);
}

/// Stopping the server loses nothing: judgements stay, and an item someone had open comes back
/// to them after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_nothing() {
    let (_dir, db, t) = fresh(10, 2, Mode::Pair, 0.0, &["admin", "ann"]);
    let c = client();
    let srv = Server::start(&db).await;
    for _ in 0..3 {
        let n = next(&c, &srv.url, &t[1]).await;
        let id = n["item"]["item_id"].as_i64().unwrap();
        let r = post(
            &c,
            &format!("{}/api/items/{id}/label", srv.url),
            &t[1],
            json!({"scale": -1}),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let open = next(&c, &srv.url, &t[1]).await;
    srv.stop().await;

    let srv = Server::start(&db).await;
    let again = next(&c, &srv.url, &t[1]).await;
    assert_eq!(
        again["item"], open["item"],
        "same item, same left/right order"
    );
    let me: Value = get(&c, &format!("{}/api/me", srv.url), Some(&t[1]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["labelled"], 3);
    srv.stop().await;
    assert_eq!(Store::open(&db).unwrap().labels().unwrap().len(), 3);
}

/// Thumbs: each response is an item of its own; up and down export as KTO rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbs_label_single_responses_and_export_kto_rows() {
    let (_dir, db, t) = fresh(2, 3, Mode::Thumbs, 0.0, &["admin"]);
    let srv = Server::start(&db).await;
    let c = client();
    let mut seen = 0;
    loop {
        let n = next(&c, &srv.url, &t[0]).await;
        if n["done"] == true {
            break;
        }
        let item = &n["item"];
        assert_eq!(item["mode"], "thumbs");
        let text = item["responses"][0].as_str().unwrap().to_string();
        assert_eq!(item["responses"].as_array().unwrap().len(), 1);
        let id = item["item_id"].as_i64().unwrap();
        let url = format!("{}/api/items/{id}/label", srv.url);
        for bad in [
            json!({"scale": 1}),
            json!({"up": true, "scale": 1}),
            json!({"up": 1}),
        ] {
            assert_eq!(
                post(&c, &url, &t[0], bad).await.status(),
                StatusCode::UNPROCESSABLE_ENTITY
            );
        }
        // Up for the first response of each row ("response 0 ..."), down for the others.
        let up = text.starts_with("response 0");
        let r = post(&c, &url, &t[0], json!({"up": up})).await;
        assert_eq!(r.status(), StatusCode::OK);
        seen += 1;
    }
    srv.stop().await;
    assert_eq!(seen, 6, "2 rows x 3 responses, one item each");
    let labels = Store::open(&db).unwrap().labels().unwrap();
    let (rows, rep) = export(&labels, &ExportOptions::default());
    assert_eq!((rows.len(), rep.rows), (6, 6));
    for r in &rows {
        let text = r["completion"].as_str().unwrap();
        assert_eq!(r["label"], json!(text.starts_with("response 0")), "{r}");
        assert!(r["prompt"].is_string());
    }
}

/// Rankings: positions sent in display order come back out in the items' own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rankings_map_display_positions_back_to_responses() {
    let (_dir, db, t) = fresh(3, 4, Mode::Rank, 0.0, &["admin"]);
    let srv = Server::start(&db).await;
    let c = client();
    loop {
        let n = next(&c, &srv.url, &t[0]).await;
        if n["done"] == true {
            break;
        }
        let item = &n["item"];
        assert_eq!(item["mode"], "rank");
        let shown: Vec<String> = item["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(shown.len(), 4);
        let id = item["item_id"].as_i64().unwrap();
        let url = format!("{}/api/items/{id}/label", srv.url);
        for bad in [
            json!({"ranking": [0, 1, 2]}),
            json!({"ranking": [0, 0, 1, 2]}),
            json!({"scale": 1}),
        ] {
            assert_eq!(
                post(&c, &url, &t[0], bad).await.status(),
                StatusCode::UNPROCESSABLE_ENTITY
            );
        }
        // Best first: "response 3 ...", then 2, 1, 0.
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(shown[d].clone()));
        assert_eq!(
            post(&c, &url, &t[0], json!({"ranking": order}))
                .await
                .status(),
            StatusCode::OK
        );
    }
    srv.stop().await;
    let labels = Store::open(&db).unwrap().labels().unwrap();
    assert_eq!(labels.len(), 3);
    let (rows, _) = export(&labels, &ExportOptions::default());
    for r in rows {
        let resp: Vec<&str> = r["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            resp[0].starts_with("response 3") && resp[3].starts_with("response 0"),
            "{resp:?}"
        );
    }
}

/// An annotator who leaves holds their item until an admin releases it: then it goes to someone
/// else, the leaver can no longer submit it, judgements are never released, and strangers to the
/// admin route get 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_releases_items_nobody_judged_to_other_annotators() {
    let (_dir, db, t) = fresh(2, 2, Mode::Pair, 0.0, &["admin", "ann", "bob"]);
    let srv = Server::start(&db).await;
    let c = client();
    let s = srv.url.clone();
    let release = |body: Value, token: &str| {
        let (c, url, token) = (
            c.clone(),
            format!("{s}/api/admin/release"),
            token.to_string(),
        );
        async move { post(&c, &url, &token, body).await }
    };

    let held = next(&c, &s, &t[1]).await["item"]["item_id"]
        .as_i64()
        .unwrap();
    let other = next(&c, &s, &t[2]).await["item"]["item_id"]
        .as_i64()
        .unwrap();
    assert_ne!(held, other);
    let r = judge(&c, &s, &t[2], other, json!({"scale": 1})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        next(&c, &s, &t[2]).await["done"],
        true,
        "ann holds the last item"
    );

    // Only an admin may release, with a known annotator and a sane age.
    let r = release(json!({"annotator": "ann"}), &t[1]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = release(json!({"annotator": "nobody"}), &t[0]).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = release(json!({"older_than_hours": -1.0}), &t[0]).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Assigned just now: not older than an hour.
    let r = release(json!({"older_than_hours": 1.0}), &t[0]).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"released": {}}));

    let r = release(json!({"annotator": "ann"}), &t[0]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"released": {"ann": 1}})
    );
    assert_eq!(next(&c, &s, &t[2]).await["item"]["item_id"], held);
    let r = judge(&c, &s, &t[2], held, json!({"scale": -1})).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The leaver's late judgement is refused, with a reason; their queue is empty.
    let r = judge(&c, &s, &t[1], held, json!({"scale": 3})).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.text().await.unwrap().contains("released"));
    assert_eq!(next(&c, &s, &t[1]).await["done"], true);
    // Judged items stay where they are.
    let r = release(json!({}), &t[0]).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"released": {}}));
    srv.stop().await;

    let store = Store::open(&db).unwrap();
    let labels = store.labels().unwrap();
    assert_eq!(labels.len(), 2);
    assert!(labels.iter().all(|l| l.annotator == "bob"));
    let p = store.progress().unwrap();
    let ann = p.annotators.iter().find(|a| a.name == "ann").unwrap();
    assert_eq!((ann.assigned, ann.labelled), (0, 0));
}

/// With `release_after` set, an item nobody judged in time goes back to the pool on the next
/// request for an item, and the one who held it sees a new item or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_held_too_long_go_back_to_the_pool_by_themselves() {
    let (_dir, db, t) = fresh(2, 2, Mode::Pair, 0.0, &["admin", "ann", "bob"]);
    let opts = preftune_label::net::ServeOptions {
        release_after: Some(std::time::Duration::from_millis(300)),
        ..Default::default()
    };
    let srv = Server::start_with(&db, opts).await;
    let c = client();
    let s = srv.url.clone();
    let held = next(&c, &s, &t[1]).await["item"]["item_id"]
        .as_i64()
        .unwrap();
    let other = next(&c, &s, &t[2]).await["item"]["item_id"]
        .as_i64()
        .unwrap();
    let r = judge(&c, &s, &t[2], other, json!({"scale": 1})).await;
    assert_eq!(r.status(), StatusCode::OK);
    // Before the deadline ann keeps it (the first request after it can release it).
    assert_eq!(next(&c, &s, &t[1]).await["item"]["item_id"], held);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(next(&c, &s, &t[2]).await["item"]["item_id"], held);
    let r = judge(&c, &s, &t[2], held, json!({"scale": 2})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(next(&c, &s, &t[1]).await["done"], true);
    srv.stop().await;
    assert_eq!(Store::open(&db).unwrap().labels().unwrap().len(), 2);
}
