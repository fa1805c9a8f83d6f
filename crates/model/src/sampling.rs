//! Drawing the next token from a row of logits: temperature, top-k, top-p, then an inverse-CDF
//! draw from one uniform number, on the host ([`sample_token`]) or, for a batch whose logits are
//! on a GPU, mostly on the device ([`sample_rows_on_device`]).
use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::generate::SamplingConfig;

/// Draws one token from `logits` (modified in place) with the uniform draw `r` in [0, 1) and
/// returns it with its log-probability under the filtered, renormalised distribution. Temperature 0
/// takes the argmax of the raw distribution (and ignores `r`).
pub(crate) fn sample_token(logits: &mut [f32], cfg: &SamplingConfig, r: f32) -> (u32, f32) {
    if cfg.temperature == 0.0 {
        let (best, _) = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            );
        return (best as u32, log_softmax_at(logits, best));
    }
    let inv_t = (1.0 / cfg.temperature) as f32;
    logits.iter_mut().for_each(|x| *x *= inv_t);
    if cfg.top_k > 0 && cfg.top_k < logits.len() {
        let mut sorted: Vec<f32> = logits.to_vec();
        let kth_idx = logits.len() - cfg.top_k;
        let (_, kth, _) = sorted.select_nth_unstable_by(kth_idx, |a, b| a.total_cmp(b));
        let kth = *kth;
        logits
            .iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // As transformers' TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p,
        // always keeping the most likely token.
        let probs = softmax(logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cum = 0.0f32;
        for &i in &order[..order.len() - 1] {
            cum += probs[i];
            if cum > (1.0 - cfg.top_p) as f32 {
                break;
            }
            logits[i] = f32::NEG_INFINITY;
        }
    }
    // Inverse-CDF draw over the unnormalised weights `e^(x - max)`, block sums first: no
    // normalising pass, and only the drawn block is scanned value by value.
    let max = preftune_kernels::vmath::max(logits);
    let mut blocks = Vec::with_capacity(logits.len().div_ceil(BLOCK));
    preftune_kernels::vmath::exp_shifted_blocks(logits, max, |s| blocks.push(s));
    let total: f64 = blocks.iter().sum();
    let target = r as f64 * total;
    let chosen = find_block(&blocks, target)
        .and_then(|(b, cum)| {
            let es = logits.chunks(BLOCK).nth(b).unwrap_or(&[]);
            find_in_block(es, cum, target).map(|i| b * BLOCK + i)
        })
        .unwrap_or_else(|| last_with_weight(logits).unwrap_or(0));
    (chosen as u32, (logits[chosen] as f64 / total).ln() as f32)
}

/// Values per block of the inverse-CDF draw (the blocks of `vmath::exp_shifted_blocks`).
const BLOCK: usize = preftune_kernels::vmath::BLOCK;

/// The block in which the running sum of `blocks` first passes `target`, with the mass before
/// it; `None` when rounding leaves the whole sum short of it.
fn find_block(blocks: &[f64], target: f64) -> Option<(usize, f64)> {
    let mut cum = 0f64;
    for (b, &s) in blocks.iter().enumerate() {
        if cum + s > target {
            return Some((b, cum));
        }
        cum += s;
    }
    None
}

/// Within a block whose mass before it is `cum`: the value at which the running sum passes
/// `target`. Rounding may leave the sum short of it at the block's end: then the block's last
/// value with weight.
fn find_in_block(es: &[f32], mut cum: f64, target: f64) -> Option<usize> {
    for (i, &e) in es.iter().enumerate() {
        cum += e as f64;
        if target < cum {
            return Some(i);
        }
    }
    last_with_weight(es)
}

fn last_with_weight(es: &[f32]) -> Option<usize> {
    es.iter().rposition(|&e| e > 0.0)
}

/// [`sample_token`] for every row of `logits` (`[rows, vocab]`, on any device) without copying
/// them to the host: exponentials and block sums are computed where the logits are, the host
/// picks each row's block from its sums and its draw, and only the picked blocks come back. Same
/// draws, same blocks and the same walk as [`sample_token`], so the same tokens up to rounding
/// (sums in f32 on the device). Rows with `live[i]` false get `None`; `draws[i]` is row `i`'s
/// uniform draw (ignored when greedy). `suppress` (`[1, vocab]`: `-inf` at the tokens to keep out,
/// 0 elsewhere) is added first, as `min_new_tokens` keeps EOS out. Top-k and top-p are not
/// handled here: they need a sort of the vocabulary.
pub(crate) fn sample_rows_on_device(
    logits: &Tensor,
    draws: &[Option<f32>],
    live: &[bool],
    cfg: &SamplingConfig,
    suppress: Option<&Tensor>,
) -> Result<Vec<Option<(u32, f32)>>> {
    debug_assert!(cfg.top_k == 0 && cfg.top_p >= 1.0);
    let (rows, vocab) = logits.dims2()?;
    let mut x = logits.to_dtype(DType::F32)?;
    if let Some(s) = suppress {
        x = x.broadcast_add(s)?;
    }
    if cfg.temperature == 0.0 {
        // The first maximum, as the host's fold (and transformers): the least index holding the
        // row's maximum. candle's CUDA argmax may return a later one on a tie.
        let max = x.max_keepdim(1)?;
        let index = vocab_index(vocab, x.device())?
            .unsqueeze(0)?
            .broadcast_as((rows, vocab))?;
        let past = Tensor::full(u32::MAX, (rows, vocab), x.device())?;
        let best = x
            .broadcast_eq(&max)?
            .where_cond(&index, &past)?
            .min_keepdim(1)?;
        let lse = (x.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
        let lp = (x.gather(&best, 1)? - lse)?;
        let best: Vec<u32> = best.flatten_all()?.to_vec1()?;
        let lp: Vec<f32> = lp.flatten_all()?.to_vec1()?;
        return Ok((0..rows)
            .map(|i| live[i].then_some((best[i], lp[i])))
            .collect());
    }
    let x = (x * (1.0 / cfg.temperature))?;
    let max = x.max_keepdim(1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let nb = vocab.div_ceil(BLOCK);
    let e = match nb * BLOCK - vocab {
        0 => e,
        pad => e.pad_with_zeros(1, 0, pad)?,
    };
    let e = e.reshape((rows * nb, BLOCK))?;
    let sums: Vec<Vec<f32>> = e.reshape((rows, nb, BLOCK))?.sum(2)?.to_vec2()?;
    // Per live row: its block, the mass before it and the target; a row whose target rounding
    // put past every block draws the last value with weight, from the last block with any.
    let mut plan = Vec::with_capacity(rows);
    for i in (0..rows).filter(|&i| live[i]) {
        let blocks: Vec<f64> = sums[i].iter().map(|&s| s as f64).collect();
        let total: f64 = blocks.iter().sum();
        let target = draws[i].unwrap_or(0.0) as f64 * total;
        let (b, cum) = match find_block(&blocks, target) {
            Some((b, cum)) => (b, Some(cum)),
            None => (last_with_weight(&sums[i]).unwrap_or(0), None),
        };
        plan.push((i, b, cum, target, total));
    }
    if plan.is_empty() {
        return Ok(vec![None; rows]);
    }
    let index: Vec<u32> = plan.iter().map(|&(i, b, ..)| (i * nb + b) as u32).collect();
    let index = Tensor::from_vec(index, plan.len(), e.device())?;
    let picked: Vec<Vec<f32>> = e.index_select(&index, 0)?.to_vec2()?;
    let mut out = vec![None; rows];
    for ((i, b, cum, target, total), es) in plan.into_iter().zip(picked) {
        let j = match cum {
            Some(cum) => find_in_block(&es, cum, target),
            None => last_with_weight(&es),
        }
        .unwrap_or(0);
        out[i] = Some(((b * BLOCK + j) as u32, (es[j] as f64 / total).ln() as f32));
    }
    Ok(out)
}

/// `0..vocab` as u32 on `dev`, made once per thread and vocabulary: `Tensor::arange` builds it
/// on the host, an upload of the whole vocabulary's indices at every greedy step otherwise.
fn vocab_index(vocab: usize, dev: &candle_core::Device) -> Result<Tensor> {
    thread_local! {
        static INDEX: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
    }
    INDEX.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some(t) = cell
            .as_ref()
            .filter(|t| t.elem_count() == vocab && t.device().same_device(dev))
        {
            return Ok(t.clone());
        }
        let t = Tensor::arange(0u32, vocab as u32, dev)?;
        *cell = Some(t.clone());
        Ok(t)
    })
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let mut e = x.to_vec();
    let max = preftune_kernels::vmath::max(&e);
    let inv = (1.0 / preftune_kernels::vmath::exp_shifted(&mut e, max)) as f32;
    e.iter_mut().for_each(|v| *v *= inv);
    e
}

fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    let max = preftune_kernels::vmath::max(x);
    x[i] - max - preftune_kernels::vmath::sum_exp_shifted(x, max).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let base = vec![1.0f32, 3.0, 2.0, 0.5, 2.9];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cfg = SamplingConfig {
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            let (t, lp) = sample_token(&mut base.clone(), &cfg, rng.gen());
            assert!(t == 1 || t == 4, "top-2 sampled {t}");
            // Renormalised over the two survivors.
            let z = (3.0f32).exp() + (2.9f32).exp();
            assert!((lp - (base[t as usize].exp() / z).ln()).abs() < 1e-5);
        }
        // top_p 0.5: token 1 alone holds < 50% mass, so tokens 1 and 4 survive, as in transformers.
        let cfg = SamplingConfig {
            top_p: 0.5,
            ..Default::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.insert(sample_token(&mut base.clone(), &cfg, rng.gen()).0);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn greedy_picks_argmax_with_raw_logprob() {
        let mut x = vec![0.0f32, 1.0, 5.0, 2.0];
        let cfg = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (t, lp) = sample_token(&mut x, &cfg, rng.gen());
        assert_eq!(t, 2);
        let z: f32 = [0.0f32, 1.0, 5.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((lp - (5.0f32.exp() / z).ln()).abs() < 1e-6);
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let cfg = SamplingConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[sample_token(&mut logits.to_vec(), &cfg, rng.gen()).0 as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    /// The device path draws what the host path draws from the same logits and draws, at
    /// temperatures 0 and 0.7, with a suppressed token and a finished row, over a vocabulary that
    /// is not a whole number of blocks.
    #[test]
    fn device_sampling_matches_the_host() {
        let (rows, vocab) = (24, 2 * BLOCK + 37);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut logits: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.gen::<f32>() * 6.0 - 3.0)
            .collect();
        // A tie for the maximum, in different blocks: greedy takes the first.
        logits[10] = 9.0;
        logits[BLOCK + 500] = 9.0;
        let dev = candle_core::Device::Cpu;
        let t = Tensor::from_vec(logits.clone(), (rows, vocab), &dev).unwrap();
        let banned = 5usize;
        let mut s = vec![0f32; vocab];
        s[banned] = f32::NEG_INFINITY;
        let suppress = Tensor::from_vec(s, (1, vocab), &dev).unwrap();
        let live: Vec<bool> = (0..rows).map(|i| i != 3).collect();
        for temperature in [0.0, 0.7] {
            let cfg = SamplingConfig {
                temperature,
                ..Default::default()
            };
            let draws: Vec<Option<f32>> = (0..rows).map(|_| Some(rng.gen())).collect();
            let got = sample_rows_on_device(&t, &draws, &live, &cfg, Some(&suppress)).unwrap();
            for i in 0..rows {
                let Some((tok, lp)) = got[i] else {
                    assert!(!live[i], "row {i} is live but drew nothing");
                    continue;
                };
                assert!(live[i], "finished row {i} drew a token");
                let mut row = logits[i * vocab..][..vocab].to_vec();
                row[banned] = f32::NEG_INFINITY;
                let (want, want_lp) = sample_token(&mut row, &cfg, draws[i].unwrap());
                assert_eq!(tok, want, "T={temperature}, row {i}");
                assert!((lp - want_lp).abs() < 1e-4, "row {i}: {lp} vs {want_lp}");
                assert_ne!(tok as usize, banned);
            }
        }
    }
}
