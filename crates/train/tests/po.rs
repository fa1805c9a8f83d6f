//! KTO, CPO (with SimPO) and ORPO end to end: TRL 1.16's own evaluate() numbers on the tiny
//! models (fixtures/golden/po-eval.json, from scripts/golden_po_eval.py), and each trainer
//! learning a synthetic preference on fresh samples.
use std::path::Path;

use preftune_train::config::load;
use preftune_train::dpo::cpo::{cpo_defaults, orpo_defaults, run_cpo, run_orpo, CpoArgs, OrpoArgs};
use preftune_train::dpo::kto::{self, KtoArgs};
use serde_json::Value;

mod common;
use common::*;

/// Runs one trainer (`kto`, `cpo`, `orpo`) with `--set`s.
fn run(trainer: &str, sets: &[String], eval_only: bool) -> Value {
    let r = match trainer {
        "kto" => kto::run(
            &load::<KtoArgs>(None, kto::defaults(), sets).unwrap(),
            false,
            eval_only,
        ),
        "cpo" => run_cpo(
            &load::<CpoArgs>(None, cpo_defaults(), sets).unwrap(),
            false,
            eval_only,
        ),
        "orpo" => run_orpo(
            &load::<OrpoArgs>(None, orpo_defaults(), sets).unwrap(),
            false,
            eval_only,
        ),
        other => panic!("{other}"),
    };
    r.unwrap_or_else(|e| panic!("{trainer}: {e}"))
}

#[test]
fn eval_only_matches_trl_evaluate() {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/po-eval.json")).unwrap(),
    )
    .unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    let mut positive_kl = 0;
    for case in cases {
        let trainer = case["trainer"].as_str().unwrap();
        let args = case["args"].as_object().unwrap();
        let data = fixtures().join("data").join(case["data"].as_str().unwrap());
        let mut sets = vec![
            format!("eval_file={}", data.display()),
            "per_device_eval_batch_size=16".into(),
            "output_dir=unused".into(),
        ];
        let policy = args
            .get("policy")
            .and_then(Value::as_str)
            .unwrap_or("tiny-llama");
        sets.push(format!("model_name_or_path={}", tiny(policy)));
        for (k, v) in args {
            match k.as_str() {
                "policy" => {}
                "ref_model" => sets.push(format!("ref_model={}", tiny(v.as_str().unwrap()))),
                _ => sets.push(format!("{k}={v}")),
            }
        }
        if trainer == "kto" && !args.contains_key("ref_model") {
            sets.push(format!("ref_model={}", tiny("tiny-qwen2")));
        }
        let got = run(trainer, &sets, true);
        let what = format!("{} {trainer} {:?}", case["data"], args);
        // CPO and ORPO average logits over the padded batch, preftune over completion tokens.
        let compared = compare_to_trl(&what, &case["metrics"], &got, |k| {
            trainer != "kto" && k.contains("logits/")
        });
        let want = match trainer {
            "kto" => 9,
            "orpo" => 10,
            _ => 8,
        };
        assert_eq!(compared, want, "{what}: every metric compared");
        positive_kl += (got["eval_kl"].as_f64().unwrap_or(0.0) > 0.1) as usize;
    }
    // The KL reference point itself is exercised, not only its clamp at 0.
    assert!(positive_kl >= 2, "{positive_kl} cases with a positive KL");
}

/// Each trainer learns "good" over "film" as the first completion token: on the training prompts
/// the preferred token's sampling rate rises many-fold, and the run's rewards separate.
#[test]
fn kto_cpo_simpo_and_orpo_learn_a_synthetic_preference() {
    let dir = tempfile::tempdir().unwrap();
    let (pairs, prompts) = synthetic_pairs(dir.path());
    let good = first_token(" good.");
    let before = rate(Path::new(&tiny("tiny-llama")), None, &prompts, good);
    for (trainer, extra, lr) in [
        ("kto", vec![], "3e-3"),
        ("cpo", vec![], "3e-3"),
        // CPO-SimPO (TRL's default cpo_alpha = 1): pure SimPO (cpo_alpha = 0) meets its margin by
        // pushing the rejected token down alone, which this rate does not see.
        ("cpo", vec!["loss_type=\"simpo\"", "beta=2.0"], "3e-3"),
        ("orpo", vec![], "3e-3"),
    ] {
        let out = dir.path().join(format!("{trainer}-{}", extra.len()));
        let mut sets = vec![
            format!("model_name_or_path={}", tiny("tiny-llama")),
            format!("train_file={}", pairs.display()),
            format!("output_dir={}", out.display()),
            "max_steps=30".into(),
            format!("learning_rate={lr}"),
            "per_device_train_batch_size=4".into(),
            "logging_steps=10".into(),
            "save_steps=1000".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        run(trainer, &sets, false);
        let after = rate(&out, None, &prompts, good);
        assert!(
            after > before + 0.08 && after > 10.0 * before,
            "{trainer} {extra:?}: P(first token = good): {before} -> {after}"
        );
        let last = last_metrics(&out);
        assert!(
            last["rewards/margins"].as_f64().unwrap() > 0.0,
            "{trainer} {extra:?}: {last}"
        );
    }
}
