//! Reward-model training as TRL's `RewardTrainer` does it: the Bradley–Terry loss
//! `-log sigmoid(r_chosen - r_rejected [- margin])` (the margin is Llama 2's), optional
//! `center_rewards_coefficient * (r_chosen + r_rejected)^2`, and rankings expanded into every
//! ordered pair, each prompt's pairs sharing a weight of one pair (InstructGPT).
use std::path::Path;

use candle_core::{Device, Tensor};
use preftune_data::{
    parse_examples, read_rows, tokenize_preference, ColumnMap, Example, Format, RowError,
};
use preftune_model::{LoadOptions, Model, Pretrained, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::{RunConfig, TrainingArguments};
use crate::error::{Error, Result};
use crate::ops_ext::log_sigmoid;
use crate::trainer::{
    evaluate, load_policy, resume_point, train_with_report, Algorithm, Metrics, Split,
};
use preftune_eval::sources::score_sequences;

/// The reward trainer's own options (TRL's `RewardConfig` names).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RewardArgs {
    /// Adds `coef * mean((r_chosen + r_rejected)^2)`, pulling rewards towards mean 0
    /// (Eisenstein et al. 2023); TRL recommends 0.01.
    pub center_rewards_coefficient: Option<f64>,
    /// Learning rate of the score head (`score.weight`), which starts from random while the
    /// backbone is pretrained; default: `learning_rate`. Not a TRL option.
    pub score_head_learning_rate: Option<f64>,
}

/// TRL's `RewardConfig` defaults over the shared ones (it also turns gradient checkpointing on).
pub fn defaults() -> toml::Table {
    toml::from_str(
        "learning_rate = 1e-4\nmax_length = 1024\nlogging_steps = 10\ngradient_checkpointing = true",
    )
    .expect("static TOML")
}

/// Per-pair Bradley–Terry loss `-log sigmoid(rc - rr - margin) + coef * (rc + rr)^2`, `[N]`.
/// TRL's `compute_loss` is the mean of this over the batch.
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> candle_core::Result<Tensor> {
    let mut d = (chosen - rejected)?;
    if let Some(m) = margin {
        d = (d - m)?;
    }
    let mut loss = log_sigmoid(&d)?.neg()?;
    if let Some(c) = center_rewards_coefficient {
        loss = (loss + ((chosen + rejected)?.sqr()? * c)?)?;
    }
    Ok(loss)
}

/// One training pair: full token sequences (prompt + response + EOS) and the pair's share of its
/// prompt (1 for a pair, `1 / C(k, 2)` for each pair of a k-way ranking).
#[derive(Clone, Debug)]
pub struct RewardPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: Option<f64>,
    pub weight: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DataReport {
    #[serde(flatten)]
    pub counts: crate::error::RowCounts,
    /// Prompts dropped because a sequence is longer than max_length (TRL filters them out too).
    pub dropped_too_long: usize,
    pub prompts: usize,
    pub pairs: usize,
}

/// Reads preference rows (optionally with `margin`) or ranking rows and tokenizes each sequence
/// whole, as TRL does: `prompt + response` (+ EOS for plain text; the chat template for
/// conversations).
pub fn load_split(
    path: &Path,
    args: &TrainingArguments,
    tok: &Tokenizer,
) -> Result<(Vec<RewardPair>, DataReport)> {
    let rows = read_rows(path)?;
    let columns = ColumnMap {
        map: args.columns.clone(),
    };
    // Pairs unless the first row looks like a ranking.
    let ranking = rows.first().is_some_and(|r| {
        r.value.get(columns.column("responses")).is_some()
            && r.value.get(columns.column("chosen")).is_none()
    });
    let format = if ranking {
        Format::Ranking
    } else {
        Format::Preference
    };
    let (examples, mut errors) = parse_examples(&rows, format, &columns);
    let mut pairs = vec![];
    let (mut dropped, mut prompts) = (0, 0);
    for (loc, ex) in &examples {
        let t = match tokenize_preference(ex, tok, args.max_length, false) {
            Ok(t) => t,
            Err(msg) => {
                errors.push(RowError {
                    loc: loc.clone(),
                    field: "(tokenize)".into(),
                    msg,
                });
                continue;
            }
        };
        let full: Vec<Vec<u32>> = t
            .completions
            .iter()
            .map(|c| [t.prompt_ids.as_slice(), c].concat())
            .collect();
        if args
            .max_length
            .is_some_and(|m| full.iter().any(|f| f.len() > m))
        {
            dropped += 1;
            continue;
        }
        prompts += 1;
        let k = full.len();
        let weight = 2.0 / (k * (k - 1)) as f64;
        let margin = match ex {
            Example::Preference { margin, .. } => *margin,
            _ => None,
        };
        for i in 0..k {
            for j in i + 1..k {
                pairs.push(RewardPair {
                    chosen: full[i].clone(),
                    rejected: full[j].clone(),
                    margin,
                    weight,
                });
            }
        }
    }
    crate::error::refuse_bad_rows(&errors, args.skip_invalid_rows)?;
    let report = DataReport {
        counts: crate::error::RowCounts::new(path, rows.len(), &errors),
        dropped_too_long: dropped,
        prompts,
        pairs: pairs.len(),
    };
    Ok((pairs, report))
}

pub struct RewardTrainer {
    pub train: Vec<RewardPair>,
    pub eval: Vec<RewardPair>,
    pub center_rewards_coefficient: Option<f64>,
    /// `score_head_learning_rate / learning_rate`.
    pub head_lr_scale: f64,
    pub pad_token_id: u32,
    pub device: Device,
}

impl RewardTrainer {
    fn split(&self, split: Split) -> &[RewardPair] {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }
}

impl Algorithm for RewardTrainer {
    /// TRL's reward trainer adds no load-balancing loss.
    fn router_aux_by_default(&self, _output_router_logits: bool) -> bool {
        false
    }

    fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name == "score.weight" {
            self.head_lr_scale
        } else {
            1.0
        }
    }

    fn weight(&self, split: Split, idx: &[usize]) -> f64 {
        let s = self.split(split);
        idx.iter().map(|&i| s[i].weight).sum()
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let pairs: Vec<&RewardPair> = idx.iter().map(|&i| &self.split(split)[i]).collect();
        let n = pairs.len();
        // Chosen then rejected in one batch, as TRL's collator stacks them.
        let seqs: Vec<&[u32]> = pairs
            .iter()
            .map(|p| p.chosen.as_slice())
            .chain(pairs.iter().map(|p| p.rejected.as_slice()))
            .collect();
        let (r, tokens) = score_sequences(model, &seqs, self.pad_token_id, &self.device)?;
        let (rc, rr) = (r.narrow(0, 0, n)?, r.narrow(0, n, n)?);
        let margin = pairs
            .iter()
            .any(|p| p.margin.is_some())
            .then(|| {
                let m: Vec<f32> = pairs
                    .iter()
                    .map(|p| p.margin.unwrap_or(0.0) as f32)
                    .collect();
                Tensor::from_vec(m, n, &self.device)
            })
            .transpose()?;
        let per_pair = bradley_terry(&rc, &rr, margin.as_ref(), self.center_rewards_coefficient)?;
        let w: Vec<f32> = pairs.iter().map(|p| p.weight as f32).collect();
        let loss = (per_pair * Tensor::from_vec(w.clone(), n, &self.device)?)?.sum_all()?;

        let (c, j) = (rc.to_vec1::<f32>()?, rr.to_vec1::<f32>()?);
        let total_w: f64 = w.iter().map(|&x| x as f64).sum();
        let mut m = Metrics::default();
        m.add("loss", loss.to_scalar::<f32>()? as f64, total_w);
        let mut acc = 0.0;
        let mut gap = 0.0;
        for i in 0..n {
            acc += w[i] as f64 * (c[i] > j[i]) as u8 as f64;
            gap += w[i] as f64 * (c[i] - j[i]) as f64;
        }
        m.add("accuracy", acc, total_w);
        m.add("margin", gap, total_w);
        let all: Vec<f64> = c.iter().chain(&j).map(|&x| x as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let std = (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
        m.add("mean_reward", mean * all.len() as f64, all.len() as f64);
        // Per batch, averaged over batches (as TRL averages its batch statistics).
        m.add("std_reward", std, 1.0);
        m.tokens = tokens;
        Ok((loss, m))
    }
}

fn report(r: &DataReport) {
    r.counts.print(&format!(
        "{} prompts, {} pairs, {} dropped (longer than max_length)",
        r.prompts, r.pairs, r.dropped_too_long
    ));
}

/// `preftune rm`: trains a reward model (or, with `eval_only`, evaluates one) and returns the summary.
pub fn run(
    cfg: &RunConfig<RewardArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let args = &cfg.args;
    let mut reports = vec![];
    let load_eval = |tok: &Tokenizer, reports: &mut Vec<DataReport>| -> Result<Vec<RewardPair>> {
        match &args.eval_file {
            Some(f) => {
                let (e, r) = load_split(f, args, tok)?;
                report(&r);
                reports.push(r);
                Ok(e)
            }
            None => Ok(vec![]),
        }
    };
    if eval_only {
        if args.eval_file.is_none() {
            return Err(Error::Config("--eval-only needs eval_file".into()));
        }
        let opts = LoadOptions {
            dtype: args.dtype.candle(),
            device: crate::trainer::run_device(args)?,
            ..Default::default()
        };
        let p = Pretrained::load(Path::new(&args.model_name_or_path), &opts)?;
        if !p.model.has_score_head() {
            return Err(Error::Config(format!(
                "{}: not a reward model (no score.weight); train one with `preftune rm`",
                args.model_name_or_path
            )));
        }
        let eval = load_eval(&p.tokenizer, &mut reports)?;
        let mut algo = RewardTrainer {
            train: vec![],
            eval,
            center_rewards_coefficient: cfg.algo.center_rewards_coefficient,
            head_lr_scale: 1.0,
            pad_token_id: p.pad_token_id(),
            device: p.model.device().clone(),
        };
        let mut v = serde_json::to_value(evaluate(args, &p.model, &mut algo)?).unwrap_or_default();
        v["data"] = serde_json::to_value(&reports).unwrap_or_default();
        return Ok(v);
    }
    let train_file = args
        .train_file
        .as_ref()
        .ok_or_else(|| Error::Config("train_file is required".into()))?;
    let ckpt = resume_point(args, &cfg.table, resume)?;
    let (mut policy, lora) = load_policy(args, ckpt.as_ref().map(|(_, p)| p.as_path()))?;
    if !policy.model.has_score_head() {
        policy.model.add_score_head(args.seed)?;
    }
    // Under LoRA the head of a reward model it starts from trains in full beside the adapters
    // (PEFT's `modules_to_save`); it is saved in the adapter file.
    policy.model.train_score_head()?;
    let (train, tr) = load_split(train_file, args, &policy.tokenizer)?;
    report(&tr);
    reports.push(tr);
    let eval = load_eval(&policy.tokenizer, &mut reports)?;
    let mut algo = RewardTrainer {
        train,
        eval,
        center_rewards_coefficient: cfg.algo.center_rewards_coefficient,
        head_lr_scale: cfg
            .algo
            .score_head_learning_rate
            .map_or(1.0, |h| h / args.learning_rate),
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
    };
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut algo, &reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> serde_json::Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/golden/losses.json"
        );
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap()
            ["reward"]
            .clone()
    }

    fn vec_of(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    /// Loss values and gradients against TRL's `RewardTrainer.compute_loss` (losses.json).
    #[test]
    fn bradley_terry_matches_trl() {
        let g = golden();
        let dev = Device::Cpu;
        let t = |k: &str| Tensor::new(vec_of(&g["inputs"][k]), &dev).unwrap();
        let (rc, rr, margin) = (t("rewards_chosen"), t("rewards_rejected"), t("margin"));
        let n = rc.dim(0).unwrap() as f64;
        for case in g["cases"].as_array().unwrap() {
            let coef = case["center_rewards_coefficient"].as_f64();
            let m = case["margin"].as_bool().unwrap().then_some(&margin);
            let vc = candle_core::Var::from_tensor(&rc).unwrap();
            let vr = candle_core::Var::from_tensor(&rr).unwrap();
            let loss = (bradley_terry(vc.as_tensor(), vr.as_tensor(), m, coef)
                .unwrap()
                .sum_all()
                .unwrap()
                / n)
                .unwrap();
            let got = loss.to_scalar::<f64>().unwrap();
            let want = case["loss"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-6, "{case}: loss {got} vs {want}");
            // d loss / d rc_i = -(1 - sigmoid(d_i)) / n + 2 coef (rc_i + rr_i) / n, checked in f64.
            let grads = loss.backward().unwrap();
            let gc = grads.get(vc.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let gr = grads.get(vr.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let (c, r) = (
                vec_of(&g["inputs"]["rewards_chosen"]),
                vec_of(&g["inputs"]["rewards_rejected"]),
            );
            let mv = vec_of(&g["inputs"]["margin"]);
            for i in 0..c.len() {
                let d = c[i] - r[i] - if m.is_some() { mv[i] } else { 0.0 };
                let s = 1.0 / (1.0 + (-d).exp());
                let center = 2.0 * coef.unwrap_or(0.0) * (c[i] + r[i]);
                assert!((gc[i] - (-(1.0 - s) + center) / n).abs() < 1e-9);
                assert!((gr[i] - ((1.0 - s) + center) / n).abs() < 1e-9);
            }
            let acc = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / n;
            assert!((acc - case["accuracy"].as_f64().unwrap()).abs() < 1e-9);
            let gap = c.iter().zip(&r).map(|(a, b)| a - b).sum::<f64>() / n;
            assert!((gap - case["mean_margin"].as_f64().unwrap()).abs() < 1e-6);
        }
    }
}
