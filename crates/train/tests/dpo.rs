//! DPO end to end: TRL's own evaluate() numbers, a learned synthetic preference, the reference
//! options, and gradients through the whole model against finite differences.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use preftune_model::{token_logprobs, LoadOptions, Pretrained};
use preftune_train::config::load;
use preftune_train::dpo::{defaults, run, DpoArgs};
use serde_json::Value;

mod common;
use common::*;

fn dpo(sets: &[String], eval_only: bool) -> Value {
    let cfg = load::<DpoArgs>(None, defaults(), sets).unwrap();
    run(&cfg, false, eval_only).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn eval_only_matches_trl_evaluate() {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/dpo-eval.json")).unwrap(),
    )
    .unwrap();
    for case in g["cases"].as_array().unwrap() {
        let data = fixtures().join("data").join(case["data"].as_str().unwrap());
        let max_length = case["max_length"]
            .as_u64()
            .map_or("1000000".to_string(), |m| m.to_string());
        let sets = vec![
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("ref_model={}", tiny("tiny-qwen2")),
            format!("eval_file={}", data.display()),
            format!("loss_type={}", case["loss_type"].as_str().unwrap()),
            format!("beta={}", case["beta"]),
            format!("max_length={max_length}"),
            "per_device_eval_batch_size=16".into(),
        ];
        let got = dpo(&sets, true);
        let what = format!(
            "{} {} beta {} max_length {}",
            case["data"], case["loss_type"], case["beta"], max_length
        );
        let compared = compare_to_trl(&what, &case["metrics"], &got, |_| false);
        assert_eq!(compared, 10, "{what}: every metric compared");
    }
}

#[test]
fn dpo_raises_the_preferred_property_on_fresh_samples() {
    let dir = tempfile::tempdir().unwrap();
    let (pairs, fresh) = synthetic_pairs(dir.path());
    let good = first_token(" good.");
    assert_ne!(
        good,
        first_token(" film."),
        "the property must be visible in the first token"
    );
    let out = dir.path().join("out");
    let sets = vec![
        format!("model_name_or_path={}", tiny("tiny-llama")),
        format!("train_file={}", pairs.display()),
        format!("output_dir={}", out.display()),
        "max_steps=30".into(),
        "learning_rate=3e-3".into(),
        "per_device_train_batch_size=4".into(),
        "logging_steps=10".into(),
        "save_steps=1000".into(),
    ];
    let s = dpo(&sets, false);
    assert!(s["train_loss"].as_f64().unwrap() < 0.5, "{s}");
    let before = rate(Path::new(&tiny("tiny-llama")), None, &fresh, good);
    let after = rate(&out, None, &fresh, good);
    // DPO also widens the margin by lowering the rejected token (a known trait), so the preferred
    // rate rises from ~0.1% to tens of percent, not to 1.
    assert!(
        after > before + 0.08 && after > 10.0 * before,
        "P(first token = good) on fresh samples: {before} -> {after}"
    );
    let m: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = m.last().unwrap();
    assert_eq!(last["rewards/accuracies"], 1.0);
    assert!(last["rewards/margins"].as_f64().unwrap() > 1.0);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "completion_length/chosen",
        "completion_length/rejected",
    ] {
        assert!(last.get(k).is_some(), "metrics.jsonl has {k}");
    }
}

#[test]
fn precomputed_reference_is_cached_resumable_and_equivalent() {
    let dir = tempfile::tempdir().unwrap();
    let (pairs, _) = synthetic_pairs(dir.path());
    let base = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("model_name_or_path={}", tiny("tiny-qwen2")),
            format!("train_file={}", pairs.display()),
            format!("output_dir={}", dir.path().join(out).display()),
            "max_steps=4".into(),
            "learning_rate=1e-3".into(),
            "per_device_train_batch_size=4".into(),
            "logging_steps=1".into(),
            "save_steps=1000".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let live = dpo(&base("live", &[]), false);
    let pre = dpo(&base("pre", &["precompute_ref_log_probs=true"]), false);
    let cache_files = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("pairs.jsonl.ref-logps-")
            })
            .collect()
    };
    let caches = cache_files();
    assert_eq!(caches.len(), 1, "one cache file next to the dataset");
    let lines = std::fs::read_to_string(&caches[0]).unwrap().lines().count();
    assert_eq!(lines, 8);
    assert!(
        (live["train_loss"].as_f64().unwrap() - pre["train_loss"].as_f64().unwrap()).abs() < 1e-5,
        "{live} vs {pre}"
    );
    // Cut the cache short (an interrupted precomputation): the run completes it and trains the same.
    let text = std::fs::read_to_string(&caches[0]).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&caches[0], kept.join("\n") + "\n{\"i\": 5, \"logp").unwrap();
    let again = dpo(&base("again", &["precompute_ref_log_probs=true"]), false);
    assert!(
        (again["train_loss"].as_f64().unwrap() - pre["train_loss"].as_f64().unwrap()).abs() < 1e-6
    );
    // Other numerics (bf16 products) or other tokens (a shorter max_length) are other caches.
    dpo(
        &base("bf16", &["precompute_ref_log_probs=true", "bf16=true"]),
        false,
    );
    dpo(
        &base("short", &["precompute_ref_log_probs=true", "max_length=12"]),
        false,
    );
    assert_eq!(
        cache_files().len(),
        3,
        "bf16 and max_length each key their own cache"
    );
    // A LoRA policy's reference is its base: the same cache as the full model's, unless the base
    // is quantised.
    let lora = ["precompute_ref_log_probs=true", "use_peft=true"];
    dpo(&base("lora", &lora), false);
    assert_eq!(cache_files().len(), 3, "LoRA on the same base");
    dpo(
        &base("q8", &[&lora[..], &["load_in_8bit=true"]].concat()),
        false,
    );
    assert_eq!(
        cache_files().len(),
        4,
        "a quantised base keys its own cache"
    );
}

/// LoRA DPO on tiny-llama (with `extra` options) learns to prefer " good.", and its adapter on the
/// f32 base raises that token's rate on fresh prompts. Returns the pairs file.
fn lora_dpo_learns(dir: &Path, extra: &[&str]) -> PathBuf {
    let (pairs, fresh) = synthetic_pairs(dir);
    let out = dir.join("lora");
    let mut sets = vec![
        format!("model_name_or_path={}", tiny("tiny-llama")),
        format!("train_file={}", pairs.display()),
        format!("eval_file={}", pairs.display()),
        format!("output_dir={}", out.display()),
        "use_peft=true".into(),
        "lora_r=8".into(),
        "lora_target_modules=[\"all-linear\"]".into(),
        "lora_dropout=0.0".into(),
        "max_steps=30".into(),
        "learning_rate=5e-3".into(),
        "per_device_train_batch_size=4".into(),
        "save_steps=1000".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let s = dpo(&sets, false);
    assert!(out.join("adapter_model.safetensors").exists());
    assert!(
        s["eval"]["eval_rewards/accuracies"].as_f64().unwrap() > 0.99,
        "{extra:?}: {s}"
    );
    let good = first_token(" good.");
    let before = rate(Path::new(&tiny("tiny-llama")), None, &fresh, good);
    let after = rate(Path::new(&tiny("tiny-llama")), Some(&out), &fresh, good);
    assert!(
        after > before + 0.08 && after > 10.0 * before,
        "{extra:?}: {before} -> {after}"
    );
    pairs
}

#[test]
fn lora_dpo_uses_the_base_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    lora_dpo_learns(dir.path(), &[]);
}

/// QLoRA: LoRA DPO on a base that stays 4-bit (`load_in_4bit`) learns the preference, and its
/// adapter works on the full-precision base it was not trained on.
#[test]
fn lora_dpo_on_a_4bit_base_learns_and_transfers_to_the_full_base() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = lora_dpo_learns(
        dir.path(),
        &["load_in_4bit=true", "gradient_checkpointing=true"],
    );

    // A quantised base trains adapters only, and 4 and 8 bits are one choice.
    for (extra, want) in [
        (vec!["load_in_4bit=true"], "set use_peft = true"),
        (
            vec!["use_peft=true", "load_in_4bit=true", "load_in_8bit=true"],
            "not both",
        ),
    ] {
        let mut sets = vec![
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("train_file={}", pairs.display()),
            format!("output_dir={}", dir.path().join("bad").display()),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let e = load::<DpoArgs>(None, defaults(), &sets)
            .map_err(|e| e.to_string())
            .and_then(|cfg| run(&cfg, false, false).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(e.contains(want) && e.contains("load_in_4bit"), "{e}");
    }
}

#[test]
fn dpo_gradients_through_the_model_match_finite_differences() {
    fd_check(
        "tiny-llama",
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ],
    );
    // Mixtures of experts: through the routers' softmax and top-k weights, and the experts.
    fd_check(
        "tiny-mixtral",
        &[
            "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.experts.1.w1.weight",
            "model.layers.1.block_sparse_moe.experts.2.w2.weight",
        ],
    );
    fd_check(
        "tiny-qwen3moe",
        &[
            "model.layers.0.mlp.gate.weight",
            "model.layers.1.mlp.experts.3.up_proj.weight",
        ],
    );
    // Qwen2-MoE's shared expert and its sigmoid gate too.
    fd_check(
        "tiny-qwen2moe",
        &[
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.0.mlp.shared_expert.up_proj.weight",
            "model.layers.0.mlp.experts.2.down_proj.weight",
        ],
    );
}

/// Sigmoid DPO of `policy` against tiny-qwen2, in f64: d loss / d (the largest two gradients of
/// each named weight) by autograd and by central differences.
fn fd_check(policy: &str, names: &[&str]) {
    let opts = LoadOptions {
        dtype: DType::F64,
        trainable: true,
        ..Default::default()
    };
    let pol = Pretrained::load(Path::new(&tiny(policy)), &opts).unwrap();
    let reference = Pretrained::load(
        Path::new(&tiny("tiny-qwen2")),
        &LoadOptions {
            dtype: DType::F64,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = Device::Cpu;
    let ids = Tensor::new(
        &[[40u32, 41, 42, 43, 44, 45], [40, 41, 42, 50, 51, 3]],
        &dev,
    )
    .unwrap();
    let att = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[0u32, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]], &dev).unwrap();
    let beta = 0.5;
    let loss_of = |m: &preftune_model::Model| -> Tensor {
        let lp = |mm: &preftune_model::Model| {
            token_logprobs(
                mm,
                &mm.forward(&ids, Some(&att), None, None).unwrap(),
                &ids,
                &mask,
                1.0,
            )
            .unwrap()
            .sum
        };
        let (p, r) = (
            lp(m).to_dtype(DType::F64).unwrap(),
            lp(&reference.model).to_dtype(DType::F64).unwrap().detach(),
        );
        let d = ((p.get(0).unwrap() - r.get(0).unwrap()).unwrap()
            - (p.get(1).unwrap() - r.get(1).unwrap()).unwrap())
        .unwrap();
        // -log sigmoid(beta * d)
        let z = (d * beta).unwrap();
        (z.minimum(0.0).unwrap()
            - (z.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0)
                .unwrap()
                .log()
                .unwrap())
        .unwrap()
        .neg()
        .unwrap()
    };
    let grads = loss_of(&pol.model).backward().unwrap();
    for &name in names {
        let (_, w) = pol
            .model
            .named_params()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        let g = grads
            .get(&w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let var = candle_core::Var::from_tensor(&w).unwrap();
        // The element with the largest gradient, and one more.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &order[..2] {
            let eps = 1e-5;
            let mut plus = base.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, w.shape(), &dev).unwrap())
                .unwrap();
            let lp = loss_of(&pol.model).to_scalar::<f64>().unwrap();
            let mut minus = base.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, w.shape(), &dev).unwrap())
                .unwrap();
            let lm = loss_of(&pol.model).to_scalar::<f64>().unwrap();
            var.set(&Tensor::from_vec(base.clone(), w.shape(), &dev).unwrap())
                .unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-6 + 1e-4 * fd.abs(),
                "{policy} {name}[{i}]: autograd {} vs fd {fd}",
                g[i]
            );
            assert!(g[i].abs() > 1e-8, "{policy} {name}: a real gradient");
        }
    }
}

/// `reference_free` and `rpo_alpha` on one pair, in closed form from the evaluation's own
/// metrics: without a reference the implicit rewards are `beta` times the policy's log-probs and
/// the loss is `softplus(-margin)`; `rpo_alpha` adds `alpha` times the chosen tokens' mean NLL.
#[test]
fn reference_free_and_rpo_alpha_in_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.jsonl");
    let first = std::fs::read_to_string(fixtures().join("data/pairs-standard.jsonl")).unwrap();
    std::fs::write(&one, first.lines().next().unwrap()).unwrap();
    let beta = 0.3;
    let eval = |extra: &[&str]| -> Value {
        let mut sets = vec![
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("ref_model={}", tiny("tiny-qwen2")),
            format!("eval_file={}", one.display()),
            format!("beta={beta}"),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        dpo(&sets, true)
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    let free = eval(&["reference_free=true"]);
    for side in ["chosen", "rejected"] {
        let (r, lp) = (
            f(&free, &format!("eval_rewards/{side}")),
            f(&free, &format!("eval_logps/{side}")),
        );
        assert!(
            (r - beta * lp).abs() < 1e-4 * (1.0 + r.abs()),
            "{side}: {r} vs {lp}"
        );
    }
    let margin = f(&free, "eval_rewards/margins");
    let softplus = (1.0 + (-margin).exp()).ln();
    assert!((f(&free, "eval_loss") - softplus).abs() < 1e-4, "{free}");
    // With the reference the rewards differ: the reference was not ignored before.
    let with_ref = eval(&[]);
    assert!((f(&with_ref, "eval_rewards/chosen") - f(&free, "eval_rewards/chosen")).abs() > 1e-3);

    let alpha = 0.7;
    let rpo = eval(&[&format!("rpo_alpha={alpha}")]);
    let tokens = rpo["data"][0]["mean_chosen_tokens"].as_f64().unwrap();
    let nll = -f(&rpo, "eval_logps/chosen") / tokens;
    let added = f(&rpo, "eval_loss") - f(&with_ref, "eval_loss");
    assert!(
        (added - alpha * nll).abs() < 1e-4 * (1.0 + added.abs()),
        "rpo term {added}, alpha * NLL {}",
        alpha * nll
    );
}

/// PRO end to end on rankings (best first): the best response's rate rises and the worst's falls
/// on fresh samples; with `rpo_alpha`, PRO's SFT term adds `alpha` times the best response's
/// mean NLL to the loss (closed form from a reference-free evaluation of one ranking).
#[test]
fn pro_trains_on_rankings_with_its_sft_term() {
    let dir = tempfile::tempdir().unwrap();
    let (_, fresh) = synthetic_pairs(dir.path());
    let ranking = [" good.", " bad.", " film."];
    let ids: Vec<u32> = ranking.iter().map(|t| first_token(t)).collect();
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    let rows: Vec<String> = fresh
        .iter()
        .map(|p| serde_json::json!({"prompt": p, "responses": ranking}).to_string())
        .collect();
    let data = dir.path().join("rankings.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = dir.path().join("pro");
    let s = dpo(
        &[
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("train_file={}", data.display()),
            format!("output_dir={}", out.display()),
            "loss_type=pro".into(),
            "max_steps=30".into(),
            "learning_rate=3e-3".into(),
            "per_device_train_batch_size=4".into(),
            "logging_steps=10".into(),
            "save_steps=1000".into(),
        ],
        false,
    );
    assert!(s["train_loss"].as_f64().unwrap().is_finite(), "{s}");
    let base = Path::new(&tiny("tiny-llama")).to_path_buf();
    let (good0, good1) = (
        rate(&base, None, &fresh, ids[0]),
        rate(&out, None, &fresh, ids[0]),
    );
    let (film0, film1) = (
        rate(&base, None, &fresh, ids[2]),
        rate(&out, None, &fresh, ids[2]),
    );
    assert!(
        good1 > good0 + 0.08 && good1 > 5.0 * good0,
        "best: {good0} -> {good1}"
    );
    assert!(film1 < film0, "worst: {film0} -> {film1}");
    let last = last_metrics(&out);
    assert!(last["rewards/accuracies"].as_f64().unwrap() > 0.9, "{last}");

    let one = dir.path().join("one.jsonl");
    std::fs::write(&one, &rows[0]).unwrap();
    let beta = 0.5;
    let eval = |extra: Option<&str>| -> Value {
        let mut sets = vec![
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("ref_model={}", tiny("tiny-llama")),
            format!("eval_file={}", one.display()),
            "loss_type=pro".into(),
            "reference_free=true".into(),
            format!("beta={beta}"),
        ];
        sets.extend(extra.map(String::from));
        dpo(&sets, true)
    };
    let (plain, sft) = (eval(None), eval(Some("rpo_alpha=0.4")));
    let best_logp = plain["eval_rewards/best"].as_f64().unwrap() / beta;
    let tokens = plain["data"][0]["mean_chosen_tokens"].as_f64().unwrap();
    let added = sft["eval_loss"].as_f64().unwrap() - plain["eval_loss"].as_f64().unwrap();
    assert!(
        (added - 0.4 * (-best_logp / tokens)).abs() < 1e-4 * (1.0 + added.abs()),
        "SFT term {added}, want {}",
        0.4 * (-best_logp / tokens)
    );
}

/// TRL 1.16 adds a MoE model's load-balancing loss to DPO's, weighted by the config's
/// `router_aux_loss_coef` (0.001 here) or the one set: `eval_aux_loss` and `eval_loss` match its
/// `evaluate()` on the three MoE fixtures (`scripts/golden_router_aux.py`).
#[test]
fn moe_models_add_the_load_balancing_loss_as_trl_does() {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/router-aux.json")).unwrap(),
    )
    .unwrap();
    let data = fixtures().join("data/pairs-standard.jsonl");
    for case in g["dpo_eval"].as_array().unwrap() {
        let name = case["model"].as_str().unwrap();
        let mut sets = vec![
            format!("model_name_or_path={}", tiny(name)),
            format!("ref_model={}", tiny("tiny-qwen2")),
            format!("eval_file={}", data.display()),
            "beta=0.1".into(),
            "max_length=1000000".into(),
            "per_device_eval_batch_size=16".into(),
        ];
        if let Some(c) = case["router_aux_loss_coef"].as_f64() {
            sets.push(format!("router_aux_loss_coef={c}"));
        }
        let got = dpo(&sets, true);
        let what = format!("{name}, coefficient {}", case["router_aux_loss_coef"]);
        let compared = compare_to_trl(&what, &case["metrics"], &got, |_| false);
        assert_eq!(compared, 11, "{what}: every metric compared, aux_loss too");
    }
}

/// Training adds `coef x aux_loss` to the logged loss (the first step's, from the same weights),
/// and 0 turns it off; a dense model refuses a coefficient.
#[test]
fn training_logs_the_load_balancing_loss_and_dense_models_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("data/pairs-standard.jsonl");
    let first_step = |model: &str, coef: f64, checkpointing: bool| {
        let out = dir.path().join(format!("{model}-{coef}-{checkpointing}"));
        let sets = vec![
            format!("model_name_or_path={}", tiny(model)),
            format!("train_file={}", data.display()),
            format!("output_dir={}", out.display()),
            format!("router_aux_loss_coef={coef}"),
            format!("gradient_checkpointing={checkpointing}"),
            "max_steps=1".into(),
            "per_device_train_batch_size=2".into(),
            "gradient_accumulation_steps=2".into(),
            "logging_steps=1".into(),
            "save_steps=1000".into(),
        ];
        let cfg = load::<DpoArgs>(None, defaults(), &sets).unwrap();
        run(&cfg, false, false).map(|_| last_metrics(&out))
    };
    let off = first_step("tiny-mixtral", 0.0, false).unwrap();
    assert!(off.get("aux_loss").is_none(), "{off}");
    let norm = |m: &Value| m["grad_norm"].as_f64().unwrap();
    let mut on_norms = vec![];
    for checkpointing in [false, true] {
        let on = first_step("tiny-mixtral", 0.5, checkpointing).unwrap();
        let aux = on["aux_loss"].as_f64().unwrap();
        assert!(aux > 1.0, "top-2 of 4 experts: at least 1 ({aux})");
        let (a, b) = (on["loss"].as_f64().unwrap(), off["loss"].as_f64().unwrap());
        assert!(
            (a - b - 0.5 * aux).abs() < 1e-5,
            "{a} - {b} against 0.5 x {aux}"
        );
        on_norms.push(norm(&on));
    }
    // The term reaches the gradients, through checkpointed layers too: both runs agree within
    // rounding, and differ from the run without it by 0.2% (a lost term would put the
    // checkpointed run there).
    let (plain, ckpt, without) = (on_norms[0], on_norms[1], norm(&off));
    assert!(
        (plain - ckpt).abs() < 1e-4 * plain,
        "{plain} against {ckpt} checkpointed"
    );
    assert!(
        (plain - without).abs() > 1e-3 * without,
        "{plain} against {without} without"
    );
    let e = first_step("tiny-llama", 0.5, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("router_aux_loss_coef") && e.contains("not a mixture-of-experts"),
        "{e}"
    );
}
