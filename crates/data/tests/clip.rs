//! Text cut before tokenising (`preftune_data::clip`) gives exactly what tokenising the whole
//! text and then truncating gives, on every fixture tokenizer, for plain and chat examples, both
//! truncation modes, and texts that are long runs of words, of one letter, of spaces, of digits
//! and of multi-byte characters. And the boundary itself: a row of exactly `max_length` tokens.
use std::path::Path;

use preftune_data::clip::clip_bound;
use preftune_data::{
    join_truncated, tokenize_preference, tokenize_sft, Example, SftTokenizeOptions, Text,
    TruncationMode,
};
use preftune_model::{Message, Tokenizer};

fn tokenizers() -> Vec<(&'static str, Tokenizer)> {
    ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
        .into_iter()
        .map(|m| {
            let dir = format!("{}/../../fixtures/models/{m}", env!("CARGO_MANIFEST_DIR"));
            (m, Tokenizer::from_hf_dir(Path::new(&dir)).unwrap())
        })
        .collect()
}

/// Long texts of several kinds, each at least `bytes` long.
fn long_texts(bytes: usize) -> Vec<String> {
    let kinds = [
        "the quick brown fox jumps over the lazy dog. ",
        "a",
        " ",
        "0123456789",
        "été 😀 жёлтый 日本語 ",
        "\n\n  x\t",
    ];
    kinds
        .iter()
        .map(|k| k.repeat(bytes / k.len() + 1))
        .collect()
}

fn opts(max: Option<usize>, mode: TruncationMode) -> SftTokenizeOptions {
    SftTokenizeOptions {
        max_length: max,
        truncation_mode: mode,
        completion_only_loss: true,
        assistant_only_loss: false,
    }
}

/// The whole text tokenised, then truncated as `tokenize_sft` does.
fn whole_then_truncated(
    ex: &Example,
    tok: &Tokenizer,
    max: usize,
    mode: TruncationMode,
) -> Result<(Vec<u32>, Vec<u8>), String> {
    let t = tokenize_sft(ex, tok, &opts(None, mode))?;
    let (mut ids, mut mask) = (t.input_ids, t.loss_mask);
    if ids.len() > max {
        match mode {
            TruncationMode::KeepStart => {
                ids.truncate(max);
                mask.truncate(max);
            }
            TruncationMode::KeepEnd => {
                let cut = ids.len() - max;
                ids.drain(..cut);
                mask.drain(..cut);
                mask[0] = 0;
            }
        }
    }
    if !mask.contains(&1) {
        return Err("no targets".into());
    }
    Ok((ids, mask))
}

#[test]
fn sft_examples_cut_before_tokenising_match_the_whole_text() {
    for (name, tok) in tokenizers() {
        for max in [1, 7, 64] {
            let bound = clip_bound(&tok, max);
            for text in long_texts(2 * bound + 3) {
                let short = "Say something.".to_string();
                let examples = [
                    Example::LanguageModeling {
                        text: Text::Plain(text.clone()),
                    },
                    Example::PromptCompletion {
                        prompt: Text::Plain(short.clone()),
                        completion: Text::Plain(text.clone()),
                    },
                    Example::PromptCompletion {
                        prompt: Text::Plain(text.clone()),
                        completion: Text::Plain(short.clone()),
                    },
                    Example::LanguageModeling {
                        text: Text::Messages(vec![
                            Message::new("user", &text),
                            Message::new("assistant", &text),
                        ]),
                    },
                ];
                for ex in &examples {
                    for mode in [TruncationMode::KeepStart, TruncationMode::KeepEnd] {
                        let want = whole_then_truncated(ex, &tok, max, mode);
                        let got = tokenize_sft(ex, &tok, &opts(Some(max), mode)).map(|t| {
                            assert!(t.truncated);
                            (t.input_ids, t.loss_mask)
                        });
                        let what = format!(
                            "{name}, max {max}, {mode:?}, {:?}",
                            text.chars().take(8).collect::<String>()
                        );
                        match (want, got) {
                            (Ok(w), Ok(g)) => assert_eq!(w, g, "{what}"),
                            (Err(_), Err(_)) => {}
                            (w, g) => panic!("{what}: whole {w:?}, cut {g:?}"),
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn preference_rows_cut_before_tokenising_match_the_whole_text() {
    for (name, tok) in tokenizers() {
        for max in [3, 64] {
            let bound = clip_bound(&tok, max);
            for text in long_texts(2 * bound + 3) {
                let ex = Example::Preference {
                    prompt: Text::Plain("Q: ".into()),
                    chosen: Text::Plain(text.clone()),
                    rejected: Text::Plain("short".into()),
                    margin: None,
                };
                for keep_end in [false, true] {
                    let whole = tokenize_preference(&ex, &tok, None, keep_end).unwrap();
                    let cut = tokenize_preference(&ex, &tok, Some(max), keep_end).unwrap();
                    assert!(cut.completions[0].len() < whole.completions[0].len());
                    for (w, c) in whole.completions.iter().zip(&cut.completions) {
                        assert_eq!(
                            join_truncated(&whole.prompt_ids, w, Some(max), keep_end),
                            join_truncated(&cut.prompt_ids, c, Some(max), keep_end),
                            "{name}, max {max}, keep_end {keep_end}, {:?}",
                            text.chars().take(8).collect::<String>()
                        );
                    }
                }
            }
        }
    }
}

/// What reaches the tokenizer is bounded by `max_length`, not by the row: a 4 MB field is cut
/// to the bound (the 20 MB row of the audit took 3.9 GB to tokenise whole).
#[test]
fn the_tokenizer_never_sees_more_than_the_bound() {
    use preftune_data::clip::clip_example;
    let (_, tok) = tokenizers().remove(0);
    let bound = clip_bound(&tok, 128);
    assert!(bound < 64 * 1024, "bound {bound} for 128 tokens");
    let big = "word ".repeat(800_000);
    let ex = Example::PromptCompletion {
        prompt: Text::Messages(vec![Message::new("user", &big), Message::new("user", "hi")]),
        completion: Text::Messages(vec![Message::new("assistant", &big)]),
    };
    for keep_end in [false, true] {
        let (cut, which) = clip_example(&ex, bound, keep_end).unwrap();
        assert_eq!(which, [true, true]);
        let Example::PromptCompletion {
            prompt: Text::Messages(p),
            completion: Text::Messages(c),
        } = cut
        else {
            panic!("the example changed kind")
        };
        assert!(p.iter().chain(&c).all(|m| m.content.len() <= bound));
        assert_eq!(p[1].content, "hi");
    }
    let small = Example::LanguageModeling {
        text: Text::Plain("short".into()),
    };
    assert!(clip_example(&small, bound, false).is_none());
}

/// At exactly `max_length` tokens nothing is cut or marked truncated; one token fewer cuts one.
#[test]
fn a_row_of_exactly_max_length_is_kept_whole() {
    for (name, tok) in tokenizers() {
        let ex = Example::PromptCompletion {
            prompt: Text::Plain("The movie was".into()),
            completion: Text::Plain(" great, and the ending surprised everyone.".into()),
        };
        let whole = tokenize_sft(&ex, &tok, &opts(None, TruncationMode::KeepStart)).unwrap();
        let n = whole.input_ids.len();
        for mode in [TruncationMode::KeepStart, TruncationMode::KeepEnd] {
            let exact = tokenize_sft(&ex, &tok, &opts(Some(n), mode)).unwrap();
            assert!(!exact.truncated, "{name} {mode:?}");
            assert_eq!(exact.input_ids, whole.input_ids, "{name} {mode:?}");
            assert_eq!(exact.loss_mask, whole.loss_mask, "{name} {mode:?}");
            let less = tokenize_sft(&ex, &tok, &opts(Some(n - 1), mode)).unwrap();
            assert!(
                less.truncated && less.input_ids.len() == n - 1,
                "{name} {mode:?}"
            );
        }
        let pair = Example::Preference {
            prompt: Text::Plain("The movie was".into()),
            chosen: Text::Plain(" great.".into()),
            rejected: Text::Plain(" dull and far too long.".into()),
            margin: None,
        };
        let r = tokenize_preference(&pair, &tok, None, false).unwrap();
        for c in &r.completions {
            let n = r.prompt_ids.len() + c.len();
            for keep_end in [false, true] {
                let (ids, _) = join_truncated(&r.prompt_ids, c, Some(n), keep_end).unwrap();
                assert_eq!(ids.len(), n, "{name}");
                let (ids, _) = join_truncated(&r.prompt_ids, c, Some(n - 1), keep_end).unwrap();
                assert_eq!(ids.len(), n - 1, "{name}");
            }
        }
    }
}
