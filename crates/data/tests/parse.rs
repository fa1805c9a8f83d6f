//! Validation and conversion of rows into the TRL dataset formats.
use std::path::PathBuf;
use std::sync::Arc;

use preftune_data::{parse_examples, ColumnMap, Example, Format, Location, Row, Text};
use preftune_model::Message;
use serde_json::{json, Value};

fn rows(values: Vec<Value>) -> Vec<Row> {
    let file = Arc::new(PathBuf::from("data.jsonl"));
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| Row {
            loc: Location {
                file: file.clone(),
                line: i + 1,
            },
            value,
        })
        .collect()
}

/// Parses rows that must all be valid.
fn ok(format: Format, values: Vec<Value>) -> Vec<Example> {
    ok_with(format, &ColumnMap::default(), values)
}

fn ok_with(format: Format, columns: &ColumnMap, values: Vec<Value>) -> Vec<Example> {
    let (good, bad) = parse_examples(&rows(values), format, columns);
    assert!(
        bad.is_empty(),
        "unexpected errors: {:?}",
        bad.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    good.into_iter().map(|(_, ex)| ex).collect()
}

/// The rendered error of one bad row.
fn err(format: Format, value: Value) -> String {
    err_with(format, &ColumnMap::default(), value)
}

fn err_with(format: Format, columns: &ColumnMap, value: Value) -> String {
    let (good, bad) = parse_examples(&rows(vec![value]), format, columns);
    assert!(good.is_empty(), "row was accepted: {good:?}");
    assert_eq!(bad.len(), 1);
    bad[0].to_string()
}

fn plain(s: &str) -> Text {
    Text::Plain(s.into())
}

fn msgs(list: &[(&str, &str)]) -> Text {
    Text::Messages(list.iter().map(|(r, c)| Message::new(r, c)).collect())
}

#[test]
fn language_modeling_standard_and_conversational() {
    let got = ok(
        Format::LanguageModeling,
        vec![
            json!({"text": "The sky is blue."}),
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        ],
    );
    assert_eq!(
        got,
        [
            Example::LanguageModeling {
                text: plain("The sky is blue.")
            },
            Example::LanguageModeling {
                text: msgs(&[("user", "Hi"), ("assistant", "Hello")])
            },
        ]
    );
}

#[test]
fn language_modeling_without_text_or_messages_reports_text() {
    assert_eq!(
        err(Format::LanguageModeling, json!({"other": 1})),
        "data.jsonl:1: text: missing field"
    );
}

#[test]
fn prompt_only_and_prompt_completion() {
    assert_eq!(
        ok(Format::PromptOnly, vec![json!({"prompt": "Why?"})]),
        [Example::PromptOnly {
            prompt: plain("Why?")
        }]
    );
    let got = ok(
        Format::PromptCompletion,
        vec![
            json!({"prompt": "The sky is", "completion": " blue.", "id": 7}),
            json!({"prompt": [{"role": "user", "content": "Sky?"}],
                   "completion": [{"role": "assistant", "content": "Blue."}]}),
        ],
    );
    assert_eq!(
        got,
        [
            Example::PromptCompletion {
                prompt: plain("The sky is"),
                completion: plain(" blue.")
            },
            Example::PromptCompletion {
                prompt: msgs(&[("user", "Sky?")]),
                completion: msgs(&[("assistant", "Blue.")])
            },
        ]
    );
}

#[test]
fn columns_are_remapped_and_errors_name_the_dataset_column() {
    let columns = ColumnMap::new([("prompt", "question"), ("completion", "answer")]);
    let got = ok_with(
        Format::PromptCompletion,
        &columns,
        vec![json!({"question": "2+2?", "answer": "4"})],
    );
    assert_eq!(
        got,
        [Example::PromptCompletion {
            prompt: plain("2+2?"),
            completion: plain("4")
        }]
    );
    assert_eq!(
        err_with(
            Format::PromptCompletion,
            &columns,
            json!({"question": "2+2?"})
        ),
        "data.jsonl:1: answer: missing field"
    );
    assert_eq!(
        err_with(
            Format::PromptCompletion,
            &columns,
            json!({"question": "2+2?", "completion": "4"})
        ),
        "data.jsonl:1: answer: missing field"
    );
}

#[test]
fn preference_explicit_prompt_with_margin() {
    let got = ok(
        Format::Preference,
        vec![
            json!({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green.", "margin": 1.5}),
            json!({"prompt": [{"role": "user", "content": "Sky?"}],
                   "chosen": [{"role": "assistant", "content": "Blue."}],
                   "rejected": [{"role": "assistant", "content": "Green."}]}),
        ],
    );
    assert_eq!(
        got,
        [
            Example::Preference {
                prompt: plain("Sky?"),
                chosen: plain("Blue."),
                rejected: plain("Green."),
                margin: Some(1.5)
            },
            Example::Preference {
                prompt: msgs(&[("user", "Sky?")]),
                chosen: msgs(&[("assistant", "Blue.")]),
                rejected: msgs(&[("assistant", "Green.")]),
                margin: None,
            },
        ]
    );
}

#[test]
fn preference_implicit_prompt_is_split_at_the_common_prefix() {
    let got = ok(
        Format::Preference,
        vec![json!({
            "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"},
                       {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"},
                         {"role": "assistant", "content": "Green."}, {"role": "user", "content": "Sure?"},
                         {"role": "assistant", "content": "Yes."}],
        })],
    );
    assert_eq!(
        got,
        [Example::Preference {
            prompt: msgs(&[("system", "Be brief."), ("user", "Sky?")]),
            chosen: msgs(&[("assistant", "Blue.")]),
            rejected: msgs(&[
                ("assistant", "Green."),
                ("user", "Sure?"),
                ("assistant", "Yes.")
            ]),
            margin: None,
        }]
    );
}

#[test]
fn preference_implicit_prompt_errors() {
    // Plain strings are split as TRL's `extract_prompt` splits them; identical ones are refused.
    let got = ok(
        Format::Preference,
        vec![
            json!({"chosen": "Sky? Blue.", "rejected": "Sky? Green."}),
            json!({"chosen": "I liked it", "rejected": "It was dull"}),
            json!({"chosen": "good", "rejected": "bad"}),
        ],
    );
    let split = |p: &str, c: &str, r: &str| Example::Preference {
        prompt: plain(p),
        chosen: plain(c),
        rejected: plain(r),
        margin: None,
    };
    assert_eq!(
        got,
        [
            split("Sky?", " Blue.", " Green."),
            split("I", " liked it", "t was dull"),
            split("", "good", "bad"),
        ]
    );
    let e = err(
        Format::Preference,
        json!({"chosen": "Same.", "rejected": "Same."}),
    );
    assert_eq!(e, "data.jsonl:1: rejected: is the same text as `chosen`");
    // Nothing in common.
    let e = err(
        Format::Preference,
        json!({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
               "rejected": [{"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}),
    );
    assert_eq!(
        e,
        "data.jsonl:1: chosen: no `prompt` column, and `chosen` and `rejected` share no leading messages to use as the prompt"
    );
    // The shared part swallows chosen's final answer.
    let e = err(
        Format::Preference,
        json!({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
               "rejected": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                            {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}),
    );
    assert!(
        e.starts_with(
            "data.jsonl:1: chosen: its last assistant message (message [1]) is part of the prompt"
        ),
        "{e}"
    );
}

#[test]
fn unpaired_needs_a_boolean_label() {
    let got = ok(
        Format::Unpaired,
        vec![json!({"prompt": "Sky?", "completion": "Blue.", "label": true})],
    );
    assert_eq!(
        got,
        [Example::Unpaired {
            prompt: plain("Sky?"),
            completion: plain("Blue."),
            label: true
        }]
    );
    assert_eq!(
        err(
            Format::Unpaired,
            json!({"prompt": "Sky?", "completion": "Blue.", "label": 1})
        ),
        "data.jsonl:1: label: expected true or false, found a number"
    );
}

#[test]
fn ranking_is_sorted_by_score_descending_and_stable() {
    let got = ok(
        Format::Ranking,
        vec![
            json!({"prompt": "Sky?", "responses": ["a", "b", "c", "d"], "scores": [0.1, 0.9, 0.5, 0.9]}),
            json!({"prompt": "Sky?", "responses": ["best", "worst"]}),
        ],
    );
    assert_eq!(
        got,
        [
            Example::Ranking {
                prompt: plain("Sky?"),
                responses: vec![plain("b"), plain("d"), plain("c"), plain("a")],
                scores: Some(vec![0.9, 0.9, 0.5, 0.1]),
            },
            Example::Ranking {
                prompt: plain("Sky?"),
                responses: vec![plain("best"), plain("worst")],
                scores: None
            },
        ]
    );
}

#[test]
fn ranking_errors() {
    assert_eq!(
        err(
            Format::Ranking,
            json!({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]})
        ),
        "data.jsonl:1: scores: has 1 scores but `responses` has 2 responses"
    );
    assert_eq!(
        err(Format::Ranking, json!({"prompt": "p", "responses": ["a"]})),
        "data.jsonl:1: responses: needs at least 2 responses, found 1"
    );
    assert_eq!(
        err(
            Format::Ranking,
            json!({"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]})
        ),
        "data.jsonl:1: scores: score [1]: expected a number, found a string"
    );
    assert_eq!(
        err(
            Format::Ranking,
            json!({"prompt": "p", "responses": ["a", ""]})
        ),
        "data.jsonl:1: responses: response [1]: empty string"
    );
}

#[test]
fn error_classes_render_as_file_line_field_message() {
    let pc = Format::PromptCompletion;
    assert_eq!(
        err(pc, json!({"prompt": "p"})),
        "data.jsonl:1: completion: missing field"
    );
    assert_eq!(
        err(pc, json!({"prompt": "p", "completion": null})),
        "data.jsonl:1: completion: missing field (the value is null)"
    );
    assert_eq!(
        err(pc, json!({"prompt": 3, "completion": "c"})),
        "data.jsonl:1: prompt: expected a string or a list of messages, found a number"
    );
    assert_eq!(
        err(pc, json!({"prompt": "p", "completion": ""})),
        "data.jsonl:1: completion: empty string"
    );
    assert_eq!(
        err(pc, json!({"prompt": "p", "completion": []})),
        "data.jsonl:1: completion: empty message list"
    );
    assert_eq!(
        err(
            pc,
            json!({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": ""}]})
        ),
        "data.jsonl:1: completion: message [0]: empty content"
    );
    assert_eq!(
        err(pc, json!({"prompt": [{"role": "human", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]})),
        "data.jsonl:1: prompt: message [0]: role \"human\" is not one of system, user, assistant, tool"
    );
    assert_eq!(
        err(
            pc,
            json!({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "c"}]})
        ),
        "data.jsonl:1: prompt: message [0]: missing `content`"
    );
    assert_eq!(
        err(pc, json!({"prompt": ["hi"], "completion": [{"role": "assistant", "content": "c"}]})),
        "data.jsonl:1: prompt: message [0]: expected a message object with `role` and `content`, found a string"
    );
    assert_eq!(
        err(pc, json!({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]})),
        "data.jsonl:1: completion: is a list of messages but `prompt` is a string; use plain strings for both or messages for both"
    );
    assert_eq!(
        err(
            Format::Preference,
            json!({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"})
        ),
        "data.jsonl:1: margin: expected a number, found a string"
    );
}

#[test]
fn good_and_bad_rows_are_separated_in_order() {
    let (good, bad) = parse_examples(
        &rows(vec![
            json!({"text": "a"}),
            json!({"text": 1}),
            json!({"text": "c"}),
        ]),
        Format::LanguageModeling,
        &ColumnMap::default(),
    );
    assert_eq!(
        good.iter().map(|(loc, _)| loc.line).collect::<Vec<_>>(),
        [1, 3]
    );
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].loc.line, 2);
    assert_eq!(bad[0].field, "text");
}
