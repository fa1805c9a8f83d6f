//! Model hyper-parameters read from a Hugging Face `config.json`.
//!
//! Two families cover the models we support: the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3,
//! Phi-3, SmolLM), which differ only in biases, RoPE settings, tying, Qwen3's q/k norms and
//! Phi-3's fused projections; and GPT-2.
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
    /// Pre-norm LayerNorm, learned positions, GELU MLP, fused QKV stored as Conv1D `[in, out]`.
    Gpt2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// Exact erf GELU.
    Gelu,
    Relu,
}

/// Llama 3.x frequency scaling (`rope_type = "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Phi-3's fused projections: `qkv_proj` (`[q | k | v]`) and `gate_up_proj` (`[gate | up]`).
    pub fused_projections: bool,
    /// Qwen3's RMSNorm of each query and key head (`q_norm`, `k_norm`, weights `[head_dim]`),
    /// before RoPE.
    pub qk_norm: bool,
    /// Mistral's local attention: a query sees at most this many most recent keys (itself included).
    pub sliding_window: Option<usize>,
    pub activation: Activation,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The config.json as read, written back unchanged on save so `transformers` sees its own keys.
    pub raw: Value,
}

/// The largest sizes a config may ask for: far past any released model, small enough that no
/// product of two of them overflows.
pub mod limits {
    /// A width: hidden, intermediate, heads x head size.
    pub const DIM: usize = 1 << 20;
    pub const LAYERS: usize = 1 << 12;
    pub const VOCAB: usize = 1 << 24;
    pub const POSITIONS: usize = 1 << 24;
}

/// `v` if it is finite and > 0 (`positive`) or >= 0; else an error naming `key` in `path`.
pub(crate) fn finite(path: &Path, key: &str, v: f64, positive: bool) -> Result<f64> {
    if v.is_finite() && (v > 0.0 || !positive && v == 0.0) {
        return Ok(v);
    }
    let op = if positive { ">" } else { ">=" };
    Err(Error::invalid(
        path,
        key,
        format!("must be a finite number {op} 0, found {v}"),
    ))
}

fn get<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()))
}

/// A token id field that may be a number or a list of numbers (`eos_token_id`).
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(crate::io::read_json(path)?, path)
    }

    /// Parses a config.json value; `path` is only used in error messages.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let arch = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "smollm" | "smollm2" => Arch::Llama,
            "gpt2" => Arch::Gpt2,
            _ => {
                return Err(Error::UnknownArch {
                    path: path.into(),
                    arch: model_type,
                })
            }
        };
        let usize_of = |keys: &[&str]| -> Result<usize> {
            get(&raw, keys)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    Error::invalid(path, keys[0], "missing or not a non-negative integer")
                })
        };
        let f64_of = |keys: &[&str], default: f64| -> Result<f64> {
            match get(&raw, keys) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| Error::invalid(path, keys[0], "not a number")),
            }
        };
        let bool_of = |key: &str, default: bool| {
            get(&raw, &[key])
                .and_then(Value::as_bool)
                .unwrap_or(default)
        };
        let hidden_size = usize_of(&["hidden_size", "n_embd"])?;
        let num_heads = usize_of(&["num_attention_heads", "n_head"])?;
        if num_heads == 0 || hidden_size % num_heads != 0 && get(&raw, &["head_dim"]).is_none() {
            return Err(Error::invalid(
                path,
                "num_attention_heads",
                "must divide hidden_size",
            ));
        }
        let num_kv_heads = get(&raw, &["num_key_value_heads"])
            .and_then(Value::as_u64)
            .map_or(num_heads, |x| x as usize);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::invalid(
                path,
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        let act_name = get(&raw, &["hidden_act", "activation_function"])
            .and_then(Value::as_str)
            .unwrap_or("silu");
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::invalid(
                    path,
                    "hidden_act",
                    format!("unsupported activation {other:?}"),
                ))
            }
        };
        // transformers v5 nests RoPE settings in `rope_parameters`; v4 used `rope_theta`/`rope_scaling`.
        let rope = get(&raw, &["rope_parameters", "rope_scaling"]);
        let rope_theta = match rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => f64_of(&["rope_theta"], 10_000.0)?,
        };
        let rope_type = rope
            .and_then(|r| get(r, &["rope_type", "type"]))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => None,
            "llama3" => {
                let r = rope.expect("rope_type came from it");
                let num = |k: &str| {
                    r.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| Error::invalid(path, format!("rope_scaling.{k}"), "missing"))
                };
                Some(Llama3RopeScaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                })
            }
            other => {
                return Err(Error::invalid(
                    path,
                    "rope_scaling.rope_type",
                    format!("unsupported {other:?}"),
                ))
            }
        };
        let (qkv_bias, o_bias, mlp_bias) = match (arch, model_type.as_str()) {
            (Arch::Gpt2, _) => (true, true, true),
            (_, "qwen2") => (true, false, false),
            _ => {
                let b = bool_of("attention_bias", false);
                (b, b, bool_of("mlp_bias", false))
            }
        };
        let partial = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .or_else(|| get(&raw, &["partial_rotary_factor"]))
            .and_then(Value::as_f64);
        if partial.is_some_and(|f| f != 1.0) {
            return Err(Error::invalid(
                path,
                "partial_rotary_factor",
                "RoPE on part of each head is not supported",
            ));
        }
        let sliding_window = match model_type.as_str() {
            "mistral" | "phi3" => get(&raw, &["sliding_window"])
                .and_then(Value::as_u64)
                .map(|w| w as usize),
            "qwen2" | "qwen3" if bool_of("use_sliding_window", false) => {
                return Err(Error::invalid(
                    path,
                    "use_sliding_window",
                    "Qwen2/Qwen3 sliding-window attention is not supported",
                ))
            }
            _ => None,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: usize_of(&["vocab_size"])?,
            hidden_size,
            intermediate_size: match arch {
                Arch::Llama => usize_of(&["intermediate_size"])?,
                Arch::Gpt2 => get(&raw, &["n_inner"])
                    .and_then(Value::as_u64)
                    .map_or(hidden_size.saturating_mul(4), |x| x as usize),
            },
            num_layers: usize_of(&["num_hidden_layers", "n_layer"])?,
            num_heads,
            num_kv_heads,
            head_dim: get(&raw, &["head_dim"])
                .and_then(Value::as_u64)
                .map_or(hidden_size / num_heads, |x| x as usize),
            max_position_embeddings: usize_of(&["max_position_embeddings", "n_positions"])?,
            norm_eps: f64_of(
                &["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"],
                1e-5,
            )?,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings: bool_of("tie_word_embeddings", arch == Arch::Gpt2),
            qk_norm: model_type == "qwen3",
            fused_projections: model_type == "phi3",
            sliding_window,
            activation,
            bos_token_id: token_ids(get(&raw, &["bos_token_id"])).first().copied(),
            eos_token_ids: token_ids(get(&raw, &["eos_token_id"])),
            pad_token_id: token_ids(get(&raw, &["pad_token_id"])).first().copied(),
            raw,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Refuses sizes the model cannot be built with (zero, or past [`limits`]) and numbers that
    /// are not finite, naming the key: a crafted config.json must not overflow a product, divide
    /// by zero or ask for exabytes before the weights are checked against it.
    fn validate(&self, path: &Path) -> Result<()> {
        let dims = [
            ("hidden_size", self.hidden_size, limits::DIM),
            ("intermediate_size", self.intermediate_size, limits::DIM),
            ("num_attention_heads", self.num_heads, limits::DIM),
            ("num_key_value_heads", self.num_kv_heads, limits::DIM),
            ("head_dim", self.head_dim, limits::DIM),
            ("num_hidden_layers", self.num_layers, limits::LAYERS),
            ("vocab_size", self.vocab_size, limits::VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::POSITIONS,
            ),
        ];
        for (key, v, max) in dims {
            if v == 0 || v > max {
                return Err(Error::invalid(
                    path,
                    key,
                    format!("must be in 1..={max}, found {v}"),
                ));
            }
        }
        if self.num_heads * self.head_dim > limits::DIM {
            return Err(Error::invalid(
                path,
                "head_dim",
                format!("num_attention_heads x head_dim is over {}", limits::DIM),
            ));
        }
        if self.arch == Arch::Gpt2 && self.num_heads * self.head_dim != self.hidden_size {
            return Err(Error::invalid(
                path,
                "n_head",
                "must divide n_embd (GPT-2 has no separate head_dim)",
            ));
        }
        finite(path, "rms_norm_eps", self.norm_eps, false)?;
        finite(path, "rope_theta", self.rope_theta, true)?;
        if let Some(r) = &self.rope_scaling {
            finite(path, "rope_scaling.factor", r.factor, true)?;
            finite(
                path,
                "rope_scaling.low_freq_factor",
                r.low_freq_factor,
                true,
            )?;
            finite(
                path,
                "rope_scaling.high_freq_factor",
                r.high_freq_factor,
                true,
            )?;
            finite(
                path,
                "rope_scaling.original_max_position_embeddings",
                r.original_max_position_embeddings,
                true,
            )?;
        }
        if self.sliding_window == Some(0) {
            return Err(Error::invalid(path, "sliding_window", "must be > 0"));
        }
        Ok(())
    }

    /// The standard deviation transformers draws new weights from (`_init_weights`): config.json's
    /// `initializer_range`, 0.02 where it is absent or not a positive number.
    pub fn initializer_range(&self) -> f64 {
        self.raw
            .get("initializer_range")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .unwrap_or(0.02)
    }

    /// A Llama config.json for weights that came from elsewhere (GGUF).
    #[allow(clippy::too_many_arguments)]
    pub fn llama_json(
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
        max_pos: usize,
        eps: f64,
        theta: f64,
        tie: bool,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
    ) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": hidden / heads,
            "intermediate_size": intermediate,
            "vocab_size": vocab,
            "max_position_embeddings": max_pos,
            "rms_norm_eps": eps,
            "rope_theta": theta,
            "tie_word_embeddings": tie,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "torch_dtype": "float32",
        })
    }
}
