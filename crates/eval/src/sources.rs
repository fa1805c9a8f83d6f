//! Reward sources and what uses them: scoring prompt/response rows, Best-of-N sampling, and the
//! resumable JSONL output they stream into.
//!
//! Every command that needs a reward names its source the same way:
//! - `model:PATH`: a reward model (`preftune rm`, or any transformers sequence classifier with one
//!   label), normalised with the gain and bias stored with it;
//! - `command:CMD`: a program run by `sh -c` that reads JSONL rows `{"prompt", "response"}` on stdin
//!   and writes one number per line on stdout;
//! - `combine:FILE.toml`: several named sources and a rule (`weighted_sum`, or Llama 2's
//!   `piecewise`: the safety score when the prompt is flagged risky or the safety score is below
//!   `safety_threshold`, else the helpfulness score);
//! - `gold:sentiment`: the gold IMDb sentiment judge (`preftune gold-train`), its logit, or
//!   `gold:sentiment=PATH` for a judge file elsewhere;
//! - `refusal` and `toxicity[=CSV]`: the safety judges of `crate::safety`;
//! - `llm:PATH[::safe|::helpful|::QUESTION]`: a local language model asked a yes/no rubric
//!   question about the response, scored ln(P(Yes) / P(No)) (`crate::judge::Rubric`).
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use preftune_data::Text;
use preftune_model::{generate, Message, Pretrained, SamplingConfig};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gold::GoldSentiment;

/// One thing to score: a prompt (plain or a conversation), a response, and whether the prompt is
/// flagged as risky (the `risky` field of a row; only the piecewise rule reads it).
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt: Text,
    pub response: String,
    pub risky: bool,
}

pub enum Rule {
    WeightedSum(Vec<f64>),
    /// Indices of the safety and helpfulness sources.
    Piecewise {
        safety: usize,
        helpfulness: usize,
        threshold: f64,
    },
}

pub enum RewardSource {
    Model(Box<Pretrained>),
    Command(String),
    /// A scorer in Rust (library users, tests).
    Function(Box<dyn Fn(&Sample) -> f64 + Send + Sync>),
    /// The gold sentiment judge: the logit of "positive" for the response text.
    Gold(Box<GoldSentiment>),
    /// A language model's log-odds of Yes to a rubric question.
    Rubric(Box<crate::judge::Rubric>),
    Combined {
        rule: Rule,
        parts: Vec<(String, RewardSource)>,
    },
}

/// `combine:FILE.toml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CombineFile {
    /// `weighted_sum` or `piecewise`.
    rule: String,
    /// Name -> source spec.
    sources: BTreeMap<String, String>,
    #[serde(default)]
    weights: BTreeMap<String, f64>,
    /// Piecewise: names of the two sources (default `safety`, `helpfulness`).
    safety: Option<String>,
    helpfulness: Option<String>,
    /// Llama 2 used 0.15.
    #[serde(default = "default_threshold")]
    safety_threshold: f64,
}

fn default_threshold() -> f64 {
    0.15
}

/// Raw rewards of `seqs` (scored at each one's last real token) in one right-padded batch, and
/// the number of real tokens.
pub fn score_sequences(
    model: &preftune_model::Model,
    seqs: &[&[u32]],
    pad_token_id: u32,
    device: &candle_core::Device,
) -> Result<(candle_core::Tensor, usize)> {
    let rows: Vec<preftune_data::TokenizedExample> = seqs
        .iter()
        .map(|s| preftune_data::TokenizedExample {
            input_ids: s.to_vec(),
            loss_mask: vec![1; s.len()],
            position_ids: None,
            truncated: false,
        })
        .collect();
    let refs: Vec<&preftune_data::TokenizedExample> = rows.iter().collect();
    let batch = preftune_data::collate(&refs, pad_token_id, device)?;
    let hidden = model.forward(&batch.input_ids, Some(&batch.attention_mask), None, None)?;
    let r = model.scores(
        &hidden,
        &batch.input_ids,
        &batch.attention_mask,
        Some(pad_token_id),
    )?;
    Ok((r, batch.num_tokens))
}

/// Tokens of `prompt + response` as the reward model was trained on them: plain text gets EOS
/// appended (TRL's RewardTrainer does), conversations go through the chat template.
fn reward_ids(p: &Pretrained, s: &Sample) -> Result<Vec<u32>> {
    Ok(match &s.prompt {
        Text::Plain(prompt) => {
            let eos = p
                .tokenizer
                .eos_token_id
                .map(|id| p.tokenizer.decode(&[id], false))
                .transpose()?
                .unwrap_or_default();
            let mut text = format!("{prompt}{}", s.response);
            if !eos.is_empty() && !text.ends_with(&eos) {
                text.push_str(&eos);
            }
            p.tokenizer.encode(&text, true)?
        }
        Text::Messages(m) => {
            let mut all = m.clone();
            all.push(Message::new("assistant", &s.response));
            p.tokenizer.encode_chat(&all, false)?
        }
    })
}

impl RewardSource {
    /// Parses a source spec (see the module docs). Reward models load in f32 on the CPU.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(path) = spec.strip_prefix("model:") {
            let p = Pretrained::load(Path::new(path), &Default::default())?;
            if !p.model.has_score_head() {
                return Err(Error::Config(format!(
                    "{path}: not a reward model (no score.weight)"
                )));
            }
            return Ok(RewardSource::Model(Box::new(p)));
        }
        if let Some(name) = spec.strip_prefix("gold:") {
            let (name, path) = match name.split_once('=') {
                Some((n, p)) => (n, PathBuf::from(p)),
                None => (name, crate::gold::default_path()),
            };
            if name != "sentiment" {
                return Err(Error::Config(format!(
                    "reward source `{spec}`: the gold scorers are: sentiment"
                )));
            }
            if !path.exists() {
                return Err(Error::Config(format!(
                    "{}: no gold sentiment judge; train it with `preftune gold-train`",
                    path.display()
                )));
            }
            return Ok(RewardSource::Gold(Box::new(GoldSentiment::load(&path)?)));
        }
        if let Some(cmd) = spec.strip_prefix("command:") {
            return Ok(RewardSource::Command(cmd.to_string()));
        }
        if let Some(file) = spec.strip_prefix("combine:") {
            let text =
                std::fs::read_to_string(file).map_err(|e| Error::Config(format!("{file}: {e}")))?;
            let c: CombineFile =
                toml::from_str(&text).map_err(|e| Error::Config(format!("{file}: {e}")))?;
            let names: Vec<String> = c.sources.keys().cloned().collect();
            let index = |n: &str| {
                names.iter().position(|x| x == n).ok_or_else(|| {
                    Error::Config(format!("{file}: no source named `{n}` in [sources]"))
                })
            };
            let rule = match c.rule.as_str() {
                "weighted_sum" => Rule::WeightedSum(
                    names
                        .iter()
                        .map(|n| {
                            c.weights.get(n).copied().ok_or_else(|| {
                                Error::Config(format!("{file}: weights: `{n}` has no weight"))
                            })
                        })
                        .collect::<Result<_>>()?,
                ),
                "piecewise" => Rule::Piecewise {
                    safety: index(c.safety.as_deref().unwrap_or("safety"))?,
                    helpfulness: index(c.helpfulness.as_deref().unwrap_or("helpfulness"))?,
                    threshold: c.safety_threshold,
                },
                other => {
                    return Err(Error::Config(format!(
                        "{file}: rule: `{other}` (use weighted_sum or piecewise)"
                    )))
                }
            };
            let parts = c
                .sources
                .iter()
                .map(|(n, s)| Ok((n.clone(), RewardSource::parse(s)?)))
                .collect::<Result<_>>()?;
            return Ok(RewardSource::Combined { rule, parts });
        }
        if let Some(rest) = spec.strip_prefix("llm:") {
            return Ok(RewardSource::Rubric(Box::new(crate::judge::Rubric::parse(
                rest,
            )?)));
        }
        if spec == "refusal" {
            let f = |s: &Sample| f64::from(u8::from(crate::safety::is_refusal(&s.response)));
            return Ok(RewardSource::Function(Box::new(f)));
        }
        if spec == "toxicity" || spec.starts_with("toxicity=") {
            let path = spec
                .strip_prefix("toxicity=")
                .map_or_else(crate::safety::default_profanity_csv, PathBuf::from);
            let t = crate::safety::Toxicity::load(&path)?;
            return Ok(RewardSource::Function(Box::new(move |s: &Sample| {
                t.score(&s.response)
            })));
        }
        Err(Error::Config(format!(
            "reward source `{spec}`: use model:PATH, command:CMD, combine:FILE.toml, gold:sentiment, \
             refusal, toxicity[=CSV] or llm:PATH[::safe|::helpful|::QUESTION]"
        )))
    }

    /// One reward per sample.
    pub fn score(&self, samples: &[Sample]) -> Result<Vec<f64>> {
        match self {
            RewardSource::Model(p) => {
                let mut out = Vec::with_capacity(samples.len());
                for chunk in samples.chunks(8) {
                    let ids = chunk
                        .iter()
                        .map(|s| reward_ids(p, s))
                        .collect::<Result<Vec<_>>>()?;
                    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
                    let (r, _) =
                        score_sequences(&p.model, &seqs, p.pad_token_id(), p.model.device())?;
                    out.extend(p.model.normalize_rewards(&r.to_vec1::<f32>()?));
                }
                Ok(out)
            }
            RewardSource::Command(cmd) => run_command(cmd, samples),
            RewardSource::Function(f) => Ok(samples.iter().map(f.as_ref()).collect()),
            RewardSource::Gold(g) => Ok(samples.iter().map(|s| g.logit(&s.response)).collect()),
            RewardSource::Rubric(r) => samples
                .iter()
                .map(|s| r.score(&s.prompt, &s.response))
                .collect(),
            RewardSource::Combined { rule, parts } => {
                let scores = parts
                    .iter()
                    .map(|(_, s)| s.score(samples))
                    .collect::<Result<Vec<_>>>()?;
                Ok((0..samples.len())
                    .map(|i| match rule {
                        Rule::WeightedSum(w) => w.iter().zip(&scores).map(|(w, s)| w * s[i]).sum(),
                        Rule::Piecewise {
                            safety,
                            helpfulness,
                            threshold,
                        } => {
                            let s = scores[*safety][i];
                            if samples[i].risky || s < *threshold {
                                s
                            } else {
                                scores[*helpfulness][i]
                            }
                        }
                    })
                    .collect())
            }
        }
    }
}

/// A prompt as it appears in JSONL rows: a string, or a list of `{role, content}` messages.
pub fn text_json(t: &Text) -> Value {
    match t {
        Text::Plain(s) => json!(s),
        Text::Messages(m) => json!(m
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>()),
    }
}

/// Runs the external scorer once for a batch; its output must be one number per input row.
fn run_command(cmd: &str, samples: &[Sample]) -> Result<Vec<f64>> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::Msg(format!("reward command `{cmd}`: {e}")))?;
    let mut input = String::new();
    for s in samples {
        input
            .push_str(&json!({"prompt": text_json(&s.prompt), "response": s.response}).to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Write from a thread so a scorer that answers line by line cannot deadlock on a full pipe.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .map_err(|e| Error::Msg(format!("reward command `{cmd}`: {e}")))?;
    let _ = writer.join();
    let status = child
        .wait()
        .map_err(|e| Error::Msg(format!("reward command `{cmd}`: {e}")))?;
    if !status.success() {
        return Err(Error::Msg(format!(
            "reward command `{cmd}` failed: {status}"
        )));
    }
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != samples.len() {
        return Err(Error::Msg(format!(
            "reward command `{cmd}`: {} rows in, {} numbers out",
            samples.len(),
            lines.len()
        )));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.trim().parse::<f64>().map_err(|_| {
                Error::Msg(format!(
                    "reward command `{cmd}`: output line {}: `{l}` is not a number",
                    i + 1
                ))
            })
        })
        .collect()
}

/// A JSONL output that a later run continues: on open, a torn last line (from a crash) is cut
/// off and the complete lines are counted, so the caller skips that many inputs.
pub struct ResumableJsonl {
    file: std::fs::File,
    path: PathBuf,
    /// Rows already in the file.
    pub done: usize,
}

impl ResumableJsonl {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut done = 0;
        let mut keep = 0u64;
        let mut reader = std::io::BufReader::new(&file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            done += 1;
            keep += n as u64;
        }
        file.set_len(keep).map_err(|e| Error::io(path, e))?;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        Ok(ResumableJsonl {
            file,
            path: path.to_path_buf(),
            done,
        })
    }

    /// Appends rows and syncs them to disk.
    pub fn append(&mut self, rows: &[Value]) -> Result<()> {
        let mut buf = String::new();
        for r in rows {
            buf.push_str(&r.to_string());
            buf.push('\n');
        }
        self.file
            .write_all(buf.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))?;
        self.done += rows.len();
        Ok(())
    }
}

/// The prompt of a row (`prompt`: a string or a list of messages); an error names the row's file
/// and line.
pub fn row_prompt(row: &preftune_data::Row) -> Result<Text> {
    prompt_value(&row.value).map_err(|e| Error::Msg(format!("{}: prompt: {e}", row.loc)))
}

fn prompt_value(row: &Value) -> std::result::Result<Text, String> {
    match row.get("prompt") {
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(Value::Array(a)) => a
            .iter()
            .map(|m| {
                let role = m["role"].as_str().ok_or("a message has no string `role`")?;
                let content = m["content"]
                    .as_str()
                    .ok_or("a message has no string `content`")?;
                Ok(Message::new(role, content))
            })
            .collect::<std::result::Result<Vec<_>, &str>>()
            .map(Text::Messages)
            .map_err(|e| e.to_string()),
        Some(_) => Err("expected a string or a list of messages".into()),
        None => Err("missing".into()),
    }
}

/// Prompt token ids for sampling: plain text as is, conversations with the generation prompt.
pub fn prompt_ids(p: &Pretrained, prompt: &Text) -> Result<Vec<u32>> {
    Ok(match prompt {
        Text::Plain(s) => p.tokenizer.encode(s, true)?,
        Text::Messages(m) => p.tokenizer.encode_chat(m, true)?,
    })
}

/// `n` samples per prompt, each scored: what Best-of-N keeps the best of.
pub struct Candidates {
    pub responses: Vec<String>,
    pub rewards: Vec<f64>,
}

impl Candidates {
    /// Index of the highest reward (the first on ties).
    pub fn best(&self) -> usize {
        let mut best = 0;
        for (i, r) in self.rewards.iter().enumerate() {
            if *r > self.rewards[best] {
                best = i;
            }
        }
        best
    }
}

/// The highest- and lowest-scored of `scores` (the last highest, the first lowest), when the
/// highest is strictly higher: the best-versus-worst pair preference data keeps of a prompt's
/// samples.
pub fn best_and_worst(scores: &[f64]) -> Option<(usize, usize)> {
    let by_score = |&a: &usize, &b: &usize| scores[a].total_cmp(&scores[b]);
    let best = (0..scores.len()).max_by(by_score)?;
    let worst = (0..scores.len()).min_by(by_score)?;
    (scores[best] > scores[worst]).then_some((best, worst))
}

/// Each conversation answered once (the chat template's generation prompt after it), `batch_size`
/// at a time, batch `b` seeded with `sampling.seed + b`; scored by `reward` when given (risky
/// samples, for the piecewise rule). A non-empty `prefix` starts every answer (an answer template,
/// prefilled): the model continues it, and the answers returned begin with it. Red teaming and
/// context distillation sample through it.
pub fn answer_conversations(
    policy: &Pretrained,
    conversations: &[Vec<Message>],
    batch_size: usize,
    reward: Option<&RewardSource>,
    sampling: &SamplingConfig,
    prefix: &str,
) -> Result<(Vec<String>, Vec<f64>)> {
    let prefix_ids = if prefix.is_empty() {
        vec![]
    } else {
        policy.tokenizer.encode(prefix, false)?
    };
    let (mut texts, mut scores) = (vec![], vec![]);
    for (b, chunk) in conversations.chunks(batch_size.max(1)).enumerate() {
        let t: Vec<Text> = chunk.iter().map(|m| Text::Messages(m.clone())).collect();
        let ids = t
            .iter()
            .map(|t| {
                let mut ids = prompt_ids(policy, t)?;
                ids.extend(&prefix_ids);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<PromptRef> = t
            .iter()
            .zip(&ids)
            .map(|(text, ids)| PromptRef {
                ids,
                text,
                risky: true,
            })
            .collect();
        let cfg = SamplingConfig {
            seed: sampling.seed.wrapping_add(b as u64),
            ..sampling.clone()
        };
        let s = sample_and_score_ids(&policy.model, &policy.tokenizer, &refs, 1, None, &cfg)?;
        let answers: Vec<String> = s.texts.iter().map(|x| format!("{prefix}{x}")).collect();
        if let Some(r) = reward {
            let samples: Vec<Sample> = t
                .iter()
                .zip(&answers)
                .map(|(prompt, response)| Sample {
                    prompt: prompt.clone(),
                    response: response.clone(),
                    risky: true,
                })
                .collect();
            scores.extend(r.score(&samples)?);
        }
        texts.extend(answers);
    }
    Ok((texts, scores))
}

/// A prompt to sample from: its token ids, its text (what the reward source reads) and whether it
/// is risky (for the piecewise safety rule).
#[derive(Clone, Copy, Debug)]
pub struct PromptRef<'a> {
    pub ids: &'a [u32],
    pub text: &'a Text,
    pub risky: bool,
}

/// One sampled batch, prompt-major: each prompt's `n` samples in a row.
#[derive(Clone, Debug, Default)]
pub struct Scored {
    /// New tokens per sample (EOS included when hit).
    pub tokens: Vec<Vec<u32>>,
    /// The decoded responses, EOS tokens left out.
    pub texts: Vec<String>,
    /// One per sample; empty when no reward source was given.
    pub rewards: Vec<f64>,
    /// Whether each sample ended with EOS.
    pub finished: Vec<bool>,
}

/// The one sample-and-score engine: every prompt `n` times in one batch, decoded, and scored by
/// `reward` when given. Rollouts, Best-of-N, evaluation, candidates for labelling and the pipeline
/// all sample through it.
pub fn sample_and_score_ids(
    policy: &preftune_model::Model,
    tokenizer: &preftune_model::Tokenizer,
    prompts: &[PromptRef],
    n: usize,
    reward: Option<&RewardSource>,
    sampling: &SamplingConfig,
) -> Result<Scored> {
    let batch: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.ids.to_vec(), n))
        .collect();
    let out = generate(policy, &batch, sampling)?;
    let eos = &sampling.eos_token_ids;
    let texts = out
        .tokens
        .iter()
        .map(|t| {
            let body: Vec<u32> = t.iter().copied().filter(|x| !eos.contains(x)).collect();
            tokenizer.decode(&body, true)
        })
        .collect::<preftune_model::Result<Vec<_>>>()?;
    let rewards = match reward {
        Some(r) => {
            let samples: Vec<Sample> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| Sample {
                    prompt: prompts[i / n].text.clone(),
                    response: t.clone(),
                    risky: prompts[i / n].risky,
                })
                .collect();
            r.score(&samples)?
        }
        None => vec![],
    };
    Ok(Scored {
        tokens: out.tokens,
        texts,
        rewards,
        finished: out.finished,
    })
}

/// Samples `n` responses for each prompt (text and whether it is risky) in one batch, scored by
/// `reward` when given.
pub fn sample_prompts(
    policy: &Pretrained,
    reward: Option<&RewardSource>,
    prompts: &[(Text, bool)],
    n: usize,
    sampling: &SamplingConfig,
) -> Result<Scored> {
    let ids = prompts
        .iter()
        .map(|(p, _)| prompt_ids(policy, p))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<PromptRef> = prompts
        .iter()
        .zip(&ids)
        .map(|((text, risky), ids)| PromptRef {
            ids,
            text,
            risky: *risky,
        })
        .collect();
    sample_and_score_ids(&policy.model, &policy.tokenizer, &refs, n, reward, sampling)
}

/// Samples `n` responses for each prompt in one batch and scores them.
pub fn sample_and_score(
    policy: &Pretrained,
    reward: &RewardSource,
    prompts: &[(Text, bool)],
    n: usize,
    sampling: &SamplingConfig,
) -> Result<Vec<Candidates>> {
    let s = sample_prompts(policy, Some(reward), prompts, n, sampling)?;
    Ok((0..prompts.len())
        .map(|j| Candidates {
            responses: s.texts[j * n..(j + 1) * n].to_vec(),
            rewards: s.rewards[j * n..(j + 1) * n].to_vec(),
        })
        .collect())
}
