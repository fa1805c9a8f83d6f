//! Turning raw rows into typed [`Example`]s of one TRL dataset format, with one precise
//! [`RowError`] per bad row.
use preftune_model::Message;
use serde_json::Value;

use crate::{ColumnMap, Example, Format, Location, Row, RowError, Text};

/// Roles a chat template is expected to understand (TRL's conversational format).
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

impl ColumnMap {
    /// `ColumnMap::new([("prompt", "question")])` reads the canonical `prompt` from `question`.
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        ColumnMap {
            map: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The dataset column that holds the canonical field `name` (`name` itself when unmapped).
    pub fn column<'a>(&'a self, name: &'a str) -> &'a str {
        self.map.get(name).map_or(name, String::as_str)
    }
}

/// Validates every row as `format`. Returns the good examples (in row order) and one error per
/// bad row, so the caller can either refuse the dataset or skip the bad rows.
pub fn parse_examples(
    rows: &[Row],
    format: Format,
    columns: &ColumnMap,
) -> (Vec<(Location, Example)>, Vec<RowError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for row in rows {
        let cx = RowCx { row, columns };
        match cx.parse(format) {
            Ok(ex) => good.push((row.loc.clone(), ex)),
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}

/// How a JSON value is described in messages ("found a number").
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Completions and responses must hold something to learn from; prompts may be empty strings.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Prompt,
    Completion,
}

type R<T> = std::result::Result<T, RowError>;

struct RowCx<'a> {
    row: &'a Row,
    columns: &'a ColumnMap,
}

impl RowCx<'_> {
    fn col<'b>(&'b self, name: &'b str) -> &'b str {
        self.columns.column(name)
    }

    fn err(&self, name: &str, msg: impl Into<String>) -> RowError {
        RowError {
            loc: self.row.loc.clone(),
            field: self.col(name).to_string(),
            msg: msg.into(),
        }
    }

    /// The value of canonical field `name`; a JSON `null` counts as absent, because Parquet and
    /// Arrow fill missing optional values with nulls.
    fn get(&self, name: &str) -> Option<&Value> {
        self.row.value.get(self.col(name)).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> R<&Value> {
        match self.row.value.get(self.col(name)) {
            None => Err(self.err(name, "missing field")),
            Some(Value::Null) => Err(self.err(name, "missing field (the value is null)")),
            Some(v) => Ok(v),
        }
    }

    fn parse(&self, format: Format) -> R<Example> {
        Ok(match format {
            Format::LanguageModeling => {
                // TRL reads conversations from `messages` and plain text from `text`.
                let name = if self.get("messages").is_some() {
                    "messages"
                } else {
                    "text"
                };
                let text = self.text(name, self.required(name)?, Part::Completion)?;
                Example::LanguageModeling { text }
            }
            Format::PromptOnly => Example::PromptOnly {
                prompt: self.field_text("prompt", Part::Prompt)?,
            },
            Format::PromptCompletion => {
                let prompt = self.field_text("prompt", Part::Prompt)?;
                let completion = self.field_text("completion", Part::Completion)?;
                self.same_kind(&prompt, "prompt", &completion, "completion")?;
                Example::PromptCompletion { prompt, completion }
            }
            Format::Preference => self.preference()?,
            Format::Unpaired => {
                let prompt = self.field_text("prompt", Part::Prompt)?;
                let completion = self.field_text("completion", Part::Completion)?;
                self.same_kind(&prompt, "prompt", &completion, "completion")?;
                let label = match self.required("label")? {
                    Value::Bool(b) => *b,
                    other => {
                        return Err(self.err(
                            "label",
                            format!("expected true or false, found {}", kind(other)),
                        ))
                    }
                };
                Example::Unpaired {
                    prompt,
                    completion,
                    label,
                }
            }
            Format::Ranking => self.ranking()?,
        })
    }

    fn field_text(&self, name: &str, part: Part) -> R<Text> {
        self.text(name, self.required(name)?, part)
    }

    /// A text field: a string (standard format) or a list of messages (conversational).
    fn text(&self, name: &str, v: &Value, part: Part) -> R<Text> {
        self.text_in(name, "", v, part)
    }

    /// `at` prefixes messages about an element of a list field (`response [1]: `).
    fn text_in(&self, name: &str, at: &str, v: &Value, part: Part) -> R<Text> {
        match v {
            Value::String(s) => {
                if part == Part::Completion && s.is_empty() {
                    return Err(self.err(name, format!("{at}empty string")));
                }
                Ok(Text::Plain(s.clone()))
            }
            Value::Array(items) => {
                // An empty list is neither standard nor conversational, and holds nothing to learn.
                if items.is_empty() {
                    return Err(self.err(name, format!("{at}empty message list")));
                }
                let mut messages = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    messages.push(self.message(name, &format!("{at}message [{i}]: "), item)?);
                }
                if part == Part::Completion {
                    self.check_contents(name, at, &messages, 0)?;
                }
                Ok(Text::Messages(messages))
            }
            other => Err(self.err(
                name,
                format!(
                    "{at}expected a string or a list of messages, found {}",
                    kind(other)
                ),
            )),
        }
    }

    fn message(&self, name: &str, at: &str, v: &Value) -> R<Message> {
        let Value::Object(obj) = v else {
            return Err(self.err(
                name,
                format!(
                    "{at}expected a message object with `role` and `content`, found {}",
                    kind(v)
                ),
            ));
        };
        let role = match obj.get("role") {
            None | Some(Value::Null) => return Err(self.err(name, format!("{at}missing `role`"))),
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(Value::String(r)) => {
                return Err(self.err(
                    name,
                    format!("{at}role {r:?} is not one of {}", ROLES.join(", ")),
                ))
            }
            Some(other) => {
                return Err(self.err(
                    name,
                    format!("{at}`role` must be a string, found {}", kind(other)),
                ))
            }
        };
        let content = match obj.get("content") {
            None | Some(Value::Null) => {
                return Err(self.err(name, format!("{at}missing `content`")))
            }
            Some(Value::String(c)) => c.clone(),
            Some(other) => {
                return Err(self.err(
                    name,
                    format!("{at}`content` must be a string, found {}", kind(other)),
                ))
            }
        };
        Ok(Message { role, content })
    }

    /// Messages that are training targets must say something. `offset` is the index of
    /// `messages[0]` in the original column (after an implicit prompt was split off).
    fn check_contents(&self, name: &str, at: &str, messages: &[Message], offset: usize) -> R<()> {
        match messages.iter().position(|m| m.content.is_empty()) {
            Some(i) => Err(self.err(name, format!("{at}message [{}]: empty content", i + offset))),
            None => Ok(()),
        }
    }

    /// TRL tokenizes prompt and completion together, so both must be of the same kind.
    fn same_kind(&self, a: &Text, a_name: &str, b: &Text, b_name: &str) -> R<()> {
        let describe = |t: &Text| match t {
            Text::Plain(_) => "a string",
            Text::Messages(_) => "a list of messages",
        };
        if matches!(a, Text::Plain(_)) == matches!(b, Text::Plain(_)) {
            return Ok(());
        }
        Err(self.err(
            b_name,
            format!(
                "is {} but `{}` is {}; use plain strings for both or messages for both",
                describe(b),
                self.col(a_name),
                describe(a)
            ),
        ))
    }

    /// TRL's `extract_prompt` on plain strings: the prompt is the longest common prefix (by
    /// characters), less a space that ends it, which goes to the completions.
    fn plain_implicit(&self, chosen: String, rejected: String, margin: Option<f64>) -> R<Example> {
        if chosen == rejected {
            return Err(self.err(
                "rejected",
                format!("is the same text as `{}`", self.col("chosen")),
            ));
        }
        let mut at = chosen
            .char_indices()
            .zip(rejected.chars())
            .find(|((_, c), r)| c != r)
            .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
        while !(chosen.is_char_boundary(at) && rejected.is_char_boundary(at)) {
            at -= 1;
        }
        if chosen[..at].ends_with(' ') {
            at -= 1;
        }
        Ok(Example::Preference {
            prompt: Text::Plain(chosen[..at].to_string()),
            chosen: Text::Plain(chosen[at..].to_string()),
            rejected: Text::Plain(rejected[at..].to_string()),
            margin,
        })
    }

    fn preference(&self) -> R<Example> {
        let margin = match self.get("margin") {
            None => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(other) => {
                return Err(self.err(
                    "margin",
                    format!("expected a number, found {}", kind(other)),
                ))
            }
        };
        if self.get("prompt").is_some() {
            let prompt = self.field_text("prompt", Part::Prompt)?;
            let chosen = self.field_text("chosen", Part::Completion)?;
            let rejected = self.field_text("rejected", Part::Completion)?;
            self.same_kind(&prompt, "prompt", &chosen, "chosen")?;
            self.same_kind(&prompt, "prompt", &rejected, "rejected")?;
            return Ok(Example::Preference {
                prompt,
                chosen,
                rejected,
                margin,
            });
        }
        // Implicit prompt: whole conversations that share their opening messages, or plain
        // strings that share their opening characters (TRL's `extract_prompt`).
        let chosen = self.text("chosen", self.required("chosen")?, Part::Prompt)?;
        let rejected = self.text("rejected", self.required("rejected")?, Part::Prompt)?;
        self.same_kind(&chosen, "chosen", &rejected, "rejected")?;
        let (chosen, rejected) = match (chosen, rejected) {
            (Text::Messages(c), Text::Messages(r)) => (c, r),
            (Text::Plain(c), Text::Plain(r)) => return self.plain_implicit(c, r, margin),
            _ => unreachable!("same_kind checked both"),
        };
        let shared = chosen
            .iter()
            .zip(&rejected)
            .take_while(|(c, r)| c == r)
            .count();
        if shared == 0 {
            return Err(self.err(
                "chosen",
                format!(
                    "no `{}` column, and `{}` and `{}` share no leading messages to use as the prompt",
                    self.col("prompt"),
                    self.col("chosen"),
                    self.col("rejected")
                ),
            ));
        }
        for (name, conv) in [("chosen", &chosen), ("rejected", &rejected)] {
            match conv.iter().rposition(|m| m.role == "assistant") {
                None => return Err(self.err(name, "no assistant message")),
                Some(last) if last < shared => {
                    return Err(self.err(
                        name,
                        format!(
                            "its last assistant message (message [{last}]) is part of the prompt shared with `{}`; \
                             chosen and rejected must differ in their final assistant reply",
                            self.col(if name == "chosen" { "rejected" } else { "chosen" })
                        ),
                    ))
                }
                Some(_) => self.check_contents(name, "", &conv[shared..], shared)?,
            }
        }
        let prompt = chosen[..shared].to_vec();
        Ok(Example::Preference {
            prompt: Text::Messages(prompt),
            chosen: Text::Messages(chosen[shared..].to_vec()),
            rejected: Text::Messages(rejected[shared..].to_vec()),
            margin,
        })
    }

    fn ranking(&self) -> R<Example> {
        let prompt = self.field_text("prompt", Part::Prompt)?;
        let items = match self.required("responses")? {
            Value::Array(items) => items,
            other => {
                return Err(self.err(
                    "responses",
                    format!("expected a list of responses, found {}", kind(other)),
                ))
            }
        };
        if items.len() < 2 {
            return Err(self.err(
                "responses",
                format!("needs at least 2 responses, found {}", items.len()),
            ));
        }
        let mut responses = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("response [{i}]: ");
            let text = self.text_in("responses", &at, item, Part::Completion)?;
            if matches!(prompt, Text::Plain(_)) != matches!(text, Text::Plain(_)) {
                return Err(self.err(
                    "responses",
                    format!(
                        "{at}kind differs from `{}`; use plain strings for both or messages for both",
                        self.col("prompt")
                    ),
                ));
            }
            responses.push(text);
        }
        let scores = match self.get("scores") {
            None => None,
            Some(Value::Array(list)) => {
                let mut scores = Vec::with_capacity(list.len());
                for (i, v) in list.iter().enumerate() {
                    match v.as_f64() {
                        Some(s) => scores.push(s),
                        None => {
                            return Err(self.err(
                                "scores",
                                format!("score [{i}]: expected a number, found {}", kind(v)),
                            ))
                        }
                    }
                }
                Some(scores)
            }
            Some(other) => {
                return Err(self.err(
                    "scores",
                    format!("expected a list of numbers, found {}", kind(other)),
                ))
            }
        };
        let Some(scores) = scores else {
            return Ok(Example::Ranking {
                prompt,
                responses,
                scores: None,
            });
        };
        if scores.len() != responses.len() {
            return Err(self.err(
                "scores",
                format!(
                    "has {} scores but `{}` has {} responses",
                    scores.len(),
                    self.col("responses"),
                    responses.len()
                ),
            ));
        }
        // Best first; a stable sort keeps the dataset's order among equal scores.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        Ok(Example::Ranking {
            prompt,
            responses: order.iter().map(|&i| responses[i].clone()).collect(),
            scores: Some(order.iter().map(|&i| scores[i]).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_columns_read_as_is() {
        let map = ColumnMap::new([("prompt", "question")]);
        assert_eq!(map.column("prompt"), "question");
        assert_eq!(map.column("completion"), "completion");
    }

    #[test]
    fn kinds_read_naturally() {
        assert_eq!(kind(&serde_json::json!(1)), "a number");
        assert_eq!(kind(&serde_json::json!([])), "a list");
        assert_eq!(kind(&serde_json::json!({})), "an object");
    }
}
