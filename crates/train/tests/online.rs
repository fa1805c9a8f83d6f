//! GRPO and RLOO on the tiny model with a programmatic reward (the number of digits in the
//! response): the mean reward rises clearly while the KL to the reference stays finite.
use std::path::PathBuf;

use preftune_eval::sources::RewardSource;
use preftune_model::Pretrained;
use preftune_train::rl::grpo_loss::{GrpoLossType, GrpoParams, ScaleRewards};
use preftune_train::rl::online::{Objective, OnlineReference, OnlineTrainer};
use preftune_train::rl::rollout::{load_prompts, RolloutArgs};
use preftune_train::trainer::{load_policy, train};
use preftune_train::TrainingArguments;
use serde_json::Value;

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/tiny-llama")
        .to_string_lossy()
        .into_owned()
}

fn digits() -> RewardSource {
    RewardSource::Function(Box::new(|s| {
        s.response.chars().filter(char::is_ascii_digit).count() as f64
    }))
}

/// Trains with `objective` for `steps` and returns the logged rewards and KLs per step.
fn run(objective: Objective, steps: usize, lr: f64) -> (Vec<f64>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let rows: Vec<String> = [
        "The movie was",
        "I think",
        "It is",
        "We saw",
        "She said",
        "Then",
    ]
    .iter()
    .map(|p| serde_json::json!({ "prompt": p }).to_string())
    .collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let args = TrainingArguments {
        model_name_or_path: tiny(),
        output_dir: dir.path().join("run"),
        learning_rate: lr,
        per_device_train_batch_size: 3,
        max_steps: steps as i64,
        logging_steps: 1,
        save_steps: 1000,
        seed: 1,
        ..Default::default()
    };
    let (policy, lora) = load_policy(&args, None).unwrap();
    let needs_ref = match &objective {
        Objective::Grpo { params, .. } => params.beta != 0.0,
        Objective::Rloo { beta, .. } => *beta != 0.0,
    };
    let reference = needs_ref.then(|| {
        OnlineReference::Model(Box::new(
            Pretrained::load(std::path::Path::new(&tiny()), &Default::default())
                .unwrap()
                .model,
        ))
    });
    let (train_prompts, _) = load_prompts(&prompts, &policy.tokenizer, None).unwrap();
    let mut algo = OnlineTrainer {
        train: train_prompts,
        eval: vec![],
        rollout: RolloutArgs {
            reward: "(function)".into(),
            num_generations: 8,
            max_completion_length: 8,
            ..Default::default()
        },
        objective,
        reward: digits(),
        reference,
        tokenizer: policy.tokenizer.clone(),
        eos_token_ids: policy.eos_token_ids(),
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
        seed: 1,
        samples_path: Some(dir.path().join("samples.jsonl")),
    };
    let table = toml::Table::new();
    train(&args, &table, policy, lora, None, &mut algo).unwrap();
    let m: Vec<Value> = std::fs::read_to_string(args.output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(m[0].get("completions/mean_length").is_some());
    let samples = std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap();
    assert_eq!(
        samples.lines().count(),
        steps * 3 * 8,
        "every sample is logged"
    );
    let col = |k: &str| m.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>();
    (col("reward"), col("kl"))
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn check(name: &str, rewards: &[f64]) {
    check_gain(name, rewards, 1.0)
}

/// The mean reward of the last fifth of the run is over 3x that of the first fifth and `gain` more.
fn check_gain(name: &str, rewards: &[f64], gain: f64) {
    let n = rewards.len();
    let (first, last) = (mean(&rewards[..n / 5]), mean(&rewards[n - n / 5..]));
    assert!(
        last > 3.0 * first.max(0.1) && last > first + gain,
        "{name}: mean reward {first:.3} -> {last:.3} ({rewards:?})"
    );
}

#[test]
fn grpo_raises_the_reward() {
    let (rewards, kl) = run(
        Objective::Grpo {
            params: GrpoParams {
                beta: 0.04,
                epsilon_low: 0.2,
                epsilon_high: 0.2,
                loss_type: GrpoLossType::Dapo,
                max_completion_length: 8,
            },
            scale: ScaleRewards::Group,
        },
        60,
        3e-3,
    );
    check("grpo", &rewards);
    assert!(
        !kl.is_empty() && kl.iter().all(|k| k.is_finite() && *k >= 0.0),
        "{kl:?}"
    );
}

#[test]
fn rloo_raises_the_reward() {
    let (rewards, kl) = run(
        Objective::Rloo {
            beta: 0.05,
            epsilon: 0.2,
            normalize_advantages: false,
            leave_one_out: true,
        },
        60,
        3e-3,
    );
    check("rloo", &rewards);
    assert!(!kl.is_empty() && kl.iter().all(|k| k.is_finite()), "{kl:?}");
}

#[test]
fn reinforce_raises_the_reward() {
    let (rewards, kl) = run(
        Objective::Rloo {
            beta: 0.05,
            epsilon: 0.2,
            normalize_advantages: false,
            leave_one_out: false,
        },
        60,
        3e-3,
    );
    check("reinforce", &rewards);
    assert!(kl.iter().all(|k| k.is_finite()), "{kl:?}");
}

/// The config names (TRL's) parse into GRPO's and RLOO's options; a misspelt key is refused, and
/// so is a GRPO-only key given to RLOO, as an unknown key.
#[test]
fn grpo_config_keys_and_unknown_keys() {
    use preftune_train::rl::{grpo, rloo};
    use preftune_train::Options;
    let cfg = grpo::GrpoArgs::load_config(
        None,
        grpo::defaults(),
        &[
            format!("model_name_or_path={}", tiny()),
            "num_generations=4".into(),
            "loss_type=\"dr_grpo\"".into(),
            "scale_rewards=\"batch\"".into(),
            "reward=\"command:echo 1\"".into(),
            "max_num_seqs=16".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.algo.common.num_generations, 4);
    // Continuous batching's bound reaches the sampler.
    let rollout = cfg.algo.common.rollout();
    let sampling = preftune_train::rl::rollout::sampling_config(&rollout, vec![2], 0, 1);
    assert_eq!(sampling.max_num_seqs, 16);
    assert_eq!(cfg.algo.own.loss_type, GrpoLossType::DrGrpo);
    assert_eq!(cfg.algo.own.scale_rewards, ScaleRewards::Batch);
    let rloo = rloo::RlooArgs::load_config(
        None,
        rloo::defaults(),
        &[format!("model_name_or_path={}", tiny())],
    )
    .unwrap();
    assert_eq!(
        (rloo.algo.common.beta, rloo.algo.common.num_generations),
        (0.05, 2)
    );
    let err = grpo::GrpoArgs::load_config(
        None,
        grpo::defaults(),
        &[
            format!("model_name_or_path={}", tiny()),
            "num_generation=4".into(),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("unknown key `num_generation`"), "{err}");
    let err = rloo::RlooArgs::load_config(
        None,
        rloo::defaults(),
        &[
            format!("model_name_or_path={}", tiny()),
            "loss_type=\"dapo\"".into(),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("unknown key `loss_type`"), "{err}");
    let err = grpo::GrpoArgs::load_config(
        None,
        grpo::defaults(),
        &[
            format!("model_name_or_path={}", tiny()),
            "loss_type=\"drgrpo\"".into(),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("loss_type: unknown variant `drgrpo`"), "{err}");
}

fn ppo_run(
    dir: &std::path::Path,
    steps: i64,
    resume_from: Option<(usize, PathBuf)>,
    shared: bool,
    mini_batches: usize,
    tweak: &dyn Fn(&mut preftune_train::rl::ppo::PpoArgs),
) -> Vec<Value> {
    use preftune_train::rl::ppo::{Ppo, PpoArgs};
    let prompts = dir.join("prompts.jsonl");
    let rows: Vec<String> = [
        "The movie was",
        "I think",
        "It is",
        "We saw",
        "She said",
        "Then",
        "Now",
        "A",
    ]
    .iter()
    .map(|p| serde_json::json!({ "prompt": p }).to_string())
    .collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let args = TrainingArguments {
        model_name_or_path: tiny(),
        output_dir: dir.join("run"),
        learning_rate: 1e-3,
        per_device_train_batch_size: 8,
        gradient_accumulation_steps: 2,
        max_steps: steps,
        logging_steps: 1,
        save_steps: 2,
        seed: 3,
        ..Default::default()
    };
    let (policy, lora) =
        load_policy(&args, resume_from.as_ref().map(|(_, p)| p.as_path())).unwrap();
    let reference = OnlineReference::Model(Box::new(
        Pretrained::load(std::path::Path::new(&tiny()), &Default::default())
            .unwrap()
            .model,
    ));
    let mut value = Pretrained::load(
        std::path::Path::new(&tiny()),
        &preftune_model::LoadOptions {
            trainable: true,
            ..Default::default()
        },
    )
    .unwrap()
    .model;
    value.add_score_head(3).unwrap();
    let (train_prompts, _) = load_prompts(&prompts, &policy.tokenizer, None).unwrap();
    let mut ppo_args = PpoArgs {
        max_completion_length: 8,
        temperature: 1.0,
        num_ppo_epochs: 4,
        num_mini_batches: mini_batches,
        kl_coef: 0.01,
        vf_coef: 1.0,
        ..Default::default()
    };
    tweak(&mut ppo_args);
    let mut algo = Ppo::new(
        &policy,
        ppo_args,
        digits(),
        reference,
        if shared {
            let h = preftune_model::reward::init_score_head(
                64,
                1.0 / 65f64.sqrt(),
                3,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            preftune_train::rl::ppo::ValueModel::Shared(candle_core::Var::from_tensor(&h).unwrap())
        } else {
            preftune_train::rl::ppo::ValueModel::Separate(Box::new(value))
        },
        train_prompts,
        3,
    );
    train(
        &args,
        &toml::Table::new(),
        policy,
        lora,
        resume_from,
        &mut algo,
    )
    .unwrap();
    std::fs::read_to_string(args.output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn ppo_raises_the_reward_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = ppo_run(dir.path(), 60, None, false, 1, &|_| {});
    for key in [
        "objective/kl",
        "objective/entropy",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/ratio",
        "val/num_eos_tokens",
    ] {
        assert!(m[0].get(key).is_some(), "metrics.jsonl has {key}");
    }
    let scores: Vec<f64> = m
        .iter()
        .filter_map(|r| r["objective/scores"].as_f64())
        .collect();
    check_gain("ppo", &scores, 0.4);
    assert!(m
        .iter()
        .all(|r| r["objective/kl"].as_f64().is_none_or(f64::is_finite)));

    // 4 straight steps against a run resumed from the straight run's checkpoint after step 2,
    // with a separate value model, with a value head on the policy, and with two shuffled
    // minibatches per epoch.
    for (shared, mini) in [(false, 1), (true, 1), (false, 2)] {
        let straight = tempfile::tempdir().unwrap();
        let m = ppo_run(straight.path(), 4, None, shared, mini, &|_| {});
        assert!(m
            .iter()
            .all(|r| r["loss/value_avg"].as_f64().is_none_or(f64::is_finite)));
        let ck = straight.path().join("run/checkpoint-2");
        let value_file = if shared {
            "value_head.safetensors"
        } else {
            "value_model/model.safetensors"
        };
        assert!(ck.join(value_file).exists() && ck.join("ppo_state.json").exists());
        let split = tempfile::tempdir().unwrap();
        ppo_run(split.path(), 4, Some((2, ck)), shared, mini, &|_| {});
        for file in ["model.safetensors", value_file] {
            let a = candle_core::safetensors::load(
                straight.path().join("run").join(file),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let b = candle_core::safetensors::load(
                split.path().join("run").join(file),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            for (k, t) in &a {
                let d = (t - &b[k])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    d < 1e-6,
                    "shared={shared}: {file} {k} differs by {d} after resume"
                );
            }
        }
    }
}

/// The adaptive KL controller: each step's logged `kl_coef` is the last one moved by TRL's rule
/// from the step's observed KL (16 rollouts a step over a horizon of 64).
#[test]
fn ppo_adaptive_kl_controller_moves_the_coefficient() {
    let dir = tempfile::tempdir().unwrap();
    let (target, horizon) = (0.002, 64.0);
    let m = ppo_run(dir.path(), 6, None, true, 1, &|a| {
        a.adap_kl_ctrl = true;
        a.kl_target = target;
        a.kl_horizon = horizon;
    });
    let col = |k: &str| -> Vec<f64> { m.iter().map(|r| r[k].as_f64().unwrap()).collect() };
    let (coef, kl) = (col("kl_coef"), col("objective/kl"));
    assert_eq!(coef[0], 0.01);
    for t in 0..coef.len() - 1 {
        let want =
            preftune_train::rl::ppo_loss::adaptive_kl_coef(coef[t], kl[t], target, 16.0, horizon);
        assert!(
            (coef[t + 1] - want).abs() < 1e-12 * want,
            "step {}: kl_coef {} after KL {}, want {want}",
            t + 2,
            coef[t + 1],
            kl[t]
        );
    }
    assert!(coef.windows(2).any(|w| w[0] != w[1]), "{coef:?}");
    // Fixed unless asked: the coefficient stays.
    let fixed = tempfile::tempdir().unwrap();
    let m = ppo_run(fixed.path(), 3, None, true, 1, &|_| {});
    assert!(m.iter().all(|r| r["kl_coef"] == 0.01));
}

/// `loss_variant = "kl_penalty"`: no clipping (clip fraction 0), and the KL term to the rollout
/// policy changes the update (its coefficient matters).
#[test]
fn ppo_kl_penalty_variant_replaces_clipping() {
    use preftune_train::rl::ppo::LossVariant;
    let run = |coef: f64| {
        let dir = tempfile::tempdir().unwrap();
        let m = ppo_run(dir.path(), 3, None, true, 1, &|a| {
            a.loss_variant = LossVariant::KlPenalty;
            a.kl_penalty_coef = coef;
            a.cliprange = 1e-6;
        });
        let w = candle_core::safetensors::load(
            dir.path().join("run/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        (m, w)
    };
    let (m, a) = run(5.0);
    for r in &m {
        assert_eq!(r["policy/clipfrac_avg"], 0.0, "{r}");
        assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
    }
    let (_, b) = run(0.0);
    let moved = a.iter().any(|(k, t)| {
        (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-6
    });
    assert!(moved, "kl_penalty_coef changed nothing");
}
