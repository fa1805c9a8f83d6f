//! RLOO's and REINFORCE's maths (TRL's `RLOOTrainer`): leave-one-out or batch-mean baselines
//! and the per-sequence importance ratio.
use candle_core::{Result, Tensor};

use crate::rl::{mean, std_unbiased};

// RLOO

pub struct RlooAdvantages {
    pub rewards_after_kl: Vec<f64>,
    pub baselines: Vec<f64>,
    pub advantages: Vec<f64>,
}

/// Leave-one-out baselines within groups of `k`; `seq_kl` (k1 summed per sequence) is taken off the
/// rewards first when `beta != 0`; `normalize` whitens the advantages over the batch.
pub fn rloo_advantages(
    rewards: &[f64],
    seq_kl: Option<&[f64]>,
    beta: f64,
    k: usize,
    normalize: bool,
) -> RlooAdvantages {
    let r: Vec<f64> = match seq_kl {
        Some(kl) if beta != 0.0 => rewards.iter().zip(kl).map(|(r, k)| r - beta * k).collect(),
        _ => rewards.to_vec(),
    };
    let mut baselines = Vec::with_capacity(r.len());
    for grp in r.chunks(k) {
        let s: f64 = grp.iter().sum();
        for x in grp {
            baselines.push((s - x) / (grp.len() as f64 - 1.0).max(1.0));
        }
    }
    let mut advantages: Vec<f64> = r.iter().zip(&baselines).map(|(r, b)| r - b).collect();
    if normalize {
        let (m, s) = (mean(&advantages), std_unbiased(&advantages));
        advantages
            .iter_mut()
            .for_each(|a| *a = (*a - m) / (s + 1e-4));
    }
    RlooAdvantages {
        rewards_after_kl: r,
        baselines,
        advantages,
    }
}

/// REINFORCE with a baseline: the mean reward of the whole batch (after the same k1 KL penalty as
/// RLOO), so a single sample per prompt works; `normalize` whitens the advantages.
pub fn reinforce_advantages(
    rewards: &[f64],
    seq_kl: Option<&[f64]>,
    beta: f64,
    normalize: bool,
) -> RlooAdvantages {
    let r: Vec<f64> = match seq_kl {
        Some(kl) if beta != 0.0 => rewards.iter().zip(kl).map(|(r, k)| r - beta * k).collect(),
        _ => rewards.to_vec(),
    };
    let b = mean(&r);
    let mut advantages: Vec<f64> = r.iter().map(|x| x - b).collect();
    if normalize {
        let s = std_unbiased(&advantages);
        advantages.iter_mut().for_each(|a| *a /= s + 1e-4);
    }
    RlooAdvantages {
        baselines: vec![b; r.len()],
        rewards_after_kl: r,
        advantages,
    }
}

/// RLOO's clipped loss with a sequence-level ratio: `seq_logps`, `old_seq_logps`, `advantages`: `[B]`.
pub fn rloo_loss(
    seq_logps: &Tensor,
    old_seq_logps: &Tensor,
    advantages: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    let ratio = (seq_logps - old_seq_logps)?.exp()?;
    let l1 = (&ratio * advantages)?;
    let l2 = (ratio.clamp(1.0 - epsilon, 1.0 + epsilon)? * advantages)?;
    l1.minimum(&l2)?.neg()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::golden::*;
    use candle_core::Device;

    #[test]
    fn reinforce_baseline_is_the_batch_mean() {
        let a = reinforce_advantages(&[1.0, 2.0, 6.0], Some(&[1.0, 0.0, 0.0]), 0.5, false);
        assert_eq!(a.rewards_after_kl, vec![0.5, 2.0, 6.0]);
        assert!((a.baselines[0] - 8.5 / 3.0).abs() < 1e-12);
        assert!(a.advantages.iter().sum::<f64>().abs() < 1e-12);
    }

    #[test]
    fn rloo_matches_trl() {
        let g = golden();
        let inp = &g["grpo"]["inputs"];
        let rewards = v1(&inp["rewards"]);
        let mask = v2(&inp["completion_mask"]);
        let seq_sum = |rows: &[Vec<f64>]| -> Vec<f64> {
            rows.iter()
                .zip(&mask)
                .map(|(r, m)| r.iter().zip(m).map(|(a, b)| a * b).sum())
                .collect()
        };
        let (logp, old, refp) = (
            seq_sum(&v2(&inp["per_token_logps"])),
            seq_sum(&v2(&inp["old_per_token_logps"])),
            seq_sum(&v2(&inp["ref_per_token_logps"])),
        );
        let kl: Vec<f64> = old.iter().zip(&refp).map(|(o, r)| o - r).collect();
        let dev = Device::Cpu;
        let vt = |v: &[f64]| {
            Tensor::from_vec(
                v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                v.len(),
                &dev,
            )
            .unwrap()
        };
        for case in g["rloo"]["cases"].as_array().unwrap() {
            let beta = case["beta"].as_f64().unwrap();
            let norm = case["normalize_advantages"].as_bool().unwrap();
            let a = rloo_advantages(&rewards, Some(&kl), beta, 4, norm);
            let name = format!("beta={beta} normalize={norm}");
            close1(
                &a.rewards_after_kl,
                &v1(&case["rewards_after_kl"]),
                1e-5,
                &name,
            );
            close1(&a.baselines, &v1(&case["baselines"]), 1e-5, &name);
            close1(&a.advantages, &v1(&case["advantages"]), 1e-5, &name);
            if let Some(k) = case.get("sequence_kl_k1") {
                close1(&kl, &v1(k), 1e-5, &name);
            }
            let ratio: Vec<f64> = logp.iter().zip(&old).map(|(l, o)| (l - o).exp()).collect();
            close1(&ratio, &v1(&case["sequence_ratio"]), 1e-5, &name);
            let loss = rloo_loss(&vt(&logp), &vt(&old), &vt(&a.advantages), 0.2).unwrap();
            let want = case["loss"].as_f64().unwrap();
            assert!(
                (scalar(&loss) - want).abs() < 1e-6,
                "{name}: {} vs {want}",
                scalar(&loss)
            );
        }
    }
}
