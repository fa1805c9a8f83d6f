//! OpenAI's request bodies, the fields we honour, and turning sampled tokens into choices.
use std::collections::HashMap;

use preftune_model::batcher::Step;
use preftune_model::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A message's content: text, or parts of which the text ones are joined.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Clone, Debug)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize, Clone, Debug)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

impl ChatMessage {
    pub fn text(&self) -> Result<String, String> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(p)) => p
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (k, _) => Err(format!("content parts of type {k:?} are not supported")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// `/v1/chat/completions`. Fields OpenAI defines that are not listed are accepted and ignored.
#[derive(Deserialize, Clone, Debug)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// `true`: the chosen tokens' log-probabilities.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0-20 alternatives per token, with `logprobs`.
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
}

/// `/v1/completions`.
#[derive(Deserialize, Clone, Debug)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: OneOrMany,
    /// The legacy field: this many alternatives per token (0-5), and the chosen ones'.
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: Option<bool>,
}

/// What both routes share (read from the same body as the route's own fields).
#[derive(Deserialize, Clone, Debug, Default)]
pub struct SamplingFields {
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// One choice being built from its tokens: its visible text (up to a stop string, special tokens
/// left out), its log-probabilities and why it ended.
#[derive(Default, Debug)]
pub struct Choice {
    pub tokens: Vec<u32>,
    pub text: String,
    /// Bytes of `text` already streamed.
    pub sent: usize,
    pub finish: Option<&'static str>,
    pub logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl Choice {
    /// Adds one sampled token. Returns true once the choice has ended.
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        s: &Step,
        stops: &[String],
        want_logprobs: bool,
    ) -> Result<bool, String> {
        if self.finish.is_some() {
            return Ok(true);
        }
        let piece = |id: u32| tok.decode(&[id], false).map_err(|e| e.to_string());
        if want_logprobs {
            self.logprobs.push(TokenLogprob {
                token: piece(s.token)?,
                logprob: s.logprob,
                top: s
                    .top
                    .iter()
                    .map(|&(id, lp)| Ok((piece(id)?, lp)))
                    .collect::<Result<_, String>>()?,
            });
        }
        self.tokens.push(s.token);
        self.text = tok.decode(&self.tokens, true).map_err(|e| e.to_string())?;
        if let Some(at) = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.finish = Some("stop");
        } else if let Some(f) = s.finish {
            self.finish = Some(f.as_str());
        }
        Ok(self.finish.is_some())
    }

    /// The text not streamed yet that can be streamed now: held back while it ends in a partial
    /// character or could be the start of a stop string.
    pub fn ready(&mut self, stops: &[String]) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            if self.text.ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            let hold = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(|&k| s.is_char_boundary(k) && self.text[..end].ends_with(&s[..k]))
                        .max()
                })
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

/// `choices[i].logprobs` of a chat completion (`content`: one entry per token).
pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(&l.token, l.logprob);
        e["top_logprobs"] = l.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
        e
    }).collect::<Vec<_>>()})
}

/// `choices[i].logprobs` of a text completion (the legacy layout); `offset`: where the choice's
/// text starts in the response.
pub fn completion_logprobs(lps: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = vec![];
    for l in lps {
        offsets.push(at);
        at += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().cloned().collect::<HashMap<String, f32>>())
            .collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}
