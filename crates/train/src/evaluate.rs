//! Policy evaluation: samples from a policy, each scored by a reward source and with its
//! sequence KL to a reference (`preftune eval kl` and the pipeline's evaluation stage).
use preftune_eval::RewardSource;
use preftune_model::Pretrained;

use crate::error::Result;
use crate::rl::rollout::{completion_logps, rollout, sampling_config, Prompt, RolloutArgs};

/// How evaluation samples (transformers' names).
#[derive(Clone, Debug)]
pub struct EvalSampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Sampling batch `b` is seeded with `seed + b`.
    pub seed: u64,
}

/// Prompts per sampling batch when each gets `n` samples: up to 32 rows decode together (8 rows
/// ran at 0.4x the tokens/s of 32 here).
pub fn prompts_per_batch(n: usize) -> usize {
    (32 / n.max(1)).max(1)
}

/// One sample of a policy: its prompt index, response, reward and sequence KL to the reference.
#[derive(Clone, Debug)]
pub struct PolicySample {
    pub prompt: usize,
    pub response: String,
    pub reward: f64,
    pub kl: f64,
}

/// The sequence KL of `policy` to `reference` on `n` of its own samples per prompt of
/// `prompts_file`: mean with a 95% interval, and the samples' lengths.
pub fn kl_report(
    policy: &Pretrained,
    reference: &Pretrained,
    prompts_file: &std::path::Path,
    n: usize,
    sampling: &EvalSampling,
) -> Result<serde_json::Value> {
    use preftune_eval::stats::{lengths, mean_ci};
    let (prompts, _) = crate::rl::rollout::load_prompts(prompts_file, &policy.tokenizer, None)?;
    let none = RewardSource::Function(Box::new(|_| 0.0));
    let s = policy_samples(policy, reference, &prompts, n, sampling, &none)?;
    if s.is_empty() {
        return Err(crate::error::Error::Config(format!(
            "{}: no prompts",
            prompts_file.display()
        )));
    }
    let kls: Vec<f64> = s.iter().map(|x| x.kl).collect();
    let texts: Vec<String> = s.iter().map(|x| x.response.clone()).collect();
    Ok(
        serde_json::json!({"kl": mean_ci(&kls), "length": lengths(&texts, None),
                          "samples_per_prompt": n, "temperature": sampling.temperature}),
    )
}

/// `n` samples per prompt from `policy`, each scored by `reward` and with its k1 sequence KL to
/// `reference` (log-probs at T = 1), prompt-major; seeded per sampling batch.
pub fn policy_samples(
    policy: &Pretrained,
    reference: &Pretrained,
    prompts: &[Prompt],
    n: usize,
    sampling: &EvalSampling,
    reward: &RewardSource,
) -> Result<Vec<PolicySample>> {
    let args = RolloutArgs {
        reward: "(eval)".into(),
        num_generations: n,
        max_completion_length: sampling.max_new_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        max_num_seqs: 0,
        missing_eos_penalty: None,
        reward_clip: None,
    };
    let mut out = vec![];
    let per = prompts_per_batch(n);
    for (b, chunk) in prompts.chunks(per).enumerate() {
        let refs: Vec<_> = chunk.iter().collect();
        let cfg = sampling_config(
            &args,
            policy.eos_token_ids(),
            policy.pad_token_id(),
            sampling.seed.wrapping_add(b as u64),
        );
        let r = rollout(&policy.model, &policy.tokenizer, &refs, &args, reward, &cfg)?;
        let dev = policy.model.device();
        let pad = policy.pad_token_id();
        let (lp, _) = completion_logps(&policy.model.detached()?, &r, pad, 1.0, dev)?;
        let (lr, _) = completion_logps(&reference.model, &r, pad, 1.0, dev)?;
        let d: Vec<f32> = (lp.sum - lr.sum)?.to_vec1()?;
        for (i, text) in r.texts.into_iter().enumerate() {
            out.push(PolicySample {
                prompt: b * per + i / n,
                response: text,
                reward: r.rewards[i],
                kl: d[i] as f64,
            });
        }
    }
    Ok(out)
}
