//! GRPO's maths (TRL's `GRPOTrainer`): group-normalised advantages and the four loss
//! aggregations, with a k3 KL to the reference per token.
use candle_core::{DType, Result, Tensor};

use crate::rl::{mean, std_unbiased};

/// GRPO's `scale_rewards`: what the group-centred rewards are divided by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// Divide by each group's std.
    #[default]
    #[serde(alias = "true")]
    Group,
    /// Divide by the whole batch's std (the mean is still per group).
    Batch,
    /// Do not divide (Dr. GRPO).
    #[serde(alias = "false")]
    None,
}

impl std::str::FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "group" | "true" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" | "false" => Ok(ScaleRewards::None),
            o => Err(format!("scale_rewards `{o}`: use group, batch or none")),
        }
    }
}

/// Group-relative advantages over consecutive groups of `g` completions of the same prompt.
pub fn grpo_advantages(rewards: &[f64], g: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = std_unbiased(rewards);
    rewards
        .chunks(g)
        .flat_map(|grp| {
            let m = mean(grp);
            let s = match scale {
                ScaleRewards::Group => std_unbiased(grp),
                ScaleRewards::Batch => batch_std,
                ScaleRewards::None => 0.0,
            };
            grp.iter().map(move |r| match scale {
                ScaleRewards::None => r - m,
                _ => (r - m) / (s + 1e-4),
            })
        })
        .collect()
}

/// GRPO's `loss_type`: how per-token losses are aggregated (TRL 1.16's default is `dapo`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Mean over sequences of each sequence's token mean.
    Grpo,
    /// Token mean over the batch.
    Bnpo,
    /// Sum over tokens / (sequences * max_completion_length).
    DrGrpo,
    /// Token mean over the batch (over all processes in TRL; one process here).
    #[default]
    Dapo,
}

impl std::str::FromStr for GrpoLossType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "grpo" => Ok(GrpoLossType::Grpo),
            "bnpo" => Ok(GrpoLossType::Bnpo),
            "dr_grpo" => Ok(GrpoLossType::DrGrpo),
            "dapo" => Ok(GrpoLossType::Dapo),
            o => Err(format!("loss_type `{o}`: use grpo, bnpo, dr_grpo or dapo")),
        }
    }
}

pub struct GrpoParams {
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub loss_type: GrpoLossType,
    pub max_completion_length: usize,
}

pub struct GrpoLoss {
    pub loss: Tensor,
    pub per_token_loss: Tensor,
    /// Share of tokens whose ratio sits in a clipped region.
    pub clip_ratio: f64,
    /// Mean k3 KL to the reference over completion tokens (when `beta > 0`).
    pub kl: Option<f64>,
}

/// GRPO's loss. `logps`, `old_logps`, `ref_logps`, `mask`: `[B, T]`; `advantages`: `[B]`. Without
/// `old_logps` (one update per rollout) the ratio is 1 with the gradient of `logps`.
pub fn grpo_loss(
    logps: &Tensor,
    old_logps: Option<&Tensor>,
    ref_logps: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    p: &GrpoParams,
) -> Result<GrpoLoss> {
    let old = match old_logps {
        Some(o) => o.clone(),
        None => logps.detach(),
    };
    let a = advantages.unsqueeze(1)?;
    let c1 = (logps - &old)?.exp()?;
    let c2 = c1.clamp(1.0 - p.epsilon_low, 1.0 + p.epsilon_high)?;
    let l1 = c1.broadcast_mul(&a)?;
    let l2 = c2.broadcast_mul(&a)?;
    let mut per_token = l1.minimum(&l2)?.neg()?;
    let n_tok = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let mut kl = None;
    if p.beta != 0.0 {
        let r = ref_logps
            .ok_or_else(|| candle_core::Error::Msg("beta > 0 needs reference log-probs".into()))?;
        let d = (r - logps)?;
        let k3 = ((d.exp()? - 1.0)? - &d)?;
        kl = Some(
            ((&k3 * mask)?.sum_all()? / n_tok)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        );
        per_token = (per_token + (k3 * p.beta)?)?;
    }
    let masked = (&per_token * mask)?;
    let loss = match p.loss_type {
        GrpoLossType::Grpo => {
            let per_seq = (masked.sum(1)? / mask.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
            per_seq.mean_all()?
        }
        GrpoLossType::Bnpo | GrpoLossType::Dapo => (masked.sum_all()? / n_tok)?,
        GrpoLossType::DrGrpo => {
            let b = logps.dim(0)?;
            (masked.sum_all()? / (b * p.max_completion_length) as f64)?
        }
    };
    let low = c1
        .lt(1.0 - p.epsilon_low)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&a.lt(0.0)?.to_dtype(DType::F32)?)?;
    let high = c1
        .gt(1.0 + p.epsilon_high)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&a.gt(0.0)?.to_dtype(DType::F32)?)?;
    let clip_ratio = (((low + high)? * mask)?.sum_all()? / n_tok)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(GrpoLoss {
        loss,
        per_token_loss: masked,
        clip_ratio,
        kl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::golden::*;
    use candle_core::Device;
    use serde_json::Value;

    #[test]
    fn grpo_advantages_and_losses_match_trl() {
        let g = golden()["grpo"].clone();
        let inp = &g["inputs"];
        let k = g["num_generations"].as_u64().unwrap() as usize;
        let rewards = v1(&inp["rewards"]);
        for (name, scale) in [
            ("group", ScaleRewards::Group),
            ("batch", ScaleRewards::Batch),
            ("none", ScaleRewards::None),
        ] {
            let a = grpo_advantages(&rewards, k, scale);
            close1(&a, &v1(&g["advantages"][name]["advantages"]), 1e-5, name);
        }
        let adv = grpo_advantages(&rewards, k, ScaleRewards::Group);
        let dev = Device::Cpu;
        let mask = t2(&v2(&inp["completion_mask"]));
        let adv_t = Tensor::from_vec(
            adv.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            adv.len(),
            &dev,
        )
        .unwrap();
        for case in g["cases"].as_array().unwrap() {
            let logps = t2(&v2(&inp["per_token_logps"]));
            let old = t2(&v2(&inp["old_per_token_logps"]));
            let refp = t2(&v2(&inp["ref_per_token_logps"]));
            let on_policy = case["on_policy"].as_bool().unwrap();
            let p = GrpoParams {
                beta: case["beta"].as_f64().unwrap(),
                epsilon_low: case["epsilon_low"].as_f64().unwrap(),
                epsilon_high: case["epsilon_high"].as_f64().unwrap(),
                loss_type: case["loss_type"].as_str().unwrap().parse().unwrap(),
                max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            };
            let l = grpo_loss(
                &logps,
                (!on_policy).then_some(&old),
                Some(&refp),
                &adv_t,
                &mask,
                &p,
            )
            .unwrap();
            let name = format!(
                "{} beta={} on_policy={on_policy} eps_high={}",
                case["loss_type"], p.beta, p.epsilon_high
            );
            let want = case["loss"].as_f64().unwrap();
            let got = scalar(&l.loss);
            assert!(
                (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                "{name}: loss {got} vs {want}"
            );
            let pt: Vec<Vec<f64>> = l
                .per_token_loss
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect();
            close2(&pt, &v2(&case["per_token_loss"]), 1e-5, &name);
            assert!(
                (l.clip_ratio - case["clip_ratio_region_mean"].as_f64().unwrap()).abs() < 1e-6,
                "{name}"
            );
            if let Some(kl) = case.get("kl_metric").and_then(Value::as_f64) {
                assert!((l.kl.unwrap() - kl).abs() < 1e-5, "{name}: kl");
            }
        }
    }
}
