//! SFT end to end on the tiny models: learning, saving, resuming, accumulation, LoRA, bad data.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use preftune_model::{LoadOptions, Pretrained};
use preftune_train::config::load;
use preftune_train::sft::{defaults, run, SftArgs};
use serde_json::Value;

mod common;
use common::tiny;

/// A small prompt-completion set the tiny models can memorise.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let qa = [
        ("Q: What color is the sky?\nA:", " Blue."),
        ("Q: What color is grass?\nA:", " Green."),
        ("Q: Is the movie good?\nA:", " Yes, the movie was good."),
        ("Q: Who made the film?\nA:", " A young director."),
        ("Q: Where did we watch it?\nA:", " At the cinema downtown."),
        ("Q: How was the music?\nA:", " The music was great."),
    ];
    let line =
        |(p, c): &(&str, &str)| serde_json::json!({"prompt": p, "completion": c}).to_string();
    let train = dir.join("train.jsonl");
    let eval = dir.join("eval.jsonl");
    std::fs::write(&train, qa.iter().map(line).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(
        &eval,
        qa[..3].iter().map(line).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    (train, eval)
}

fn sft(sets: &[String]) -> preftune_train::Result<Value> {
    let cfg = load::<SftArgs>(None, defaults(), sets)?;
    run(&cfg, false, false)
}

fn base_sets(model: &str, dir: &Path, out: &str) -> Vec<String> {
    let (train, eval) = write_data(dir);
    vec![
        format!("model_name_or_path={model}"),
        format!("train_file={}", train.display()),
        format!("eval_file={}", eval.display()),
        format!("output_dir={}", dir.join(out).display()),
        "learning_rate=3e-3".into(),
        "per_device_train_batch_size=3".into(),
        "logging_steps=1".into(),
        "seed=7".into(),
    ]
}

fn with(mut sets: Vec<String>, more: &[&str]) -> Vec<String> {
    sets.extend(more.iter().map(|s| s.to_string()));
    sets
}

fn weights(path: &Path, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path.join(file), &Device::Cpu).unwrap()
}

fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_learns_and_the_saved_model_reloads_identically() {
    for model in ["tiny-llama", "tiny-gpt2"] {
        let dir = tempfile::tempdir().unwrap();
        let sets = with(
            base_sets(&tiny(model), dir.path(), "out"),
            &["max_steps=24", "save_steps=8", "eval_steps=12"],
        );
        let summary = sft(&sets).unwrap();
        let out = dir.path().join("out");
        let m = metrics(&out);
        let losses: Vec<f64> = m.iter().filter_map(|r| r["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 24, "{model}: one record per logged step");
        assert!(
            losses[23] < 0.25 * losses[0],
            "{model}: loss {} -> {}",
            losses[0],
            losses[23]
        );
        for key in [
            "learning_rate",
            "grad_norm",
            "num_tokens",
            "epoch",
            "mean_token_accuracy",
        ] {
            assert!(m[0].get(key).is_some(), "{model}: metrics.jsonl has {key}");
        }
        assert!(
            m.iter()
                .any(|r| r["step"] == 12 && r.get("eval_loss").is_some()),
            "{model}: eval at step 12"
        );
        assert!(
            summary["eval"]["eval_loss"].as_f64().unwrap()
                < summary["train_loss"].as_f64().unwrap()
        );
        for ck in ["checkpoint-8", "checkpoint-16", "checkpoint-24"] {
            assert!(
                out.join(ck).join("trainer_state.json").exists(),
                "{model}: {ck}"
            );
        }
        assert!(out.join("config.toml").exists() && out.join("data_report.json").exists());
        // The final model at the root reloads (HF layout) and gives the trained logits.
        let p = Pretrained::load(&out, &LoadOptions::default()).unwrap();
        let ids = p
            .tokenizer
            .encode("Q: What color is the sky?\nA:", false)
            .unwrap();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = p.model.forward(&x, None, None, None).unwrap();
        let cfg = preftune_model::SamplingConfig {
            max_new_tokens: 10,
            temperature: 0.0,
            ..Default::default()
        };
        let answer = preftune_model::generate(&p.model, std::slice::from_ref(&ids), &cfg).unwrap();
        let text = p.tokenizer.decode(&answer.tokens[0], false).unwrap();
        assert!(
            text.starts_with(" Blue."),
            "{model}: it learned the answer, got {text:?}"
        );
        let ck = Pretrained::load(&out.join("checkpoint-24"), &LoadOptions::default()).unwrap();
        let h2 = ck.model.forward(&x, None, None, None).unwrap();
        assert_eq!(
            ck.model
                .logits(&h2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            p.model
                .logits(&h)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

/// 2N straight steps vs. N steps, a resume from the checkpoint, and N more.
fn check_resume(extra: &[&str], weights_file: &str) {
    let dir = tempfile::tempdir().unwrap();
    let straight = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "a"),
        &[&["max_steps=6", "save_steps=3"], extra].concat(),
    );
    sft(&straight).unwrap();
    let b = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "b"),
        &[&["max_steps=6", "save_steps=3"], extra].concat(),
    );
    sft(&b).unwrap();
    // Simulate a run killed after step 3: only checkpoint-3 survives.
    let out_b = dir.path().join("b");
    std::fs::remove_dir_all(out_b.join("checkpoint-6")).unwrap();
    std::fs::remove_file(out_b.join(weights_file)).unwrap();
    // A changed configuration is refused before anything loads: here the new train_file does
    // not exist, and the error is the changed key, not the missing file.
    let moved = with(b.clone(), &["train_file=nowhere.jsonl"]);
    let e = run(
        &load::<SftArgs>(None, defaults(), &moved).unwrap(),
        true,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("would not continue the same run") && e.contains("train_file"),
        "{e}"
    );
    let cfg = load::<SftArgs>(None, defaults(), &b).unwrap();
    let summary = run(&cfg, true, false).unwrap();
    assert_eq!(summary["resumed_from"], 3);
    let (wa, wb) = (
        weights(&dir.path().join("a"), weights_file),
        weights(&out_b, weights_file),
    );
    let d = max_diff(&wa, &wb);
    assert!(d < 1e-6, "resumed weights differ by {d}");
    // metrics.jsonl continues without duplicated steps.
    let steps: Vec<u64> = metrics(&out_b)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn resuming_gives_the_same_weights_as_a_straight_run() {
    check_resume(
        &[
            "gradient_accumulation_steps=2",
            "weight_decay=0.01",
            "warmup_steps=2",
        ],
        "model.safetensors",
    );
}

#[test]
fn lora_with_dropout_resumes_exactly_and_saves_a_peft_adapter() {
    check_resume(
        &[
            "use_peft=true",
            "lora_r=4",
            "lora_dropout=0.2",
            "lora_target_modules=[\"q_proj\", \"v_proj\", \"down_proj\"]",
        ],
        "adapter_model.safetensors",
    );
    let dir = tempfile::tempdir().unwrap();
    let sets = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "out"),
        &[
            "max_steps=20",
            "use_peft=true",
            "lora_r=8",
            "lora_alpha=16",
            "learning_rate=1e-2",
            "lora_target_modules=[\"all-linear\"]",
        ],
    );
    let s = sft(&sets).unwrap();
    let out = dir.path().join("out");
    assert!(
        out.join("adapter_config.json").exists() && !out.join("model.safetensors").exists(),
        "LoRA saves only the adapter"
    );
    let m = metrics(&out);
    let losses: Vec<f64> = m.iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert!(
        losses[losses.len() - 1] < 0.5 * losses[0],
        "LoRA learns: {losses:?}"
    );
    // The base is untouched; base + adapter reproduces the eval loss.
    let mut p = Pretrained::load(Path::new(&tiny("tiny-llama")), &LoadOptions::default()).unwrap();
    p.model.load_lora(&out, false).unwrap();
    let cfg = load::<SftArgs>(None, defaults(), &sets).unwrap();
    let (eval, _) = preftune_train::sft::load_split(
        &dir.path().join("eval.jsonl"),
        &cfg.args,
        &cfg.algo,
        &p.tokenizer,
    )
    .unwrap();
    let mut algo = preftune_train::sft::Sft {
        train: vec![],
        eval,
        pad_token_id: p.pad_token_id(),
        device: Device::Cpu,
    };
    let ev = preftune_train::evaluate(&cfg.args, &p.model, &mut algo).unwrap();
    let want = s["eval"]["eval_loss"].as_f64().unwrap();
    assert!(
        (ev["eval_loss"] - want).abs() < 1e-5,
        "{} vs {want}",
        ev["eval_loss"]
    );
}

#[test]
fn accumulation_normalises_by_tokens_like_one_big_batch() {
    // One step of batch 6 vs. accumulating 2 x 3 over the same 6 examples: the gradient is the
    // token-weighted mean either way. Adam's first step is scale-invariant, so compare the logged
    // gradient norm (before clipping), which is not.
    let dir = tempfile::tempdir().unwrap();
    let one = with(
        base_sets(&tiny("tiny-qwen2"), dir.path(), "one"),
        &[
            "max_steps=1",
            "per_device_train_batch_size=6",
            "max_grad_norm=0",
        ],
    );
    let two = with(
        base_sets(&tiny("tiny-qwen2"), dir.path(), "two"),
        &[
            "max_steps=1",
            "per_device_train_batch_size=3",
            "gradient_accumulation_steps=2",
            "max_grad_norm=0",
        ],
    );
    let (a, b) = (sft(&one).unwrap(), sft(&two).unwrap());
    let norm = |d: &str| {
        metrics(&dir.path().join(d))[0]["grad_norm"]
            .as_f64()
            .unwrap()
    };
    let (na, nb) = (norm("one"), norm("two"));
    assert!((na - nb).abs() < 1e-5 * na, "gradient norms {na} vs {nb}");
    assert!((a["train_loss"].as_f64().unwrap() - b["train_loss"].as_f64().unwrap()).abs() < 1e-5);
    let d = max_diff(
        &weights(&dir.path().join("one"), "model.safetensors"),
        &weights(&dir.path().join("two"), "model.safetensors"),
    );
    assert!(d < 1e-4, "accumulated step differs by {d}");
}

#[test]
fn bad_rows_are_refused_with_their_place_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sets = base_sets(&tiny("tiny-llama"), dir.path(), "out");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"Q: hi\", \"completion\": \" there\"}\n{\"prompt\": \"Q: x\", \"completion\": 5}\n{\"prompt\": \"Q: y\"}\n").unwrap();
    let refused = with(
        sets.clone(),
        &[&format!("train_file={}", bad.display()), "max_steps=1"],
    );
    let e = sft(&refused).unwrap_err().to_string();
    assert!(
        e.contains("2 invalid row(s)")
            && e.contains(&format!("{}:2: completion:", bad.display()))
            && e.contains(":3: completion: missing"),
        "{e}"
    );
    let skipped = with(refused, &["skip_invalid_rows=true"]);
    let s = sft(&skipped).unwrap();
    assert_eq!(s["data"][0]["skipped"], 2);
    assert_eq!(s["data"][0]["examples"], 1);
    let trunc = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "t"),
        &["max_length=12", "max_steps=1", "skip_invalid_rows=true"],
    );
    let s = sft(&trunc).unwrap();
    assert!(s["data"][0]["truncated"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn a_diverging_run_stops_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let sets = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "out"),
        &["max_steps=50", "learning_rate=1e9", "max_grad_norm=0"],
    );
    let e = sft(&sets).unwrap_err().to_string();
    assert!(e.contains("loss is") && e.contains("stopping"), "{e}");
}

/// Recomputing layers in backward changes memory, not the training trajectory.
#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run_with = |out: &str, ckpt: bool| {
        let sets = with(
            base_sets(&tiny("tiny-llama"), dir.path(), out),
            &[
                "max_steps=4",
                "use_peft=true",
                "lora_dropout=0.2",
                "save_steps=100",
                if ckpt {
                    "gradient_checkpointing=true"
                } else {
                    "gradient_checkpointing=false"
                },
            ],
        );
        sft(&sets).unwrap();
        weights(&dir.path().join(out), "adapter_model.safetensors")
    };
    let plain = run_with("plain", false);
    let recomputed = run_with("ckpt", true);
    let d = max_diff(&plain, &recomputed);
    assert!(d < 1e-5, "adapters differ by {d}");
    // Full fine-tuning: Adam turns float noise in near-zero gradients into lr-sized steps, so compare
    // what the steps saw (loss, gradient norm) rather than the weights.
    let full = |out: &str, ckpt: &str| {
        let sets = with(
            base_sets(&tiny("tiny-gpt2"), dir.path(), out),
            &["max_steps=3", "save_steps=100", ckpt],
        );
        sft(&sets).unwrap();
        metrics(&dir.path().join(out))
            .iter()
            .filter(|r| r.get("loss").is_some())
            .map(|r| {
                (
                    r["loss"].as_f64().unwrap(),
                    r["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let a = full("full-plain", "gradient_checkpointing=false");
    let b = full("full-ckpt", "gradient_checkpointing=true");
    assert_eq!(a.len(), 3);
    for ((la, ga), (lb, gb)) in a.iter().zip(&b) {
        assert!((la - lb).abs() < 1e-5 * la.abs(), "loss {la} vs {lb}");
        assert!((ga - gb).abs() < 1e-4 * ga.abs(), "grad_norm {ga} vs {gb}");
    }
}

/// `bf16 = true` (mixed precision): the loss curve follows f32's within bf16's rounding over ten
/// steps and still falls; `bf16` with bf16 weights is refused with its key.
#[test]
fn bf16_mixed_precision_follows_the_f32_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let curve = |out: &str, bf16: bool| {
        let sets = with(
            base_sets(&tiny("tiny-llama"), dir.path(), out),
            &["max_steps=10", "save_steps=100", &format!("bf16={bf16}")],
        );
        sft(&sets).unwrap();
        metrics(&dir.path().join(out))
            .iter()
            .filter_map(|r| r.get("loss").and_then(Value::as_f64))
            .collect::<Vec<_>>()
    };
    let f32_losses = curve("f32", false);
    let bf16_losses = curve("bf16", true);
    assert_eq!(f32_losses.len(), 10);
    assert_eq!(bf16_losses.len(), 10);
    for (step, (a, b)) in f32_losses.iter().zip(&bf16_losses).enumerate() {
        assert!(
            (a - b).abs() < 0.03 * a.abs(),
            "step {step}: loss {a} (f32) vs {b} (bf16)"
        );
    }
    assert_ne!(f32_losses, bf16_losses, "the bf16 products ran");
    assert!(
        bf16_losses[9] < 0.7 * bf16_losses[0],
        "bf16 learns: {bf16_losses:?}"
    );
    let bad = with(
        base_sets(&tiny("tiny-llama"), dir.path(), "bad"),
        &["bf16=true", "dtype=\"bf16\""],
    );
    let err = sft(&bad).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
}
