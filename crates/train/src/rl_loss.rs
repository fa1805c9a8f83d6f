//! The maths of online RL (PPO, GRPO, RLOO) as pure functions, with TRL's conventions, which
//! differ from the textbook in places (see `fixtures/golden/README` and the tests):
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
use candle_core::{DType, Result, Tensor};

/// Log-prob TRL writes at padding positions, so the KL there is exactly 0.
pub const INVALID_LOGPROB: f64 = 1.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlEstimator {
    /// `logp - ref_logp`: unbiased, can be negative.
    K1,
    /// `exp(ref - logp) - 1 - (ref - logp)`: non-negative, lower variance.
    K3,
}

impl std::str::FromStr for KlEstimator {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "k1" => Ok(KlEstimator::K1),
            "k3" => Ok(KlEstimator::K3),
            o => Err(format!("kl_estimator `{o}`: use k1 or k3")),
        }
    }
}

pub fn kl_estimate(logp: f64, ref_logp: f64, est: KlEstimator) -> f64 {
    match est {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K3 => {
            let r = ref_logp - logp;
            r.exp() - 1.0 - r
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased (n - 1) standard deviation, as `torch.std`.
fn std_unbiased(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

// ---------------------------------------------------------------------------------------------
// PPO

/// Index of each response's last real token: the first `pad` minus one (`T - 1` without padding).
pub fn sequence_lengths(responses: &[Vec<u32>], pad: u32) -> Vec<usize> {
    responses
        .iter()
        .map(|r| match r.iter().position(|&t| t == pad) {
            Some(i) => i.saturating_sub(1),
            None => r.len().saturating_sub(1),
        })
        .collect()
}

/// Per-token rewards of a PPO rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct PpoRewards {
    pub kl: Vec<Vec<f64>>,
    pub non_score_reward: Vec<Vec<f64>>,
    pub rewards: Vec<Vec<f64>>,
}

/// `-kl_coef * KL` at every position (0 past each response) plus the score at `seq_len + 1` (or at
/// `seq_len` when the response fills the row), as TRL places it.
pub fn ppo_rewards(
    logprobs: &[Vec<f64>],
    ref_logprobs: &[Vec<f64>],
    scores: &[f64],
    seq_lens: &[usize],
    kl_coef: f64,
    est: KlEstimator,
) -> PpoRewards {
    let mut out = PpoRewards {
        kl: vec![],
        non_score_reward: vec![],
        rewards: vec![],
    };
    for (i, (lp, rp)) in logprobs.iter().zip(ref_logprobs).enumerate() {
        let t = lp.len();
        let kl: Vec<f64> = (0..t)
            .map(|j| {
                if j > seq_lens[i] {
                    kl_estimate(INVALID_LOGPROB, INVALID_LOGPROB, est)
                } else {
                    kl_estimate(lp[j], rp[j], est)
                }
            })
            .collect();
        let nsr: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
        let mut r = nsr.clone();
        let at = if seq_lens[i] + 1 < t {
            seq_lens[i] + 1
        } else {
            seq_lens[i]
        };
        r[at] += scores[i];
        out.kl.push(kl);
        out.non_score_reward.push(nsr);
        out.rewards.push(r);
    }
    out
}

/// `x` whitened over the positions where `mask` is true (unbiased variance, `rsqrt(var + 1e-8)`);
/// without `shift_mean` the mean is added back.
pub fn masked_whiten(x: &[Vec<f64>], mask: &[Vec<bool>], shift_mean: bool) -> Vec<Vec<f64>> {
    let vals: Vec<f64> = x
        .iter()
        .zip(mask)
        .flat_map(|(r, m)| r.iter().zip(m).filter(|(_, &m)| m).map(|(v, _)| *v))
        .collect();
    let m = mean(&vals);
    let n = vals.len() as f64;
    let var = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n * (n / (n - 1.0).max(1.0));
    let inv = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|r| {
            r.iter()
                .map(|v| {
                    let w = (v - m) * inv;
                    if shift_mean {
                        w
                    } else {
                        w + m
                    }
                })
                .collect()
        })
        .collect()
}

/// Generalised advantage estimation over every position (next value 0 after the last); returns
/// `(advantages, returns)` with `returns = advantages + values`.
pub fn gae(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    gamma: f64,
    lam: f64,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut adv = vec![];
    let mut ret = vec![];
    for (r, v) in rewards.iter().zip(values) {
        let t = r.len();
        let mut a = vec![0.0; t];
        let mut last = 0.0;
        for j in (0..t).rev() {
            let next = if j + 1 < t { v[j + 1] } else { 0.0 };
            let delta = r[j] + gamma * next - v[j];
            last = delta + gamma * lam * last;
            a[j] = last;
        }
        ret.push(a.iter().zip(v).map(|(a, v)| a + v).collect());
        adv.push(a);
    }
    (adv, ret)
}

/// Everything a PPO update needs from a rollout.
#[derive(Clone, Debug)]
pub struct PpoBatch {
    pub rewards: PpoRewards,
    /// Values with 0 past `seq_len + 1`.
    pub values: Vec<Vec<f64>>,
    pub advantages_unwhitened: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
    /// Whitened over the response, 0 past it.
    pub advantages: Vec<Vec<f64>>,
    /// `true` past each response (policy positions).
    pub padding_mask: Vec<Vec<bool>>,
    /// `true` past `seq_len + 1` (value positions).
    pub padding_mask_p1: Vec<Vec<bool>>,
}

impl PpoBatch {
    /// The rows `rows` (a minibatch); whitening stays as computed over the whole rollout.
    pub fn select(&self, rows: &[usize]) -> PpoBatch {
        fn pick<T: Clone>(v: &[T], rows: &[usize]) -> Vec<T> {
            rows.iter().map(|&i| v[i].clone()).collect()
        }
        PpoBatch {
            rewards: PpoRewards {
                kl: pick(&self.rewards.kl, rows),
                non_score_reward: pick(&self.rewards.non_score_reward, rows),
                rewards: pick(&self.rewards.rewards, rows),
            },
            values: pick(&self.values, rows),
            advantages_unwhitened: pick(&self.advantages_unwhitened, rows),
            returns: pick(&self.returns, rows),
            advantages: pick(&self.advantages, rows),
            padding_mask: pick(&self.padding_mask, rows),
            padding_mask_p1: pick(&self.padding_mask_p1, rows),
        }
    }
}

pub struct PpoRollout<'a> {
    pub logprobs: &'a [Vec<f64>],
    pub ref_logprobs: &'a [Vec<f64>],
    pub values: &'a [Vec<f64>],
    pub scores: &'a [f64],
    pub seq_lens: &'a [usize],
}

/// Rewards, GAE and whitening for one rollout, as TRL's PPO trainer computes them.
pub fn ppo_batch(
    r: &PpoRollout,
    kl_coef: f64,
    est: KlEstimator,
    whiten_rewards: bool,
    gamma: f64,
    lam: f64,
) -> PpoBatch {
    let masks = |extra: usize| -> Vec<Vec<bool>> {
        r.logprobs
            .iter()
            .zip(r.seq_lens)
            .map(|(lp, &s)| (0..lp.len()).map(|j| j > s + extra).collect())
            .collect()
    };
    let (padding_mask, padding_mask_p1) = (masks(0), masks(1));
    let values: Vec<Vec<f64>> = r
        .values
        .iter()
        .zip(&padding_mask_p1)
        .map(|(v, m)| {
            v.iter()
                .zip(m)
                .map(|(v, &m)| if m { 0.0 } else { *v })
                .collect()
        })
        .collect();
    let mut rewards = ppo_rewards(
        r.logprobs,
        r.ref_logprobs,
        r.scores,
        r.seq_lens,
        kl_coef,
        est,
    );
    if whiten_rewards {
        let keep: Vec<Vec<bool>> = padding_mask_p1
            .iter()
            .map(|m| m.iter().map(|x| !x).collect())
            .collect();
        let w = masked_whiten(&rewards.rewards, &keep, false);
        rewards.rewards = w
            .into_iter()
            .zip(&padding_mask_p1)
            .map(|(r, m)| {
                r.into_iter()
                    .zip(m)
                    .map(|(v, &m)| if m { 0.0 } else { v })
                    .collect()
            })
            .collect();
    }
    let (adv, returns) = gae(&rewards.rewards, &values, gamma, lam);
    let keep: Vec<Vec<bool>> = padding_mask
        .iter()
        .map(|m| m.iter().map(|x| !x).collect())
        .collect();
    let advantages = masked_whiten(&adv, &keep, true)
        .into_iter()
        .zip(&padding_mask)
        .map(|(a, m)| {
            a.into_iter()
                .zip(m)
                .map(|(v, &m)| if m { 0.0 } else { v })
                .collect()
        })
        .collect();
    PpoBatch {
        rewards,
        values,
        advantages_unwhitened: adv,
        returns,
        advantages,
        padding_mask,
        padding_mask_p1,
    }
}

/// PPO's losses and statistics for one minibatch.
pub struct PpoLoss {
    /// `pg_loss + vf_coef * vf_loss`, differentiable in the new log-probs and values.
    pub loss: Tensor,
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    pub approxkl: f64,
    pub ratio_mean: f64,
}

fn table(rows: &[Vec<f64>], dev: &candle_core::Device) -> Result<Tensor> {
    let t = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(
        rows.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(),
        (rows.len(), t),
        dev,
    )
}

fn mask_table(rows: &[Vec<bool>], keep_where: bool, dev: &candle_core::Device) -> Result<Tensor> {
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
fn masked_mean(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    (x * m)?.sum_all()? / m.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64
}

/// The clipped surrogate and clipped value loss. `new_logprobs`, `vpred`: `[B, T]` f32 from the
/// current forward pass (positions past each response are ignored).
pub fn ppo_loss(
    new_logprobs: &Tensor,
    vpred: &Tensor,
    batch: &PpoBatch,
    old_logprobs: &[Vec<f64>],
    cliprange: f64,
    cliprange_value: f64,
    vf_coef: f64,
) -> Result<PpoLoss> {
    let dev = new_logprobs.device();
    let keep = mask_table(&batch.padding_mask, false, dev)?;
    let keep_v = mask_table(&batch.padding_mask_p1, false, dev)?;
    // Padded positions: log-probs as INVALID_LOGPROB on both sides (ratio 1), vpred 0.
    let invalid = ((keep.ones_like()? - &keep)? * INVALID_LOGPROB)?;
    let new = ((new_logprobs * &keep)? + &invalid)?;
    let old = ((table(old_logprobs, dev)? * &keep)? + &invalid)?;
    let vpred = (vpred * &keep_v)?;
    let adv = table(&batch.advantages, dev)?;
    let ret = table(&batch.returns, dev)?;
    let values = table(&batch.values, dev)?;

    let diff = (&new - &old)?;
    let ratio = diff.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let pg = pg1.maximum(&pg2)?;
    let pg_loss = masked_mean(&pg, &keep)?;
    let pg_clipfrac = masked_mean(&pg2.gt(&pg1)?.to_dtype(DType::F32)?, &keep)?;

    let v_clipped = (&values + (&vpred - &values)?.clamp(-cliprange_value, cliprange_value)?)?;
    let vf1 = (&vpred - &ret)?.sqr()?;
    let vf2 = (v_clipped - &ret)?.sqr()?;
    let vf = vf1.maximum(&vf2)?;
    let vf_loss = (masked_mean(&vf, &keep_v)? * 0.5)?;
    let vf_clipfrac = masked_mean(&vf2.gt(&vf1)?.to_dtype(DType::F32)?, &keep_v)?;
    let loss = (&pg_loss + (&vf_loss * vf_coef)?)?;
    let approxkl = (diff.sqr()?.mean_all()? * 0.5)?;
    let scalar = |t: &Tensor| -> Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
    Ok(PpoLoss {
        pg_loss: scalar(&pg_loss)?,
        vf_loss: scalar(&vf_loss)?,
        pg_clipfrac: scalar(&pg_clipfrac)?,
        vf_clipfrac: scalar(&vf_clipfrac)?,
        approxkl: scalar(&approxkl)?,
        ratio_mean: scalar(&masked_mean(&ratio, &keep)?)?,
        loss,
    })
}

// ---------------------------------------------------------------------------------------------
// GRPO

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by each group's std.
    Group,
    /// Divide by the whole batch's std (the mean is still per group).
    Batch,
    /// Do not divide (Dr. GRPO).
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpoLossType {
    /// Mean over sequences of each sequence's token mean.
    Grpo,
    /// Token mean over the batch.
    Bnpo,
    /// Sum over tokens / (sequences * max_completion_length).
    DrGrpo,
    /// Token mean over the batch (over all processes in TRL; one process here).
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

// ---------------------------------------------------------------------------------------------
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
    use candle_core::{Device, Var};
    use serde_json::Value;

    fn golden() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/golden/losses.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn v1(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    fn v2(v: &Value) -> Vec<Vec<f64>> {
        v.as_array().unwrap().iter().map(v1).collect()
    }

    fn close1(a: &[f64], b: &[f64], tol: f64, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    fn close2(a: &[Vec<f64>], b: &[Vec<f64>], tol: f64, what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            close1(x, y, tol, &format!("{what}[{i}]"));
        }
    }

    fn t2(rows: &[Vec<f64>]) -> Tensor {
        table(rows, &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Rollout maths and losses of TRL's PPO trainer: KL estimators, score placement, GAE,
    /// whitening, clipped policy and value losses (all five golden cases but the textbook one).
    #[test]
    fn ppo_matches_trl() {
        let g = golden()["ppo"].clone();
        let h = &g["hyperparameters"];
        let inp = &g["inputs"];
        let responses: Vec<Vec<u32>> = inp["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect();
        let pad = h["pad_token_id"].as_u64().unwrap() as u32;
        let seq = sequence_lengths(&responses, pad);
        let (lp, rp, vals) = (
            v2(&inp["logprobs"]),
            v2(&inp["ref_logprobs"]),
            v2(&inp["values"]),
        );
        let scores = v1(&inp["scores"]);
        let mut checked = 0;
        for case in g["cases"].as_array().unwrap() {
            if case["score_placement"]
                .as_str()
                .unwrap()
                .starts_with("NOT TRL")
            {
                continue;
            }
            checked += 1;
            let want_seq: Vec<usize> = v1(&case["sequence_lengths"])
                .iter()
                .map(|&x| x as usize)
                .collect();
            assert_eq!(seq, want_seq);
            let est: KlEstimator = case["kl_estimator"].as_str().unwrap().parse().unwrap();
            let rollout = PpoRollout {
                logprobs: &lp,
                ref_logprobs: &rp,
                values: &vals,
                scores: &scores,
                seq_lens: &seq,
            };
            let b = ppo_batch(
                &rollout,
                h["kl_coef"].as_f64().unwrap(),
                est,
                case["whiten_rewards"].as_bool().unwrap(),
                h["gamma"].as_f64().unwrap(),
                h["lam"].as_f64().unwrap(),
            );
            let name = format!("{} whiten={}", case["kl_estimator"], case["whiten_rewards"]);
            close2(&b.rewards.kl, &v2(&case["kl"]), 1e-5, &format!("{name} kl"));
            close2(
                &b.rewards.non_score_reward,
                &v2(&case["non_score_reward"]),
                1e-5,
                &name,
            );
            close2(
                &b.rewards.rewards,
                &v2(&case["rewards"]),
                1e-5,
                &format!("{name} rewards"),
            );
            close2(
                &b.advantages_unwhitened,
                &v2(&case["advantages_unwhitened"]),
                1e-5,
                &name,
            );
            close2(
                &b.returns,
                &v2(&case["returns"]),
                1e-5,
                &format!("{name} returns"),
            );
            close2(
                &b.advantages,
                &v2(&case["advantages"]),
                1e-4,
                &format!("{name} advantages"),
            );

            let new = Var::from_tensor(&t2(&v2(&inp["new_logprobs"]))).unwrap();
            let vpred = Var::from_tensor(&t2(&v2(&inp["vpred"]))).unwrap();
            let l = ppo_loss(
                new.as_tensor(),
                vpred.as_tensor(),
                &b,
                &lp,
                h["cliprange"].as_f64().unwrap(),
                h["cliprange_value"].as_f64().unwrap(),
                h["vf_coef"].as_f64().unwrap(),
            )
            .unwrap();
            for (got, key) in [
                (l.pg_loss, "pg_loss"),
                (l.vf_loss, "vf_loss"),
                (scalar(&l.loss), "loss"),
                (l.pg_clipfrac, "pg_clipfrac"),
                (l.vf_clipfrac, "vf_clipfrac"),
                (l.approxkl, "approxkl"),
            ] {
                let want = case[key].as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{name} {key}: {got} vs {want}"
                );
            }
            // Gradients reach the new log-probs (response positions only) and the values.
            let grads = l.loss.backward().unwrap();
            let gn = grads
                .get(new.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert!(
                gn[0][4] == 0.0 && gn[0][0] != 0.0,
                "padding gets no policy gradient"
            );
            assert!(grads.get(vpred.as_tensor()).is_some());
        }
        assert_eq!(checked, 4);
    }

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
