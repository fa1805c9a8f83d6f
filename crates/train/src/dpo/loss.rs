//! The DPO family's maths, as pure functions over per-sequence log-probabilities (tested against
//! TRL's values in fixtures/golden/losses.json). Every function is differentiable in the policy's
//! log-probs and works in the dtype it is given (f64 in tests, f32 in training).
use candle_core::{Result, Tensor};

use crate::ops_ext::{log_sigmoid, sigmoid};

/// TRL's `loss_type` names, plus `pro` (listwise ranking) and `sft` (NLL on chosen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    SigmoidNorm,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    ApoZero,
    ApoDown,
    Sft,
    Pro,
}

impl std::str::FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "sigmoid" => LossType::Sigmoid,
            "hinge" => LossType::Hinge,
            "ipo" => LossType::Ipo,
            "robust" => LossType::Robust,
            "sigmoid_norm" => LossType::SigmoidNorm,
            "exo_pair" => LossType::ExoPair,
            "nca_pair" => LossType::NcaPair,
            "bco_pair" => LossType::BcoPair,
            "sppo_hard" => LossType::SppoHard,
            "apo_zero" => LossType::ApoZero,
            "apo_down" => LossType::ApoDown,
            "sft" => LossType::Sft,
            "pro" => LossType::Pro,
            other => {
                return Err(format!(
                    "unknown loss_type {other:?} (sigmoid, hinge, ipo, robust, sigmoid_norm, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sft, pro)"
                ))
            }
        })
    }
}

/// Summed completion log-probs of a batch of pairs (all `[B]`) and completion lengths.
pub struct PairLogps<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_len: &'a Tensor,
    pub rejected_len: &'a Tensor,
}

#[derive(Clone, Copy, Debug)]
pub struct PairParams {
    pub beta: f64,
    pub label_smoothing: f64,
    /// R-DPO (Park et al. 2024): each implicit reward gets `- length_alpha * |y|`.
    pub length_alpha: f64,
}

/// Implicit rewards `beta * log(pi/ref)` (minus the R-DPO length term), chosen and rejected.
pub fn implicit_rewards(p: &PairLogps, prm: &PairParams) -> Result<(Tensor, Tensor)> {
    let rw = ((p.chosen - p.ref_chosen)? * prm.beta)?;
    let rl = ((p.rejected - p.ref_rejected)? * prm.beta)?;
    if prm.length_alpha == 0.0 {
        return Ok((rw, rl));
    }
    Ok((
        (rw - (p.chosen_len * prm.length_alpha)?)?,
        (rl - (p.rejected_len * prm.length_alpha)?)?,
    ))
}

/// Per-pair loss `[B]` of one loss type (not `pro` or `sft`, which are not pairwise).
pub fn pair_loss(kind: LossType, p: &PairLogps, prm: &PairParams) -> Result<Tensor> {
    let (beta, ls) = (prm.beta, prm.label_smoothing);
    let cl = (p.chosen - p.ref_chosen)?;
    let rl = (p.rejected - p.ref_rejected)?;
    // beta * delta, with R-DPO's length term: [beta*cl - a|y_w|] - [beta*rl - a|y_l|].
    let (rw_, rl_) = implicit_rewards(p, prm)?;
    let z = (&rw_ - &rl_)?;
    let per_token = |x: &Tensor, n: &Tensor| x.broadcast_div(&n.clamp(1.0, f64::INFINITY)?);
    match kind {
        LossType::Sigmoid => log_sigmoid(&z)?.neg(),
        LossType::Hinge => (1.0 - z)?.relu(),
        LossType::Ipo => {
            let d = (per_token(&cl, p.chosen_len)? - per_token(&rl, p.rejected_len)?)?;
            (d - 1.0 / (2.0 * beta))?.sqr()
        }
        LossType::Robust => {
            let clean = (log_sigmoid(&z)? * -(1.0 - ls))?;
            let flipped = (log_sigmoid(&z.neg()?)? * -ls)?;
            (clean - flipped)? / (1.0 - 2.0 * ls)
        }
        LossType::SigmoidNorm => {
            let d = (per_token(&cl, p.chosen_len)? - per_token(&rl, p.rejected_len)?)?;
            log_sigmoid(&(d * beta)?)?.neg()
        }
        LossType::ExoPair => {
            let (qw, log_qw) = (sigmoid(&z)?, log_sigmoid(&z)?);
            let (ql, log_ql) = (sigmoid(&z.neg()?)?, log_sigmoid(&z.neg()?)?);
            let (log_pw, log_pl) = ((-ls).ln_1p(), ls.ln());
            (qw * (log_qw - log_pw)?)? + (ql * (log_ql - log_pl)?)?
        }
        LossType::NcaPair => {
            let (c, r) = ((&cl * beta)?, (&rl * beta)?);
            (log_sigmoid(&c)?.neg()? - (log_sigmoid(&c.neg()?)? * 0.5)?)?
                - (log_sigmoid(&r.neg()?)? * 0.5)?
        }
        LossType::BcoPair => log_sigmoid(&(&cl * beta)?)?.neg()? - log_sigmoid(&(&rl * -beta)?)?,
        LossType::SppoHard => (&cl - 0.5 / beta)?.sqr()? + (&rl + 0.5 / beta)?.sqr()?,
        LossType::ApoZero => (1.0 - sigmoid(&(&cl * beta)?)?)? + sigmoid(&(&rl * beta)?)?,
        LossType::ApoDown => sigmoid(&(&cl * beta)?)? + (1.0 - sigmoid(&((&cl - &rl)? * beta)?)?)?,
        LossType::Sft | LossType::Pro => candle_core::bail!("{kind:?} is not a pairwise loss"),
    }
}

/// PRO's listwise loss for one ranking (best first): `-sum_{k<n-1} log(exp(r_k) / sum_{i>=k} exp(r_i))`.
pub fn pro_loss(rewards: &Tensor) -> Result<Tensor> {
    let n = rewards.dim(0)?;
    let mut total = rewards.zeros_like()?.sum_all()?;
    for k in 0..n.saturating_sub(1) {
        let tail = rewards.narrow(0, k, n - k)?.unsqueeze(0)?;
        let lse = crate::ops_ext::logsumexp_vec(&tail)?;
        total = (total - (rewards.get(k)? - lse)?)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use serde_json::Value;

    fn golden() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/golden/losses.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn t(v: &Value, dtype: DType) -> Tensor {
        let x: Vec<f64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        Tensor::new(x, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn close(got: &Tensor, want: &Value, what: &str) {
        let g: Vec<f64> = got.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let w: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (a, b) in g.iter().zip(&w) {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-5 * b.abs(),
                "{what}: {g:?} vs {w:?}"
            );
        }
    }

    /// The golden pairs' summed log-probs and lengths (f32).
    struct Inputs([Tensor; 6]);

    impl Inputs {
        fn from_golden(g: &Value) -> Self {
            let inp = &g["dpo"]["inputs"];
            let keys = [
                "policy_chosen_logps",
                "policy_rejected_logps",
                "ref_chosen_logps",
                "ref_rejected_logps",
                "chosen_lengths",
                "rejected_lengths",
            ];
            Inputs(keys.map(|k| t(&inp[k], DType::F32)))
        }

        fn pairs(&self) -> PairLogps<'_> {
            let [pc, pr, rc, rr, lc, lr] = &self.0;
            PairLogps {
                chosen: pc,
                rejected: pr,
                ref_chosen: rc,
                ref_rejected: rr,
                chosen_len: lc,
                rejected_len: lr,
            }
        }
    }

    #[test]
    fn every_dpo_loss_type_matches_trl() {
        let g = golden();
        let inputs = Inputs::from_golden(&g);
        let p = inputs.pairs();
        let cases = g["dpo"]["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 22);
        for c in cases {
            let kind: LossType = c["loss_type"].as_str().unwrap().parse().unwrap();
            let prm = PairParams {
                beta: c["beta"].as_f64().unwrap(),
                label_smoothing: c["label_smoothing"].as_f64().unwrap(),
                length_alpha: 0.0,
            };
            let what = format!("{kind:?} beta {}", prm.beta);
            let per = pair_loss(kind, &p, &prm).unwrap();
            close(&per, &c["per_pair_loss"], &what);
            let mean = per.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!(
                (mean - c["loss"].as_f64().unwrap()).abs() < 1e-5,
                "{what}: mean"
            );
            let (rw, rl) = implicit_rewards(&p, &prm).unwrap();
            close(&rw, &c["chosen_rewards"], &what);
            close(&rl, &c["rejected_rewards"], &what);
            close(&(&rw - &rl).unwrap(), &c["reward_margins"], &what);
        }
    }

    #[test]
    fn length_regularised_dpo_matches_the_formula() {
        let g = golden();
        let inputs = Inputs::from_golden(&g);
        let p = inputs.pairs();
        for c in g["rdpo"]["cases"].as_array().unwrap() {
            let prm = PairParams {
                beta: c["beta"].as_f64().unwrap(),
                label_smoothing: 0.0,
                length_alpha: c["alpha"].as_f64().unwrap(),
            };
            close(
                &pair_loss(LossType::Sigmoid, &p, &prm).unwrap(),
                &c["per_pair_loss"],
                "rdpo",
            );
            let (rw, rl) = implicit_rewards(&p, &prm).unwrap();
            close(&rw, &c["chosen_rewards"], "rdpo chosen");
            close(&rl, &c["rejected_rewards"], "rdpo rejected");
        }
    }

    #[test]
    fn pro_matches_the_formula_in_f64() {
        for c in golden()["pro"]["cases"].as_array().unwrap() {
            let r = t(&c["rewards"], DType::F64);
            let got = pro_loss(&r).unwrap().to_scalar::<f64>().unwrap();
            let want = c["loss"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        // With two responses PRO is exactly DPO's sigmoid loss on the reward difference.
        let r = Tensor::new(&[0.7f64, -0.2], &Device::Cpu).unwrap();
        let dpo = log_sigmoid(&Tensor::new(&[0.9f64], &Device::Cpu).unwrap())
            .unwrap()
            .neg()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        assert!((pro_loss(&r).unwrap().to_scalar::<f64>().unwrap() - dpo).abs() < 1e-12);
    }

    #[test]
    fn pair_losses_have_correct_gradients() {
        // d/d(chosen) of sigmoid DPO = -beta * sigmoid(-beta*delta); check against finite differences
        // for every pairwise loss type in f64.
        let dev = Device::Cpu;
        let base = [-3.1f64, -2.2, -5.0];
        let (pr, rc, rr) = (
            Tensor::new(&[-4.0f64, -1.9, -4.4], &dev).unwrap(),
            Tensor::new(&[-3.3f64, -2.0, -4.9], &dev).unwrap(),
            Tensor::new(&[-3.6f64, -2.5, -4.0], &dev).unwrap(),
        );
        let (lc, lr) = (
            Tensor::new(&[3.0f64, 5.0, 2.0], &dev).unwrap(),
            Tensor::new(&[4.0f64, 2.0, 6.0], &dev).unwrap(),
        );
        let kinds = [
            LossType::Sigmoid,
            LossType::Hinge,
            LossType::Ipo,
            LossType::Robust,
            LossType::SigmoidNorm,
            LossType::ExoPair,
            LossType::NcaPair,
            LossType::BcoPair,
            LossType::SppoHard,
            LossType::ApoZero,
            LossType::ApoDown,
        ];
        for kind in kinds {
            let prm = PairParams {
                beta: 0.5,
                label_smoothing: 0.1,
                length_alpha: 0.02,
            };
            let f = |c: &Tensor| {
                let p = PairLogps {
                    chosen: c,
                    rejected: &pr,
                    ref_chosen: &rc,
                    ref_rejected: &rr,
                    chosen_len: &lc,
                    rejected_len: &lr,
                };
                pair_loss(kind, &p, &prm).unwrap().sum_all().unwrap()
            };
            let v = candle_core::Var::new(&base, &dev).unwrap();
            let g = f(v.as_tensor())
                .backward()
                .unwrap()
                .get(v.as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..3 {
                let (mut a, mut b) = (base, base);
                a[i] += 1e-6;
                b[i] -= 1e-6;
                let fd = (f(&Tensor::new(&a, &dev).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
                    - f(&Tensor::new(&b, &dev).unwrap())
                        .to_scalar::<f64>()
                        .unwrap())
                    / 2e-6;
                assert!(
                    (fd - g[i]).abs() < 1e-6,
                    "{kind:?}[{i}]: autograd {} vs fd {fd}",
                    g[i]
                );
            }
        }
    }
}
