//! DPO and its family on the shared loop: pairwise losses (TRL's `loss_type`s, R-DPO, combined with
//! `loss_weights`), PRO on rankings, `rpo_alpha`, and the reference model as a separate frozen model,
//! the LoRA base (no second copy of the weights), precomputed log-probs, or none.
pub mod cpo;
pub mod kto;
pub mod loss;
pub mod online;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use preftune_data::{
    collate, join_truncated, parse_examples, read_rows, tokenize_preference, ColumnMap, Format,
    RowError, TokenizedExample,
};
use preftune_model::{token_logprobs, Model, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::{RunConfig, TrainingArguments};
use crate::error::{Error, Result};
use crate::trainer::{evaluate, train_with_report, Algorithm, Metrics, Split};
use loss::{implicit_rewards, pair_loss, pro_loss, LossType, PairLogps, PairParams};

/// One loss type or several (TRL accepts both).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(LossType),
    Many(Vec<LossType>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    /// A name or a list of names; an unknown one is named with the list of known ones.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let parse = |s: &str| s.parse::<LossType>().map_err(serde::de::Error::custom);
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) => OneOrMany::One(parse(&s)?),
            Raw::Many(v) => OneOrMany::Many(
                v.iter()
                    .map(|s| parse(s))
                    .collect::<std::result::Result<_, _>>()?,
            ),
        })
    }
}

/// DPO's own options (TRL's `DPOConfig` names, plus `length_alpha`, `rpo_alpha`, `reference_free`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DpoArgs {
    pub beta: f64,
    pub loss_type: OneOrMany,
    pub loss_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    /// R-DPO: each implicit reward gets `- length_alpha * |y|`.
    pub length_alpha: f64,
    /// Adds `rpo_alpha * NLL(chosen)` (mean over chosen tokens).
    pub rpo_alpha: Option<f64>,
    /// Use a uniform reference (reference log-probs 0).
    pub reference_free: bool,
    /// The frozen reference; default: the policy's starting weights (the base model under LoRA).
    pub ref_model: Option<String>,
    /// Compute reference log-probs once, cache them next to the dataset, and free the reference.
    pub precompute_ref_log_probs: bool,
    /// PRO: divide each response's log-ratio by its length.
    pub pro_length_normalize: bool,
}

impl Default for DpoArgs {
    fn default() -> Self {
        DpoArgs {
            beta: 0.1,
            loss_type: OneOrMany::One(LossType::Sigmoid),
            loss_weights: None,
            label_smoothing: 0.0,
            length_alpha: 0.0,
            rpo_alpha: None,
            reference_free: false,
            ref_model: None,
            precompute_ref_log_probs: false,
            pro_length_normalize: false,
        }
    }
}

/// DPO's defaults over the shared ones, as TRL's `DPOConfig` sets them.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nmax_length = 1024\nlogging_steps = 10")
        .expect("static TOML")
}

impl DpoArgs {
    /// The loss types with their weights, validated.
    pub fn losses(&self) -> Result<Vec<(LossType, f64)>> {
        let kinds = match &self.loss_type {
            OneOrMany::One(k) => vec![*k],
            OneOrMany::Many(v) => v.clone(),
        };
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; kinds.len()]);
        if weights.len() != kinds.len() {
            return Err(Error::Config(format!(
                "loss_weights has {} entries for {} loss types",
                weights.len(),
                kinds.len()
            )));
        }
        if kinds.contains(&LossType::Pro) && kinds.len() > 1 {
            return Err(Error::Config(
                "loss_type pro (listwise) cannot be combined with pairwise losses".into(),
            ));
        }
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(Error::Config("beta must be > 0".into()));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(Error::Config("label_smoothing must be in [0, 0.5)".into()));
        }
        if kinds.contains(&LossType::ExoPair) && self.label_smoothing == 0.0 {
            return Err(Error::Config(
                "exo_pair needs label_smoothing > 0 (it takes log(label_smoothing))".into(),
            ));
        }
        Ok(kinds.into_iter().zip(weights).collect())
    }
}

/// A prompt and its tokenized responses (2 for a pair: chosen, rejected; k for a ranking), each
/// already joined and truncated, with cached reference log-probs when precomputed.
#[derive(Clone, Debug)]
pub struct Item {
    pub rows: Vec<TokenizedExample>,
    pub ref_logps: Option<Vec<f32>>,
}

/// Where reference log-probs come from.
pub enum Reference {
    Model(Box<Model>),
    /// A reference model (its path) that only filling the precomputed cache would load: when the
    /// cache already holds every example, the run never loads it.
    Unloaded(String),
    /// The policy without its LoRA adapters.
    LoraBase,
    Precomputed,
    Free,
}

impl Reference {
    /// Log-probs of `rows` under a reference that scores as it goes: a frozen model, or `policy`
    /// without its adapters; without gradient.
    pub(crate) fn live_logps(
        &self,
        policy: &Model,
        rows: &[&TokenizedExample],
        pad: u32,
        device: &Device,
    ) -> Result<Tensor> {
        // The policy's training products, not a sampler's: the same weights give the same
        // log-probs as the policy's own pass.
        let _same = preftune_model::ops::TrainingProducts::new();
        let lp = match self {
            Reference::Model(m) => seq_logps(m, rows, pad, device)?.logps,
            Reference::LoraBase => {
                seq_logps(&policy.without_lora().detached()?, rows, pad, device)?.logps
            }
            Reference::Unloaded(p) => {
                return Err(Error::Msg(format!(
                    "the reference model {p} is used before it was loaded"
                )))
            }
            Reference::Precomputed | Reference::Free => {
                return Err(Error::Msg(
                    "this reference has no model to score with".into(),
                ))
            }
        };
        Ok(lp.detach())
    }
}

pub struct Dpo {
    pub losses: Vec<(LossType, f64)>,
    pub params: PairParams,
    pub rpo_alpha: Option<f64>,
    pub pro_length_normalize: bool,
    pub train: Vec<Item>,
    pub eval: Vec<Item>,
    pub reference: Reference,
    pub pad_token_id: u32,
    pub device: Device,
}

/// Data report for one split.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataReport {
    #[serde(flatten)]
    pub counts: crate::error::RowCounts,
    /// Rows where a sequence was cut to max_length.
    pub truncated: usize,
    /// Rows dropped because the prompt alone fills max_length (TRL drops them too).
    pub dropped_prompt_too_long: usize,
    pub examples: usize,
    pub mean_chosen_tokens: f64,
    pub mean_rejected_tokens: f64,
}

/// Reads preference (or, for `pro`, ranking) data and tokenizes it as TRL's DPOTrainer does.
pub fn load_split(
    path: &Path,
    args: &TrainingArguments,
    listwise: bool,
    tok: &Tokenizer,
) -> Result<(Vec<Item>, DataReport)> {
    load_split_with(path, args, listwise, tok, false)
}

/// [`load_split`]; with `legacy_specials`, as TRL's CPO and ORPO trainers tokenize: the
/// tokenizer's BOS before the prompt and its EOS after each completion, unless already there.
pub(crate) fn load_split_with(
    path: &Path,
    args: &TrainingArguments,
    listwise: bool,
    tok: &Tokenizer,
    legacy_specials: bool,
) -> Result<(Vec<Item>, DataReport)> {
    let rows = read_rows(path)?;
    let columns = ColumnMap {
        map: args.columns.clone(),
    };
    let format = if listwise {
        Format::Ranking
    } else {
        Format::Preference
    };
    let (examples, mut errors) = parse_examples(&rows, format, &columns);
    let keep_end = args.truncation_mode == preftune_data::TruncationMode::KeepEnd;
    let mut items = vec![];
    let (mut truncated, mut dropped) = (0, 0);
    for (loc, ex) in &examples {
        let mut r = match tokenize_preference(ex, tok, args.max_length, keep_end) {
            Ok(r) => r,
            Err(msg) => {
                errors.push(RowError {
                    loc: loc.clone(),
                    field: "(tokenize)".into(),
                    msg,
                });
                continue;
            }
        };
        if legacy_specials {
            if let Some(bos) = tok.bos_token_id {
                if r.prompt_ids.first() != Some(&bos) {
                    r.prompt_ids.insert(0, bos);
                }
            }
            if let Some(eos) = tok.eos_token_id {
                for c in &mut r.completions {
                    if c.last() != Some(&eos) {
                        c.push(eos);
                    }
                }
            }
        }
        let mut out = vec![];
        let mut cut = false;
        for c in &r.completions {
            match join_truncated(&r.prompt_ids, c, args.max_length, keep_end) {
                Some((ids, mask)) => {
                    cut |= ids.len() < r.prompt_ids.len() + c.len();
                    out.push(TokenizedExample {
                        input_ids: ids,
                        loss_mask: mask,
                        position_ids: None,
                        truncated: cut,
                    });
                }
                None => break,
            }
        }
        if out.len() < r.completions.len() {
            dropped += 1;
            continue;
        }
        truncated += cut as usize;
        items.push(Item {
            rows: out,
            ref_logps: None,
        });
    }
    crate::error::refuse_bad_rows(&errors, args.skip_invalid_rows)?;
    let mean_len = |j: usize| {
        let n = items.iter().filter(|i| i.rows.len() > j).count().max(1);
        items
            .iter()
            .filter_map(|i| i.rows.get(j))
            .map(|r| r.loss_mask.iter().map(|&m| m as f64).sum::<f64>())
            .sum::<f64>()
            / n as f64
    };
    let report = DataReport {
        counts: crate::error::RowCounts::new(path, rows.len(), &errors),
        truncated,
        dropped_prompt_too_long: dropped,
        examples: items.len(),
        mean_chosen_tokens: mean_len(0),
        mean_rejected_tokens: mean_len(1),
    };
    Ok((items, report))
}

/// Summed log-probs and statistics of a set of sequences under `model` (chunked by the caller).
pub(crate) struct SeqStats {
    pub logps: Tensor,
    pub lens: Vec<f32>,
    pub hits: Vec<usize>,
    pub mean_logit_sum: Vec<f32>,
    pub tokens: usize,
    /// The final hidden states and the batch, for a second loss over the same forward pass.
    pub hidden: Tensor,
    pub batch: preftune_data::Batch,
}

pub(crate) fn seq_logps(
    model: &Model,
    rows: &[&TokenizedExample],
    pad: u32,
    device: &Device,
) -> Result<SeqStats> {
    let batch = collate(rows, pad, device)?;
    let hidden = model.forward(&batch.input_ids, Some(&batch.attention_mask), None, None)?;
    let lp = token_logprobs(model, &hidden, &batch.input_ids, &batch.loss_mask, 1.0)?;
    let lens = rows
        .iter()
        .map(|r| r.loss_mask.iter().skip(1).map(|&m| m as f32).sum())
        .collect();
    Ok(SeqStats {
        logps: lp.sum,
        lens,
        hits: lp.row_hits,
        mean_logit_sum: lp.row_mean_logit_sum,
        tokens: batch.num_tokens,
        hidden,
        batch,
    })
}

impl Dpo {
    fn split(&self, split: Split) -> &[Item] {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }

    fn listwise(&self) -> bool {
        self.losses.iter().any(|(k, _)| *k == LossType::Pro)
    }

    /// Reference log-probs of the flattened rows of `items` (same order as the policy's).
    fn reference_logps(
        &self,
        model: &Model,
        items: &[&Item],
        rows: &[&TokenizedExample],
    ) -> Result<Tensor> {
        let n = rows.len();
        match &self.reference {
            Reference::Free => Ok(Tensor::zeros(n, DType::F32, &self.device)?),
            Reference::Precomputed => {
                let cached: Vec<&Vec<f32>> = items
                    .iter()
                    .map(|it| {
                        it.ref_logps.as_ref().ok_or_else(|| {
                            Error::Msg("missing precomputed reference log-probs".into())
                        })
                    })
                    .collect::<Result<_>>()?;
                // Same order as `rows`: per item for rankings, all chosen then all rejected for pairs.
                let v: Vec<f32> = if self.listwise() {
                    cached.iter().flat_map(|r| r.iter().copied()).collect()
                } else {
                    (0..2)
                        .flat_map(|j| cached.iter().map(move |r| r[j]))
                        .collect()
                };
                Ok(Tensor::from_vec(v, n, &self.device)?)
            }
            live => live.live_logps(model, rows, self.pad_token_id, &self.device),
        }
    }

    /// Rows in TRL's order: every item's first response, then every item's second (pairs); for
    /// rankings, item by item.
    fn rows<'a>(&self, items: &[&'a Item]) -> Vec<&'a TokenizedExample> {
        if self.listwise() {
            items.iter().flat_map(|i| i.rows.iter()).collect()
        } else {
            (0..2)
                .flat_map(|j| items.iter().map(move |i| &i.rows[j]))
                .collect()
        }
    }
}

impl Algorithm for Dpo {
    fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    /// Every pair (or ranking) weighs the same: the loss is a mean over pairs, as in TRL.
    fn weight(&self, _split: Split, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let data = self.split(split);
        let items: Vec<&Item> = idx.iter().map(|&i| &data[i]).collect();
        let rows = self.rows(&items);
        let pol = seq_logps(model, &rows, self.pad_token_id, &self.device)?;
        let reference = self.reference_logps(model, &items, &rows)?;
        let b = items.len();
        let lens = Tensor::from_vec(pol.lens.clone(), rows.len(), &self.device)?;
        let mut m = Metrics::default();
        m.tokens = pol.tokens;
        let loss = if self.listwise() {
            let mut total = Tensor::zeros((), DType::F32, &self.device)?;
            let mut start = 0;
            // PRO's SFT term (with `rpo_alpha`): the NLL of each ranking's best response.
            let (mut best_logps, mut best_lens) = (vec![], vec![]);
            for it in &items {
                let k = it.rows.len();
                best_logps.push(pol.logps.narrow(0, start, 1)?);
                best_lens.push(pol.lens[start]);
                let mut r = ((pol.logps.narrow(0, start, k)? - reference.narrow(0, start, k)?)?
                    * self.params.beta)?;
                if self.pro_length_normalize {
                    r = r.broadcast_div(&lens.narrow(0, start, k)?.clamp(1.0, f64::INFINITY)?)?;
                }
                let rv: Vec<f32> = r.to_vec1()?;
                m.add("rewards/best", rv[0] as f64, 1.0);
                m.add("rewards/worst", rv[k - 1] as f64, 1.0);
                m.add(
                    "rewards/accuracies",
                    rv.windows(2).filter(|w| w[0] > w[1]).count() as f64,
                    (k - 1) as f64,
                );
                total = (total + pro_loss(&r)?)?;
                start += k;
            }
            if let Some(a) = self.rpo_alpha {
                let tokens = best_lens.iter().sum::<f32>().max(1.0) as f64;
                let nll = (Tensor::cat(&best_logps, 0)?.sum_all()?.neg()? / tokens)?;
                total = (total + (nll * (a * b as f64))?)?;
            }
            total
        } else {
            let (pc, pr) = (pol.logps.narrow(0, 0, b)?, pol.logps.narrow(0, b, b)?);
            let (rc, rr) = (reference.narrow(0, 0, b)?, reference.narrow(0, b, b)?);
            let (lc, lr) = (lens.narrow(0, 0, b)?, lens.narrow(0, b, b)?);
            let p = PairLogps {
                chosen: &pc,
                rejected: &pr,
                ref_chosen: &rc,
                ref_rejected: &rr,
                chosen_len: &lc,
                rejected_len: &lr,
            };
            let mut total = Tensor::zeros((), DType::F32, &self.device)?;
            for (kind, w) in &self.losses {
                let per = match kind {
                    // TRL's `sft` loss type: NLL over chosen tokens, the same for every pair.
                    LossType::Sft => (pc.sum_all()?.neg()?
                        / lc.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?
                        .broadcast_as(b)?,
                    _ => pair_loss(*kind, &p, &self.params)?,
                };
                total = (total + (per.sum_all()? * *w)?)?;
            }
            if let Some(a) = self.rpo_alpha {
                let nll =
                    (pc.sum_all()?.neg()? / lc.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
                total = (total + (nll * (a * b as f64))?)?;
            }
            let (rw, rl) = implicit_rewards(&p, &self.params)?;
            pair_metrics(&mut m, &rw, &rl, &pc, &pr, &pol, b)?;
            let len = |r: &[f32]| r.iter().map(|&x| x as f64).sum::<f64>();
            let (clen, rlen, bf) = (len(&pol.lens[..b]), len(&pol.lens[b..]), b as f64);
            m.add(
                "mean_token_accuracy",
                pol.hits[..b].iter().sum::<usize>() as f64,
                clen,
            );
            m.add("completion_length/chosen", clen, bf);
            m.add("completion_length/rejected", rlen, bf);
            total
        };
        m.add("loss", loss.to_scalar::<f32>()? as f64, b as f64);
        Ok((loss, m))
    }
}

/// TRL's pairwise metrics of a batch of `b` pairs (chosen rows first in `pol`): rewards `rw`, `rl`
/// (chosen, rejected), their accuracy and margin, the policy's log-probs `pc`, `pr`, and the mean
/// logit over completion tokens.
pub(crate) fn pair_metrics(
    m: &mut Metrics,
    rw: &Tensor,
    rl: &Tensor,
    pc: &Tensor,
    pr: &Tensor,
    pol: &SeqStats,
    b: usize,
) -> Result<()> {
    let (rw, rl): (Vec<f32>, Vec<f32>) = (rw.to_vec1()?, rl.to_vec1()?);
    let bf = b as f64;
    m.add("rewards/chosen", rw.iter().map(|&x| x as f64).sum(), bf);
    m.add("rewards/rejected", rl.iter().map(|&x| x as f64).sum(), bf);
    m.add(
        "rewards/accuracies",
        rw.iter().zip(&rl).filter(|(a, b)| a > b).count() as f64,
        bf,
    );
    m.add(
        "rewards/margins",
        rw.iter().zip(&rl).map(|(a, b)| (a - b) as f64).sum(),
        bf,
    );
    let sum =
        |t: &Tensor| -> Result<f64> { Ok(t.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum()) };
    m.add("logps/chosen", sum(pc)?, bf);
    m.add("logps/rejected", sum(pr)?, bf);
    let (clen, rlen): (f64, f64) = (
        pol.lens[..b].iter().map(|&x| x as f64).sum(),
        pol.lens[b..].iter().map(|&x| x as f64).sum(),
    );
    m.add(
        "logits/chosen",
        pol.mean_logit_sum[..b].iter().map(|&x| x as f64).sum(),
        clen,
    );
    m.add(
        "logits/rejected",
        pol.mean_logit_sum[b..].iter().map(|&x| x as f64).sum(),
        rlen,
    );
    Ok(())
}

/// A fingerprint of what reference log-probs depend on, for the cache file name.
fn fingerprint(parts: &[String]) -> String {
    let mut h = preftune_model::io::Fnv::new();
    h.bytes(parts.join("\u{1f}").as_bytes());
    h.hex()
}

/// A fingerprint of every row's tokens, loss mask and positions.
fn tokens_fingerprint(items: &[Item]) -> String {
    let mut h = preftune_model::io::Fnv::new();
    for r in items.iter().flat_map(|it| &it.rows) {
        // Lengths first, so that no two different row sets give the same stream of words.
        h.words([r.input_ids.len() as u32, r.position_ids.is_some() as u32]);
        h.words(r.input_ids.iter().copied());
        h.words(r.loss_mask.iter().map(|&m| m as u32));
        h.words(r.position_ids.iter().flatten().copied());
    }
    h.hex()
}

/// Fills `items[i].ref_logps`, reading and appending to a cache file next to `data` so an
/// interrupted precomputation resumes where it stopped.
fn precompute(
    items: &mut [Item],
    data: &Path,
    key: &[String],
    dpo: &mut Dpo,
    model: &Model,
    batch: usize,
    load: &dyn Fn(&str) -> Result<Model>,
) -> Result<PathBuf> {
    let meta = std::fs::metadata(data).map_err(|e| Error::io(data, e))?;
    let mut parts = key.to_vec();
    parts.push(format!(
        "{}:{}:{:?}",
        data.display(),
        meta.len(),
        meta.modified().ok()
    ));
    // The tokens themselves: a chat template, tokenizer or length setting that changes what the
    // reference sees changes the key, whatever caused it.
    parts.push(tokens_fingerprint(items));
    let name = format!(
        "{}.ref-logps-{}.jsonl",
        data.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        fingerprint(&parts)
    );
    let cache = data.with_file_name(name);
    let mut done: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&cache) {
        for line in text.lines() {
            // A line cut short by a crash is simply recomputed.
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let (Some(i), Some(l)) = (v["i"].as_u64(), v["logps"].as_array()) {
                    done.insert(
                        i as usize,
                        l.iter()
                            .filter_map(|x| x.as_f64().map(|x| x as f32))
                            .collect(),
                    );
                }
            }
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cache)
        .map_err(|e| Error::io(&cache, e))?;
    let todo: Vec<usize> = (0..items.len())
        .filter(|i| done.get(i).is_none_or(|l| l.len() != items[*i].rows.len()))
        .collect();
    if let (false, Reference::Unloaded(path)) = (todo.is_empty(), &dpo.reference) {
        dpo.reference = Reference::Model(Box::new(load(path)?));
    }
    for chunk in todo.chunks(batch.max(1)) {
        let its: Vec<&Item> = chunk.iter().map(|&i| &items[i]).collect();
        let rows: Vec<&TokenizedExample> = its.iter().flat_map(|i| i.rows.iter()).collect();
        let lp: Vec<f32> = dpo.reference_logps(model, &its, &rows)?.to_vec1()?;
        let mut at = 0;
        for &i in chunk {
            let k = items[i].rows.len();
            let v = lp[at..at + k].to_vec();
            at += k;
            writeln!(file, "{}", serde_json::json!({"i": i, "logps": v}))
                .map_err(|e| Error::io(&cache, e))?;
            done.insert(i, v);
        }
        file.flush().map_err(|e| Error::io(&cache, e))?;
    }
    for (i, it) in items.iter_mut().enumerate() {
        it.ref_logps = done.remove(&i);
    }
    Ok(cache)
}

/// The splits a run reads: `train_file` (unless `eval_only`) and `eval_file` (required with
/// `eval_only`), each through `load`, with its report printed by `print`.
pub(crate) fn load_splits<T>(
    args: &TrainingArguments,
    eval_only: bool,
    load: impl Fn(&Path) -> Result<(Vec<T>, DataReport)>,
    print: impl Fn(&DataReport),
) -> Result<(Vec<T>, Vec<T>, Vec<DataReport>)> {
    let mut reports = vec![];
    let mut read = |path: &Path| -> Result<Vec<T>> {
        let (items, r) = load(path)?;
        print(&r);
        reports.push(r);
        Ok(items)
    };
    let train = match (&args.train_file, eval_only) {
        (_, true) => vec![],
        (Some(f), false) => read(f)?,
        (None, false) => return Err(Error::Config("train_file is required".into())),
    };
    let eval = match (&args.eval_file, eval_only) {
        (Some(f), _) => read(f)?,
        (None, true) => return Err(Error::Config("--eval-only needs eval_file".into())),
        (None, false) => vec![],
    };
    Ok((train, eval, reports))
}

/// Evaluates (`--eval-only`) and returns the summary with the data reports.
pub(crate) fn eval_summary(
    args: &TrainingArguments,
    model: &Model,
    algo: &mut dyn Algorithm,
    reports: &[DataReport],
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(evaluate(args, model, algo)?).unwrap_or_default();
    v["data"] = serde_json::to_value(reports).unwrap_or_default();
    Ok(v)
}

pub(crate) fn report(r: &DataReport) {
    r.counts.print(&format!(
        "{} truncated, {} dropped (prompt fills max_length), {} examples, mean completion tokens chosen {:.1} rejected {:.1}",
        r.truncated, r.dropped_prompt_too_long, r.examples, r.mean_chosen_tokens, r.mean_rejected_tokens
    ));
}

/// `preftune dpo`: trains (or, with `eval_only`, evaluates) and returns the summary printed as JSON.
pub fn run(cfg: &RunConfig<DpoArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    let args = &cfg.args;
    // The whole run, so that precomputed reference log-probs use the policy's products.
    let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
    let d = &cfg.algo;
    let losses = d.losses()?;
    let listwise = losses.iter().any(|(k, _)| *k == LossType::Pro);
    let params = PairParams {
        beta: d.beta,
        label_smoothing: d.label_smoothing,
        length_alpha: d.length_alpha,
    };
    let frozen = |path: &str| Ok(crate::trainer::load_model(args, path, false)?.model);
    let (policy, lora, ckpt) =
        crate::trainer::load_run_policy(args, &cfg.table, resume, eval_only)?;
    // With precomputed log-probs the reference serves only to fill the cache.
    let lazy = d.precompute_ref_log_probs && !eval_only;
    let model_ref = |path: &str| -> Result<Reference> {
        Ok(if lazy {
            Reference::Unloaded(path.to_string())
        } else {
            Reference::Model(Box::new(frozen(path)?))
        })
    };
    let reference = if d.reference_free {
        Reference::Free
    } else if let Some(r) = &d.ref_model {
        model_ref(r)?
    } else if lora.is_some() {
        Reference::LoraBase
    } else if eval_only {
        return Err(Error::Config(
            "--eval-only needs ref_model (the policy would be its own reference)".into(),
        ));
    } else {
        // The policy's starting weights, even when resuming from a checkpoint.
        model_ref(&args.model_name_or_path)?
    };
    let mut dpo = Dpo {
        losses,
        params,
        rpo_alpha: d.rpo_alpha,
        pro_length_normalize: d.pro_length_normalize,
        train: vec![],
        eval: vec![],
        reference,
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
    };
    let mut reports = vec![];
    let mut splits: Vec<(Split, PathBuf)> = vec![];
    if !eval_only {
        splits.push((
            Split::Train,
            args.train_file
                .clone()
                .ok_or_else(|| Error::Config("train_file is required".into()))?,
        ));
    }
    match (&args.eval_file, eval_only) {
        (Some(f), _) => splits.push((Split::Eval, f.clone())),
        (None, true) => return Err(Error::Config("--eval-only needs eval_file".into())),
        (None, false) => {}
    }
    let mut ref_key = vec![
        d.ref_model
            .clone()
            .unwrap_or_else(|| args.model_name_or_path.clone()),
        format!(
            "{:?}:{}:{}",
            args.max_length, args.truncation_mode, d.reference_free
        ),
        // The numerics: bf16 products, the weights' dtype, the code path (the CPU's kernels or
        // a GPU's composed ops, whose bf16 products store bf16 outputs) and preftune's own
        // version of the forward pass give other log-probs.
        format!(
            "bf16={}:dtype={}:numerics={}:path={}",
            args.bf16,
            args.dtype,
            preftune_model::NUMERICS,
            match preftune_model::kernels::cpu_kernels(policy.model.device()) {
                true => "cpu-kernels",
                false => "composed",
            }
        ),
    ];
    // A LoRA policy's reference is its base: quantised under load_in_4bit / load_in_8bit.
    if let (None, Some(q)) = (&d.ref_model, args.base_quant()) {
        ref_key.push(format!("base={q:?}"));
    }
    for (split, path) in splits {
        let (mut items, r) = load_split(&path, args, listwise, &policy.tokenizer)?;
        report(&r);
        reports.push(r);
        if d.precompute_ref_log_probs
            && !matches!(dpo.reference, Reference::Free)
            && !items.is_empty()
        {
            let cache = precompute(
                &mut items,
                &path,
                &ref_key,
                &mut dpo,
                &policy.model,
                args.per_device_eval_batch_size,
                &frozen,
            )?;
            eprintln!(
                "reference log-probs for {} cached in {}",
                path.display(),
                cache.display()
            );
        }
        match split {
            Split::Train => dpo.train = items,
            Split::Eval => dpo.eval = items,
        }
    }
    if d.precompute_ref_log_probs && !matches!(dpo.reference, Reference::Free) {
        // Training now holds one model: the reference is no longer needed.
        dpo.reference = Reference::Precomputed;
    }
    if eval_only {
        let mut v =
            serde_json::to_value(evaluate(args, &policy.model, &mut dpo)?).unwrap_or_default();
        v["data"] = serde_json::to_value(&reports).unwrap_or_default();
        return Ok(v);
    }
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut dpo, &reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ids: &[u32], mask: &[u8], pos: Option<Vec<u32>>) -> Item {
        Item {
            rows: vec![TokenizedExample {
                input_ids: ids.to_vec(),
                loss_mask: mask.to_vec(),
                position_ids: pos,
                truncated: false,
            }],
            ref_logps: None,
        }
    }

    /// The cache key follows the tokens: one changed id, mask bit, position or row boundary gives
    /// another key; the same tokens give the same one.
    #[test]
    fn tokens_fingerprint_follows_every_token() {
        let base = [item(&[1, 2, 3], &[0, 1, 1], None)];
        let key = tokens_fingerprint(&base);
        assert_eq!(
            key,
            tokens_fingerprint(&[item(&[1, 2, 3], &[0, 1, 1], None)])
        );
        for other in [
            vec![item(&[1, 2, 4], &[0, 1, 1], None)],
            vec![item(&[1, 2, 3], &[0, 0, 1], None)],
            vec![item(&[1, 2, 3], &[0, 1, 1], Some(vec![0, 1, 2]))],
            vec![item(&[1], &[0], None), item(&[2, 3], &[1, 1], None)],
        ] {
            assert_ne!(key, tokens_fingerprint(&other));
        }
    }
}
