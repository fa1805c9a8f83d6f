//! KL estimators between the policy and the reference, per token.
/// Log-prob TRL writes at padding positions, so the KL there is exactly 0.
pub const INVALID_LOGPROB: f64 = 1.0;

/// PPO's `kl_estimator`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - ref_logp`: unbiased, can be negative.
    #[default]
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
