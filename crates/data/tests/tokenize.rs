//! SFT tokenisation against the tiny fixture tokenizer (ChatML template, EOS `<|im_end|>` = 2,
//! no BOS added).
use std::path::Path;

use preftune_data::{
    tokenize_sft, Example, SftTokenizeOptions, Text, TokenizedExample, TruncationMode,
};
use preftune_model::{Message, Tokenizer};

const EOS: u32 = 2;

fn tok() -> Tokenizer {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/tiny-llama"
    );
    Tokenizer::from_hf_dir(Path::new(dir)).unwrap()
}

fn opts() -> SftTokenizeOptions {
    SftTokenizeOptions {
        max_length: None,
        truncation_mode: TruncationMode::KeepStart,
        completion_only_loss: true,
        assistant_only_loss: false,
    }
}

fn lm(text: &str) -> Example {
    Example::LanguageModeling {
        text: Text::Plain(text.into()),
    }
}

fn chat(list: &[(&str, &str)]) -> Vec<Message> {
    list.iter().map(|(r, c)| Message::new(r, c)).collect()
}

/// The text of each maximal run of target tokens, decoded with special tokens kept.
fn target_runs(tok: &Tokenizer, t: &TokenizedExample) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &m) in t.input_ids.iter().zip(&t.loss_mask) {
        if m == 1 {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut current), false).unwrap());
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    runs
}

#[test]
fn fixture_tokenizer_is_as_the_tests_assume() {
    let tok = tok();
    assert_eq!(tok.eos_token_id, Some(EOS));
    assert_eq!(tok.pad_token_id, Some(3));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(EOS));
}

#[test]
fn plain_text_gets_eos_appended_once() {
    let tok = tok();
    let t = tokenize_sft(&lm("The sky is blue."), &tok, &opts()).unwrap();
    assert_eq!(
        t.input_ids,
        tok.encode("The sky is blue.<|im_end|>", true).unwrap()
    );
    assert_eq!(t.input_ids.last(), Some(&EOS));
    assert_eq!(t.input_ids.iter().filter(|&&i| i == EOS).count(), 1);
    // Already ending with EOS: not doubled.
    let again = tokenize_sft(&lm("The sky is blue.<|im_end|>"), &tok, &opts()).unwrap();
    assert_eq!(again.input_ids, t.input_ids);
    // Every token but the first is a target.
    assert_eq!(t.loss_mask[0], 0);
    assert!(t.loss_mask[1..].iter().all(|&m| m == 1));
    assert_eq!(t.loss_mask.len(), t.input_ids.len());
    assert_eq!((t.position_ids.as_ref(), t.truncated), (None, false));
}

#[test]
fn prompt_completion_masks_exactly_the_prompt_tokens() {
    let tok = tok();
    let ex = Example::PromptCompletion {
        prompt: Text::Plain("Question: what colour is the sky?\nAnswer:".into()),
        completion: Text::Plain(" Blue.".into()),
    };
    let t = tokenize_sft(&ex, &tok, &opts()).unwrap();
    let prompt_len = tok
        .encode("Question: what colour is the sky?\nAnswer:", true)
        .unwrap()
        .len();
    assert!(prompt_len > 3);
    assert_eq!(
        t.input_ids,
        tok.encode(
            "Question: what colour is the sky?\nAnswer: Blue.<|im_end|>",
            true
        )
        .unwrap()
    );
    assert!(t.loss_mask[..prompt_len].iter().all(|&m| m == 0));
    assert!(t.loss_mask[prompt_len..].iter().all(|&m| m == 1));
    assert_eq!(target_runs(&tok, &t), [" Blue.<|im_end|>"]);

    // Without completion_only_loss everything after token 0 is a target.
    let all = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            completion_only_loss: false,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(all.input_ids, t.input_ids);
    assert_eq!(all.loss_mask[0], 0);
    assert!(all.loss_mask[1..].iter().all(|&m| m == 1));
}

#[test]
fn assistant_only_loss_masks_in_assistant_content_and_its_eos() {
    let tok = tok();
    let messages = chat(&[
        ("system", "Be brief."),
        ("user", "What colour is the sky?"),
        ("assistant", "Blue."),
        ("user", "And grass?"),
        ("assistant", "Green, mostly."),
    ]);
    let ex = Example::LanguageModeling {
        text: Text::Messages(messages.clone()),
    };
    let t = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            assistant_only_loss: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(t.input_ids, tok.encode_chat(&messages, false).unwrap());
    assert_eq!(
        target_runs(&tok, &t),
        ["Blue.<|im_end|>", "Green, mostly.<|im_end|>"]
    );

    // Without it, the whole conversation is trained on.
    let all = tokenize_sft(&ex, &tok, &opts()).unwrap();
    assert_eq!(all.input_ids, t.input_ids);
    assert_eq!(
        all.loss_mask.iter().filter(|&&m| m == 1).count(),
        all.input_ids.len() - 1
    );
}

#[test]
fn conversational_prompt_completion_masks_the_prompt_and_generation_prompt() {
    let tok = tok();
    let prompt = chat(&[("user", "What colour is the sky?")]);
    let ex = Example::PromptCompletion {
        prompt: Text::Messages(prompt.clone()),
        completion: Text::Messages(chat(&[("assistant", "Blue.")])),
    };
    let t = tokenize_sft(&ex, &tok, &opts()).unwrap();
    let prompt_len = tok.encode_chat(&prompt, true).unwrap().len();
    assert!(t.loss_mask[..prompt_len].iter().all(|&m| m == 0));
    // The template's newline after `<|im_end|>` belongs to the completion rendering.
    assert_eq!(target_runs(&tok, &t), ["Blue.<|im_end|>\n"]);
    // With assistant_only_loss as well (TRL applies both masks) the trailing newline goes.
    let both = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            assistant_only_loss: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(target_runs(&tok, &both), ["Blue.<|im_end|>"]);
}

#[test]
fn truncation_keep_start_and_keep_end() {
    let tok = tok();
    let ex = lm("one two three four five six seven eight nine ten");
    let full = tokenize_sft(&ex, &tok, &opts()).unwrap();
    let n = full.input_ids.len();
    assert!(n > 6, "{n}");

    let start = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            max_length: Some(4),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(start.input_ids, full.input_ids[..4]);
    assert_eq!(start.loss_mask, [0, 1, 1, 1]);
    assert!(start.truncated);

    let end = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            max_length: Some(4),
            truncation_mode: TruncationMode::KeepEnd,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(end.input_ids, full.input_ids[n - 4..]);
    assert_eq!(end.input_ids.last(), Some(&EOS));
    assert_eq!(end.loss_mask, [0, 1, 1, 1]);
    assert!(end.truncated);

    // Long enough: untouched.
    let fits = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            max_length: Some(n),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!((fits.input_ids, fits.truncated), (full.input_ids, false));
}

#[test]
fn truncating_away_every_completion_token_is_an_error() {
    let tok = tok();
    let ex = Example::PromptCompletion {
        prompt: Text::Plain("A rather long prompt with many words in it".into()),
        completion: Text::Plain(" ok".into()),
    };
    let e = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            max_length: Some(3),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(
        e.starts_with("no completion tokens left after truncation"),
        "{e}"
    );
}

#[test]
fn unsupported_examples_and_options_are_refused() {
    let tok = tok();
    let pref = Example::Preference {
        prompt: Text::Plain("p".into()),
        chosen: Text::Plain("a".into()),
        rejected: Text::Plain("b".into()),
        margin: None,
    };
    let e = tokenize_sft(&pref, &tok, &opts()).unwrap_err();
    assert!(e.contains("preference"), "{e}");

    let e = tokenize_sft(
        &lm("text"),
        &tok,
        &SftTokenizeOptions {
            assistant_only_loss: true,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.contains("conversational"), "{e}");

    let no_assistant = Example::LanguageModeling {
        text: Text::Messages(chat(&[("user", "Hi")])),
    };
    let e = tokenize_sft(
        &no_assistant,
        &tok,
        &SftTokenizeOptions {
            assistant_only_loss: true,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.contains("no assistant message"), "{e}");
}

#[test]
fn assistant_only_loss_refuses_templates_that_are_not_prefix_stable() {
    let base = tok();
    let mut config = base.config().clone();
    // Renders the conversation newest-first, so a shorter conversation is not a prefix.
    config["chat_template"] = "{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        .into();
    let tok = Tokenizer::new(base.inner().clone(), config).unwrap();
    let ex = Example::LanguageModeling {
        text: Text::Messages(chat(&[("user", "Hi"), ("assistant", "Hello")])),
    };
    let e = tokenize_sft(
        &ex,
        &tok,
        &SftTokenizeOptions {
            assistant_only_loss: true,
            ..opts()
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        "chat template is not prefix-stable; assistant_only_loss cannot be used with it"
    );
}
