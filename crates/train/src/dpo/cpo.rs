//! Preference optimisation without a reference model: CPO (with SimPO and AlphaPO as its loss
//! types, TRL's `CPOTrainer`) and ORPO (TRL's `ORPOTrainer`). Both train on preference pairs, like
//! DPO, with one model in memory; the maths are pure functions of the sequence log-probs, tested
//! against TRL 1.16 in fixtures/golden/po-eval.json.
use candle_core::{DType, Device, Tensor};
use preftune_data::TokenizedExample;
use preftune_model::{token_logprobs, Model};
use serde::{Deserialize, Serialize};

use super::{eval_summary, load_split_with, load_splits, report, seq_logps, Item};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::ops_ext::log_sigmoid;
use crate::trainer::{train_with_report, Algorithm, Metrics, Split};

/// CPO's `loss_type` (TRL's names; `alphapo` is TRL's shorthand for `simpo` with `cpo_alpha = 0`
/// and a non-zero `alpha`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
    Alphapo,
}

/// `preftune cpo`'s options: TRL's `CPOConfig` names and defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CpoArgs {
    pub beta: f64,
    pub loss_type: CpoLoss,
    pub label_smoothing: f64,
    /// Weight of the NLL of the chosen completions (CPO's behaviour-cloning term).
    pub cpo_alpha: f64,
    /// SimPO's target margin.
    pub simpo_gamma: f64,
    /// AlphaPO: rewards `(1 - p^-alpha) / alpha` in place of `log p` (0: off).
    pub alpha: f64,
}

impl Default for CpoArgs {
    fn default() -> Self {
        CpoArgs {
            beta: 0.1,
            loss_type: CpoLoss::Sigmoid,
            label_smoothing: 0.0,
            cpo_alpha: 1.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
        }
    }
}

/// `preftune orpo`'s options: TRL's `ORPOConfig` names and defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OrpoArgs {
    /// Weight of the odds-ratio term (the paper's lambda).
    pub beta: f64,
}

impl Default for OrpoArgs {
    fn default() -> Self {
        OrpoArgs { beta: 0.1 }
    }
}

/// CPO's defaults over the shared ones, as TRL's `CPOConfig` sets them.
pub fn cpo_defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nmax_length = 1024\nlogging_steps = 10")
        .expect("static TOML")
}

/// ORPO's defaults over the shared ones, as TRL's `ORPOConfig` sets them.
pub fn orpo_defaults() -> toml::Table {
    toml::from_str("learning_rate = 1e-6\nmax_length = 1024\nlogging_steps = 10")
        .expect("static TOML")
}

/// The resolved CPO settings (after TRL's `alphapo` shorthand).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpoParams {
    pub loss_type: CpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub alpha: f64,
}

impl CpoArgs {
    /// Validated settings and the NLL weight.
    pub fn params(&self) -> Result<(CpoParams, f64)> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(Error::Config("beta must be > 0".into()));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(Error::Config("label_smoothing must be in [0, 0.5)".into()));
        }
        let (loss_type, cpo_alpha) = match self.loss_type {
            CpoLoss::Alphapo => (CpoLoss::Simpo, 0.0),
            k => (k, self.cpo_alpha),
        };
        Ok((
            CpoParams {
                loss_type,
                beta: self.beta,
                label_smoothing: self.label_smoothing,
                simpo_gamma: self.simpo_gamma,
                alpha: self.alpha,
            },
            cpo_alpha,
        ))
    }
}

/// CPO's per-pair losses and rewards (`beta * r`) from the policy's log-probs of chosen and
/// rejected completions (averaged per token for `ipo` and `simpo`, summed otherwise, as TRL).
pub fn cpo_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    p: &CpoParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    // AlphaPO's reward shape `(1 - p^-alpha) / alpha = (1 - exp(-alpha log p)) / alpha`.
    let reward = |lp: &Tensor| -> Result<Tensor> {
        if p.alpha == 0.0 {
            return Ok(lp.clone());
        }
        Ok(((1.0 - (lp * -p.alpha)?.exp()?)? / p.alpha)?)
    };
    let (rc, rr) = (reward(chosen)?, reward(rejected)?);
    let mut z = (&rc - &rr)?;
    let smoothed = |z: &Tensor| -> Result<Tensor> {
        let bz = (z * p.beta)?;
        let clean = (log_sigmoid(&bz)? * -(1.0 - p.label_smoothing))?;
        Ok((clean - (log_sigmoid(&bz.neg()?)? * p.label_smoothing)?)?)
    };
    let losses = match p.loss_type {
        CpoLoss::Simpo | CpoLoss::Alphapo => {
            z = (z - p.simpo_gamma / p.beta)?;
            smoothed(&z)?
        }
        CpoLoss::Sigmoid => smoothed(&z)?,
        CpoLoss::Hinge => (1.0 - (z * p.beta)?)?.relu()?,
        CpoLoss::Ipo => (z - 1.0 / (2.0 * p.beta))?.sqr()?,
    };
    Ok((losses, (rc * p.beta)?, (rr * p.beta)?))
}

/// `log(1 - exp(x))` for `x < 0`, computed in f64 (the branch TRL takes: `log1p(-exp(x))` below
/// `-ln 2`, `log(-expm1(x))` above; in f64 both are accurate to far below f32's precision).
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let x64 = x.to_dtype(DType::F64)?;
    Ok((1.0 - x64.exp()?)?.log()?.to_dtype(x.dtype())?)
}

/// ORPO's odds-ratio term from the policy's mean token log-probs: the per-pair
/// `beta * log sigmoid(log odds)` (subtracted from the NLL), the rewards `beta * logp`, and the
/// batch means of `log sigmoid(log odds)` and of the log odds (TRL's `log_odds_ratio` and
/// `log_odds_chosen`).
pub fn orpo_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let log_odds = ((chosen - rejected)? - (log1mexp(chosen)? - log1mexp(rejected)?)?)?;
    let ratio = log_sigmoid(&log_odds)?;
    Ok((
        (&ratio * beta)?,
        (chosen * beta)?,
        (rejected * beta)?,
        ratio.mean_all()?,
        log_odds.mean_all()?,
    ))
}

/// Which reference-free objective trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    Cpo { params: CpoParams, cpo_alpha: f64 },
    Orpo { beta: f64 },
}

impl Objective {
    /// Whether the preference term sees mean (not summed) token log-probs, as TRL's trainers.
    fn average(&self) -> bool {
        match self {
            Objective::Orpo { .. } => true,
            Objective::Cpo { params, .. } => {
                matches!(params.loss_type, CpoLoss::Ipo | CpoLoss::Simpo)
            }
        }
    }
}

pub struct Cpo {
    pub objective: Objective,
    pub train: Vec<Item>,
    pub eval: Vec<Item>,
    pub pad_token_id: u32,
    pub device: Device,
}

impl Algorithm for Cpo {
    /// TRL's CPO and ORPO add the load-balancing loss only when the model config asks for router
    /// logits.
    fn router_aux_by_default(&self, output_router_logits: bool) -> bool {
        output_router_logits
    }

    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    /// Every pair weighs the same: the loss is a mean over pairs, as in TRL.
    fn weight(&self, _split: Split, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    fn loss(&mut self, model: &Model, split: Split, idx: &[usize]) -> Result<(Tensor, Metrics)> {
        let data = match split {
            Split::Train => &self.train,
            Split::Eval => &self.eval,
        };
        let b = idx.len();
        // TRL's order: every pair's chosen, then every pair's rejected.
        let rows: Vec<&TokenizedExample> = (0..2)
            .flat_map(|j| idx.iter().map(move |&i| &data[i].rows[j]))
            .collect();
        let pol = seq_logps(model, &rows, self.pad_token_id, &self.device)?;
        let lens = Tensor::from_vec(pol.lens.clone(), 2 * b, &self.device)?;
        let logps = if self.objective.average() {
            pol.logps.broadcast_div(&lens.clamp(1.0, f64::INFINITY)?)?
        } else {
            pol.logps.clone()
        };
        let (pc, pr) = (logps.narrow(0, 0, b)?, logps.narrow(0, b, b)?);
        let chosen_tokens = pol.lens[..b].iter().sum::<f32>().max(1.0) as f64;
        let mut m = Metrics::default();
        m.tokens = pol.tokens;
        let bf = b as f64;
        let (total, rw, rl) = match self.objective {
            Objective::Cpo { params, cpo_alpha } => {
                let (losses, rw, rl) = cpo_loss(&pc, &pr, &params)?;
                let mut total = losses.sum_all()?;
                // The mean NLL over the batch's chosen completion tokens.
                let nll = if cpo_alpha != 0.0 {
                    (pol.logps.narrow(0, 0, b)?.sum_all()?.neg()? / chosen_tokens)?
                } else {
                    Tensor::zeros((), DType::F32, &self.device)?
                };
                total = (total + (&nll * (cpo_alpha * bf))?)?;
                m.add("nll_loss", nll.to_scalar::<f32>()? as f64 * bf, bf);
                (total, rw, rl)
            }
            Objective::Orpo { beta } => {
                let (losses, rw, rl, ratio, log_odds) = orpo_loss(&pc, &pr, beta)?;
                // ORPO's NLL covers prompt and completion of the chosen sequences (every token
                // after the first), as TRL computes it.
                let (ids, attn) = (
                    pol.batch.input_ids.narrow(0, 0, b)?,
                    pol.batch.attention_mask.narrow(0, 0, b)?,
                );
                let lp = token_logprobs(model, &pol.hidden.narrow(0, 0, b)?, &ids, &attn, 1.0)?;
                let tokens: f64 = rows[..b]
                    .iter()
                    .map(|r| r.input_ids.len().saturating_sub(1) as f64)
                    .sum();
                let nll = (lp.sum.sum_all()?.neg()? / tokens.max(1.0))?;
                let total = ((&nll * bf)? - losses.sum_all()?)?;
                m.add("nll_loss", nll.to_scalar::<f32>()? as f64 * bf, bf);
                m.add("log_odds_ratio", ratio.to_scalar::<f32>()? as f64 * bf, bf);
                m.add(
                    "log_odds_chosen",
                    log_odds.to_scalar::<f32>()? as f64 * bf,
                    bf,
                );
                (total, rw, rl)
            }
        };
        // TRL averages logits/* over the padded batch; here over completion tokens.
        super::pair_metrics(&mut m, &rw, &rl, &pc, &pr, &pol, b)?;
        m.add("loss", total.to_scalar::<f32>()? as f64, bf);
        Ok((total, m))
    }
}

/// `preftune cpo` and `preftune orpo`: train (or, with `eval_only`, evaluate) on preference pairs.
fn run_objective<A>(
    cfg: &RunConfig<A>,
    objective: Objective,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let args = &cfg.args;
    let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
    let (policy, lora, ckpt) =
        crate::trainer::load_run_policy(args, &cfg.table, resume, eval_only)?;
    let mut algo = Cpo {
        objective,
        train: vec![],
        eval: vec![],
        pad_token_id: policy.pad_token_id(),
        device: policy.model.device().clone(),
    };
    let (train, eval, reports) = load_splits(
        args,
        eval_only,
        |path| load_split_with(path, args, false, &policy.tokenizer, true),
        report,
    )?;
    (algo.train, algo.eval) = (train, eval);
    if eval_only {
        return eval_summary(args, &policy.model, &mut algo, &reports);
    }
    train_with_report(args, &cfg.table, policy, lora, ckpt, &mut algo, &reports)
}

/// `preftune cpo`: CPO, SimPO or AlphaPO.
pub fn run_cpo(
    cfg: &RunConfig<CpoArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let (params, cpo_alpha) = cfg.algo.params()?;
    run_objective(cfg, Objective::Cpo { params, cpo_alpha }, resume, eval_only)
}

/// `preftune orpo`.
pub fn run_orpo(
    cfg: &RunConfig<OrpoArgs>,
    resume: bool,
    eval_only: bool,
) -> Result<serde_json::Value> {
    let beta = cfg.algo.beta;
    if beta.is_nan() || beta < 0.0 {
        return Err(Error::Config("beta must be >= 0".into()));
    }
    run_objective(cfg, Objective::Orpo { beta }, resume, eval_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn golden() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/golden/po-eval.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn vec(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    fn close(got: &Tensor, want: &Value, tol: f64, what: &str) {
        let g: Vec<f64> = got.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let w = vec(want);
        assert_eq!(g.len(), w.len(), "{what}");
        for (a, b) in g.iter().zip(&w) {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}: {g:?} vs {w:?}"
            );
        }
    }

    /// TRL's `cpo_loss` and `odds_ratio_loss` on the same log-probs, in f64: losses, rewards,
    /// ORPO's logged means, and the gradients of the summed losses (autograd here, torch there).
    /// TRL computes ORPO's odds in f32 even from f64 inputs, hence its looser tolerance.
    #[test]
    fn cpo_simpo_alphapo_and_orpo_match_trl_with_gradients() {
        let g = golden();
        let dev = Device::Cpu;
        let inp = &g["losses"]["inputs"];
        let (c0, r0) = (vec(&inp["chosen"]), vec(&inp["rejected"]));
        let cases = g["losses"]["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 9);
        for case in cases {
            let what = case.to_string()[..80].to_string();
            let c = candle_core::Var::new(c0.as_slice(), &dev).unwrap();
            let r = candle_core::Var::new(r0.as_slice(), &dev).unwrap();
            let beta = case["beta"].as_f64().unwrap();
            let orpo = case["loss"] == "orpo";
            let tol = if orpo { 1e-6 } else { 1e-10 };
            let (losses, rw, rl) = if orpo {
                let (l, rw, rl, ratio, odds) =
                    orpo_loss(c.as_tensor(), r.as_tensor(), beta).unwrap();
                let f = |t: &Tensor| t.to_scalar::<f64>().unwrap();
                assert!((f(&ratio) - case["log_odds_ratio"].as_f64().unwrap()).abs() < 1e-6);
                assert!((f(&odds) - case["log_odds_chosen"].as_f64().unwrap()).abs() < 1e-6);
                (l, rw, rl)
            } else {
                let p = CpoParams {
                    loss_type: serde_json::from_value(case["loss_type"].clone()).unwrap(),
                    beta,
                    label_smoothing: case["label_smoothing"].as_f64().unwrap(),
                    simpo_gamma: case["simpo_gamma"].as_f64().unwrap(),
                    alpha: case["alpha"].as_f64().unwrap(),
                };
                cpo_loss(c.as_tensor(), r.as_tensor(), &p).unwrap()
            };
            close(&losses, &case["losses"], tol, &what);
            close(&rw, &case["chosen_rewards"], tol, &what);
            close(&rl, &case["rejected_rewards"], tol, &what);
            let grads = losses.sum_all().unwrap().backward().unwrap();
            close(
                grads.get(c.as_tensor()).unwrap(),
                &case["grad_chosen"],
                tol,
                &what,
            );
            close(
                grads.get(r.as_tensor()).unwrap(),
                &case["grad_rejected"],
                tol,
                &what,
            );
        }
    }

    /// `alphapo` is SimPO with no NLL term, as TRL's shorthand; bad settings are refused.
    #[test]
    fn alphapo_shorthand_and_validation() {
        let a = CpoArgs {
            loss_type: CpoLoss::Alphapo,
            alpha: 0.25,
            ..CpoArgs::default()
        };
        let (p, cpo_alpha) = a.params().unwrap();
        assert_eq!((p.loss_type, cpo_alpha), (CpoLoss::Simpo, 0.0));
        assert!(CpoArgs {
            beta: 0.0,
            ..CpoArgs::default()
        }
        .params()
        .is_err());
        assert!(CpoArgs {
            label_smoothing: 0.5,
            ..CpoArgs::default()
        }
        .params()
        .is_err());
    }
}
