//! Reward and value models: the backbone plus a scalar head read at the last real token, stored as
//! `score.weight` in the layout of transformers' `AutoModelForSequenceClassification` with
//! `num_labels = 1`, so transformers loads what we save and gives the same scores.
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::Model;

/// Where a normalised reward's gain and bias live in config.json (transformers keeps unknown keys).
const NORMALIZATION_KEY: &str = "preftune_reward_normalization";

/// A fresh scalar head `[1, hidden]` drawn from `N(0, std)` (seeded).
pub fn init_score_head(
    hidden: usize,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Box-Muller: rand 0.8 has no normal distribution without rand_distr.
    let w: Vec<f32> = (0..hidden)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(1e-300), rng.gen());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(w, (1, hidden), device)?.to_dtype(dtype)?)
}

impl Model {
    /// Whether the model carries a score head (a reward or value model).
    pub fn has_score_head(&self) -> bool {
        self.score.is_some()
    }

    /// Adds a fresh score head drawn from `N(0, initializer_range)` (seeded), as transformers
    /// initialises the `score` layer of `AutoModelForSequenceClassification` (what TRL's reward
    /// and value models are); trainable when the backbone or its adapters are; replaces any head
    /// already there.
    pub fn add_score_head(&mut self, seed: u64) -> Result<()> {
        let std = self.cfg.initializer_range();
        let t = init_score_head(self.cfg.hidden_size, std, seed, self.dtype(), self.device())?;
        // Trainable when anything else is: the backbone, or its LoRA adapters (the head then
        // trains in full beside them, as PEFT's `modules_to_save`).
        let trainable = self.is_trainable();
        self.score = Some(if trainable {
            Var::from_tensor(&t)?.as_tensor().clone()
        } else {
            t
        });
        Ok(())
    }

    /// Makes the score head trainable (a `Var`) if it is not: a reward model fine-tuned with LoRA
    /// trains its head in full beside the adapters.
    pub fn train_score_head(&mut self) -> Result<()> {
        if let Some(t) = &self.score {
            if !t.is_variable() {
                self.score = Some(Var::from_tensor(t)?.as_tensor().clone());
            }
        }
        Ok(())
    }

    /// Raw scores `[B]` (f32) from hidden states `[B, T, H]`, each read at its row's last real token:
    /// the last position with `attention_mask = 1` whose id is not `pad_token_id`, the position
    /// transformers' sequence classifiers pick (they skip trailing pad ids even when pad = EOS).
    pub fn scores(
        &self,
        hidden: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pad_token_id: Option<u32>,
    ) -> Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| {
            Error::Msg("this model has no score head (not a reward model)".into())
        })?;
        let (b, t, h) = hidden.dims3()?;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mask = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut rows = Vec::with_capacity(b);
        for (r, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
            let pos = (0..t)
                .rev()
                .find(|&i| mask[i] != 0 && Some(ids[i]) != pad_token_id)
                .or_else(|| (0..t).rev().find(|&i| mask[i] != 0))
                .ok_or_else(|| Error::Msg(format!("row {r} has no real token to score")))?;
            rows.push((r * t + pos) as u32);
        }
        let idx = Tensor::from_vec(rows, b, hidden.device())?;
        let last = hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        let s = last.matmul(&head.t()?)?.squeeze(1)?;
        Ok(s.to_dtype(DType::F32)?)
    }

    /// The score head applied at every position: `[B, T]` (f32) from hidden states `[B, T, H]`
    /// (PPO's value model reads it at each response position).
    pub fn scores_all(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .score
            .as_ref()
            .ok_or_else(|| Error::Msg("this model has no score head".into()))?;
        let (b, t, h) = hidden.dims3()?;
        let s = hidden
            .reshape((b * t, h))?
            .matmul(&head.t()?)?
            .reshape((b, t))?;
        Ok(s.to_dtype(DType::F32)?)
    }

    /// `(gain, bias)` applied by [`Model::normalize_rewards`]; `(1, 0)` until set.
    pub fn reward_normalization(&self) -> (f64, f64) {
        let n = &self.cfg.raw[NORMALIZATION_KEY];
        (
            n["gain"].as_f64().unwrap_or(1.0),
            n["bias"].as_f64().unwrap_or(0.0),
        )
    }

    /// Stores `gain` and `bias` with the model (config.json); see [`normalization_for`].
    pub fn set_reward_normalization(&mut self, gain: f64, bias: f64) {
        self.cfg.raw[NORMALIZATION_KEY] = json!({"gain": gain, "bias": bias});
    }

    /// `gain * raw + bias` for each raw score.
    pub fn normalize_rewards(&self, raw: &[f32]) -> Vec<f64> {
        let (g, b) = self.reward_normalization();
        raw.iter().map(|&r| g * r as f64 + b).collect()
    }
}

/// The gain and bias that map `raw` rewards to mean 0 and (population) standard deviation 1.
pub fn normalization_for(raw: &[f32]) -> Result<(f64, f64)> {
    if raw.len() < 2 {
        return Err(Error::Msg(
            "reward normalisation needs at least two samples".into(),
        ));
    }
    let n = raw.len() as f64;
    let mean = raw.iter().map(|&r| r as f64).sum::<f64>() / n;
    let var = raw.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n;
    if var <= 0.0 || !var.is_finite() {
        return Err(Error::Msg(
            "reward normalisation: the samples' rewards are all equal".into(),
        ));
    }
    let gain = 1.0 / var.sqrt();
    Ok((gain, -mean * gain))
}
