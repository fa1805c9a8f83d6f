//! Helpers shared by the trainer tests: the fixtures, and the synthetic preference (" good." over
//! " film." as the first completion token) that the preference trainers must learn.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use preftune_model::{generate, LoadOptions, Pretrained, SamplingConfig};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn tiny(name: &str) -> String {
    fixtures()
        .join("models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Rate at which sampled continuations of the prompts start with `token`.
pub fn rate(model_dir: &Path, adapter: Option<&Path>, prompts: &[String], token: u32) -> f64 {
    let mut p = Pretrained::load(model_dir, &LoadOptions::default()).unwrap();
    if let Some(a) = adapter {
        p.model.load_lora(a, false).unwrap();
    }
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|t| p.tokenizer.encode(t, false).unwrap())
        .collect();
    let (mut hit, mut n) = (0, 0);
    for seed in 0..40 {
        let cfg = SamplingConfig {
            max_new_tokens: 1,
            temperature: 1.0,
            seed,
            pad_token_id: p.pad_token_id(),
            ..Default::default()
        };
        let out = generate(&p.model, &ids, &cfg).unwrap();
        hit += out.tokens.iter().filter(|t| t[0] == token).count();
        n += out.tokens.len();
    }
    hit as f64 / n as f64
}

pub fn synthetic_pairs(dir: &Path) -> (PathBuf, Vec<String>) {
    // Prefer " good." over " film.": single tokens in the tiny vocabulary, so the pair differs exactly
    // at the first completion token (the property measured).
    let subjects = [
        "The movie",
        "The film",
        "This story",
        "The acting",
        "The music",
        "The ending",
        "The plot",
        "The cast",
    ];
    let rows: Vec<String> = subjects
        .iter()
        .map(|s| serde_json::json!({"prompt": format!("{s} was"), "chosen": " good.", "rejected": " film."}).to_string())
        .collect();
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, rows.join("\n")).unwrap();
    // Fresh samples (40 seeds per prompt) from the training prompts: the tiny random model does not
    // generalise to unseen prompts, so that would test the model, not DPO.
    let prompts = subjects.iter().map(|s| format!("{s} was")).collect();
    (path, prompts)
}

pub fn first_token(text: &str) -> u32 {
    let p = Pretrained::load(Path::new(&tiny("tiny-llama")), &LoadOptions::default()).unwrap();
    p.tokenizer.encode(text, false).unwrap()[0]
}

/// Compares preftune's `--eval-only` summary `got` with TRL's `evaluate()` metrics `want` to 1e-4
/// (relative above 1), leaving out what is not a model output (timing, TRL's token counter,
/// entropy, which preftune does not compute) and whatever `skip` names; returns how many were
/// compared.
pub fn compare_to_trl(
    what: &str,
    want: &serde_json::Value,
    got: &serde_json::Value,
    skip: impl Fn(&str) -> bool,
) -> usize {
    let mut compared = 0;
    for (k, w) in want.as_object().unwrap() {
        let not_output = [
            "runtime",
            "per_second",
            "num_tokens",
            "entropy",
            "preparation_time",
        ]
        .iter()
        .any(|s| k.contains(s));
        if not_output || skip(k) {
            continue;
        }
        let (w, v) = (
            w.as_f64().unwrap(),
            got[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: {k} missing in {got}")),
        );
        assert!(
            (w - v).abs() < 1e-4 * (1.0 + w.abs()),
            "{what}: {k} = {v}, TRL {w}"
        );
        compared += 1;
    }
    compared
}

/// The last line of a run's `metrics.jsonl`.
pub fn last_metrics(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}
