//! SFT tokenisation as TRL's `SFTTrainer` does it: EOS appended to plain text, chat templates for
//! conversations, completion-only and assistant-only loss masks, then truncation.
use preftune_model::{Message, Tokenizer};
use serde_json::Value;

use crate::clip::{tokenize_clipped, MARGIN_TOKENS};
use crate::{Example, SftTokenizeOptions, Text, TokenizedExample, TruncationMode};

type R<T> = std::result::Result<T, String>;

/// Tokenizes a language-modeling or prompt-completion example for SFT. The error is a sentence
/// about this example; the caller adds where it came from. Under `max_length`, text far beyond
/// what truncation keeps is cut before tokenising ([`crate::clip`]), with the same result.
pub fn tokenize_sft(
    ex: &Example,
    tok: &Tokenizer,
    opts: &SftTokenizeOptions,
) -> R<TokenizedExample> {
    let (ids, mask) = tokenize_clipped(
        ex,
        tok,
        opts.max_length,
        opts.truncation_mode == TruncationMode::KeepEnd,
        |ex| untruncated(ex, tok, opts),
        |(ids, _), _, max| ids.len() >= max + MARGIN_TOKENS,
    )?;
    truncate(ids, mask, opts)
}

/// The whole example's ids and loss mask, before truncation.
fn untruncated(ex: &Example, tok: &Tokenizer, opts: &SftTokenizeOptions) -> R<(Vec<u32>, Vec<u8>)> {
    let (input_ids, mut loss_mask) = match ex {
        Example::LanguageModeling {
            text: Text::Plain(text),
        } => {
            refuse_assistant_only(opts)?;
            let ids = encode(tok, &with_eos(text, &eos_string(tok)?), true)?;
            let mask = vec![1; ids.len()];
            (ids, mask)
        }
        Example::LanguageModeling {
            text: Text::Messages(messages),
        } => {
            let ids = encode_chat(tok, messages, false)?;
            let mask = if opts.assistant_only_loss {
                assistant_mask(tok, messages, &ids)?
            } else {
                vec![1; ids.len()]
            };
            (ids, mask)
        }
        Example::PromptCompletion {
            prompt: Text::Plain(prompt),
            completion: Text::Plain(completion),
        } => {
            refuse_assistant_only(opts)?;
            // TRL appends EOS to the completion, then tokenizes prompt and prompt+completion
            // separately and marks the prompt by the length of its own tokenization.
            let prompt_ids = encode(tok, prompt, true)?;
            let full = format!("{prompt}{}", with_eos(completion, &eos_string(tok)?));
            let ids = encode(tok, &full, true)?;
            let mask = completion_mask(prompt_ids.len(), ids.len(), opts.completion_only_loss);
            (ids, mask)
        }
        Example::PromptCompletion {
            prompt: Text::Messages(prompt),
            completion: Text::Messages(completion),
        } => {
            let prompt_ids = encode_chat(tok, prompt, true)?;
            let conversation = [prompt.as_slice(), completion.as_slice()].concat();
            let ids = encode_chat(tok, &conversation, false)?;
            let mut mask = completion_mask(prompt_ids.len(), ids.len(), opts.completion_only_loss);
            // TRL applies both masks when both options are on.
            if opts.assistant_only_loss {
                let assistant = assistant_mask(tok, &conversation, &ids)?;
                mask.iter_mut().zip(assistant).for_each(|(m, a)| *m &= a);
            }
            (ids, mask)
        }
        Example::PromptCompletion { .. } => {
            return Err(
                "prompt and completion must both be plain text or both be lists of messages".into(),
            )
        }
        other => {
            return Err(format!(
                "SFT takes language-modeling or prompt-completion examples, not {}",
                format_name(other)
            ))
        }
    };
    // Token 0 has nothing before it to be predicted from.
    if let Some(first) = loss_mask.first_mut() {
        *first = 0;
    }
    Ok((input_ids, loss_mask))
}

/// Truncation to `max_length` as the options say, refusing an example left without targets.
fn truncate(
    mut input_ids: Vec<u32>,
    mut loss_mask: Vec<u8>,
    opts: &SftTokenizeOptions,
) -> R<TokenizedExample> {
    let mut truncated = false;
    if let Some(max) = opts.max_length {
        if input_ids.len() > max {
            truncated = true;
            match opts.truncation_mode {
                TruncationMode::KeepStart => {
                    input_ids.truncate(max);
                    loss_mask.truncate(max);
                }
                TruncationMode::KeepEnd => {
                    let cut = input_ids.len() - max;
                    input_ids.drain(..cut);
                    loss_mask.drain(..cut);
                    if let Some(first) = loss_mask.first_mut() {
                        *first = 0;
                    }
                }
            }
        }
    }
    if !loss_mask.contains(&1) {
        return Err(if truncated {
            "no completion tokens left after truncation (raise max_length or use the other truncation mode)".into()
        } else {
            "the example has no target tokens".into()
        });
    }
    Ok(TokenizedExample {
        input_ids,
        loss_mask,
        position_ids: None,
        truncated,
    })
}

fn format_name(ex: &Example) -> &'static str {
    match ex {
        Example::LanguageModeling { .. } => "a language-modeling example",
        Example::PromptOnly { .. } => "a prompt-only example",
        Example::PromptCompletion { .. } => "a prompt-completion example",
        Example::Preference { .. } => "a preference example",
        Example::Unpaired { .. } => "an unpaired example",
        Example::Ranking { .. } => "a ranking example",
    }
}

fn refuse_assistant_only(opts: &SftTokenizeOptions) -> R<()> {
    if opts.assistant_only_loss {
        return Err("assistant_only_loss needs conversational data (lists of messages); this example is plain text".into());
    }
    Ok(())
}

pub(crate) fn encode(tok: &Tokenizer, text: &str, add_special_tokens: bool) -> R<Vec<u32>> {
    tok.encode(text, add_special_tokens)
        .map_err(|e| e.to_string())
}

pub(crate) fn encode_chat(
    tok: &Tokenizer,
    messages: &[Message],
    add_generation_prompt: bool,
) -> R<Vec<u32>> {
    tok.encode_chat(messages, add_generation_prompt)
        .map_err(|e| e.to_string())
}

/// The EOS token as text, appended to plain examples so the model learns to stop.
pub(crate) fn eos_string(tok: &Tokenizer) -> R<String> {
    let from_config = match tok.config().get("eos_token") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    from_config
        .or_else(|| tok.eos_token_id.and_then(|id| tok.inner().id_to_token(id)))
        .ok_or_else(|| {
            "the tokenizer has no eos_token (tokenizer_config.json), which plain-text SFT appends"
                .into()
        })
}

/// TRL appends EOS only when the text does not already end with it.
pub(crate) fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) {
        text.to_string()
    } else {
        format!("{text}{eos}")
    }
}

fn completion_mask(prompt_len: usize, len: usize, completion_only: bool) -> Vec<u8> {
    let prompt_len = if completion_only {
        prompt_len.min(len)
    } else {
        0
    };
    let mut mask = vec![0; prompt_len];
    mask.resize(len, 1);
    mask
}

/// 1 on the tokens each assistant message adds to the rendered conversation. Transformers gets
/// this from `{% generation %}` blocks, which few templates have; rendering prefixes works with
/// any template whose rendering of a prefix is a prefix of the whole rendering.
fn assistant_mask(tok: &Tokenizer, messages: &[Message], ids: &[u32]) -> R<Vec<u8>> {
    let mut mask = vec![0; ids.len()];
    let unstable = || {
        "chat template is not prefix-stable; assistant_only_loss cannot be used with it".to_string()
    };
    let mut any = false;
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        any = true;
        let before = encode_chat(tok, &messages[..k], true)?;
        let after = encode_chat(tok, &messages[..=k], false)?;
        if !ids.starts_with(&before) || !ids.starts_with(&after) || after.len() < before.len() {
            return Err(unstable());
        }
        let span = &after[before.len()..];
        // What a template writes after the turn's EOS (ChatML's "\n") is never generated: the
        // model stops at EOS, so it is not a target.
        let end = match tok
            .eos_token_id
            .and_then(|eos| span.iter().rposition(|&t| t == eos))
        {
            Some(i) => before.len() + i + 1,
            None => after.len(),
        };
        mask[before.len()..end].fill(1);
    }
    if !any {
        return Err(
            "assistant_only_loss is set but the conversation has no assistant message".into(),
        );
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_appended_only_when_missing() {
        assert_eq!(with_eos("hi", "</s>"), "hi</s>");
        assert_eq!(with_eos("hi</s>", "</s>"), "hi</s>");
        assert_eq!(with_eos("", "</s>"), "</s>");
    }

    #[test]
    fn completion_mask_marks_by_prompt_length() {
        assert_eq!(completion_mask(2, 5, true), [0, 0, 1, 1, 1]);
        assert_eq!(completion_mask(2, 5, false), [1, 1, 1, 1, 1]);
        // A prompt that tokenizes longer than the whole (merges at the boundary) masks everything.
        assert_eq!(completion_mask(7, 5, true), [0, 0, 0, 0, 0]);
    }

    #[test]
    fn eos_string_reads_the_added_token_object_form() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/models/tiny-llama"
        );
        let base = Tokenizer::from_hf_dir(std::path::Path::new(dir)).unwrap();
        assert_eq!(eos_string(&base).unwrap(), "<|im_end|>");
        let mut config = base.config().clone();
        config["eos_token"] = serde_json::json!({"content": "<|endoftext|>", "special": true});
        let tok = Tokenizer::new(base.inner().clone(), config).unwrap();
        assert_eq!(eos_string(&tok).unwrap(), "<|endoftext|>");
    }
}
