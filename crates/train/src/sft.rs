//! Supervised fine-tuning: next-token cross-entropy on completions (prompt-completion data),
//! assistant turns (conversational data with `assistant_only_loss`), or all tokens.
use std::path::Path;

use candle_core::{Device, Tensor};
use preftune_data::{
    collate, pack, parse_examples, read_rows, tokenize_sft, ColumnMap, Example, Format, RowError,
    SftTokenizeOptions, TokenizedExample,
};
use preftune_model::{token_logprobs, LoadOptions, Model, Pretrained, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::{RunConfig, TrainingArguments};
use crate::error::{Error, Result};
use crate::trainer::{
    evaluate, load_policy, resume_point, train_with_report, Algorithm, Metrics, Split,
};

/// SFT's own options (TRL's `SFTConfig` names).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SftArgs {
    /// Loss on completion tokens only; default: on for prompt-completion data.
    pub completion_only_loss: Option<bool>,
    /// Loss on assistant turns only (conversational data).
    pub assistant_only_loss: bool,
    /// Pack examples into rows of `max_length` (sequences never attend to each other).
    pub packing: bool,
}

/// SFT's defaults over the shared ones, as TRL's `SFTConfig` sets them.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 2e-5\nmax_length = 1024\nlogging_steps = 10")
        .expect("static TOML")
}

/// What happened to the data on its way in; printed and written to the run folder.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DataReport {
    #[serde(flatten)]
    pub counts: crate::error::RowCounts,
    pub truncated: usize,
    pub examples: usize,
    /// Rows after packing (equals `examples` without packing).
    pub sequences: usize,
    pub tokens: usize,
}

/// Reads, validates and tokenizes one data file. Bad rows are refused unless `skip_invalid_rows`.
pub fn load_split(
    path: &Path,
    args: &TrainingArguments,
    sft: &SftArgs,
    tok: &Tokenizer,
) -> Result<(Vec<TokenizedExample>, DataReport)> {
    let rows = read_rows(path)?;
    let columns = ColumnMap {
        map: args.columns.clone(),
    };
    let prompt_col = columns.map.get("prompt").map_or("prompt", String::as_str);
    // TRL decides by the columns: a prompt column means prompt-completion data.
    let format = if rows
        .first()
        .is_some_and(|r| r.value.get(prompt_col).is_some())
    {
        Format::PromptCompletion
    } else {
        Format::LanguageModeling
    };
    let (examples, mut errors) = parse_examples(&rows, format, &columns);
    let opts = SftTokenizeOptions {
        max_length: args.max_length,
        truncation_mode: args.truncation_mode,
        completion_only_loss: sft.completion_only_loss.unwrap_or(true),
        assistant_only_loss: sft.assistant_only_loss,
    };
    let mut out = vec![];
    for (loc, ex) in &examples {
        if matches!(ex, Example::PromptCompletion { .. })
            || matches!(ex, Example::LanguageModeling { .. })
        {
            match tokenize_sft(ex, tok, &opts) {
                Ok(t) => out.push(t),
                Err(msg) => errors.push(RowError {
                    loc: loc.clone(),
                    field: "(tokenize)".into(),
                    msg,
                }),
            }
        }
    }
    crate::error::refuse_bad_rows(&errors, args.skip_invalid_rows)?;
    let truncated = out.iter().filter(|t| t.truncated).count();
    let examples_n = out.len();
    if sft.packing {
        let max = args
            .max_length
            .ok_or_else(|| Error::Config("packing needs max_length".into()))?;
        out = pack(&out, max);
    }
    let report = DataReport {
        counts: crate::error::RowCounts::new(path, rows.len(), &errors),
        truncated,
        examples: examples_n,
        sequences: out.len(),
        tokens: out.iter().map(|t| t.input_ids.len()).sum(),
    };
    Ok((out, report))
}

pub struct Sft {
    pub train: Vec<TokenizedExample>,
    pub eval: Vec<TokenizedExample>,
    pub pad_token_id: u32,
    pub device: Device,
}

impl Sft {
    fn split(&self, split: Split) -> &[TokenizedExample] {
        match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        }
    }
}

impl Algorithm for Sft {
    fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    fn weight(&self, split: Split, idx: &[usize]) -> f64 {
        let data = self.split(split);
        idx.iter()
            .map(|&i| data[i].loss_mask.iter().map(|&m| m as f64).sum::<f64>())
            .sum()
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let data = self.split(split);
        let refs: Vec<&TokenizedExample> = idx.iter().map(|&i| &data[i]).collect();
        let (loss, lp, tokens) = nll_sum(model, &refs, self.pad_token_id, &self.device)?;
        let n = self.weight(split, idx);
        let mut m = Metrics::default();
        m.add("loss", loss.to_scalar::<f32>()? as f64, n);
        m.add("mean_token_accuracy", lp.argmax_hits() as f64, n);
        m.tokens = tokens;
        Ok((loss, m))
    }
}

/// The summed NLL of the loss-masked tokens of `rows` (one padded batch), their log-prob
/// details, and the batch's token count: SFT's loss, and PPO-ptx's.
pub(crate) fn nll_sum(
    model: &Model,
    rows: &[&TokenizedExample],
    pad_token_id: u32,
    device: &candle_core::Device,
) -> Result<(Tensor, preftune_model::TokenLogprobs, usize)> {
    let batch = collate(rows, pad_token_id, device)?;
    let hidden = model.forward(
        &batch.input_ids,
        Some(&batch.attention_mask),
        batch.position_ids.as_ref(),
        None,
    )?;
    let lp = token_logprobs(model, &hidden, &batch.input_ids, &batch.loss_mask, 1.0)?;
    Ok((lp.sum.sum_all()?.neg()?, lp, batch.num_tokens))
}

fn report(r: &DataReport) {
    r.counts.print(&format!(
        "{} truncated, {} examples, {} sequences, {} tokens",
        r.truncated, r.examples, r.sequences, r.tokens
    ));
}

/// `preftune sft`: trains (or, with `eval_only`, evaluates) and returns the summary printed as JSON.
/// An SFT config (defaults, the file, `--set`) plus the `[name]` table of a command that runs SFT
/// as one of its steps (`keys`: what the table needs, for the error when it is missing).
pub fn load_with_table<T: serde::de::DeserializeOwned>(
    file: Option<&std::path::Path>,
    set: &[String],
    name: &str,
    keys: &str,
) -> Result<(RunConfig<SftArgs>, T)> {
    crate::config::load_with_table(file, defaults(), set, name, keys)
}

pub fn run(cfg: &RunConfig<SftArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    let args = &cfg.args;
    if eval_only {
        let eval_file = args
            .eval_file
            .as_ref()
            .ok_or_else(|| Error::Config("--eval-only needs eval_file".into()))?;
        let opts = LoadOptions {
            dtype: args.dtype.candle(),
            device: crate::trainer::run_device(args)?,
            ..Default::default()
        };
        let p = Pretrained::load(Path::new(&args.model_name_or_path), &opts)?;
        let (eval, r) = load_split(eval_file, args, &cfg.algo, &p.tokenizer)?;
        report(&r);
        let mut algo = Sft {
            train: vec![],
            eval,
            pad_token_id: p.pad_token_id(),
            device: p.model.device().clone(),
        };
        return Ok(serde_json::to_value(evaluate(args, &p.model, &mut algo)?).unwrap_or_default());
    }
    let train_file = args
        .train_file
        .as_ref()
        .ok_or_else(|| Error::Config("train_file is required".into()))?;
    let ckpt = resume_point(args, &cfg.table, resume)?;
    let (policy, lora) = load_policy(args, ckpt.as_ref().map(|(_, p)| p.as_path()))?;
    let (train_set, tr) = load_split(train_file, args, &cfg.algo, &policy.tokenizer)?;
    report(&tr);
    let mut reports = vec![tr];
    let eval_set = match &args.eval_file {
        Some(f) => {
            let (e, er) = load_split(f, args, &cfg.algo, &policy.tokenizer)?;
            report(&er);
            reports.push(er);
            e
        }
        None => vec![],
    };
    let mut algo = Sft {
        train: train_set,
        eval: eval_set,
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
    };
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut algo, &reports)
}
