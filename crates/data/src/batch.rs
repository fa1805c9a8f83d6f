//! Packing tokenized examples into fixed-size rows, and padding a batch into tensors.
use std::collections::BTreeSet;

use candle_core::{Device, Tensor};

use crate::{Batch, Error, Result, TokenizedExample};

/// Packs examples into rows of at most `max_length` tokens by best-fit decreasing (TRL's `bfd`
/// strategy): longest first, each into the fullest row it still fits in. Examples longer than
/// `max_length` are cut to their first `max_length` tokens and marked truncated. Positions restart
/// at 0 at each sequence, and no sequence's first token is a target (it would be predicted from
/// the previous sequence). Deterministic: ties keep input order and go to the earliest row.
pub fn pack(examples: &[TokenizedExample], max_length: usize) -> Vec<TokenizedExample> {
    if max_length == 0 {
        return Vec::new();
    }
    let len = |ex: &TokenizedExample| ex.input_ids.len().min(max_length);
    let mut order: Vec<usize> = (0..examples.len())
        .filter(|&i| len(&examples[i]) > 0)
        .collect();
    order.sort_by_key(|&i| std::cmp::Reverse(len(&examples[i])));

    // (space left, row index): the first entry at or above a length is the best fit.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    for i in order {
        let n = len(&examples[i]);
        let row = match free.range((n, 0)..).next().copied() {
            Some(entry) => {
                free.remove(&entry);
                entry.1
            }
            None => {
                rows.push(Vec::new());
                used.push(0);
                rows.len() - 1
            }
        };
        rows[row].push(i);
        used[row] += n;
        free.insert((max_length - used[row], row));
    }

    rows.into_iter()
        .map(|members| {
            let (mut ids, mut mask, mut positions) = (Vec::new(), Vec::new(), Vec::new());
            let mut truncated = false;
            for i in members {
                let ex = &examples[i];
                let n = len(ex);
                ids.extend_from_slice(&ex.input_ids[..n]);
                mask.extend_from_slice(&ex.loss_mask[..n.min(ex.loss_mask.len())]);
                // A mask shorter than its ids would misalign every later sequence.
                mask.resize(ids.len(), 0);
                match &ex.position_ids {
                    // An already packed row keeps its own sequence boundaries.
                    Some(p) if p.len() >= n => positions.extend_from_slice(&p[..n]),
                    _ => positions.extend(0..n as u32),
                }
                truncated |= ex.truncated || ex.input_ids.len() > n;
            }
            for (m, &p) in mask.iter_mut().zip(&positions) {
                if p == 0 {
                    *m = 0;
                }
            }
            TokenizedExample {
                input_ids: ids,
                loss_mask: mask,
                position_ids: Some(positions),
                truncated,
            }
        })
        .collect()
}

/// Right-pads a batch to its longest example. Padding gets `pad_token_id`, attention 0, loss 0
/// and position 0. Position ids are returned only when some example carries them (packed rows).
pub fn collate(
    examples: &[&TokenizedExample],
    pad_token_id: u32,
    device: &Device,
) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::Candle(candle_core::Error::Msg(
            "cannot collate an empty batch".into(),
        )));
    }
    for ex in examples {
        let bad = ex.loss_mask.len() != ex.input_ids.len()
            || ex
                .position_ids
                .as_ref()
                .is_some_and(|p| p.len() != ex.input_ids.len());
        if bad {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "collate: an example has {} input ids but a loss mask or position ids of another length",
                ex.input_ids.len()
            ))));
        }
    }
    let b = examples.len();
    let t = examples
        .iter()
        .map(|ex| ex.input_ids.len())
        .max()
        .unwrap_or(0);
    let with_positions = examples.iter().any(|ex| ex.position_ids.is_some());
    let mut input_ids = vec![pad_token_id; b * t];
    let mut attention = vec![0u32; b * t];
    let mut loss = vec![0u32; b * t];
    let mut positions = vec![0u32; if with_positions { b * t } else { 0 }];
    let mut num_tokens = 0;
    for (r, ex) in examples.iter().enumerate() {
        let n = ex.input_ids.len();
        let row = r * t..r * t + n;
        input_ids[row.clone()].copy_from_slice(&ex.input_ids);
        attention[row.clone()].fill(1);
        for (dst, &m) in loss[row.clone()].iter_mut().zip(&ex.loss_mask) {
            *dst = m as u32;
        }
        if with_positions {
            match &ex.position_ids {
                Some(p) => positions[row].copy_from_slice(p),
                None => positions[row]
                    .iter_mut()
                    .zip(0u32..)
                    .for_each(|(dst, p)| *dst = p),
            }
        }
        num_tokens += n;
    }
    let tensor = |data: Vec<u32>| Tensor::from_vec(data, (b, t), device);
    Ok(Batch {
        input_ids: tensor(input_ids)?,
        attention_mask: tensor(attention)?,
        loss_mask: tensor(loss)?,
        position_ids: if with_positions {
            Some(tensor(positions)?)
        } else {
            None
        },
        num_tokens,
    })
}
