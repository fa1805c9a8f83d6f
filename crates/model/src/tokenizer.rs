//! Tokenizer (`tokenizers`) plus chat template (`minijinja`), rendered as transformers renders them.
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::{atomic_write, write_json};

/// One chat message; `role` is `system`, `user` or `assistant`.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// tokenizer_config.json as read (or built from GGUF metadata), written back on save.
    config: Value,
    chat_template: Option<String>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// The longest token's text in bytes, found on first use.
    longest_token: std::sync::OnceLock<usize>,
}

/// A special token in tokenizer_config.json is either a string or an `AddedToken` object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Parses `path` as a tokenizer.json. The text is parsed as JSON first, so a malformed file is an
/// error naming its line and column; the tokenizers crate panics on some malformed files (an
/// `expect` in its decoder's deserializer), so a panic there becomes an error too.
fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<Value>(&text)
        .map_err(|e| Error::invalid(path, "tokenizer", format!("not JSON: {e}")))?;
    let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::invalid(path, "tokenizer", e.to_string())),
        Err(panic) => Err(Error::invalid(
            path,
            "tokenizer",
            format!(
                "malformed (the tokenizers crate gave up: {})",
                crate::error::panic_message(&*panic)
            ),
        )),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (and `chat_template.jinja`, transformers'
    /// newer home for the template) from an HF folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::io(
                &tj,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = load_tokenizer_json(&tj)?;
        let tc = dir.join("tokenizer_config.json");
        let mut config = if tc.exists() {
            crate::io::read_json(&tc)?
        } else {
            json!({})
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let t = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            config["chat_template"] = Value::String(t);
        }
        Self::new(inner, config)
    }

    /// Wraps a tokenizer and its tokenizer_config.json.
    pub fn new(inner: tokenizers::Tokenizer, config: Value) -> Result<Self> {
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // The list form: [{"name": "default", "template": ...}, ...].
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let id = |key: &str| token_str(config.get(key)).and_then(|s| inner.token_to_id(&s));
        let (eos_token_id, pad_token_id, bos_token_id) =
            (id("eos_token"), id("pad_token"), id("bos_token"));
        Ok(Tokenizer {
            inner,
            config,
            chat_template,
            eos_token_id,
            pad_token_id,
            bos_token_id,
            longest_token: std::sync::OnceLock::new(),
        })
    }

    /// Bytes of the longest token's text in the vocabulary (added tokens included), at least 1.
    /// Byte-level vocabularies spell a raw byte as one char of up to 2 UTF-8 bytes, so this is
    /// an upper bound on the input bytes one token covers: a text of `n` bytes makes at least
    /// `n / longest_token_bytes()` tokens (unless the normaliser deletes text).
    pub fn longest_token_bytes(&self) -> usize {
        *self.longest_token.get_or_init(|| {
            self.inner
                .get_vocab(true)
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(1)
                .max(1)
        })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`. `add_special_tokens` applies the post-processor (BOS etc.), as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Msg(format!("decoding: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders the chat template like transformers' `apply_chat_template(tokenize=False)`:
    /// Jinja with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`,
    /// Python string methods, and the special tokens as variables.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Msg("this tokenizer has no chat_template (tokenizer_config.json)".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            chrono::Local::now().format(&fmt).to_string()
        });
        env.add_filter("tojson", tojson);
        env.add_template("chat", template)
            .map_err(|e| Error::Msg(format!("chat_template does not parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Msg(e.to_string()))?;
        let special = |k: &str| token_str(self.config.get(k)).unwrap_or_default();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => special("bos_token"),
            eos_token => special("eos_token"),
            pad_token => special("pad_token"),
            unk_token => special("unk_token"),
        };
        tmpl.render(ctx)
            .map_err(|e| Error::Msg(format!("rendering chat_template: {e}")))
    }

    /// Token ids of a conversation, as `apply_chat_template(tokenize=True)` (no extra special tokens).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(
            &self.apply_chat_template(messages, add_generation_prompt)?,
            false,
        )
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| Error::invalid(&path, "tokenizer", e.to_string()))?;
        atomic_write(&path, text.as_bytes())?;
        let mut config = self.config.clone();
        if let Some(t) = &self.chat_template {
            config["chat_template"] = Value::String(t.clone());
        }
        write_json(&dir.join("tokenizer_config.json"), &config)
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`. Python's default
/// separators are `", "` and `": "` and nothing is HTML-escaped (unlike minijinja's built-in).
fn tojson(
    v: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<String, minijinja::Error> {
    let v = serde_json::to_value(&v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    write_py_json(&v, indent, 0, &mut out);
    Ok(out)
}

fn write_py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}
