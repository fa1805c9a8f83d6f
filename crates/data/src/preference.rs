//! Preference and ranking tokenisation as TRL's `DPOTrainer` does it: EOS appended to plain
//! completions, the prompt rendered with the generation prompt for conversations, and the prompt's
//! tokens taken as the common prefix of the tokenized prompt and prompt+completion (tokens can merge
//! across the boundary).
use preftune_model::Tokenizer;

use crate::clip::{tokenize_clipped, MARGIN_TOKENS};
use crate::tokenize::{encode, encode_chat, eos_string, with_eos};
use crate::{Example, Text};

type R<T> = std::result::Result<T, String>;

/// A prompt with several tokenized completions (2 for a pair: chosen then rejected; k for a ranking,
/// best first).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedRanking {
    pub prompt_ids: Vec<u32>,
    pub completions: Vec<Vec<u32>>,
    /// Nuanced preference margin of a pair, when the data has one.
    pub margin: Option<f64>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes a preference pair or a ranking. Completions of an empty token list are refused.
/// With `max_length` (and `keep_end`, as the trainer truncates), text far beyond what truncation
/// keeps is cut first ([`crate::clip`]); the result is the whole text's.
pub fn tokenize_preference(
    ex: &Example,
    tok: &Tokenizer,
    max_length: Option<usize>,
    keep_end: bool,
) -> R<TokenizedRanking> {
    tokenize_clipped(
        ex,
        tok,
        max_length,
        keep_end,
        |ex| whole(ex, tok),
        // Every sequence with a cut field (the prompt, or its completion) must still overflow.
        |r, cut, max| {
            r.completions.iter().zip(&cut[1..]).all(|(c, &c_cut)| {
                !(cut[0] || c_cut) || r.prompt_ids.len() + c.len() >= max + MARGIN_TOKENS
            })
        },
    )
}

fn whole(ex: &Example, tok: &Tokenizer) -> R<TokenizedRanking> {
    let (prompt, responses, margin): (&Text, Vec<&Text>, Option<f64>) = match ex {
        Example::Preference {
            prompt,
            chosen,
            rejected,
            margin,
        } => (prompt, vec![chosen, rejected], *margin),
        Example::Ranking {
            prompt, responses, ..
        } => (prompt, responses.iter().collect(), None),
        _ => return Err("preference training needs preference or ranking rows".into()),
    };
    let (prompt_ids, full): (Vec<u32>, Vec<Vec<u32>>) = match prompt {
        Text::Plain(p) => {
            let eos = eos_string(tok)?;
            let mut full = vec![];
            for r in &responses {
                let Text::Plain(c) = r else {
                    return Err("prompt is plain text but a completion is a conversation".into());
                };
                full.push(encode(tok, &format!("{p}{}", with_eos(c, &eos)), true)?);
            }
            (encode(tok, p, true)?, full)
        }
        Text::Messages(pm) => {
            let mut full = vec![];
            for r in &responses {
                let Text::Messages(cm) = r else {
                    return Err("prompt is a conversation but a completion is plain text".into());
                };
                let all: Vec<_> = pm.iter().chain(cm.iter()).cloned().collect();
                full.push(encode_chat(tok, &all, false)?);
            }
            (encode_chat(tok, pm, true)?, full)
        }
    };
    let prompt_len = full
        .iter()
        .map(|f| common_prefix(&prompt_ids, f))
        .min()
        .unwrap_or(0);
    let completions: Vec<Vec<u32>> = full.iter().map(|f| f[prompt_len..].to_vec()).collect();
    if let Some(i) = completions.iter().position(Vec::is_empty) {
        return Err(format!("completion {i} has no tokens after the prompt"));
    }
    Ok(TokenizedRanking {
        prompt_ids: prompt_ids[..prompt_len].to_vec(),
        completions,
        margin,
    })
}

/// `prompt + completion` truncated to `max_length` (keep_start or keep_end), with its completion
/// mask; `None` when no completion token survives.
pub fn join_truncated(
    prompt: &[u32],
    completion: &[u32],
    max_length: Option<usize>,
    keep_end: bool,
) -> Option<(Vec<u32>, Vec<u8>)> {
    let mut ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mut mask: Vec<u8> = std::iter::repeat_n(0, prompt.len())
        .chain(std::iter::repeat_n(1, completion.len()))
        .collect();
    if let Some(max) = max_length {
        if ids.len() > max {
            let range = if keep_end {
                ids.len() - max..ids.len()
            } else {
                0..max
            };
            ids = ids[range.clone()].to_vec();
            mask = mask[range].to_vec();
        }
    }
    // Token 0 has no context: never a target.
    if let Some(m) = mask.first_mut() {
        *m = 0;
    }
    mask.contains(&1).then_some((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use preftune_model::Message;

    fn tok() -> Tokenizer {
        Tokenizer::from_hf_dir(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/models/tiny-llama"
        )))
        .unwrap()
    }

    #[test]
    fn plain_pairs_get_eos_and_share_the_prompt_prefix() {
        let t = tok();
        let ex = Example::Preference {
            prompt: Text::Plain("The movie was".into()),
            chosen: Text::Plain(" good.".into()),
            rejected: Text::Plain(" bad.".into()),
            margin: Some(2.0),
        };
        let r = tokenize_preference(&ex, &t, None, false).unwrap();
        assert_eq!(r.prompt_ids, t.encode("The movie was", true).unwrap());
        assert_eq!(
            t.decode(&r.completions[0], false).unwrap(),
            " good.<|im_end|>"
        );
        assert_eq!(
            t.decode(&r.completions[1], false).unwrap(),
            " bad.<|im_end|>"
        );
        assert_eq!(r.margin, Some(2.0));
    }

    #[test]
    fn conversations_use_the_generation_prompt_and_rankings_keep_order() {
        let t = tok();
        let m = |c: &str| Text::Messages(vec![Message::new("assistant", c)]);
        let ex = Example::Ranking {
            prompt: Text::Messages(vec![Message::new("user", "Rate it.")]),
            responses: vec![m("Great."), m("Fine."), m("Awful.")],
            scores: None,
        };
        let r = tokenize_preference(&ex, &t, None, false).unwrap();
        assert_eq!(
            t.decode(&r.prompt_ids, false).unwrap(),
            "<|im_start|>user\nRate it.<|im_end|>\n<|im_start|>assistant\n"
        );
        let texts: Vec<String> = r
            .completions
            .iter()
            .map(|c| t.decode(c, false).unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                "Great.<|im_end|>\n",
                "Fine.<|im_end|>\n",
                "Awful.<|im_end|>\n"
            ]
        );
    }

    #[test]
    fn truncation_keeps_start_or_end_and_drops_empty_completions() {
        let (ids, mask) = join_truncated(&[1, 2, 3], &[4, 5, 6], Some(4), false).unwrap();
        assert_eq!((ids, mask), (vec![1, 2, 3, 4], vec![0, 0, 0, 1]));
        let (ids, mask) = join_truncated(&[1, 2, 3], &[4, 5, 6], Some(4), true).unwrap();
        assert_eq!((ids, mask), (vec![3, 4, 5, 6], vec![0, 1, 1, 1]));
        assert!(join_truncated(&[1, 2, 3], &[4], Some(3), false).is_none());
    }
}
