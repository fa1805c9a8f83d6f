//! Cutting text before it is tokenised, so that memory follows `max_length`, not the row.
//!
//! A tokenizer holds offsets and alignments for every character of its input: a 20 MB row took
//! 3.9 GB and 12 s, only to be truncated to `max_length` tokens. No token covers more input bytes
//! than the vocabulary's longest token has, so a text field longer than [`clip_bound`] bytes
//! makes more than `max_length + MARGIN_TOKENS` tokens on its own. Such a field is cut to the
//! bound first, keeping its start or its end as truncation will. The caller then checks that the
//! cut sequence still overflows `max_length` by [`MARGIN_TOKENS`] (a normaliser that deletes text
//! could break the bound) and otherwise tokenises the whole text, so the result is always the one
//! whole-text tokenisation gives: the tokens next to a cut lie far outside what is kept.
use preftune_model::Tokenizer;

use crate::{Example, Text};

type R<T> = std::result::Result<T, String>;

/// Tokens beyond `max_length` a cut sequence must still have, so the tokens merged differently
/// next to the cut are never among those kept.
pub const MARGIN_TOKENS: usize = 16;

/// Bytes beyond which a text field cannot fit in `max_length` tokens of `tok`, margin included.
pub fn clip_bound(tok: &Tokenizer, max_length: usize) -> usize {
    max_length
        .saturating_add(MARGIN_TOKENS + 1)
        .saturating_mul(tok.longest_token_bytes())
        .saturating_add(256)
}

/// `s` cut to at most `bound` bytes on a character boundary, keeping its start (or its end);
/// `None` when it is within the bound.
fn clip_str(s: &str, bound: usize, keep_end: bool) -> Option<String> {
    if s.len() <= bound {
        return None;
    }
    Some(if keep_end {
        let mut at = s.len() - bound;
        while !s.is_char_boundary(at) {
            at += 1;
        }
        s[at..].to_string()
    } else {
        let mut at = bound;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s[..at].to_string()
    })
}

/// `t` with its text (or each message's content) cut to `bound` bytes; `None` if none was over.
fn clip_text(t: &Text, bound: usize, keep_end: bool) -> Option<Text> {
    match t {
        Text::Plain(s) => clip_str(s, bound, keep_end).map(Text::Plain),
        Text::Messages(ms) => {
            let cut: Vec<_> = ms
                .iter()
                .map(|m| clip_str(&m.content, bound, keep_end))
                .collect();
            cut.iter().any(Option::is_some).then(|| {
                let messages = ms
                    .iter()
                    .zip(cut)
                    .map(|(m, c)| {
                        let mut m = m.clone();
                        if let Some(c) = c {
                            m.content = c;
                        }
                        m
                    })
                    .collect();
                Text::Messages(messages)
            })
        }
    }
}

/// `ex` with every text field over `bound` bytes cut (see the module), and which fields were
/// cut, in field order: the text or prompt first, then the completion, or chosen and rejected,
/// or the responses. `None` when no field is over the bound.
pub fn clip_example(ex: &Example, bound: usize, keep_end: bool) -> Option<(Example, Vec<bool>)> {
    let mut cut = vec![];
    let mut one = |t: &Text| {
        let c = clip_text(t, bound, keep_end);
        cut.push(c.is_some());
        c.unwrap_or_else(|| t.clone())
    };
    let clipped = match ex {
        Example::LanguageModeling { text } => Example::LanguageModeling { text: one(text) },
        Example::PromptOnly { prompt } => Example::PromptOnly {
            prompt: one(prompt),
        },
        Example::PromptCompletion { prompt, completion } => Example::PromptCompletion {
            prompt: one(prompt),
            completion: one(completion),
        },
        Example::Preference {
            prompt,
            chosen,
            rejected,
            margin,
        } => Example::Preference {
            prompt: one(prompt),
            chosen: one(chosen),
            rejected: one(rejected),
            margin: *margin,
        },
        Example::Unpaired {
            prompt,
            completion,
            label,
        } => Example::Unpaired {
            prompt: one(prompt),
            completion: one(completion),
            label: *label,
        },
        Example::Ranking {
            prompt,
            responses,
            scores,
        } => Example::Ranking {
            prompt: one(prompt),
            responses: responses.iter().map(&mut one).collect(),
            scores: scores.clone(),
        },
    };
    cut.contains(&true).then_some((clipped, cut))
}

/// Tokenises `ex` with `tokenize`, through a cut copy when a field is over [`clip_bound`] and
/// `overflows(result, which fields were cut, max_length)` confirms the cut result still runs past
/// what truncation keeps; otherwise (no `max_length`, nothing to cut, or no confirmation) the whole
/// example. Either way the caller truncates the result as it would the whole text's.
pub(crate) fn tokenize_clipped<T>(
    ex: &Example,
    tok: &Tokenizer,
    max_length: Option<usize>,
    keep_end: bool,
    tokenize: impl Fn(&Example) -> R<T>,
    overflows: impl Fn(&T, &[bool], usize) -> bool,
) -> R<T> {
    if let Some(max) = max_length {
        if let Some((cut, which)) = clip_example(ex, clip_bound(tok, max), keep_end) {
            if let Ok(t) = tokenize(&cut) {
                if overflows(&t, &which, max) {
                    return Ok(t);
                }
            }
        }
    }
    tokenize(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_fall_on_character_boundaries_at_either_end() {
        let s = "aé€😀".repeat(10); // 1 + 2 + 3 + 4 bytes per repeat
        for bound in 1..s.len() {
            let start = clip_str(&s, bound, false).unwrap();
            assert!(start.len() <= bound && start.len() + 4 > bound && s.starts_with(&start));
            let end = clip_str(&s, bound, true).unwrap();
            assert!(end.len() <= bound && end.len() + 4 > bound && s.ends_with(&end));
        }
        assert_eq!(clip_str(&s, s.len(), false), None);
    }
}
