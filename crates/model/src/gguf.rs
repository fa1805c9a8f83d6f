//! GGUF (llama.cpp) in: metadata to an HF config, dequantised tensors under HF names, and a
//! `tokenizers` BPE rebuilt from the vocabulary and merges stored in the file.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::config::{finite, limits, ModelConfig, MoeNames};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What a GGUF file gives us: an HF-style config.json, tensors (internal layout), and a tokenizer.
pub struct GgufModel {
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
    /// Quantised linear weights kept as stored ([`load_gguf_with`]), rows in our layout.
    pub quantized: HashMap<String, Arc<QTensor>>,
    pub tokenizer: Tokenizer,
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, GValue>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&GValue> {
        self.md
            .get(key)
            .ok_or_else(|| Error::invalid(self.path, key, "missing from GGUF metadata"))
    }
    fn num(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        let n = match v {
            GValue::U8(x) => *x as f64,
            GValue::I8(x) => *x as f64,
            GValue::U16(x) => *x as f64,
            GValue::I16(x) => *x as f64,
            GValue::U32(x) => *x as f64,
            GValue::I32(x) => *x as f64,
            GValue::U64(x) => *x as f64,
            GValue::I64(x) => *x as f64,
            GValue::F32(x) => *x as f64,
            GValue::F64(x) => *x,
            _ => return Err(Error::invalid(self.path, key, "not a number")),
        };
        Ok(n)
    }
    /// A size: an integer in `1..=max`.
    fn dim(&self, key: &str, max: usize) -> Result<usize> {
        let v = self.num(key)?;
        if v.fract() != 0.0 || !(1.0..=max as f64).contains(&v) {
            return Err(Error::invalid(
                self.path,
                key,
                format!("must be an integer in 1..={max}, found {v}"),
            ));
        }
        Ok(v as usize)
    }
    /// A token id, if present: an integer below `vocab`.
    fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        let Some(v) = self.opt_num(key)? else {
            return Ok(None);
        };
        if v.fract() != 0.0 || !(0.0..vocab as f64).contains(&v) {
            return Err(Error::invalid(
                self.path,
                key,
                format!("must be a token id below {vocab}, found {v}"),
            ));
        }
        Ok(Some(v as u32))
    }
    fn opt_num(&self, key: &str) -> Result<Option<f64>> {
        if self.md.contains_key(key) {
            self.num(key).map(Some)
        } else {
            Ok(None)
        }
    }
    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|_| Error::invalid(self.path, key, "not a string"))
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .get(key)?
            .to_vec()
            .map_err(|_| Error::invalid(self.path, key, "not an array"))?;
        arr.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| Error::invalid(self.path, key, "not an array of strings"))
            })
            .collect()
    }
}

/// llama.cpp stores Q and K rows interleaved for its RoPE kernel; this restores transformers'
/// rotate-half order: `w.reshape(n, hd/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = head_size(out, n_head)?;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn hf_name(path: &Path, gguf: &str, arch: &str) -> Result<String> {
    Ok(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let parts: Vec<&str> = gguf.split('.').collect();
            // llama.cpp's first Mixtral files: one tensor an expert (`blk.L.ffn_gate.E.weight`).
            if let ["blk", l, n, e, "weight"] = parts.as_slice() {
                if let Ok(e) = e.parse::<usize>() {
                    return expert_name(&format!("blk.{l}.{n}_exps.weight"), arch, e)
                        .ok_or_else(|| Error::invalid(path, gguf, "unsupported GGUF tensor"));
                }
            }
            let (layer, name, kind) = match parts.as_slice() {
                ["blk", l, n, k] => (*l, *n, *k),
                _ => return Err(Error::invalid(path, gguf, "unsupported GGUF tensor")),
            };
            let hf = match name {
                "attn_q" => "self_attn.q_proj",
                // Phi-3's fused projections.
                "attn_qkv" => "self_attn.qkv_proj",
                "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                // A mixture of experts' router (the experts are split in `expert_names`).
                "ffn_gate_inp" => &format!("{}.gate", moe_names(arch).block()),
                // Qwen2-MoE's shared expert and its gate.
                "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
                "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
                "ffn_up_shexp" => "mlp.shared_expert.up_proj",
                "ffn_down_shexp" => "mlp.shared_expert.down_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                // Gemma: norms on both sides of each sublayer; its ffn_norm is the MLP's pre-norm.
                "ffn_norm" if is_gemma(arch) => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                // OLMo 2: norms after the attention and the MLP.
                "post_attention_norm" => "post_attention_layernorm",
                "post_ffw_norm" => "post_feedforward_layernorm",
                _ => return Err(Error::invalid(path, gguf, "unsupported GGUF tensor")),
            };
            format!("model.layers.{layer}.{hf}.{kind}")
        }
    })
}

/// How a checkpoint of this GGUF architecture names its router and experts: Mixtral (`llama`
/// with experts) or Qwen2-MoE / Qwen3-MoE (`qwen2moe`, `qwen3moe`).
fn moe_names(arch: &str) -> MoeNames {
    match arch {
        "qwen2moe" | "qwen3moe" => MoeNames::Qwen,
        _ => MoeNames::Mixtral,
    }
}

/// llama.cpp's stacked projections of a layer's experts, in the order of
/// [`MoeNames::projections`] (gate, up, down).
pub(crate) const EXPERT_STACKS: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

/// llama.cpp stacks a layer's experts in one tensor per projection (`blk.L.ffn_gate_exps`,
/// `_up_exps`, `_down_exps`: `[experts, out, in]`); Hugging Face keeps one linear per expert. The
/// Hugging Face name of expert `e`'s slice, or `None` for other tensors.
fn expert_name(gguf: &str, arch: &str, e: usize) -> Option<String> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = rest.strip_suffix("_exps.weight")?;
    let names = moe_names(arch);
    let proj = names.projections()[EXPERT_STACKS.iter().position(|s| *s == part)?];
    Some(format!(
        "model.layers.{layer}.{}.experts.{e}.{proj}.weight",
        names.block()
    ))
}

/// The GGUF architectures read, with their Hugging Face class. llama.cpp stores Llama's Q/K
/// weights permuted for its interleaved RoPE; Qwen2/Qwen3/OLMo 2 (NeoX RoPE) keep Hugging Face's
/// layout.
const ARCHS: [(&str, &str); 9] = [
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen2moe", "Qwen2MoeForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("qwen3moe", "Qwen3MoeForCausalLM"),
    ("olmo2", "Olmo2ForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "Gemma3ForCausalLM"),
];

fn is_gemma(arch: &str) -> bool {
    matches!(arch, "gemma2" | "gemma3")
}

/// Gemma's hyper-parameters as llama.cpp stores them (or assumes them when absent), into the
/// Hugging Face config: attention scale, soft-caps, sliding-window layers, local RoPE base and
/// linear RoPE scaling, GeGLU.
fn gemma_config(m: &Meta, arch: &str, config: &mut Value, head_dim: usize) -> Result<()> {
    let k = |s: &str| format!("{arch}.{s}");
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    let (hidden, heads) = (
        config["hidden_size"].as_u64().unwrap_or(0) as usize,
        config["num_attention_heads"].as_u64().unwrap_or(1).max(1) as usize,
    );
    config["model_type"] = json!(if arch == "gemma2" {
        "gemma2"
    } else {
        "gemma3_text"
    });
    config["hidden_activation"] = json!("gelu_pytorch_tanh");
    config["head_dim"] = json!(head_dim);
    // llama.cpp does not store query_pre_attn_scalar: it scales by hidden / heads for the 27B
    // models (46 layers for Gemma 2, 62 for Gemma 3) and by head_dim otherwise.
    let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    config["query_pre_attn_scalar"] = json!(if big { hidden / heads } else { head_dim });
    let num = |key: &str| m.opt_num(&k(key));
    // Soft-caps: llama.cpp defaults Gemma 2's to 50 (attention) and 30 (logits); Gemma 3 has no
    // attention cap, and a logit cap only when stored.
    let (attn_cap, final_cap) = if arch == "gemma2" {
        (
            Some(num("attn_logit_softcapping")?.unwrap_or(50.0)),
            Some(num("final_logit_softcapping")?.unwrap_or(30.0)),
        )
    } else {
        (None, num("final_logit_softcapping")?.filter(|c| *c > 0.0))
    };
    config["attn_logit_softcapping"] = json!(attn_cap);
    config["final_logit_softcapping"] = json!(final_cap);
    // Sliding windows: Gemma 2 always (4096 by default), Gemma 3 when the window is stored.
    let window = match num("attention.sliding_window")? {
        Some(w) if w > 0.0 => Some(m.dim(&k("attention.sliding_window"), limits::POSITIONS)?),
        Some(_) => None,
        None if arch == "gemma2" => Some(4096),
        None => None,
    };
    config["sliding_window"] = json!(window);
    if window.is_some() {
        // llama.cpp's pattern: a per-layer array, or every n-th layer global (n = 2 for Gemma 2,
        // 6 for Gemma 3): layer i slides when i % n < n - 1.
        let key = k("attention.sliding_window_pattern");
        let sliding: Vec<bool> = match m.md.get(&key) {
            Some(GValue::Array(a)) => {
                if a.len() != layers {
                    return Err(Error::invalid(
                        m.path,
                        &key,
                        format!("{} entries for {layers} layers", a.len()),
                    ));
                }
                a.iter()
                    .map(|v| {
                        v.to_bool()
                            .map_err(|_| Error::invalid(m.path, &key, "not an array of bools"))
                    })
                    .collect::<Result<_>>()?
            }
            Some(_) => {
                let n = m.dim(&key, layers.max(1))?;
                (0..layers).map(|i| i % n < n - 1).collect()
            }
            None => {
                let n = if arch == "gemma2" { 2 } else { 6 };
                (0..layers).map(|i| i % n < n - 1).collect()
            }
        };
        let types: Vec<&str> = sliding
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        config["layer_types"] = json!(types);
    }
    if arch == "gemma3" {
        // Global layers: rope.freq_base, linearly scaled when stored so; local ones their own
        // base (10000 when absent), unscaled.
        let theta = config["rope_theta"].as_f64().unwrap_or(10_000.0);
        let local = match num("rope.freq_base_swa")? {
            Some(t) => finite(m.path, &k("rope.freq_base_swa"), t, true)?,
            None => 10_000.0,
        };
        let linear = m.md.contains_key(&k("rope.scaling.type"))
            && m.string(&k("rope.scaling.type"))? == "linear";
        let mut full = json!({"rope_theta": theta, "rope_type": "default"});
        if linear {
            let f = m.num(&k("rope.scaling.factor"))?;
            full = json!({
                "rope_theta": theta,
                "rope_type": "linear",
                "factor": finite(m.path, &k("rope.scaling.factor"), f, true)?,
            });
        }
        config["rope_parameters"] = json!({
            "full_attention": full,
            "sliding_attention": {"rope_theta": local, "rope_type": "default"},
        });
        if let Some(o) = config.as_object_mut() {
            o.remove("rope_theta");
        }
    }
    Ok(())
}

/// Reads a Llama-, Qwen2-, Qwen3-, OLMo 2- or Phi-3-architecture GGUF file, dequantising every
/// tensor to f32.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel> {
    load_gguf_with(path, device, false)
}

/// The head size of a Q/K weight of `out` rows in `n_head` heads, which must be even.
fn head_size(out: usize, n_head: usize) -> Result<usize> {
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(Error::Msg(format!(
            "a Q/K weight of {out} rows does not split into {n_head} heads of even size"
        )));
    }
    Ok(out / n_head)
}

/// The rows of llama.cpp's interleaved Q/K weight in transformers' order: row `i` of the result
/// is row `rows[i]` of the stored weight ([`unpermute`] as a row map).
fn unpermute_rows(out: usize, n_head: usize) -> Result<Vec<usize>> {
    let hd = head_size(out, n_head)?;
    Ok((0..out)
        .map(|r| {
            let (h, j, i) = (r / hd, (r % hd) / (hd / 2), r % (hd / 2));
            h * hd + 2 * i + j
        })
        .collect())
}

/// BOS, EOS, padding (EOS when absent) and unknown token ids.
#[allow(clippy::type_complexity)]
fn special_ids(
    m: &Meta,
    vocab: usize,
) -> Result<(Option<u32>, Option<u32>, Option<u32>, Option<u32>)> {
    let id = |key: &str| m.token_id(key, vocab);
    let (bos, eos, unk) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
    );
    let pad = id("tokenizer.ggml.padding_token_id")?.or(eos);
    Ok((bos, eos, pad, unk))
}

/// The open file and its header (metadata and tensor directory).
fn read_header(path: &Path) -> Result<(std::fs::File, Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content =
        Content::read(&mut file).map_err(|e| Error::invalid(path, "gguf", e.to_string()))?;
    Ok((file, content))
}

/// The tokenizer of a GGUF file alone (its metadata; no tensor is read).
pub fn load_gguf_tokenizer(path: &Path) -> Result<Tokenizer> {
    let (_, content) = read_header(path)?;
    let m = Meta {
        path,
        md: &content.metadata,
    };
    let arch = m.string("general.architecture")?;
    let tokens = m.strings("tokenizer.ggml.tokens")?;
    let (bos, eos, pad, unk) = special_ids(&m, tokens.len())?;
    let context = m.dim(&format!("{arch}.context_length"), limits::POSITIONS)?;
    build_tokenizer(&m, &arch, &tokens, bos, eos, pad, unk, context)
}

/// [`load_gguf`]; with `keep_quantized`, the decoder layers' block-quantised weights stay
/// quantised (in `quantized`), for LoRA on a quantised base, and only the rest is dequantised.
pub fn load_gguf_with(path: &Path, device: &Device, keep_quantized: bool) -> Result<GgufModel> {
    let (mut file, content) = read_header(path)?;
    let m = Meta {
        path,
        md: &content.metadata,
    };
    let arch = m.string("general.architecture")?;
    let Some(&(_, hf_class)) = ARCHS.iter().find(|(a, _)| *a == arch) else {
        return Err(Error::UnknownArch {
            path: path.into(),
            arch: format!("gguf:{arch}"),
        });
    };
    let permuted = arch == "llama";
    let k = |s: &str| format!("{arch}.{s}");
    // Every size is checked before use: a crafted head count of 0 divided by zero, and a huge
    // one overflowed a product (panics, exit 101).
    use crate::config::limits;
    let n_head = m.dim(&k("attention.head_count"), limits::DIM)?;
    let n_kv = match m.opt_num(&k("attention.head_count_kv"))? {
        Some(_) => m.dim(&k("attention.head_count_kv"), limits::DIM)?,
        None => n_head,
    };
    if !n_head.is_multiple_of(n_kv) {
        return Err(Error::invalid(
            path,
            k("attention.head_count_kv"),
            format!("must be > 0 and divide attention.head_count ({n_head})"),
        ));
    }
    let tokens = m.strings("tokenizer.ggml.tokens")?;

    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    // Stacked expert tensors and how many experts each holds, checked against `expert_count`.
    let mut stacked: Vec<(String, usize)> = vec![];
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        // Dequantised on the host, one tensor at a time, then moved: the CPU's dequantisation is
        // the one tested against llama.cpp's layout (and candle's CUDA one builds no MMQ here).
        let bad = |e: candle_core::Error| Error::invalid(path, name.as_str(), e.to_string());
        let q = content.tensor(&mut file, name, &Device::Cpu).map_err(bad)?;
        // Llama's Q and K rows come interleaved, in heads of this many.
        let permuted_heads = match name.as_str() {
            n if !permuted || !n.starts_with("blk.") => None,
            n if n.ends_with("attn_q.weight") => Some(n_head),
            n if n.ends_with("attn_k.weight") => Some(n_kv),
            _ => None,
        };
        // A layer's experts stacked in one tensor, split into one weight each below.
        let stack = name.ends_with("_exps.weight");
        let expert = |e: usize| {
            expert_name(name, &arch, e)
                .ok_or_else(|| Error::invalid(path, name.as_str(), "unsupported GGUF tensor"))
        };
        if stack {
            stacked.push((name.clone(), q.shape().dims().first().copied().unwrap_or(0)));
        }
        if keep_quantized && stack && q.rank() == 3 && crate::ops::is_block_quantized(q.dtype()) {
            for (e, qe) in crate::ops::split_experts(&q)
                .map_err(bad)?
                .into_iter()
                .enumerate()
            {
                quantized.insert(expert(e)?, Arc::new(qe));
            }
            continue;
        }
        if keep_quantized
            && name.starts_with("blk.")
            && q.rank() == 2
            && crate::ops::is_block_quantized(q.dtype())
        {
            let q = match permuted_heads {
                Some(n) => {
                    let rows = unpermute_rows(q.shape().dims2().map_err(bad)?.0, n)
                        .map_err(|e| Error::invalid(path, name.as_str(), e.to_string()))?;
                    crate::ops::permute_rows(&q, &rows).map_err(bad)?
                }
                None => q,
            };
            quantized.insert(hf_name(path, name, &arch)?, Arc::new(q));
            continue;
        }
        let mut t = q.dequantize(&Device::Cpu).map_err(bad)?;
        // llama.cpp stores Gemma's RMSNorm weights as 1 + w, the scale it multiplies by.
        if is_gemma(&arch) && name.ends_with("norm.weight") {
            t = (t - 1.0).map_err(bad)?;
        }
        if let Some(n) = permuted_heads {
            t = unpermute(&t, n)?;
        }
        // llama.cpp keeps the shared expert's gate as a vector; transformers as a `[1, H]` linear.
        if name.ends_with("ffn_gate_inp_shexp.weight") && t.rank() == 1 {
            t = t.unsqueeze(0).map_err(bad)?;
        }
        if stack {
            for e in 0..t.dim(0).map_err(bad)? {
                tensors.insert(
                    expert(e)?,
                    t.get(e).map_err(bad)?.to_device(device).map_err(bad)?,
                );
            }
            continue;
        }
        tensors.insert(
            hf_name(path, name, &arch)?,
            t.to_device(device).map_err(bad)?,
        );
    }

    let (bos, eos, pad, unk) = special_ids(&m, tokens.len())?;
    let context = m.dim(&k("context_length"), limits::POSITIONS)?;
    let hidden = m.dim(&k("embedding_length"), limits::DIM)?;
    // Qwen3's heads are wider than hidden / heads: llama.cpp stores their size.
    let head_dim = match m.opt_num(&k("attention.key_length"))? {
        Some(_) => Some(m.dim(&k("attention.key_length"), limits::DIM)?),
        None => None,
    };
    if head_dim.is_none() && !hidden.is_multiple_of(n_head) {
        return Err(Error::invalid(
            path,
            k("attention.head_count"),
            format!("must divide embedding_length ({hidden})"),
        ));
    }
    let vocab = match m.opt_num(&k("vocab_size"))? {
        Some(_) => m.dim(&k("vocab_size"), limits::VOCAB)?,
        None => tokens.len(),
    };
    let eps_key = k("attention.layer_norm_rms_epsilon");
    let eps = finite(path, &eps_key, m.num(&eps_key)? as f32 as f64, false)?;
    let theta_key = k("rope.freq_base");
    let theta = match m.opt_num(&theta_key)? {
        Some(t) => finite(path, &theta_key, t, true)?,
        None => 10_000.0,
    };
    let layers = m.dim(&k("block_count"), limits::LAYERS)?;
    // llama.cpp reads an expert count of 0 as a dense model.
    let experts = match m.opt_num(&k("expert_count"))? {
        Some(n) if n != 0.0 => Some((
            m.dim(&k("expert_count"), limits::EXPERTS)?,
            m.dim(&k("expert_used_count"), limits::EXPERTS)?,
        )),
        _ => None,
    };
    let expert_width = match m.opt_num(&k("expert_feed_forward_length"))? {
        Some(_) => Some(m.dim(&k("expert_feed_forward_length"), limits::DIM)?),
        None => None,
    };
    let ff = match (m.opt_num(&k("feed_forward_length"))?, expert_width) {
        (None, Some(w)) => w,
        _ => m.dim(&k("feed_forward_length"), limits::DIM)?,
    };
    let mut config = ModelConfig::llama_json(
        hidden,
        layers,
        n_head,
        n_kv,
        ff,
        vocab,
        context,
        eps,
        theta,
        !tensors.contains_key("lm_head.weight") && !quantized.contains_key("lm_head.weight"),
        bos,
        eos,
        pad,
    );
    config["model_type"] = Value::String(arch.clone());
    config["architectures"] = json!([hf_class]);
    match (experts, arch.as_str()) {
        (Some((n, used)), "llama" | "qwen2moe" | "qwen3moe") => {
            if let Some((name, d)) = stacked.iter().find(|(_, d)| *d != n) {
                return Err(Error::invalid(
                    path,
                    name.as_str(),
                    format!("holds {d} experts; {} is {n}", k("expert_count")),
                ));
            }
            // llama.cpp renormalises the chosen experts' weights for Mixtral and Qwen3-MoE, not
            // for Qwen2-MoE.
            config["num_local_experts"] = json!(n);
            config["num_experts_per_tok"] = json!(used);
            config["norm_topk_prob"] = json!(arch != "qwen2moe");
            if arch == "llama" {
                config["model_type"] = json!("mixtral");
                config["architectures"] = json!(["MixtralForCausalLM"]);
            } else {
                config["model_type"] = json!(match arch.as_str() {
                    "qwen2moe" => "qwen2_moe",
                    _ => "qwen3_moe",
                });
                let width = expert_width.ok_or_else(|| {
                    Error::invalid(path, k("expert_feed_forward_length"), "missing")
                })?;
                config["moe_intermediate_size"] = json!(width);
                if arch == "qwen2moe" {
                    // llama.cpp's default when the key is absent: the dense width.
                    let shared = match m.opt_num(&k("expert_shared_feed_forward_length"))? {
                        Some(_) => m.dim(&k("expert_shared_feed_forward_length"), limits::DIM)?,
                        None => ff,
                    };
                    config["shared_expert_intermediate_size"] = json!(shared);
                }
                // Layers without a router are dense.
                let dense: Vec<usize> = (0..layers)
                    .filter(|l| {
                        !content
                            .tensor_infos
                            .contains_key(&format!("blk.{l}.ffn_gate_inp.weight"))
                    })
                    .collect();
                config["mlp_only_layers"] = json!(dense);
            }
        }
        (Some(_), _) => {
            return Err(Error::invalid(
                path,
                k("expert_count"),
                "mixtures of experts are read for llama (Mixtral), qwen2moe and qwen3moe only",
            ))
        }
        (None, _) if !stacked.is_empty() => {
            return Err(Error::invalid(
                path,
                stacked[0].0.as_str(),
                format!("stacked experts without {}", k("expert_count")),
            ))
        }
        (None, "qwen2moe" | "qwen3moe") => {
            return Err(Error::invalid(path, k("expert_count"), "missing"))
        }
        (None, _) => {}
    }
    if let Some(hd) = head_dim {
        config["head_dim"] = json!(hd);
    }
    if is_gemma(&arch) {
        gemma_config(&m, &arch, &mut config, head_dim.unwrap_or(hidden / n_head))?;
    }
    let tokenizer = build_tokenizer(&m, &arch, &tokens, bos, eos, pad, unk, context)?;
    Ok(GgufModel {
        config,
        tensors,
        quantized,
        tokenizer,
    })
}

/// BPE merges implied by a sentencepiece vocabulary that stores none, as transformers'
/// `generate_merges` recovers them: every split of every token into two tokens, ranked by the
/// token's score (higher first), then by the longer left piece, then the longer right one; within
/// one token, by the pieces' ids.
fn spm_merges(tokens: &[String], score: &dyn Fn(usize) -> f64) -> Vec<(String, String)> {
    // Python's dict semantics: a repeated token keeps its last id, at its first position.
    let mut id: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = vec![];
    for (i, t) in tokens.iter().enumerate() {
        if id.insert(t.as_str(), i).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = vec![];
    for t in order {
        let sc = score(id[t]);
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(at, _)| t.split_at(at))
            .filter(|(l, r)| id.contains_key(l) && id.contains_key(r))
            .map(|(l, r)| (l, r, sc))
            .collect();
        local.sort_by_key(|(l, r, _)| (id[l], id[r]));
        merges.extend(local);
    }
    // Python's stable sort with reverse=True: descending keys, equal keys in their order.
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// How transformers rebuilds a sentencepiece vocabulary (`tokenizer.ggml.model = "llama"`),
/// by architecture.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Spm {
    /// `GemmaTokenizer`: spaces normalised to `▁`, no prefix space; the file stores no merges and
    /// its scores do not follow the merge order, so merges come from the tokens' order.
    Gemma,
    /// `LlamaTokenizer` (Llama 2, Mistral v0.1, TinyLlama, ...): `Metaspace` with a prefix `▁`
    /// on the first section; merges ranked by the stored scores.
    Llama,
    /// Phi-3: as Llama, but the prefix `▁` comes from a normaliser.
    Phi3,
}

impl Spm {
    fn of(arch: &str) -> Self {
        match arch {
            "gemma2" | "gemma3" => Spm::Gemma,
            "phi3" => Spm::Phi3,
            _ => Spm::Llama,
        }
    }
}

/// A sentencepiece vocabulary as the BPE `tokenizer.json` transformers builds from a GGUF file:
/// byte fallback, merges recovered from scores (or Gemma's token order) unless the file stores
/// them, the normaliser / pre-tokenizer / decoder of the architecture's tokenizer class.
fn spm_json(m: &Meta, tokens: &[String], flavour: Spm) -> Result<Value> {
    // Gemma files store runs of spaces as spaces; GemmaTokenizer spells them with U+2581.
    let tokens: Vec<String> = tokens
        .iter()
        .map(|t| {
            if flavour == Spm::Gemma && t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let merges = if m.md.contains_key("tokenizer.ggml.merges") {
        stored_merges(m)?
    } else if flavour == Spm::Gemma {
        spm_merges(&tokens, &|i| -(i as f64))
    } else {
        let key = "tokenizer.ggml.scores";
        let scores: Vec<f64> = m
            .get(key)?
            .to_vec()
            .map_err(|_| Error::invalid(m.path, key, "not an array"))?
            .iter()
            .map(|v| v.to_f32().map(f64::from))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::invalid(m.path, key, "not an array of numbers"))?;
        if scores.len() != tokens.len() {
            return Err(Error::invalid(
                m.path,
                key,
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        spm_merges(&tokens, &|i| scores[i])
    };
    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let mut decoders = vec![
        replace("\u{2581}", " "),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    let (normalizer, pre_tokenizer, unk) = match flavour {
        Spm::Gemma => (
            replace(" ", "\u{2581}"),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
            json!("<unk>"),
        ),
        Spm::Llama => (
            Value::Null,
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
            Value::Null,
        ),
        Spm::Phi3 => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, replace(" ", "\u{2581}")]}),
            Value::Null,
            Value::Null,
        ),
    };
    if flavour != Spm::Gemma {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": bpe_model(&tokens, merges, unk, true),
    }))
}

/// The merges a file stores, `"left right"` each.
fn stored_merges(m: &Meta) -> Result<Vec<(String, String)>> {
    Ok(m.strings("tokenizer.ggml.merges")?
        .iter()
        .map(|s| {
            let (a, b) = s.split_once(' ').unwrap_or((s.as_str(), ""));
            (a.to_string(), b.to_string())
        })
        .collect())
}

/// A `tokenizers` BPE model over `tokens` (ids in file order); `sentencepiece`: unknown pieces
/// fall back to byte tokens and runs of unknowns fuse, as sentencepiece does.
fn bpe_model(
    tokens: &[String],
    merges: Vec<(String, String)>,
    unk: Value,
    sentencepiece: bool,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = merges.into_iter().map(|(l, r)| json!([l, r])).collect();
    json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
           "end_of_word_suffix": null, "fuse_unk": sentencepiece, "byte_fallback": sentencepiece,
           "ignore_merges": false, "vocab": vocab, "merges": merges})
}

/// A byte-level BPE (`tokenizer.ggml.model = "gpt2"`): its pre-tokenizer, vocabulary and merges.
fn byte_level_json(m: &Meta, tokens: &[String]) -> Result<Value> {
    let pre = if m.md.contains_key("tokenizer.ggml.pre") {
        m.string("tokenizer.ggml.pre")?
    } else {
        "default".into()
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre.as_str() {
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        // "gpt-2" is llama.cpp's name; "gpt2" is what preftune 0.1 wrote before it knew.
        "gpt-2" | "gpt2" | "default" => byte_level,
        other => {
            return Err(Error::invalid(
                m.path,
                "tokenizer.ggml.pre",
                format!("pre-tokenizer {other:?} is not supported"),
            ))
        }
    };
    Ok(json!({
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": bpe_model(tokens, stored_merges(m)?, Value::Null, false),
    }))
}

/// Rebuilds a `tokenizer.json` from GGUF metadata: byte-level BPE (`gpt2`), as `gguf_to_hf.py`
/// does, or a sentencepiece vocabulary (`llama`), as transformers does.
#[allow(clippy::too_many_arguments)]
fn build_tokenizer(
    m: &Meta,
    arch: &str,
    tokens: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    context: usize,
) -> Result<Tokenizer> {
    let model = m.string("tokenizer.ggml.model")?;
    let spm = model == "llama";
    if model != "gpt2" && !spm {
        return Err(Error::invalid(
            m.path,
            "tokenizer.ggml.model",
            format!(
                "{model:?} is not supported (byte-level BPE, \"gpt2\", or sentencepiece, \"llama\")"
            ),
        ));
    }
    let types: Vec<i64> = match m.md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| Error::invalid(m.path, "tokenizer.ggml.token_type", "not an array"))?
            .iter()
            .map(|x| x.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let tok_str = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize)).cloned();
    let mut tj = if spm {
        spm_json(m, tokens, Spm::of(arch))?
    } else {
        byte_level_json(m, tokens)?
    };
    // Control tokens are special; a sentencepiece vocabulary's user-defined ones (`<think>`) are
    // added whole too, not special, as transformers does.
    const CONTROL: i64 = 3;
    const USER_DEFINED: i64 = 4;
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == CONTROL || (spm && ty == USER_DEFINED))
        .map(|(i, (t, &ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": ty == CONTROL})
        })
        .collect();
    // llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    let add_bos =
        m.md.get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(spm);
    let post_processor = match (add_bos, tok_str(bos)) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}
        }),
        _ => Value::Null,
    };
    tj["version"] = json!("1.0");
    tj["truncation"] = Value::Null;
    tj["padding"] = Value::Null;
    tj["added_tokens"] = json!(added);
    tj["post_processor"] = post_processor;
    let inner: tokenizers::Tokenizer = tj
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| Error::invalid(m.path, "tokenizer.ggml", e.to_string()))?;
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_str(bos), "eos_token": tok_str(eos), "pad_token": tok_str(pad), "unk_token": tok_str(unk),
        "model_max_length": context, "add_bos_token": add_bos, "clean_up_tokenization_spaces": false,
    });
    if m.md.contains_key("tokenizer.chat_template") {
        config["chat_template"] = Value::String(m.string("tokenizer.chat_template")?);
    }
    Tokenizer::new(inner, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{write, Value};

    fn crafted(metadata: &[(&str, &Value)]) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
        write(&mut std::fs::File::create(f.path()).unwrap(), metadata, &[]).unwrap();
        f
    }

    /// Crafted metadata that divided by zero (a panic, exit 101) is an error naming the file and
    /// the key.
    #[test]
    fn crafted_gguf_metadata_is_an_error_not_a_panic() {
        let llama = Value::String("llama".into());
        for (key, value, want) in [
            (
                "llama.attention.head_count",
                Value::U32(0),
                "llama.attention.head_count: must be an integer in 1..=1048576, found 0",
            ),
            (
                "general.alignment",
                Value::U32(0),
                "general.alignment must be > 0",
            ),
        ] {
            let heads = Value::U32(4);
            let mut md = vec![("general.architecture", &llama), (key, &value)];
            if key != "llama.attention.head_count" {
                md.push(("llama.attention.head_count", &heads));
            }
            let f = crafted(&md);
            let e = match load_gguf(f.path(), &Device::Cpu) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{key} = 0 loaded"),
            };
            assert!(e.contains(want), "{key}: {e}");
            assert!(e.contains(&f.path().display().to_string()), "{key}: {e}");
        }
        let heads = Value::U32(4);
        let kv = Value::U32(3);
        let f = crafted(&[
            ("general.architecture", &llama),
            ("llama.attention.head_count", &heads),
            ("llama.attention.head_count_kv", &kv),
        ]);
        let e = load_gguf(f.path(), &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("must be > 0 and divide attention.head_count (4)"),
            "{e}"
        );
    }
}
