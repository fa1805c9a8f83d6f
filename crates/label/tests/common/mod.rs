//! A labelling server on a loopback port over a fresh database, for the HTTP and browser tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use preftune_label::{ImportOptions, Mode, Store};
use serde_json::json;

pub struct Server {
    pub url: String,
    pub db: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Starts serving `db` (which must exist) on 127.0.0.1 with an OS-chosen port.
    pub async fn start(db: &Path) -> Server {
        Self::start_with(db, preftune_label::net::ServeOptions::default()).await
    }

    /// [`Server::start`] with other limits or session lifetime.
    pub async fn start_with(db: &Path, opts: preftune_label::net::ServeOptions) -> Server {
        let store = Store::open(db).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(preftune_label::server::serve_on(
            store,
            listener,
            opts,
            async {
                let _ = rx.await;
            },
        ));
        Server {
            url,
            db: db.to_path_buf(),
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Stops the server and waits until it has let go of the database.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

/// Writes a candidates file: `n` prompts with `k` responses each.
pub fn candidates(dir: &Path, name: &str, n: usize, k: usize) -> PathBuf {
    let p = dir.join(name);
    let rows: String = (0..n)
        .map(|i| {
            let responses: Vec<String> = (0..k)
                .map(|j| format!("response {j} to prompt {i}"))
                .collect();
            format!(
                "{}\n",
                json!({"prompt": format!("prompt {i}"), "responses": responses,
                                   "sampling": {"temperature": 1.0}})
            )
        })
        .collect();
    std::fs::write(&p, rows).unwrap();
    p
}

/// A database with the candidates imported and the named annotators (first one admin);
/// returns their tokens.
pub fn setup(db: &Path, cands: &Path, mode: Mode, overlap: f64, names: &[&str]) -> Vec<String> {
    let mut s = Store::open(db).unwrap();
    s.import(
        cands,
        &ImportOptions {
            mode,
            overlap,
            overlap_copies: 2,
            seed: 0,
        },
    )
    .unwrap();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| s.add_annotator(n, i == 0).unwrap())
        .collect()
}

/// A temporary folder with a database of `n` prompts x `k` responses and the named annotators
/// (see [`setup`]); keep the folder alive while the database is used.
pub fn fresh(
    n: usize,
    k: usize,
    mode: Mode,
    overlap: f64,
    names: &[&str],
) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let cands = candidates(dir.path(), "c.jsonl", n, k);
    let tokens = setup(&db, &cands, mode, overlap, names);
    (dir, db, tokens)
}
