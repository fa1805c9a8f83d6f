//! Judgements out as training data: preference rows (`prompt`, `chosen`, `rejected`, `margin`)
//! for `rm` and `dpo`, ranking rows (`prompt`, `responses` best first) for `rm` and PRO, or
//! unpaired rows (`prompt`, `completion`, `label`) for KTO.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::store::{Label, Mode};

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Keep "about the same" judgements as rows with margin 0 (and `"tie": true`); dropped by
    /// default, since a tie says nothing about which response to prefer.
    pub keep_ties: bool,
    /// One row per item instead of one per judgement: the mean scale of its judgements (pairs)
    /// or the mean rank of each response (rankings).
    pub aggregate: bool,
    /// Leave out items any annotator flagged unsafe.
    pub drop_unsafe: bool,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ExportReport {
    pub judgements: usize,
    pub rows: usize,
    pub ties_dropped: usize,
    pub unsafe_dropped: usize,
}

/// A response in the prompt's own kind: conversational prompts get an assistant message, as
/// TRL's conversational preference format (and our data crate) expect.
fn completion(prompt: &Value, text: &str) -> Value {
    if prompt.is_array() {
        json!([{"role": "assistant", "content": text}])
    } else {
        Value::String(text.to_string())
    }
}

pub fn export(labels: &[Label], opts: &ExportOptions) -> (Vec<Value>, ExportReport) {
    let mut report = ExportReport {
        judgements: labels.len(),
        ..Default::default()
    };
    let mut by_item: BTreeMap<i64, Vec<&Label>> = BTreeMap::new();
    for l in labels {
        by_item.entry(l.item_id).or_default().push(l);
    }
    let mut rows = vec![];
    for group in by_item.values() {
        if opts.drop_unsafe && group.iter().any(|l| l.unsafe_flag) {
            report.unsafe_dropped += group.len();
            continue;
        }
        let units: Vec<Vec<&Label>> = if opts.aggregate {
            vec![group.clone()]
        } else {
            group.iter().map(|l| vec![*l]).collect()
        };
        for unit in units {
            let first = unit[0];
            let annotators: Vec<&str> = unit.iter().map(|l| l.annotator.as_str()).collect();
            let unsafe_flag = unit.iter().any(|l| l.unsafe_flag);
            let who = if opts.aggregate {
                json!(annotators)
            } else {
                json!(annotators[0])
            };
            match first.mode {
                Mode::Pair => {
                    let choices: Vec<f64> = unit
                        .iter()
                        .filter_map(|l| l.choice)
                        .map(|c| c as f64)
                        .collect();
                    if choices.is_empty() {
                        continue;
                    }
                    let mean = choices.iter().sum::<f64>() / choices.len() as f64;
                    let (a, b) = (&first.responses[0], &first.responses[1]);
                    let tie = mean == 0.0;
                    if tie && !opts.keep_ties {
                        report.ties_dropped += unit.len();
                        continue;
                    }
                    let (chosen, rejected) = if mean >= 0.0 { (a, b) } else { (b, a) };
                    let mut row = json!({
                        "prompt": first.prompt,
                        "chosen": completion(&first.prompt, chosen),
                        "rejected": completion(&first.prompt, rejected),
                        "margin": mean.abs(),
                        "annotator": who,
                        "unsafe": unsafe_flag,
                    });
                    if tie {
                        row["tie"] = json!(true);
                    }
                    rows.push(row);
                }
                Mode::Thumbs => {
                    // Votes +1 / -1; with several judgements (aggregate) the majority decides.
                    let votes: Vec<i64> = unit.iter().filter_map(|l| l.choice).collect();
                    if votes.is_empty() {
                        continue;
                    }
                    let sum: i64 = votes.iter().sum();
                    if sum == 0 {
                        // An even split says nothing either way; KTO rows have no tie.
                        report.ties_dropped += unit.len();
                        continue;
                    }
                    rows.push(json!({
                        "prompt": first.prompt,
                        "completion": completion(&first.prompt, &first.responses[0]),
                        "label": sum > 0,
                        "annotator": who,
                        "unsafe": unsafe_flag,
                    }));
                }
                Mode::Rank => {
                    let k = first.responses.len();
                    // Mean rank of each response over the unit's judgements; stable on ties.
                    let mut rank_sum = vec![0.0; k];
                    let mut n = 0.0;
                    for l in &unit {
                        if let Some(r) = &l.ranking {
                            n += 1.0;
                            for (pos, &i) in r.iter().enumerate() {
                                rank_sum[i] += pos as f64;
                            }
                        }
                    }
                    if n == 0.0 {
                        continue;
                    }
                    let mut order: Vec<usize> = (0..k).collect();
                    order.sort_by(|&x, &y| rank_sum[x].total_cmp(&rank_sum[y]));
                    let responses: Vec<Value> = order
                        .iter()
                        .map(|&i| completion(&first.prompt, &first.responses[i]))
                        .collect();
                    rows.push(json!({
                        "prompt": first.prompt,
                        "responses": responses,
                        "annotator": who,
                        "unsafe": unsafe_flag,
                    }));
                }
            }
        }
    }
    report.rows = rows.len();
    (rows, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(item: i64, who: &str, choice: i64, unsafe_flag: bool) -> Label {
        Label {
            unsafe_flag,
            ..Label::test_pair(item, who, choice, 0)
        }
    }

    #[test]
    fn pairs_margins_ties_and_aggregation() {
        let labels = vec![
            pair(1, "ann", 2, false),
            pair(1, "bob", -1, false),
            pair(2, "ann", 0, false),
            pair(3, "ann", -3, true),
        ];
        let (rows, rep) = export(&labels, &ExportOptions::default());
        assert_eq!(rep.ties_dropped, 1);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (&rows[0]["chosen"], &rows[0]["margin"]),
            (&json!("A"), &json!(2.0))
        );
        assert_eq!(
            (&rows[1]["chosen"], &rows[1]["margin"]),
            (&json!("B"), &json!(1.0))
        );
        assert_eq!(rows[2]["unsafe"], json!(true));

        let (rows, rep) = export(
            &labels,
            &ExportOptions {
                aggregate: true,
                keep_ties: true,
                drop_unsafe: true,
            },
        );
        assert_eq!((rep.unsafe_dropped, rows.len()), (1, 2));
        assert_eq!(rows[0]["margin"], json!(0.5));
        assert_eq!(rows[0]["annotator"], json!(["ann", "bob"]));
        assert_eq!(rows[1]["tie"], json!(true));
    }

    /// Thumbs become KTO rows; aggregated, the majority decides and an even split is dropped.
    #[test]
    fn thumbs_become_kto_rows() {
        let thumb = |item: i64, who: &str, up: bool| Label {
            mode: Mode::Thumbs,
            responses: vec!["A".into()],
            ..pair(item, who, if up { 1 } else { -1 }, false)
        };
        let labels = vec![
            thumb(1, "ann", true),
            thumb(1, "bob", true),
            thumb(2, "ann", false),
            thumb(3, "ann", true),
            thumb(3, "bob", false),
        ];
        let (rows, rep) = export(&labels, &ExportOptions::default());
        assert_eq!((rows.len(), rep.ties_dropped), (5, 0));
        assert_eq!(
            (&rows[0]["completion"], &rows[0]["label"], &rows[2]["label"]),
            (&json!("A"), &json!(true), &json!(false))
        );
        let agg = ExportOptions {
            aggregate: true,
            ..Default::default()
        };
        let (rows, rep) = export(&labels, &agg);
        assert_eq!((rows.len(), rep.ties_dropped), (2, 2));
        assert_eq!(
            (&rows[0]["label"], &rows[1]["label"]),
            (&json!(true), &json!(false))
        );
    }

    #[test]
    fn rankings_best_first_and_conversational() {
        let mut l = pair(1, "ann", 0, false);
        l.mode = Mode::Rank;
        l.choice = None;
        l.responses = vec!["x".into(), "y".into(), "z".into()];
        l.ranking = Some(vec![2, 0, 1]);
        l.prompt = json!([{"role": "user", "content": "hi"}]);
        let (rows, _) = export(&[l], &ExportOptions::default());
        assert_eq!(
            rows[0]["responses"],
            json!([[{"role": "assistant", "content": "z"}],
                   [{"role": "assistant", "content": "x"}],
                   [{"role": "assistant", "content": "y"}]])
        );
    }
}
