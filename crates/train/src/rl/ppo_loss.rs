//! PPO's maths (TRL's `PPOTrainer`): rewards with the KL penalty, GAE, whitening, the clipped
//! policy and value losses.
use candle_core::{DType, Result, Tensor};

use crate::rl::kl::{kl_estimate, KlEstimator, INVALID_LOGPROB};
use crate::rl::{mask_table, masked_mean, mean, table};

// PPO

/// Index of each response's last real token: the first `pad` minus one (`T - 1` without padding).
/// Ziegler et al.'s adaptive KL controller, as TRL's `AdaptiveKLController.update`: the
/// coefficient moves by the proportional error of the observed KL against the target (clipped to
/// +-20%), scaled by the samples seen (`n_steps`) over the horizon.
pub fn adaptive_kl_coef(coef: f64, kl: f64, target: f64, n_steps: f64, horizon: f64) -> f64 {
    let err = (kl / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + err * n_steps / horizon)
}

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

#[cfg(test)]
mod tests {
    /// TRL's AdaptiveKLController(init_kl_coef=0.2, target=6, horizon=10000): update(8, 256)
    /// (error clipped to +0.2), then update(3, 256) (clipped to -0.2), then update(6.6, 256).
    #[test]
    fn adaptive_kl_controller_follows_trl() {
        let mut c = 0.2;
        for (kl, want) in [
            (8.0, 0.2 * 1.00512),
            (3.0, 0.2 * 1.00512 * 0.99488),
            (6.6, 0.2 * 1.00512 * 0.99488 * 1.00256),
        ] {
            c = super::adaptive_kl_coef(c, kl, 6.0, 256.0, 10000.0);
            assert!((c - want).abs() < 1e-15, "{c} vs {want}");
        }
    }

    use super::*;
    use crate::rl::golden::*;
    use candle_core::Var;

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
}
