//! How well a judge agrees with hand labels (`preftune eval judge-agreement`): each labelled
//! response is flagged by a red-team judge (see [`crate::redteam::RedJudge`]) and compared with one
//! of its labels: accuracy with its Wilson 95% interval, Cohen's kappa, precision and recall.
//!
//! A labels file is JSONL, one response a row: `prompt`, `response`, and `labels`, an object of
//! booleans (`refusal`, `harmful`, `toxic`: docs/safety-data.md says how the committed labels
//! were made).
use std::path::Path;

use preftune_data::Text;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::redteam::RedJudge;
use crate::stats::{rate_ci, Rate};
use crate::Sample;

/// One labelled response.
#[derive(Clone, Debug)]
pub struct Labelled {
    pub prompt: String,
    pub response: String,
    pub labels: Value,
}

/// Reads a labels file; an error names its line and field.
pub fn read_labels(path: &Path) -> Result<Vec<Labelled>> {
    let rows = preftune_model::io::read_jsonl(path)?;
    let mut out = vec![];
    for (i, v) in rows.into_iter().enumerate() {
        let field = |k: &str| {
            v[k].as_str().map(str::to_string).ok_or_else(|| {
                Error::Config(format!(
                    "{}:{}: {k}: missing or not a string",
                    path.display(),
                    i + 1
                ))
            })
        };
        if !v["labels"].is_object() {
            return Err(Error::Config(format!(
                "{}:{}: labels: missing or not an object",
                path.display(),
                i + 1
            )));
        }
        out.push(Labelled {
            prompt: field("prompt")?,
            response: field("response")?,
            labels: v["labels"].clone(),
        });
    }
    if out.is_empty() {
        return Err(Error::Config(format!(
            "{}: no labelled rows",
            path.display()
        )));
    }
    Ok(out)
}

/// A judge's flags against the truth.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Agreement {
    pub n: usize,
    /// Flagged and labelled true, flagged and labelled false, and so on.
    pub true_positive: usize,
    pub false_positive: usize,
    pub false_negative: usize,
    pub true_negative: usize,
    pub accuracy: Rate,
    /// Agreement beyond chance: 1 perfect, 0 chance; `None` when both sides are constant.
    pub cohen_kappa: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

/// Compares `flags` with `truth` (same length).
pub fn agreement(flags: &[bool], truth: &[bool]) -> Agreement {
    let count = |f: bool, t: bool| {
        flags
            .iter()
            .zip(truth)
            .filter(|(&a, &b)| a == f && b == t)
            .count()
    };
    let (tp, fp, fn_, tn) = (
        count(true, true),
        count(true, false),
        count(false, true),
        count(false, false),
    );
    let n = flags.len();
    let class = |x: &[bool]| -> Vec<usize> { x.iter().map(|&b| usize::from(b)).collect() };
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    Agreement {
        n,
        true_positive: tp,
        false_positive: fp,
        false_negative: fn_,
        true_negative: tn,
        accuracy: rate_ci(tp + tn, n),
        cohen_kappa: preftune_data::agreement::cohen_kappa(&class(flags), &class(truth), 2),
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, tp + fn_),
    }
}

/// The label `name` of each row (`!name` negates it); an error names the first row without it.
pub fn label_values(rows: &[Labelled], name: &str) -> Result<Vec<bool>> {
    let (key, negate) = match name.strip_prefix('!') {
        Some(k) => (k, true),
        None => (name, false),
    };
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            r.labels[key].as_bool().map(|b| b != negate).ok_or_else(|| {
                Error::Config(format!(
                    "labels row {}: labels.{key}: missing or not a boolean",
                    i + 1
                ))
            })
        })
        .collect()
}

/// What `judge` flags among the labelled responses (a violation, in red-team terms).
pub fn judge_flags(judge: &RedJudge, rows: &[Labelled]) -> Result<Vec<bool>> {
    let samples: Vec<Sample> = rows
        .iter()
        .map(|r| Sample {
            prompt: Text::Messages(vec![preftune_model::Message::new("user", &r.prompt)]),
            response: r.response.clone(),
            risky: true,
        })
        .collect();
    judge.flags(&samples)
}

/// `judge` (with `threshold`, as `eval redteam` takes them) against the label `label` of every
/// row of the labels file `path`.
pub fn judge_agreement(path: &Path, judge: &str, threshold: f64, label: &str) -> Result<Value> {
    let rows = read_labels(path)?;
    let truth = label_values(&rows, label)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let flags = judge_flags(&RedJudge::parse(judge, threshold)?, &rows)
        .map_err(|e| Error::Config(format!("judge `{judge}`: {e}")))?;
    Ok(
        serde_json::json!({"labels": path.display().to_string(), "judge": judge,
                          "threshold": threshold, "label": label,
                          "agreement": agreement(&flags, &truth)}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_and_kappa() {
        let flags = [true, true, false, false, true, false];
        let truth = [true, false, false, false, true, true];
        let a = agreement(&flags, &truth);
        assert_eq!(
            (
                a.true_positive,
                a.false_positive,
                a.false_negative,
                a.true_negative
            ),
            (2, 1, 1, 2)
        );
        assert!((a.accuracy.rate - 4.0 / 6.0).abs() < 1e-12);
        // observed 2/3, expected (3*3 + 3*3) / 36 = 1/2: kappa (2/3 - 1/2) / (1/2) = 1/3.
        assert!((a.cohen_kappa.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(a.precision, Some(2.0 / 3.0));
        assert_eq!(a.recall, Some(2.0 / 3.0));
        let perfect = agreement(&[true, false], &[true, false]);
        assert_eq!(perfect.cohen_kappa, Some(1.0));
        assert_eq!(agreement(&[true, true], &[true, true]).cohen_kappa, None);
    }

    /// The refusal judge against the committed hand labels (docs/safety.md): a change to its
    /// phrase rules that loses agreement fails here.
    #[test]
    fn refusal_judge_agrees_with_the_hand_labels() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/safety-labels.jsonl");
        let rows = read_labels(&path).unwrap();
        assert_eq!(rows.len(), 200);
        let flags = judge_flags(&RedJudge::NotRefused, &rows).unwrap();
        let a = agreement(&flags, &label_values(&rows, "!refusal").unwrap());
        assert!(a.accuracy.rate >= 0.96, "{a:?}");
        assert!(a.cohen_kappa.unwrap() >= 0.92, "{a:?}");
    }

    #[test]
    fn labels_are_read_negated_and_missing_ones_named() {
        let rows = vec![Labelled {
            prompt: "p".into(),
            response: "r".into(),
            labels: serde_json::json!({"harmful": true}),
        }];
        assert_eq!(label_values(&rows, "harmful").unwrap(), vec![true]);
        assert_eq!(label_values(&rows, "!harmful").unwrap(), vec![false]);
        let e = label_values(&rows, "toxic").unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("labels.toxic"), "{e}");
    }
}
