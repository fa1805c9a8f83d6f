//! The row loops of the fused LM head + log-softmax + gather (the model crate's
//! `fused::LmHeadLogprob`): over a chunk of logits `[rows, vocab]`, each row's log-probability of
//! its label and, in backward, the row turned in place into the gradient of that log-probability.
//! The chunking and the LM head's products stay with the op.
use crate::fused::par_rows;

/// `(max, log-sum-exp)` of a row.
pub fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = crate::vmath::max(row);
    let sum = crate::vmath::sum_exp_shifted(row, max);
    (max, max + sum.ln() as f32)
}

/// What the forward pass reads off one row of logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowLogprob {
    /// `log softmax(row)[label]`.
    pub logprob: f32,
    /// Whether the label holds the row's largest logit.
    pub hit: bool,
    /// The mean logit over the vocabulary.
    pub mean: f32,
}

/// [`RowLogprob`] of each row of `logits` (`labels.len()` rows of `vocab` values).
pub fn logprob_rows(logits: &mut [f32], vocab: usize, labels: &[u32]) -> Vec<RowLogprob> {
    debug_assert_eq!(logits.len(), labels.len() * vocab);
    par_rows(logits, vocab, |first, part| {
        part.chunks(vocab)
            .zip(&labels[first..])
            .map(|(row, &label)| {
                let (max, z) = log_sum_exp(row);
                let x = row[label as usize];
                RowLogprob {
                    logprob: x - z,
                    hit: x >= max,
                    mean: row.iter().sum::<f32>() / vocab as f32,
                }
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Turns each row of `logits` into `g_i * scale * (onehot(label_i) - softmax(row_i))` in place:
/// the gradient of `g_i * log softmax(row_i)[label_i]` with respect to logits that were scaled by
/// `scale` (`1 / temperature`) before the softmax.
pub fn logprob_grad_rows(logits: &mut [f32], vocab: usize, labels: &[u32], g: &[f32], scale: f32) {
    debug_assert_eq!(logits.len(), labels.len() * vocab);
    debug_assert_eq!(labels.len(), g.len());
    par_rows(logits, vocab, |first, part| {
        for (i, row) in part.chunks_mut(vocab).enumerate() {
            let (_, z) = log_sum_exp(row);
            let gi = g[first + i] * scale;
            crate::vmath::exp_shifted(row, z);
            row.iter_mut().for_each(|x| *x *= -gi);
            row[labels[first + i] as usize] += gi;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written out in f64: the log-probability, the argmax and the mean of each row, and the
    /// gradient against central differences of `g * logprob`, over enough rows to split across
    /// threads.
    #[test]
    fn rows_match_the_formulas_written_out() {
        let (rows, vocab) = (40, 1000);
        let logits: Vec<f32> = crate::test_values_f32(rows * vocab, 3)
            .into_iter()
            .map(|x| 4.0 * x)
            .collect();
        let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % vocab as u32).collect();
        let g: Vec<f32> = (0..rows).map(|i| 0.5 + i as f32 / 10.0).collect();
        let lp64 = |row: &[f64], label: usize| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            let z = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
            row[label] - z
        };
        let wide = |row: &[f32]| row.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let mut l = logits.clone();
        let got = logprob_rows(&mut l, vocab, &labels);
        assert_eq!(got.len(), rows);
        for (i, r) in got.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let label = labels[i] as usize;
            assert!(
                (r.logprob as f64 - lp64(&wide(row), label)).abs() < 1e-5,
                "row {i}"
            );
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(r.hit, row[label] >= max, "row {i}");
            let mean = row.iter().map(|&x| x as f64).sum::<f64>() / vocab as f64;
            assert!((r.mean as f64 - mean).abs() < 1e-5, "row {i}");
        }
        // A row whose label is its argmax.
        let mut top = vec![0f32; vocab];
        top[7] = 1.0;
        assert!(logprob_rows(&mut top, vocab, &[7])[0].hit);

        // The op hands over logits already scaled by 1 / temperature.
        let scale = 0.8f32;
        let mut d: Vec<f32> = logits.iter().map(|&x| scale * x).collect();
        logprob_grad_rows(&mut d, vocab, &labels, &g, scale);
        for i in [0, 17, rows - 1] {
            let row = wide(&logits[i * vocab..(i + 1) * vocab]);
            let label = labels[i] as usize;
            // d/dx_j of g * logprob(scale * x), at a few entries, the label's among them.
            for j in [label, 0, 500, vocab - 1] {
                let h = 1e-4;
                let at = |dx: f64| {
                    let r: Vec<f64> = row
                        .iter()
                        .enumerate()
                        .map(|(k, &x)| scale as f64 * (x + if k == j { dx } else { 0.0 }))
                        .collect();
                    g[i] as f64 * lp64(&r, label)
                };
                let want = (at(h) - at(-h)) / (2.0 * h);
                let got = d[i * vocab + j] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {i} entry {j}: {got} against {want}"
                );
            }
        }
    }
}
