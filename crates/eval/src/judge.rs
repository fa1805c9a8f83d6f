//! Pairwise judges for win rates: any reward source (the higher score wins), or a local language
//! model asked which of two responses is better (`llm:PATH`).
//!
//! The LLM judge reads the probabilities of the answers "A" and "B" at the first assistant
//! token instead of sampling, and asks in both orders, averaging: language models favour one
//! position, and a judge that only asked once would measure that bias as much as the responses.
use std::path::Path;

use candle_core::{DType, Tensor};
use preftune_data::Text;
use preftune_model::{Message, Pretrained};

use crate::error::{Error, Result};
use crate::sources::{RewardSource, Sample};

/// The question the LLM judge answers unless told otherwise.
pub const DEFAULT_QUESTION: &str = "Which response is better?";

/// Per pair, the preference for the first side; for reward judges also both sides' rewards.
pub type Comparison = (Vec<f64>, Option<(Vec<f64>, Vec<f64>)>);

pub enum Judge {
    Reward(RewardSource),
    Llm {
        model: Box<Pretrained>,
        question: String,
    },
}

/// Token ids that begin an answer `letter` ("A" or " A").
fn answer_ids(p: &Pretrained, letter: &str) -> Result<Vec<u32>> {
    let mut ids = vec![];
    for text in [letter.to_string(), format!(" {letter}")] {
        if let Some(&id) = p.tokenizer.encode(&text, false)?.first() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    if ids.is_empty() {
        return Err(Error::Config(format!(
            "llm judge: the tokenizer has no token for `{letter}`"
        )));
    }
    Ok(ids)
}

fn prompt_text(t: &Text) -> String {
    match t {
        Text::Plain(s) => s.clone(),
        Text::Messages(m) => m
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

impl Judge {
    /// `llm:PATH` (a causal LM, prompted with `question`), else any reward source spec.
    pub fn parse(spec: &str, question: Option<&str>) -> Result<Judge> {
        match spec.strip_prefix("llm:") {
            Some(path) => Ok(Judge::Llm {
                model: Box::new(Pretrained::load(Path::new(path), &Default::default())?),
                question: question.unwrap_or(DEFAULT_QUESTION).to_string(),
            }),
            None => Ok(Judge::Reward(RewardSource::parse(spec)?)),
        }
    }

    /// For each pair, the judge's preference for `a[i]` over `b[i]` in [0, 1]: 1 or 0 (0.5 on a
    /// tie) for reward judges, the order-averaged probability for the LLM judge. Also returns
    /// each side's reward for reward judges (`None` for the LLM judge).
    pub fn compare(&self, a: &[Sample], b: &[Sample]) -> Result<Comparison> {
        match self {
            Judge::Reward(src) => {
                let (ra, rb) = (src.score(a)?, src.score(b)?);
                let p = ra
                    .iter()
                    .zip(&rb)
                    .map(|(x, y)| match x.total_cmp(y) {
                        std::cmp::Ordering::Greater => 1.0,
                        std::cmp::Ordering::Less => 0.0,
                        std::cmp::Ordering::Equal => 0.5,
                    })
                    .collect();
                Ok((p, Some((ra, rb))))
            }
            Judge::Llm { model, question } => {
                let ids_a = answer_ids(model, "A")?;
                let ids_b = answer_ids(model, "B")?;
                let mut out = Vec::with_capacity(a.len());
                for (x, y) in a.iter().zip(b) {
                    // P(first listed wins) with x first, and P(second listed wins) with y first.
                    let first = llm_first_wins(
                        model,
                        question,
                        &x.prompt,
                        &x.response,
                        &y.response,
                        &ids_a,
                        &ids_b,
                    )?;
                    let second = llm_first_wins(
                        model,
                        question,
                        &x.prompt,
                        &y.response,
                        &x.response,
                        &ids_a,
                        &ids_b,
                    )?;
                    out.push((first + (1.0 - second)) / 2.0);
                }
                Ok((out, None))
            }
        }
    }
}

/// The probability, among the answers "A" and "B", that the model names response A.
fn llm_first_wins(
    p: &Pretrained,
    question: &str,
    prompt: &Text,
    ra: &str,
    rb: &str,
    ids_a: &[u32],
    ids_b: &[u32],
) -> Result<f64> {
    let text = format!(
        "You compare two responses to the same prompt.\n\nPrompt:\n{}\n\nResponse A:\n{ra}\n\n\
         Response B:\n{rb}\n\n{question} Answer with the single letter A or B.",
        prompt_text(prompt)
    );
    let ids = if p.tokenizer.chat_template().is_some() {
        p.tokenizer
            .encode_chat(&[Message::new("user", &text)], true)?
    } else {
        p.tokenizer.encode(&format!("{text}\nAnswer:"), true)?
    };
    let x = Tensor::new(ids.as_slice(), p.model.device())?.unsqueeze(0)?;
    let hidden = p.model.forward(&x, None, None, None)?;
    let last = hidden.narrow(1, ids.len() - 1, 1)?;
    let logits = p
        .model
        .logits(&last)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    // Relative to the best logit; the normaliser cancels in pa / (pa + pb).
    let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mass = |ids: &[u32]| {
        ids.iter()
            .map(|&i| (logits[i as usize] - top).exp())
            .sum::<f64>()
    };
    let (pa, pb) = (mass(ids_a), mass(ids_b));
    if pa + pb <= 0.0 || !(pa + pb).is_finite() {
        return Err(Error::Msg(
            "llm judge: the model gives the answers A and B no probability".into(),
        ));
    }
    Ok(pa / (pa + pb))
}
