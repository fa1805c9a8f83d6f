//! Every block-quantised GGUF type preftune reads (the K-quants Q2_K-Q6_K, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0), one small tensor each: dequantised as gguf-py 0.19 does it, multiplied as the dequantised
//! weight is, and reordered by rows without requantising. The file and gguf-py's values come from
//! `scripts/parity/make_block_quant_gguf.py` (random blocks with finite scales).
mod common;

use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use common::fixtures;

fn tensors() -> Vec<(String, Arc<QTensor>, Tensor)> {
    let path = fixtures().join("models/block-quants.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let golden = candle_core::safetensors::load(
        fixtures().join("golden/block-quants.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    assert_eq!(names.len(), 10, "one tensor per type");
    names
        .into_iter()
        .map(|name| {
            let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let want = golden
                .get(name)
                .unwrap_or_else(|| panic!("no golden for {name}"))
                .clone();
            (name.clone(), Arc::new(q), want)
        })
        .collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn every_block_type_dequantises_as_gguf_py() {
    for (name, q, want) in tensors() {
        assert_eq!(
            format!("{:?}", q.dtype()).to_lowercase().replace('_', ""),
            name.replace('_', ""),
            "{name}: read as {:?}",
            q.dtype()
        );
        let got = preftune_model::ops::dequantize(&q, DType::F32).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let d = max_diff(&got, &want);
        // Both multiply f32 scales by integer quants; only the order of two multiplications
        // may differ.
        assert!(
            d <= 1e-6 * max_abs(&want),
            "{name}: dequantised values differ by {d}"
        );
    }
}

/// `x W^T` over the blocks: many rows take the dequantised weight's product exactly; a decoding
/// step's few rows multiply the blocks against int8 activations, as llama.cpp does, within that
/// rounding.
#[test]
fn quantised_products_match_the_dequantised_weight() {
    for (name, q, want) in tensors() {
        let (_, cols) = want.dims2().unwrap();
        // Measured: 0 at 64 rows; 0.0019-0.0074 at 2 rows.
        for (rows, bound) in [(64, 1e-6), (2, 2e-2)] {
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| (i as f32 * 0.37).sin() * 1.5)
                .collect();
            let x = Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap();
            let got = preftune_model::ops::quant_matmul(&x, &q, false).unwrap();
            let dense = x.matmul(&want.t().unwrap()).unwrap();
            let rel = max_diff(&got, &dense) / max_abs(&dense);
            assert!(
                rel < bound,
                "{name}, {rows} rows: relative difference {rel}"
            );
        }
    }
}

#[test]
fn reordering_rows_moves_blocks_without_requantising() {
    for (name, q, want) in tensors() {
        let order = [2, 0, 1];
        let moved = preftune_model::ops::permute_rows(&q, &order).unwrap();
        let got = preftune_model::ops::dequantize(&moved, DType::F32).unwrap();
        let idx = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let d = max_diff(&got, &want.index_select(&idx, 0).unwrap());
        assert!(d <= 1e-6 * max_abs(&want), "{name}: {d}");
    }
}
