//! Reward models end to end: learning a preference that holds on held-out prompts, the saved
//! layout, rankings, reward sources, Best-of-N and the resumable output.
use std::path::{Path, PathBuf};

use preftune_data::Text;
use preftune_eval::sources::{sample_and_score, ResumableJsonl, RewardSource, Sample};
use preftune_model::reward::normalization_for;
use preftune_model::{LoadOptions, Pretrained, SamplingConfig};
use preftune_train::config::load;
use preftune_train::reward::{defaults, load_split, run, RewardArgs};
use preftune_train::TrainingArguments;
use serde_json::{json, Value};

mod common;
use common::tiny;

fn write_pairs(path: &Path, subjects: &[&str]) {
    let rows: Vec<String> = subjects
        .iter()
        .map(|s| {
            json!({"prompt": format!("{s} was"), "chosen": " good.", "rejected": " film."})
                .to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n")).unwrap();
}

fn rm(sets: &[String], eval_only: bool) -> Value {
    let cfg = load::<RewardArgs>(None, defaults(), sets).unwrap();
    run(&cfg, false, eval_only).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn reward_model_learns_a_preference_that_holds_on_held_out_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let held_out = dir.path().join("held_out.jsonl");
    write_pairs(
        &train,
        &[
            "The movie",
            "The film",
            "This story",
            "The acting",
            "The music",
            "The ending",
            "The plot",
            "The cast",
            "The script",
            "The scene",
            "The score",
            "The show",
        ],
    );
    write_pairs(
        &held_out,
        &[
            "The camera",
            "The dialogue",
            "The pacing",
            "The sound",
            "The editing",
            "The director",
        ],
    );
    let out = dir.path().join("rm");
    let base = |model: &str| {
        vec![
            format!("model_name_or_path={model}"),
            format!("eval_file={}", held_out.display()),
            "per_device_eval_batch_size=3".to_string(),
        ]
    };
    // Before training: a fresh head is about as likely to prefer either response.
    let mut sets = base(&tiny("tiny-llama"));
    sets.extend([
        format!("train_file={}", train.display()),
        format!("output_dir={}", out.display()),
        "per_device_train_batch_size=4".into(),
        "learning_rate=1e-3".into(),
        "max_steps=30".into(),
        "logging_steps=5".into(),
        "save_steps=1000".into(),
        "center_rewards_coefficient=0.01".into(),
    ]);
    let summary = rm(&sets, false);
    let metrics: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for key in [
        "loss",
        "accuracy",
        "margin",
        "mean_reward",
        "std_reward",
        "grad_norm",
    ] {
        assert!(metrics[0].get(key).is_some(), "metrics.jsonl has {key}");
    }
    let first = metrics[0]["loss"].as_f64().unwrap();
    let last = metrics
        .iter()
        .rev()
        .find_map(|m| m["loss"].as_f64())
        .unwrap();
    assert!(last < 0.5 * first, "training loss {first} -> {last}");
    let eval = rm(&base(&out.display().to_string()), true);
    let acc = eval["eval_accuracy"].as_f64().unwrap();
    assert!(
        acc >= 0.99,
        "held-out accuracy {acc} (chance is 0.5): {eval}"
    );
    assert!(eval["eval_margin"].as_f64().unwrap() > 0.5);
    assert_eq!(summary["eval"]["eval_accuracy"], eval["eval_accuracy"]);

    // Saved as transformers' sequence classifier with one label, no LM head.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["id2label"], json!({"0": "LABEL_0"}));
    assert!(config["pad_token_id"].is_u64());
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(tensors["score.weight"].dims(), &[1, 64]);
    assert!(!tensors.contains_key("lm_head.weight"));

    // A reward source over the saved model ranks a held-out pair the same way.
    let src = RewardSource::parse(&format!("model:{}", out.display())).unwrap();
    let s = |r: &str| Sample {
        prompt: Text::Plain("The camera was".into()),
        response: r.into(),
        risky: false,
    };
    let r = src.score(&[s(" good."), s(" film.")]).unwrap();
    assert!(r[0] > r[1], "{r:?}");

    // Normalisation: gain and bias stored with the model give mean 0, std 1 on the reference set.
    let raw: Vec<f32> = [0.5f32, 1.5, 2.5, 3.5].to_vec();
    let (g, b) = normalization_for(&raw).unwrap();
    let z: Vec<f64> = raw.iter().map(|&x| g * x as f64 + b).collect();
    let mean = z.iter().sum::<f64>() / 4.0;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
    assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
    let mut p = Pretrained::load(&out, &LoadOptions::default()).unwrap();
    p.model.set_reward_normalization(2.0, -1.0);
    let norm_dir = dir.path().join("rm-norm");
    p.save(&norm_dir).unwrap();
    let src2 = RewardSource::parse(&format!("model:{}", norm_dir.display())).unwrap();
    let r2 = src2.score(&[s(" good."), s(" film.")]).unwrap();
    for (a, b) in r.iter().zip(&r2) {
        assert!((2.0 * a - 1.0 - b).abs() < 1e-5, "{a} -> {b}");
    }
}

#[test]
fn rankings_become_all_ordered_pairs_weighted_once_per_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank.jsonl");
    std::fs::write(
        &path,
        [
            json!({"prompt": "A", "responses": [" x", " y", " z"]}).to_string(),
            json!({"prompt": "B", "responses": [" u", " v"]}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let p = Pretrained::load(Path::new(&tiny("tiny-llama")), &LoadOptions::default()).unwrap();
    let (pairs, report) = load_split(&path, &TrainingArguments::default(), &p.tokenizer).unwrap();
    assert_eq!((report.prompts, report.pairs), (2, 4));
    let w: Vec<f64> = pairs.iter().map(|p| p.weight).collect();
    assert!((w[..3].iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
    assert_eq!(w[3], 1.0);
    // Best first: the first response beats both others, the second beats the third.
    let enc = |t: &str| p.tokenizer.encode(t, true).unwrap();
    let eos = p
        .tokenizer
        .decode(&[p.tokenizer.eos_token_id.unwrap()], false)
        .unwrap();
    assert_eq!(pairs[0].chosen, enc(&format!("A x{eos}")));
    assert_eq!(pairs[2].chosen, enc(&format!("A y{eos}")));
    assert_eq!(pairs[2].rejected, enc(&format!("A z{eos}")));
}

fn command_source(script: &str) -> RewardSource {
    RewardSource::parse(&format!("command:{script}")).unwrap()
}

#[test]
fn command_and_combined_sources() {
    let s = |resp: &str, risky: bool| Sample {
        prompt: Text::Plain("p".into()),
        response: resp.into(),
        risky,
    };
    // One number per line: the length of each JSON row.
    let len = command_source("awk '{print length($0)}'");
    let r = len.score(&[s("ab", false), s("abcd", false)]).unwrap();
    assert_eq!(r[1] - r[0], 2.0);
    let bad = command_source("echo 1");
    let e = bad
        .score(&[s("a", false), s("b", false)])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2 rows in, 1 numbers out"), "{e}");
    let nan = command_source("awk '{print \"x\"}'");
    let e = nan.score(&[s("a", false)]).err().unwrap().to_string();
    assert!(e.contains("output line 1"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("combine.toml");
    // safety: 0.1 when the response mentions "bomb", else 0.9; helpfulness: 5.
    std::fs::write(
        &file,
        r#"rule = "piecewise"
safety_threshold = 0.15
[sources]
safety = "command:awk '{print (index($0, \"bomb\") ? 0.1 : 0.9)}'"
helpfulness = "command:awk '{print 5}'"
"#,
    )
    .unwrap();
    let c = RewardSource::parse(&format!("combine:{}", file.display())).unwrap();
    let r = c
        .score(&[s("fine", false), s("a bomb", false), s("fine", true)])
        .unwrap();
    assert_eq!(r, vec![5.0, 0.1, 0.9], "helpful, unsafe, risky prompt");
    std::fs::write(
        &file,
        "rule = \"weighted_sum\"\n[sources]\na = \"command:awk '{print 1}'\"\nb = \"command:awk '{print 10}'\"\n[weights]\na = 0.5\nb = 0.25\n",
    )
    .unwrap();
    let c = RewardSource::parse(&format!("combine:{}", file.display())).unwrap();
    assert_eq!(c.score(&[s("x", false)]).unwrap(), vec![3.0]);
}

#[test]
fn best_of_n_beats_a_single_sample_under_the_same_reward() {
    let p = Pretrained::load(Path::new(&tiny("tiny-llama")), &LoadOptions::default()).unwrap();
    // Reward: the number of characters of the row (so: response length).
    let reward = command_source("awk '{print length($0)}'");
    let prompts: Vec<(Text, bool)> = ["The movie was", "I think", "It is", "We saw"]
        .iter()
        .map(|t| (Text::Plain(t.to_string()), false))
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 3,
        eos_token_ids: p.eos_token_ids(),
        pad_token_id: p.pad_token_id(),
        ..Default::default()
    };
    let mean_best = |n: usize| {
        let c = sample_and_score(&p, &reward, &prompts, n, &cfg).unwrap();
        c.iter().map(|c| c.rewards[c.best()]).sum::<f64>() / c.len() as f64
    };
    let (one, eight) = (mean_best(1), mean_best(8));
    assert!(eight > one, "best of 8: {eight}, single sample: {one}");
}

#[test]
fn resumable_output_drops_a_torn_line_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
    let mut out = ResumableJsonl::open(&path).unwrap();
    assert_eq!(out.done, 2);
    out.append(&[json!({"a": 3})]).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
    );
}

/// Against TRL's RewardTrainer (`fixtures/golden/rm-steps-tiny-llama.json`, from
/// `scripts/reference/golden_rm_steps.py`): from the score head transformers drew, the rewards
/// before training and every step's loss and gradient norm over six steps of one batch (so the
/// data order cannot matter). And a fresh head is drawn at TRL's scale, `initializer_range`: a
/// head twice as large made the first losses near 1.0 instead of ln 2 and lost 0.2 of held-out
/// accuracy on IMDb (issue 24).
#[test]
fn training_matches_trl_step_by_step_from_the_same_head() {
    use candle_core::{Device, Tensor};
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/golden/rm-steps-tiny-llama.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    // The tiny model with TRL's head, as a reward-model folder.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("rm-init");
    std::fs::create_dir_all(&model).unwrap();
    let src = PathBuf::from(tiny("tiny-llama"));
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let head = floats(&golden["score_head"]);
    let h = head.len();
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(head, (1, h), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, model.join("model.safetensors")).unwrap();

    // The rewards before training.
    let p = Pretrained::load(&model, &LoadOptions::default()).unwrap();
    assert!(p.model.has_score_head());
    let data =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/pairs-tiny.jsonl");
    let args = TrainingArguments {
        max_length: Some(64),
        ..Default::default()
    };
    let (pairs, _) = load_split(&data, &args, &p.tokenizer).unwrap();
    let seqs: Vec<&[u32]> = pairs
        .iter()
        .map(|x| x.chosen.as_slice())
        .chain(pairs.iter().map(|x| x.rejected.as_slice()))
        .collect();
    let (r, _) =
        preftune_eval::sources::score_sequences(&p.model, &seqs, p.pad_token_id(), &Device::Cpu)
            .unwrap();
    let r = r.to_vec1::<f32>().unwrap();
    let want: Vec<f32> = [
        floats(&golden["rewards_chosen"]),
        floats(&golden["rewards_rejected"]),
    ]
    .concat();
    let worst = r
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "initial rewards differ from TRL's by {worst}: {r:?} vs {want:?}"
    );

    // Six steps, one batch each.
    let out = dir.path().join("out");
    rm(
        &[
            format!("model_name_or_path={}", model.display()),
            format!("train_file={}", data.display()),
            format!("output_dir={}", out.display()),
            "learning_rate=1e-3".into(),
            "per_device_train_batch_size=8".into(),
            "max_steps=6".into(),
            "logging_steps=1".into(),
            "save_steps=100".into(),
        ],
        false,
    );
    let ours: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    let steps = golden["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len());
    for (i, (o, t)) in ours.iter().zip(steps).enumerate() {
        for key in ["loss", "grad_norm", "learning_rate"] {
            let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            // Six Adam steps compound float differences; 2% (or 1e-4 absolute) still tells a
            // changed loss, head, schedule or optimiser apart.
            assert!(
                (a - b).abs() <= 0.02 * b.abs() + 1e-4,
                "step {}: {key} {a} against TRL's {b}",
                i + 1
            );
        }
    }

    // A fresh head is drawn at transformers' scale: N(0, initializer_range).
    let mut fresh = Pretrained::load(&src, &LoadOptions::default()).unwrap();
    fresh.model.add_score_head(7).unwrap();
    let saved = dir.path().join("fresh");
    fresh.save(&saved).unwrap();
    let w = candle_core::safetensors::load(saved.join("model.safetensors"), &Device::Cpu).unwrap();
    let v = w["score.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let std = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
    let range = golden["initializer_range"].as_f64().unwrap();
    assert!(
        (std / range - 1.0).abs() < 0.25,
        "head std {std}, initializer_range {range}"
    );
}
