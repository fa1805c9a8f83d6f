//! Online RL: the rollout engine, the shared loop of GRPO, RLOO and REINFORCE, PPO, and the maths
//! of each as pure functions with TRL's conventions, which differ from the textbook in places (see
//! `fixtures/golden/README` and the tests):
//! - PPO: the score lands on the first padding position after the response (`seq_len + 1`) when
//!   there is one; values are kept one position further than log-probs; GAE runs over all
//!   positions; advantages are whitened with an unbiased variance; the value loss carries 0.5.
//! - GRPO: `A = (r - mean_group) / (std + 1e-4)` with an unbiased std; a k3 KL to the reference
//!   per token; loss aggregation `grpo`, `bnpo`, `dr_grpo`, `dapo`.
//! - RLOO: a k1 KL summed per sequence comes off the reward before the leave-one-out baseline; the
//!   importance ratio is per sequence.
//!
//! Rollout-time quantities (rewards, advantages) are plain numbers; losses are tensors that carry
//! gradients to the new log-probs and values.
use candle_core::{Result, Tensor};

pub mod grpo;
pub mod grpo_loss;
pub mod kl;
pub mod online;
pub mod ppo;
pub mod ppo_loss;
pub mod rloo;
pub mod rloo_loss;
pub mod rollout;

pub(crate) fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased (n - 1) standard deviation, as `torch.std`.
pub(crate) fn std_unbiased(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

pub(crate) fn table(rows: &[Vec<f64>], dev: &candle_core::Device) -> Result<Tensor> {
    let t = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(
        rows.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(),
        (rows.len(), t),
        dev,
    )
}

pub(crate) fn mask_table(
    rows: &[Vec<bool>],
    keep_where: bool,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let t = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(
        rows.iter()
            .flatten()
            .map(|&m| (m == keep_where) as u8 as f32)
            .collect::<Vec<_>>(),
        (rows.len(), t),
        dev,
    )
}

/// `sum(x * m) / sum(m)`.
pub(crate) fn masked_mean(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    (x * m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64
}

/// Reading `fixtures/golden/losses.json` and comparing against it, for the maths' tests.
#[cfg(test)]
pub(crate) mod golden {
    use super::*;
    use candle_core::{DType, Device};
    use serde_json::Value;

    pub(crate) fn golden() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/golden/losses.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    pub(crate) fn v1(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    pub(crate) fn v2(v: &Value) -> Vec<Vec<f64>> {
        v.as_array().unwrap().iter().map(v1).collect()
    }

    pub(crate) fn close1(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    pub(crate) fn close2(a: &[Vec<f64>], b: &[Vec<f64>], tol: f64, what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            close1(x, y, tol, &format!("{what}[{i}]"));
        }
    }

    pub(crate) fn t2(rows: &[Vec<f64>]) -> Tensor {
        table(rows, &Device::Cpu).unwrap()
    }

    pub(crate) fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }
}
