//! KTO (Ethayarajh et al. 2024, TRL's `KTOTrainer`): preference optimisation from unpaired
//! thumbs-up / thumbs-down rows. Each desirable completion's implicit reward is pushed above, and
//! each undesirable one's below, a reference point: the policy's KL from the reference, estimated
//! on mismatched (prompt, completion) pairs of the same batch. The maths is [`kto_loss`], a pure
//! function tested against TRL 1.16 (fixtures/golden/po-eval.json).
use candle_core::{DType, Device, Tensor};
use preftune_data::{
    join_truncated, parse_examples, read_rows, tokenize_preference, ColumnMap, Example, Format,
    RowError, TokenizedExample,
};
use preftune_model::{Model, Tokenizer};
use serde::{Deserialize, Serialize};

use super::{seq_logps, DataReport};
use crate::config::{RunConfig, TrainingArguments};
use crate::error::{Error, Result};
use crate::ops_ext::sigmoid;
use crate::trainer::{train_with_report, Algorithm, Metrics, Split};

/// KTO's `loss_type` (TRL's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// The KTO paper's loss, with the KL reference point.
    Kto,
    /// APO-zero for unpaired data: no reference point.
    ApoZeroUnpaired,
}

/// `preftune kto`'s options: TRL's `KTOConfig` names and defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KtoArgs {
    pub beta: f64,
    pub loss_type: KtoLoss,
    /// Weights of the desirable and undesirable rows' losses (raise the rarer side's).
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// The frozen reference; default: the policy's starting weights (the base model under LoRA).
    pub ref_model: Option<String>,
}

impl Default for KtoArgs {
    fn default() -> Self {
        KtoArgs {
            beta: 0.1,
            loss_type: KtoLoss::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            ref_model: None,
        }
    }
}

/// KTO's defaults over the shared ones, as TRL's `KTOConfig` sets them.
pub fn defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nmax_length = 1024\nlogging_steps = 10")
        .expect("static TOML")
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KtoParams {
    pub loss_type: KtoLoss,
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// The batch's KL estimate: the mean of `policy - reference` log-probs of the mismatched pairs,
/// clamped at 0 and carrying no gradient (TRL's `kl`).
pub fn kl_estimate(policy_kl: &Tensor, ref_kl: &Tensor) -> Result<f64> {
    let d = (policy_kl - ref_kl)?.to_dtype(DType::F64)?.mean_all()?;
    Ok(d.to_scalar::<f64>()?.max(0.0))
}

/// Per-row KTO losses (weighted) and rewards `beta * log(pi/ref)`, from summed completion
/// log-probs under the policy and the reference, each row's label, and the batch's KL.
pub fn kto_loss(
    policy: &Tensor,
    reference: &Tensor,
    desirable: &[bool],
    kl: f64,
    p: &KtoParams,
) -> Result<(Tensor, Tensor)> {
    let n = desirable.len();
    let logratio = (policy - reference)?;
    let dtype = logratio.dtype();
    let sign: Vec<f64> = desirable
        .iter()
        .map(|&d| if d { 1.0 } else { -1.0 })
        .collect();
    let weight: Vec<f64> = desirable
        .iter()
        .map(|&d| {
            if d {
                p.desirable_weight
            } else {
                p.undesirable_weight
            }
        })
        .collect();
    let dev = logratio.device();
    let sign = Tensor::from_vec(sign, n, dev)?.to_dtype(dtype)?;
    let weight = Tensor::from_vec(weight, n, dev)?.to_dtype(dtype)?;
    // kto: desirable 1 - s(b(r - kl)), undesirable 1 - s(b(kl - r)): both 1 - s(b * sign * (r - kl)).
    // apo_zero_unpaired: desirable 1 - s(b r), undesirable s(b r) = 1 - s(-b r).
    let z = match p.loss_type {
        KtoLoss::Kto => (&logratio - kl)?,
        KtoLoss::ApoZeroUnpaired => logratio.clone(),
    };
    let losses = (1.0 - sigmoid(&((z * &sign)? * p.beta)?)?)?;
    Ok(((losses * weight)?, (logratio * p.beta)?))
}

/// One tokenized row: its prompt and completion tokens (the KL rows pair them anew) and label.
#[derive(Clone, Debug)]
pub struct KtoItem {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub row: TokenizedExample,
    pub label: bool,
}

/// Reads unpaired rows (`prompt`, `completion`, `label`) or preference pairs, which are unpaired
/// as TRL's `unpair_preference_dataset` does (per block of 1000 rows: every chosen as desirable,
/// then every rejected as undesirable), and tokenizes them as TRL's KTOTrainer.
pub fn load_split(
    path: &std::path::Path,
    args: &TrainingArguments,
    tok: &Tokenizer,
) -> Result<(Vec<KtoItem>, DataReport)> {
    let rows = read_rows(path)?;
    let columns = ColumnMap {
        map: args.columns.clone(),
    };
    let col = |c: &str| columns.map.get(c).map_or(c.to_string(), String::clone);
    let paired = rows
        .first()
        .is_some_and(|r| r.value.get(col("chosen")).is_some());
    let format = if paired {
        Format::Preference
    } else {
        Format::Unpaired
    };
    let (examples, mut errors) = parse_examples(&rows, format, &columns);
    let mut unpaired = vec![];
    for block in examples.chunks(1000) {
        let mut rejected = vec![];
        for (loc, ex) in block {
            match ex {
                Example::Preference {
                    prompt,
                    chosen,
                    rejected: r,
                    ..
                } => {
                    unpaired.push((loc.clone(), prompt.clone(), chosen.clone(), true));
                    rejected.push((loc.clone(), prompt.clone(), r.clone(), false));
                }
                Example::Unpaired {
                    prompt,
                    completion,
                    label,
                } => unpaired.push((loc.clone(), prompt.clone(), completion.clone(), *label)),
                _ => {}
            }
        }
        unpaired.extend(rejected);
    }
    let keep_end = args.truncation_mode == preftune_data::TruncationMode::KeepEnd;
    let (mut items, mut truncated, mut dropped) = (vec![], 0, 0);
    for (loc, prompt, completion, label) in unpaired {
        let ex = Example::Ranking {
            prompt,
            responses: vec![completion],
            scores: None,
        };
        let r = match tokenize_preference(&ex, tok, args.max_length, keep_end) {
            Ok(r) => r,
            Err(msg) => {
                errors.push(RowError {
                    loc,
                    field: "(tokenize)".into(),
                    msg,
                });
                continue;
            }
        };
        let completion = r.completions.into_iter().next().unwrap_or_default();
        let Some((ids, mask)) =
            join_truncated(&r.prompt_ids, &completion, args.max_length, keep_end)
        else {
            dropped += 1;
            continue;
        };
        let cut = ids.len() < r.prompt_ids.len() + completion.len();
        truncated += cut as usize;
        items.push(KtoItem {
            prompt: r.prompt_ids,
            completion,
            row: TokenizedExample {
                input_ids: ids,
                loss_mask: mask,
                position_ids: None,
                truncated: cut,
            },
            label,
        });
    }
    crate::error::refuse_bad_rows(&errors, args.skip_invalid_rows)?;
    let mean = |want: bool| {
        let sel: Vec<&KtoItem> = items.iter().filter(|i| i.label == want).collect();
        sel.iter()
            .map(|i| i.row.loss_mask.iter().map(|&m| m as f64).sum::<f64>())
            .sum::<f64>()
            / sel.len().max(1) as f64
    };
    let report = DataReport {
        counts: crate::error::RowCounts::new(path, rows.len(), &errors),
        truncated,
        dropped_prompt_too_long: dropped,
        examples: items.len(),
        mean_chosen_tokens: mean(true),
        mean_rejected_tokens: mean(false),
    };
    Ok((items, report))
}

pub struct Kto {
    pub params: KtoParams,
    pub train: Vec<KtoItem>,
    pub eval: Vec<KtoItem>,
    /// A frozen model or the LoRA base (the KL pairs change with each batch, so nothing is
    /// precomputed).
    pub reference: super::Reference,
    pub max_length: Option<usize>,
    pub keep_end: bool,
    /// The last KL estimate, for a batch of one row (whose only mismatched pair is itself).
    pub last_kl: f64,
    pub pad_token_id: u32,
    pub device: Device,
}

impl Kto {
    fn ref_logps(&self, model: &Model, rows: &[&TokenizedExample]) -> Result<Tensor> {
        self.reference
            .live_logps(model, rows, self.pad_token_id, &self.device)
    }

    /// TRL's mismatched pairs: row `i`'s prompt with row `i - 1`'s completion (row 0 takes the
    /// last row's), truncated as the rows are. As in TRL, two rows of one prompt next to each
    /// other pair the prompt with its own other response.
    fn kl_rows(&self, items: &[&KtoItem]) -> Vec<TokenizedExample> {
        let n = items.len();
        (0..n)
            .filter_map(|i| {
                let other = items[(i + n - 1) % n];
                join_truncated(
                    &items[i].prompt,
                    &other.completion,
                    self.max_length,
                    self.keep_end,
                )
                .map(|(ids, mask)| TokenizedExample {
                    input_ids: ids,
                    loss_mask: mask,
                    position_ids: None,
                    truncated: false,
                })
            })
            .collect()
    }
}

impl Algorithm for Kto {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    /// Every row weighs the same: the loss is a mean over rows, as in TRL.
    fn weight(&self, _split: Split, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let data = match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        };
        let items: Vec<&KtoItem> = idx.iter().map(|&i| &data[i]).collect();
        let rows: Vec<&TokenizedExample> = items.iter().map(|i| &i.row).collect();
        let labels: Vec<bool> = items.iter().map(|i| i.label).collect();
        let pol = seq_logps(model, &rows, self.pad_token_id, &self.device)?;
        let reference = self.ref_logps(model, &rows)?;
        let kl = match self.params.loss_type {
            // A lone row's mismatched pair would be itself: keep the last batch's estimate.
            KtoLoss::Kto if items.len() < 2 => self.last_kl,
            KtoLoss::Kto => {
                let kl_rows = self.kl_rows(&items);
                let kl_refs: Vec<&TokenizedExample> = kl_rows.iter().collect();
                if kl_refs.is_empty() {
                    0.0
                } else {
                    // No gradient flows through the reference point. Both sides with the
                    // policy's training products.
                    let _same = preftune_model::ops::TrainingProducts::new();
                    let policy_kl = seq_logps(
                        &model.detached()?,
                        &kl_refs,
                        self.pad_token_id,
                        &self.device,
                    )?
                    .logps;
                    kl_estimate(&policy_kl, &self.ref_logps(model, &kl_refs)?)?
                }
            }
            KtoLoss::ApoZeroUnpaired => 0.0,
        };
        self.last_kl = kl;
        let (losses, rewards) = kto_loss(&pol.logps, &reference, &labels, kl, &self.params)?;
        let total = losses.sum_all()?;
        let mut m = Metrics::default();
        m.tokens = pol.tokens;
        m.add("kl", kl, 1.0);
        let rewards: Vec<f32> = rewards.to_vec1()?;
        let logps: Vec<f32> = pol.logps.to_vec1()?;
        // As TRL logs them: each side's per-batch mean, averaged over the batches that have it.
        let mut means = [None, None];
        for (side, want) in [("chosen", true), ("rejected", false)] {
            let sel: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == want).collect();
            if sel.is_empty() {
                continue;
            }
            let n = sel.len() as f64;
            let r: f64 = sel.iter().map(|&i| rewards[i] as f64).sum::<f64>() / n;
            means[want as usize] = Some(r);
            m.add(&format!("rewards/{side}"), r, 1.0);
            let lp: f64 = sel.iter().map(|&i| logps[i] as f64).sum::<f64>() / n;
            m.add(&format!("logps/{side}"), lp, 1.0);
            let tokens: f64 = sel.iter().map(|&i| pol.lens[i] as f64).sum();
            if tokens > 0.0 {
                let logits: f64 = sel.iter().map(|&i| pol.mean_logit_sum[i] as f64).sum();
                m.add(&format!("logits/{side}"), logits / tokens, 1.0);
            }
        }
        if let [Some(r), Some(c)] = means {
            m.add("rewards/margins", c - r, 1.0);
        }
        m.add("loss", total.to_scalar::<f32>()? as f64, idx.len() as f64);
        Ok((total, m))
    }
}

/// `preftune kto`: trains (or, with `eval_only`, evaluates) and returns the summary printed as JSON.
pub fn run(cfg: &RunConfig<KtoArgs>, resume: bool, eval_only: bool) -> Result<serde_json::Value> {
    let args = &cfg.args;
    let k = &cfg.algo;
    if k.beta.is_nan() || k.beta <= 0.0 {
        return Err(Error::Config("beta must be > 0".into()));
    }
    if k.desirable_weight < 0.0 || k.undesirable_weight < 0.0 {
        return Err(Error::Config(
            "desirable_weight and undesirable_weight must be >= 0".into(),
        ));
    }
    if k.loss_type == KtoLoss::Kto
        && (args.per_device_train_batch_size < 2 || args.per_device_eval_batch_size < 2)
    {
        return Err(Error::Config(
            "KTO estimates its KL from other rows of the batch: per_device_train_batch_size and \
             per_device_eval_batch_size must be >= 2"
                .into(),
        ));
    }
    let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
    let (policy, lora, ckpt) =
        crate::trainer::load_run_policy(args, &cfg.table, resume, eval_only)?;
    let frozen = |path: &str| -> Result<super::Reference> {
        Ok(super::Reference::Model(Box::new(
            crate::trainer::load_model(args, path, false)?.model,
        )))
    };
    let reference = if let Some(r) = &k.ref_model {
        frozen(r)?
    } else if lora.is_some() {
        super::Reference::LoraBase
    } else if eval_only {
        return Err(Error::Config(
            "--eval-only needs ref_model (the policy would be its own reference)".into(),
        ));
    } else {
        frozen(&args.model_name_or_path)?
    };
    let mut kto = Kto {
        params: KtoParams {
            loss_type: k.loss_type,
            beta: k.beta,
            desirable_weight: k.desirable_weight,
            undesirable_weight: k.undesirable_weight,
        },
        train: vec![],
        eval: vec![],
        reference,
        max_length: args.max_length,
        keep_end: args.truncation_mode == preftune_data::TruncationMode::KeepEnd,
        last_kl: 0.0,
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
    };
    let print = |r: &DataReport| {
        r.counts.print(&format!(
            "{} truncated, {} dropped (prompt fills max_length), {} examples, mean completion tokens desirable {:.1} undesirable {:.1}",
            r.truncated, r.dropped_prompt_too_long, r.examples, r.mean_chosen_tokens, r.mean_rejected_tokens
        ))
    };
    let (train, eval, reports) = super::load_splits(
        args,
        eval_only,
        |path| load_split(path, args, &policy.tokenizer),
        print,
    )?;
    (kto.train, kto.eval) = (train, eval);
    if eval_only {
        return super::eval_summary(args, &policy.model, &mut kto, &reports);
    }
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut kto, &reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KTO paper's loss by hand, in f64: desirable `1 - s(b (r - kl))`, undesirable
    /// `1 - s(b (kl - r))`, each weighted; APO-zero ignores the KL; the KL estimate is clamped at 0.
    #[test]
    fn kto_loss_matches_the_formula() {
        let dev = Device::Cpu;
        let pol = Tensor::new(&[-3.0f64, -5.0, -2.0, -7.5], &dev).unwrap();
        let refr = Tensor::new(&[-3.5f64, -4.0, -2.5, -7.0], &dev).unwrap();
        let labels = [true, false, true, false];
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let p = KtoParams {
            loss_type: KtoLoss::Kto,
            beta: 0.5,
            desirable_weight: 1.5,
            undesirable_weight: 0.7,
        };
        let kl = 0.3;
        let (l, r) = kto_loss(&pol, &refr, &labels, kl, &p).unwrap();
        let (l, r): (Vec<f64>, Vec<f64>) = (l.to_vec1().unwrap(), r.to_vec1().unwrap());
        let lr = [0.5, -1.0, 0.5, -0.5];
        for i in 0..4 {
            let want = if labels[i] {
                1.5 * (1.0 - s(0.5 * (lr[i] - kl)))
            } else {
                0.7 * (1.0 - s(0.5 * (kl - lr[i])))
            };
            assert!((l[i] - want).abs() < 1e-12, "{i}: {} vs {want}", l[i]);
            assert!((r[i] - 0.5 * lr[i]).abs() < 1e-12);
        }
        let apo = KtoParams {
            loss_type: KtoLoss::ApoZeroUnpaired,
            ..p
        };
        let (l, _) = kto_loss(&pol, &refr, &labels, kl, &apo).unwrap();
        let l: Vec<f64> = l.to_vec1().unwrap();
        assert!((l[0] - 1.5 * (1.0 - s(0.25))).abs() < 1e-12);
        assert!((l[1] - 0.7 * s(-0.5)).abs() < 1e-12);
        let (a, b) = (
            Tensor::new(&[-1.0f64, -2.0], &dev).unwrap(),
            Tensor::new(&[-1.5f64, -1.0], &dev).unwrap(),
        );
        assert_eq!(kl_estimate(&a, &b).unwrap(), 0.0);
        assert!((kl_estimate(&b, &a).unwrap() - 0.25).abs() < 1e-12);
    }

    /// The loss's gradient in the policy log-probs, autograd against central differences (f64),
    /// for both loss types; the KL point carries no gradient.
    #[test]
    fn kto_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let base = [-3.0f64, -5.0, -2.0, -7.5, -1.0];
        let refr = Tensor::new(&[-3.5f64, -4.0, -2.5, -7.0, -1.4], &dev).unwrap();
        let labels = [true, false, true, false, false];
        for loss_type in [KtoLoss::Kto, KtoLoss::ApoZeroUnpaired] {
            let p = KtoParams {
                loss_type,
                beta: 0.7,
                desirable_weight: 1.3,
                undesirable_weight: 0.8,
            };
            let f = |x: &Tensor| {
                let (l, _) = kto_loss(x, &refr, &labels, 0.2, &p).unwrap();
                l.sum_all().unwrap()
            };
            let v = candle_core::Var::new(&base, &dev).unwrap();
            let g: Vec<f64> = f(v.as_tensor())
                .backward()
                .unwrap()
                .get(v.as_tensor())
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..base.len() {
                let (mut a, mut b) = (base, base);
                a[i] += 1e-6;
                b[i] -= 1e-6;
                let at = |x: &[f64]| {
                    f(&Tensor::new(x, &dev).unwrap())
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (at(&a) - at(&b)) / 2e-6;
                assert!(
                    (fd - g[i]).abs() < 1e-7,
                    "{loss_type:?}[{i}]: {} vs {fd}",
                    g[i]
                );
            }
        }
    }
}
