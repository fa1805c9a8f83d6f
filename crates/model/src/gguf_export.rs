//! Export to llama.cpp's GGUF (`preftune export-gguf`), the reverse of [`crate::gguf`]: tensor
//! names, Llama's Q/K permutation for interleaved RoPE, the hyper-parameters, and the tokenizer
//! (byte-level BPE) with its chat template, so that an aligned model runs in llama.cpp, Ollama and
//! LM Studio.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::{MoeNames, Pretrained};

/// The tensor types a model is exported in (llama.cpp's `--outtype` / `llama-quantize` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    /// llama.cpp's Q4_K_M recipe: Q4_K, with Q6_K for the output head and for `attn_v` and
    /// `ffn_down` in the layers that gain most from more bits.
    Q4KM,
}

impl std::str::FromStr for GgufType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufType::F32,
            "f16" => GgufType::F16,
            "bf16" => GgufType::Bf16,
            "q8_0" => GgufType::Q8_0,
            "q4_k_m" => GgufType::Q4KM,
            other => return Err(format!("{other:?}: use f32, f16, bf16, q8_0 or q4_k_m")),
        })
    }
}

impl GgufType {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
            GgufType::Bf16 => 32,
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as i64 - (layers / 8) as i64) % 3 == 2
}

/// The type of one tensor: 1-D tensors (norms) stay f32, as llama.cpp keeps them; a block type
/// whose block does not divide the rows falls back as llama.cpp does (K-quants to Q5_0 / Q8_0,
/// then F16).
fn tensor_type(ty: GgufType, name: &str, dims: &[usize], layers: usize) -> GgmlDType {
    // Routers stay f32, as llama.cpp keeps them (it never quantises `ffn_gate_inp`).
    if dims.len() < 2 || name.ends_with("ffn_gate_inp.weight") {
        return GgmlDType::F32;
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let want = match ty {
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Bf16 => GgmlDType::BF16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4KM => {
            let more = |l: Option<usize>| l.is_some_and(|l| use_more_bits(l, layers));
            if name == "output.weight"
                || (name.ends_with("attn_v.weight")
                    || name.ends_with("ffn_down.weight")
                    || name.ends_with("ffn_down_exps.weight"))
                    && more(layer)
            {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let cols = dims[dims.len() - 1];
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if fits(want) {
        want
    } else if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// The GGUF name of a Llama-family tensor (OLMo 2's norms follow its sublayers).
fn gguf_name(hf: &str, arch: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (layer, rest) = rest.split_once('.')?;
            let (module, kind) = rest.rsplit_once('.')?;
            let g = match module {
                "self_attn.q_proj" => "attn_q",
                // Phi-3's fused projections, in the same row order.
                "self_attn.qkv_proj" => "attn_qkv",
                "mlp.gate_up_proj" => "ffn_up",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
                "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
                "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
                "mlp.shared_expert.up_proj" => "ffn_up_shexp",
                "mlp.shared_expert.down_proj" => "ffn_down_shexp",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" if arch == "olmo2" => "post_attention_norm",
                "post_feedforward_layernorm" if arch == "olmo2" => "post_ffw_norm",
                "post_attention_layernorm" => "ffn_norm",
                _ => return None,
            };
            format!("blk.{layer}.{g}.{kind}")
        }
    })
}

/// An expert's projection (`model.layers.L.{block_sparse_moe|mlp}.experts.E.NAME.weight`):
/// llama.cpp's stacked tensor for it (`blk.L.ffn_{gate|up|down}_exps.weight`) and `E`.
fn expert_slot(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (_, rest) = rest.split_once(".experts.")?;
    let (e, rest) = rest.split_once('.')?;
    let proj = rest.strip_suffix(".weight")?;
    let i = [MoeNames::Mixtral, MoeNames::Qwen]
        .iter()
        .find_map(|n| n.projections().iter().position(|p| *p == proj))?;
    let stack = crate::gguf::EXPERT_STACKS[i];
    Some((format!("blk.{layer}.{stack}_exps.weight"), e.parse().ok()?))
}

/// llama.cpp's layout of Llama's Q/K rows (the inverse of the loader's `unpermute`).
fn permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, 2, out / n_head / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The tokenizer as GGUF metadata: tokens (padded to the embedding's rows), types, merges, the
/// special ids, the pre-tokenizer (the two the loader reads back: `gpt-2`, `smollm`) and the chat
/// template.
fn tokenizer_metadata(p: &Pretrained, vocab_rows: usize) -> Result<Vec<(String, GValue)>> {
    let bad = |what: String| Error::Msg(format!("export-gguf: tokenizer: {what}"));
    let tj: Value = serde_json::from_str(
        &p.tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    if tj["model"]["type"] != "BPE" {
        return Err(bad(format!(
            "{} models cannot be exported (only byte-level BPE)",
            tj["model"]["type"]
        )));
    }
    let byte_level = |v: &Value| v["type"] == "ByteLevel";
    let pre = match &tj["pre_tokenizer"] {
        // llama.cpp's name for GPT-2's byte-level regex ("gpt2" is the tokenizer model).
        v if byte_level(v) => "gpt-2",
        v if v["type"] == "Sequence"
            && v["pretokenizers"].as_array().is_some_and(|a| {
                a.len() == 2
                    && a[0]["type"] == "Digits"
                    && a[0]["individual_digits"] == true
                    && byte_level(&a[1])
            }) =>
        {
            "smollm"
        }
        other => return Err(bad(format!("pre-tokenizer {other} has no GGUF equivalent"))),
    };
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_rows];
    let mut put = |id: u64, t: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!(
                "token id {id} past the {vocab_rows} embedding rows"
            ))
        })?;
        *slot = Some((t.to_string(), ty));
        Ok(())
    };
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const USER_DEFINED: i32 = 4;
    const UNUSED: i32 = 5;
    for (t, id) in tj["model"]["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(0), t, NORMAL)?;
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let ty = if a["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(
            a["id"].as_u64().unwrap_or(0),
            a["content"].as_str().unwrap_or_default(),
            ty,
        )?;
    }
    let (tokens, types): (Vec<GValue>, Vec<GValue>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (t, ty) = t.unwrap_or((format!("[PAD{i}]"), UNUSED));
            (GValue::String(t), GValue::I32(ty))
        })
        .unzip();
    let merges: Vec<GValue> = tj["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::Array(ab) => GValue::String(format!(
                "{} {}",
                ab.first().and_then(Value::as_str).unwrap_or_default(),
                ab.get(1).and_then(Value::as_str).unwrap_or_default()
            )),
            other => GValue::String(other.as_str().unwrap_or_default().to_string()),
        })
        .collect();
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), GValue::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), GValue::Array(types)),
        ("tokenizer.ggml.merges".into(), GValue::Array(merges)),
    ];
    let tc = p.tokenizer.config();
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        GValue::Bool(tc["add_bos_token"] == true),
    ));
    let eos = p.eos_token_ids().first().copied();
    for (key, id) in [
        (
            "bos_token_id",
            p.tokenizer.bos_token_id.or(p.model.cfg.bos_token_id),
        ),
        ("eos_token_id", eos),
        ("padding_token_id", Some(p.pad_token_id())),
    ] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}"), GValue::U32(id)));
        }
    }
    if let Some(t) = p.tokenizer.chat_template() {
        md.push(("tokenizer.chat_template".into(), GValue::String(t.into())));
    }
    Ok(md)
}

/// What an export wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportSummary {
    pub architecture: String,
    pub tensors: usize,
    /// Tensors per GGML type.
    pub types: BTreeMap<String, usize>,
    pub bytes: usize,
}

/// Writes `p` as a GGUF file of type `ty` at `out` (atomically). The Llama family only (Llama,
/// Mistral without a sliding window, SmolLM, Qwen2, Qwen3); LoRA adapters are merged first.
pub fn export_gguf(p: &Pretrained, out: &Path, ty: GgufType) -> Result<ExportSummary> {
    let cfg = &p.model.cfg;
    let model_type = cfg.raw["model_type"].as_str().unwrap_or_default();
    let refuse = |why: String| Err(Error::Msg(format!("export-gguf: {why}")));
    if p.model.is_quantized() {
        return refuse("the model was loaded with a quantised base; load it dense".into());
    }
    let arch = match model_type {
        "llama" | "mistral" | "smollm" | "smollm2" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        // llama.cpp runs Mixtral as `llama` with experts.
        "mixtral" => "llama",
        "qwen2_moe" => "qwen2moe",
        "qwen3_moe" => "qwen3moe",
        "olmo2" => "olmo2",
        "phi3" => "phi3",
        other => {
            return refuse(format!(
            "model_type {other:?}: only the Llama family (Llama, Mistral, Mixtral, SmolLM, Qwen2, Qwen3, \
                 Qwen2-MoE, Qwen3-MoE, OLMo 2, Phi-3) is exported"
        ))
        }
    };
    // llama.cpp runs Phi-3 without its sliding window (it switches it off), so the file is
    // exported and equals the model within the window; elsewhere a window has no equivalent.
    if cfg.sliding_window.is_some() && arch != "phi3" {
        return refuse("sliding-window attention has no llama-architecture equivalent".into());
    }
    // llama.cpp's qwen3moe renormalises the chosen experts' weights, its qwen2moe does not, and
    // neither has dense layers.
    if let Some(m) = cfg.moe.as_ref().filter(|_| arch != "llama") {
        let renormalises = arch == "qwen3moe";
        if m.norm_topk_prob != renormalises {
            return refuse(format!(
                "llama.cpp's {arch} {} the experts' weights: this model has norm_topk_prob = {}",
                if renormalises {
                    "renormalises"
                } else {
                    "does not renormalise"
                },
                m.norm_topk_prob
            ));
        }
        if m.sparse_layers.contains(&false) {
            return refuse(format!(
                "llama.cpp's {arch} has experts in every layer: this model has dense layers \
                 (mlp_only_layers / decoder_sparse_step)"
            ));
        }
    }
    if cfg.rope_scaling.is_some() {
        return refuse("Llama 3 RoPE scaling is not exported yet".into());
    }
    if p.model.has_score_head() {
        return refuse("a reward model (score head) is not a model llama.cpp runs".into());
    }
    let mut model = p.model.clone();
    model.merge_lora()?;
    let a = |k: &str| format!("{arch}.{k}");
    let u = |x: usize| GValue::U32(x as u32);
    let mut md: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), GValue::String(arch.into())),
        (
            "general.name".into(),
            GValue::String(
                out.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ),
        ("general.file_type".into(), u(ty.file_type() as usize)),
        ("general.quantization_version".into(), u(2)),
        (a("block_count"), u(cfg.num_layers)),
        (a("context_length"), u(cfg.max_position_embeddings)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_heads)),
        (a("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (
            a("attention.layer_norm_rms_epsilon"),
            GValue::F32(cfg.norm_eps as f32),
        ),
        (a("rope.freq_base"), GValue::F32(cfg.rope_theta as f32)),
        (a("rope.dimension_count"), u(cfg.head_dim)),
        (a("vocab_size"), u(cfg.vocab_size)),
    ];
    if let Some(m) = &cfg.moe {
        md.push((a("expert_count"), u(m.num_experts)));
        md.push((a("expert_used_count"), u(m.top_k)));
        if arch != "llama" {
            md.push((
                a("expert_feed_forward_length"),
                u(m.expert_intermediate_size),
            ));
        }
        if let Some(w) = m.shared_expert_intermediate_size {
            md.push((a("expert_shared_feed_forward_length"), u(w)));
        }
    }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size || arch == "qwen3" || arch == "qwen3moe" {
        md.push((a("attention.key_length"), u(cfg.head_dim)));
        md.push((a("attention.value_length"), u(cfg.head_dim)));
    }
    md.extend(tokenizer_metadata(p, cfg.vocab_size)?);

    let mut qt: Vec<(String, QTensor)> = vec![];
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    // Experts' projections, stacked per layer and projection as llama.cpp stores them.
    let mut stacks: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    let mut tensors = vec![];
    for (hf, t) in model.named_params() {
        let t = t.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        match expert_slot(&hf) {
            Some((name, e)) => stacks.entry(name).or_default().push((e, t)),
            None => tensors.push((
                gguf_name(&hf, arch).ok_or_else(|| {
                    Error::Msg(format!("export-gguf: tensor {hf} has no GGUF name"))
                })?,
                t,
            )),
        }
    }
    // llama.cpp's qwen2moe has no tied head: it needs `output.weight`, the embedding's copy.
    if arch == "qwen2moe" && !tensors.iter().any(|(n, _)| n == "output.weight") {
        if let Some((_, e)) = tensors.iter().find(|(n, _)| n == "token_embd.weight") {
            let e = e.clone();
            tensors.push(("output.weight".into(), e));
        }
    }
    for (name, mut experts) in stacks {
        experts.sort_by_key(|(e, _)| *e);
        let ts: Vec<Tensor> = experts.into_iter().map(|(_, t)| t).collect();
        tensors.push((name, Tensor::stack(&ts, 0)?));
    }
    for (name, mut t) in tensors {
        // llama.cpp reads the shared expert's gate as a vector (`{n_embd}`).
        if name.ends_with("ffn_gate_inp_shexp.weight") {
            t = t.flatten_all()?;
        }
        if arch == "llama" && name.ends_with("attn_q.weight") {
            t = permute(&t, cfg.num_heads)?;
        } else if arch == "llama" && name.ends_with("attn_k.weight") {
            t = permute(&t, cfg.num_kv_heads)?;
        }
        let d = tensor_type(ty, &name, t.dims(), cfg.num_layers);
        *types.entry(format!("{d:?}")).or_default() += 1;
        qt.push((name, crate::ops::quantize(&t, d)?));
    }
    let mdr: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &mdr, &tr)?;
    let bytes = buf.into_inner();
    crate::io::atomic_write(out, &bytes)?;
    Ok(ExportSummary {
        architecture: arch.into(),
        tensors: qt.len(),
        types,
        bytes: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_and_falls_back_on_narrow_rows() {
        // 32 layers: more bits for 0..4, 28..32 and every third from 4 on (6, 9, ...).
        let more: Vec<usize> = (0..32).filter(|&l| use_more_bits(l, 32)).collect();
        assert_eq!(more[..6], [0, 1, 2, 3, 6, 9]);
        assert!(more.contains(&28) && more.contains(&31) && !more.contains(&5));
        let wide = [4096, 4096];
        assert_eq!(
            tensor_type(GgufType::Q4KM, "blk.0.attn_v.weight", &wide, 32),
            GgmlDType::Q6K
        );
        assert_eq!(
            tensor_type(GgufType::Q4KM, "blk.5.attn_v.weight", &wide, 32),
            GgmlDType::Q4K
        );
        assert_eq!(
            tensor_type(GgufType::Q4KM, "output.weight", &wide, 32),
            GgmlDType::Q6K
        );
        assert_eq!(
            tensor_type(GgufType::Q4KM, "blk.5.ffn_up.weight", &wide, 32),
            GgmlDType::Q4K
        );
        // Rows of 64 do not fit a 256-wide K block: Q5_0 / Q8_0 instead; norms stay f32.
        let narrow = [128, 64];
        assert_eq!(
            tensor_type(GgufType::Q4KM, "blk.5.ffn_up.weight", &narrow, 32),
            GgmlDType::Q5_0
        );
        assert_eq!(
            tensor_type(GgufType::Q4KM, "output.weight", &narrow, 32),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type(GgufType::Q8_0, "blk.0.attn_norm.weight", &[64], 32),
            GgmlDType::F32
        );
        assert_eq!(
            tensor_type(GgufType::Q8_0, "blk.0.attn_q.weight", &[64, 48], 32),
            GgmlDType::F16
        );
        assert!("q4_k_m".parse::<GgufType>().is_ok() && "q3".parse::<GgufType>().is_err());
    }
}
