//! LoRA on a quantised base (QLoRA-style): a model whose linears stay quantised computes what the
//! dense model holding the dequantised weights computes, in forward and backward, with and without
//! gradient checkpointing and bf16 products; GGUF blocks stay as stored (Q/K rows un-permuted
//! without requantising); what a quantised base cannot do is a clear error.
mod common;

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::*;
use preftune_model::ops::{dequantize, quantize_weight, BaseQuant, Bf16Scope};
use preftune_model::{token_logprobs, LoadOptions, LoraConfig, Model, ModelConfig, Pretrained};

/// 2 x 24 tokens: 48 rows, above the few-row (decoding) products.
fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..48).map(|i| 20 + (i * 7 % 90) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 24), &dev).unwrap();
    let mask = Tensor::ones((2, 24), DType::U32, &dev).unwrap();
    (ids, mask)
}

fn logits(m: &Model, ids: &Tensor) -> Vec<f32> {
    let h = m.forward(ids, None, None, None).unwrap();
    m.logits(&h)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// tiny-llama with every linear weight replaced by its quantised-then-dequantised value.
fn dequantised_reference(quant: BaseQuant) -> Model {
    let src = tiny("tiny-llama");
    let cfg = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let tensors: HashMap<String, Tensor> = read_st(&src.join("model.safetensors"))
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("_proj.weight") {
                let q = quantize_weight(&t, quant).unwrap().unwrap();
                dequantize(&q, DType::F32).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    Model::from_tensors(cfg, tensors, &src, DType::F32, false).unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: Some(vec!["all-linear".into()]),
        layers_to_transform: None,
    }
}

fn set_b(m: &mut Model) {
    // A fresh adapter is an exact no-op (B = 0): give B values so that A's gradient is not zero.
    let params = m.lora_params();
    let dir = tempfile::tempdir().unwrap();
    let cfg = lora();
    m.save_lora(dir.path(), &cfg, "base").unwrap();
    let path = dir.path().join("adapter_model.safetensors");
    let mut st = read_st(&path);
    for (n, t) in &params {
        if n.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
                .collect();
            st.insert(
                n.clone(),
                Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&st, &path).unwrap();
    let mut fresh = m.without_lora();
    fresh.load_lora(dir.path(), true).unwrap();
    *m = fresh;
}

/// Adapter gradients of a log-likelihood loss, by PEFT name, through `Model::backward`. With
/// `nonzero_b`, `B` (zero in a fresh adapter) gets values first, so that `A` has a gradient too.
fn adapter_grads(m: &mut Model, nonzero_b: bool) -> Vec<(String, Vec<f32>)> {
    m.add_lora(&lora(), 7).unwrap();
    if nonzero_b {
        set_b(m);
    }
    let (ids, mask) = batch();
    let h = m.forward(&ids, Some(&mask), None, None).unwrap();
    let loss = token_logprobs(m, &h, &ids, &mask, 1.0)
        .unwrap()
        .sum
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    named_grads(m, &m.backward(&loss).unwrap())
}

fn assert_same_grads(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    assert!(!a.is_empty());
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        let scale = x.iter().fold(0f32, |s, v| s.max(v.abs()));
        assert!(scale > 0.0, "{what}: {n} has an all-zero gradient");
        let d = max_abs_diff(x, y);
        assert!(d <= 1e-4 * scale.max(1.0), "{what}: {n} differs by {d}");
    }
}

#[test]
fn quantised_base_computes_what_its_dequantised_weights_compute() {
    for quant in [BaseQuant::Q4, BaseQuant::Q8] {
        let q = Pretrained::load_quantized(&tiny("tiny-llama"), &LoadOptions::default(), quant)
            .unwrap();
        assert!(q.model.is_quantized());
        let dense = Pretrained::load(&tiny("tiny-llama"), &LoadOptions::default()).unwrap();
        // 4-bit blocks of 32: 18 bytes per 32 values (4.5 bits), 8-bit 34 bytes (8.5 bits).
        let linear_values: usize = dense
            .model
            .named_params()
            .iter()
            .filter(|(n, _)| n.ends_with("_proj.weight"))
            .map(|(_, t)| t.elem_count())
            .sum();
        let bits = 8.0 * q.model.quantized_bytes() as f64 / linear_values as f64;
        let want = if quant == BaseQuant::Q4 { 4.5 } else { 8.5 };
        assert!(
            (bits - want).abs() < 1e-9,
            "{quant:?}: {bits} bits a weight"
        );

        let reference = dequantised_reference(quant);
        let (ids, _) = batch();
        let (got, want) = (logits(&q.model, &ids), logits(&reference, &ids));
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{quant:?}: logits differ by {d}");
        // Quantisation is lossy: the dense original differs (else the test proves nothing).
        assert!(max_abs_diff(&got, &logits(&dense.model, &ids)) > 1e-3);

        // Adapter gradients: stored graph, recomputed layers, and bf16 products.
        let mut r = reference.clone();
        let want = adapter_grads(&mut r, true);
        let mut m = q.model.clone();
        assert_same_grads(&want, &adapter_grads(&mut m, true), &format!("{quant:?}"));
        let mut m = q.model.clone();
        m.set_gradient_checkpointing(true);
        assert_same_grads(
            &want,
            &adapter_grads(&mut m, true),
            &format!("{quant:?} checkpointed"),
        );
        let _bf16 = Bf16Scope::new(true);
        let mut r = reference.clone();
        let want = adapter_grads(&mut r, true);
        let mut m = q.model.clone();
        m.set_gradient_checkpointing(true);
        assert_same_grads(
            &want,
            &adapter_grads(&mut m, true),
            &format!("{quant:?} bf16"),
        );
    }
}

#[test]
fn every_adapter_of_a_quantised_base_gets_a_gradient() {
    let q = Pretrained::load_quantized(&tiny("tiny-llama"), &LoadOptions::default(), BaseQuant::Q4)
        .unwrap();
    let mut m = q.model.clone();
    let grads = adapter_grads(&mut m, false);
    // 2 layers x 7 linears x (A, B); with B = 0, only B's gradients are non-zero.
    assert_eq!(grads.len(), 28);
    for (n, g) in &grads {
        assert!(g.iter().all(|x| x.is_finite()), "{n}");
        if n.ends_with("lora_B.weight") {
            assert!(g.iter().any(|&x| x != 0.0), "{n} has an all-zero gradient");
        }
    }
}

#[test]
fn gguf_blocks_stay_as_stored_with_qk_rows_unpermuted() {
    let (ids, _) = batch();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.gguf");
        let (md, qt) = tiny_llama_gguf_parts(dtype);
        write_gguf(&path, &md, &qt);
        let dense = Pretrained::load(&path, &LoadOptions::default()).unwrap();
        // load_in_4bit keeps Q8_0 as stored: no second quantisation.
        let kept =
            Pretrained::load_quantized(&path, &LoadOptions::default(), BaseQuant::Q4).unwrap();
        let stored: usize = qt
            .iter()
            .filter(|(n, _)| n.starts_with("blk.") && n.ends_with(".weight") && !n.contains("norm"))
            .map(|(_, t)| t.storage_size_in_bytes())
            .sum();
        assert_eq!(kept.model.quantized_bytes(), stored, "{dtype:?}");
        let d = max_abs_diff(&logits(&kept.model, &ids), &logits(&dense.model, &ids));
        assert!(d < 1e-4, "{dtype:?}: logits differ by {d}");
        // Decoding rows take candle's quantised product (int8 activations): close, not equal.
        let one = ids.narrow(1, 0, 5).unwrap().narrow(0, 0, 1).unwrap();
        let (a, b) = (logits(&kept.model, &one), logits(&dense.model, &one));
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        assert!(max_abs_diff(&a, &b) < 0.05 * scale, "{dtype:?}: decoding");
    }
}

#[test]
fn a_quantised_base_refuses_what_it_cannot_do() {
    let path = tiny("tiny-llama");
    let q = Pretrained::load_quantized(&path, &LoadOptions::default(), BaseQuant::Q8).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = q.save(dir.path()).unwrap_err().to_string();
    assert!(e.contains("quantised base is not saved"), "{e}");
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let e = Pretrained::load_quantized(&path, &opts, BaseQuant::Q4)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("use_peft"), "{e}");

    // Merging folds the adapter into the dequantised weight: the dense model it computes.
    let mut m = q.model.clone();
    m.add_lora(&lora(), 3).unwrap();
    set_b(&mut m);
    let mut r = dequantised_reference(BaseQuant::Q8);
    r.add_lora(&lora(), 3).unwrap();
    set_b(&mut r);
    let (ids, _) = batch();
    let before = logits(&m, &ids);
    m.merge_lora().unwrap();
    r.merge_lora().unwrap();
    assert!(!m.is_quantized());
    assert!(max_abs_diff(&logits(&m, &ids), &logits(&r, &ids)) < 1e-4);
    assert!(max_abs_diff(&logits(&m, &ids), &before) < 1e-4);
}
