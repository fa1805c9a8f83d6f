//! Packing and collation.
use candle_core::Device;
use preftune_data::{collate, pack, TokenizedExample};

/// Example `k` of length `len`: ids `k*100 + i` (unique across the test), mask 0 then 1s.
fn ex(k: u32, len: usize) -> TokenizedExample {
    TokenizedExample {
        input_ids: (0..len as u32).map(|i| k * 100 + i).collect(),
        loss_mask: (0..len).map(|i| u8::from(i > 0)).collect(),
        position_ids: None,
        truncated: false,
    }
}

fn examples() -> Vec<TokenizedExample> {
    [5, 3, 8, 2, 7, 1, 4, 6, 3, 9]
        .iter()
        .enumerate()
        .map(|(k, &len)| ex(k as u32 + 1, len))
        .collect()
}

#[test]
fn packed_rows_fit_and_hold_every_token_exactly_once() {
    let input = examples();
    let packed = pack(&input, 10);
    let total: usize = input.iter().map(|e| e.input_ids.len()).sum();
    assert!(packed.iter().all(|r| r.input_ids.len() <= 10));
    assert_eq!(
        packed.iter().map(|r| r.input_ids.len()).sum::<usize>(),
        total
    );
    let mut seen: Vec<u32> = packed.iter().flat_map(|r| r.input_ids.clone()).collect();
    let mut expected: Vec<u32> = input.iter().flat_map(|e| e.input_ids.clone()).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    // 48 tokens in rows of 10: best-fit decreasing needs the minimum, 5.
    assert_eq!(packed.len(), 5);
    assert!(packed.iter().all(|r| !r.truncated));
}

#[test]
fn sequences_stay_contiguous_with_restarting_positions_and_masked_first_tokens() {
    let packed = pack(&examples(), 10);
    for row in &packed {
        let pos = row
            .position_ids
            .as_ref()
            .expect("packed rows carry positions");
        assert_eq!(pos.len(), row.input_ids.len());
        assert_eq!(row.loss_mask.len(), row.input_ids.len());
        for (i, &p) in pos.iter().enumerate() {
            let id = row.input_ids[i];
            // Position = offset within its own example, which the test ids encode.
            assert_eq!(p, id % 100);
            assert_eq!(row.loss_mask[i], u8::from(p != 0));
            if p > 0 {
                assert_eq!(row.input_ids[i - 1], id - 1, "sequence split apart");
            }
        }
    }
}

#[test]
fn first_tokens_are_masked_even_when_the_input_mask_says_otherwise() {
    let mut a = ex(1, 3);
    a.loss_mask = vec![1, 1, 1];
    let mut b = ex(2, 3);
    b.loss_mask = vec![1, 1, 1];
    let packed = pack(&[a, b], 8);
    assert_eq!(packed.len(), 1);
    assert_eq!(packed[0].loss_mask, [0, 1, 1, 0, 1, 1]);
    assert_eq!(
        packed[0].position_ids.as_deref(),
        Some(&[0, 1, 2, 0, 1, 2][..])
    );
}

#[test]
fn packing_is_best_fit_decreasing_and_deterministic() {
    // Lengths 6, 5, 4, 3, 2 into rows of 10: 6 opens row 0, 5 opens row 1, 4 fits row 0 exactly,
    // 3 goes to row 1 (5+3), 2 goes to row 1 (the only one with room).
    let input: Vec<_> = [3, 6, 2, 5, 4]
        .iter()
        .enumerate()
        .map(|(k, &n)| ex(k as u32 + 1, n))
        .collect();
    let packed = pack(&input, 10);
    let first_ids = |r: &TokenizedExample| -> Vec<u32> {
        r.input_ids
            .iter()
            .zip(r.position_ids.as_ref().unwrap())
            .filter(|(_, &p)| p == 0)
            .map(|(&i, _)| i / 100)
            .collect()
    };
    assert_eq!(
        packed.iter().map(first_ids).collect::<Vec<_>>(),
        [vec![2, 5], vec![4, 1, 3]]
    );
    assert_eq!(pack(&input, 10), packed);
}

#[test]
fn over_long_examples_are_cut_to_max_length_and_marked() {
    let packed = pack(&[ex(1, 12), ex(2, 3)], 10);
    assert_eq!(packed.len(), 2);
    assert_eq!(packed[0].input_ids, (100..110).collect::<Vec<u32>>());
    assert!(packed[0].truncated);
    assert!(!packed[1].truncated);
}

#[test]
fn collate_pads_right_and_counts_real_tokens() {
    let (a, b) = (ex(1, 4), ex(2, 2));
    let batch = collate(&[&a, &b], 3, &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.dims(), [2, 4]);
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        [[100, 101, 102, 103], [200, 201, 3, 3]]
    );
    assert_eq!(
        batch.attention_mask.to_vec2::<u32>().unwrap(),
        [[1, 1, 1, 1], [1, 1, 0, 0]]
    );
    assert_eq!(
        batch.loss_mask.to_vec2::<u32>().unwrap(),
        [[0, 1, 1, 1], [0, 1, 0, 0]]
    );
    assert!(batch.position_ids.is_none());
    assert_eq!(batch.num_tokens, 6);
}

#[test]
fn collate_returns_positions_when_any_example_is_packed() {
    let packed = pack(&[ex(1, 2), ex(2, 3)], 8).remove(0);
    let plain = ex(3, 3);
    let batch = collate(&[&packed, &plain], 0, &Device::Cpu).unwrap();
    let pos = batch
        .position_ids
        .expect("positions")
        .to_vec2::<u32>()
        .unwrap();
    assert_eq!(pos, [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]);
    assert_eq!(
        batch.loss_mask.to_vec2::<u32>().unwrap(),
        [[0, 1, 1, 0, 1], [0, 1, 1, 0, 0]]
    );
    assert_eq!(batch.num_tokens, 8);
}

#[test]
fn collate_refuses_an_empty_batch() {
    let e = collate(&[], 0, &Device::Cpu)
        .err()
        .expect("empty batch must fail");
    assert!(e.to_string().contains("empty batch"), "{e}");
}
