//! Model hyper-parameters read from a Hugging Face `config.json`.
//!
//! Two families cover the models we support: the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3,
//! Phi-3, SmolLM, OLMo 2, Gemma 2 and 3), which differ in biases, RoPE settings, tying, q/k norms,
//! Phi-3's fused projections, where the norms sit (OLMo 2 after each sublayer, Gemma on both
//! sides), Gemma's `1 + w` norms, scaled embeddings, soft-capping and alternating local layers,
//! and mixtures of experts in place of the MLP (Mixtral, Qwen3-MoE); and GPT-2.
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

/// RMSNorm of queries and keys before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head (`[head_dim]` weights): Qwen3, Gemma 3.
    PerHead,
    /// Over all heads at once (`[heads * head_dim]` weights), before the split: OLMo 2.
    Full,
}

/// Where a block's norms sit around its attention and MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + f(norm(x))`: Llama, GPT-2 and most others.
    Pre,
    /// `x + norm(f(x))`: OLMo 2 (`post_attention_layernorm`, `post_feedforward_layernorm`).
    Post,
    /// `x + post_norm(f(pre_norm(x)))`: Gemma 2 and 3.
    Both,
}

/// How a mixture-of-experts checkpoint names its router and experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeNames {
    /// Mixtral: `block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1` (gate), `w3` (up), `w2`
    /// (down).
    Mixtral,
    /// Qwen2-MoE and Qwen3-MoE: `mlp.gate`, `mlp.experts.E.gate_proj`, `up_proj`, `down_proj`
    /// (and Qwen2-MoE's `mlp.shared_expert.*`, `mlp.shared_expert_gate`).
    Qwen,
}

impl MoeNames {
    /// The module holding the router (`{block}.gate`) and the experts (`{block}.experts.E`).
    pub fn block(self) -> &'static str {
        match self {
            MoeNames::Mixtral => "block_sparse_moe",
            MoeNames::Qwen => "mlp",
        }
    }

    /// Each expert's gate, up and down projections.
    pub fn projections(self) -> [&'static str; 3] {
        match self {
            MoeNames::Mixtral => ["w1", "w3", "w2"],
            MoeNames::Qwen => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// A sparse mixture of SwiGLU experts in place of the MLP: a linear router scores the experts,
/// softmax in f32, each token goes to its `top_k` best, weighted by their probabilities
/// (renormalised to sum to 1 with `norm_topk_prob`).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// Each expert's hidden width (Qwen3-MoE's `moe_intermediate_size`, Mixtral's
    /// `intermediate_size`).
    pub expert_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub names: MoeNames,
    /// Which layers hold experts (Qwen3-MoE's `mlp_only_layers` and `decoder_sparse_step` make
    /// some dense, with the model's `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// Qwen2-MoE's shared expert: a SwiGLU of this width that every token goes through, its
    /// output scaled by `sigmoid(shared_expert_gate(x))` and added to the routed experts'.
    pub shared_expert_intermediate_size: Option<usize>,
    /// `router_aux_loss_coef`: the weight of the load-balancing loss in training (transformers'
    /// default for these families, 0.001, when the config has none).
    pub router_aux_loss_coef: f64,
    /// `output_router_logits`: the config asks for that loss in every training forward pass (TRL's
    /// CPO and ORPO add it only then; its other trainers whenever the coefficient is not 0).
    pub output_router_logits: bool,
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
    /// `rope_type = "linear"`: positions divided by this factor (Gemma 3's global layers).
    pub rope_linear_factor: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers (the others use `rope_theta`).
    pub rope_local_theta: Option<f64>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Phi-3's fused projections: `qkv_proj` (`[q | k | v]`) and `gate_up_proj` (`[gate | up]`).
    pub fused_projections: bool,
    /// RMSNorm of queries and keys (`q_norm`, `k_norm`) before RoPE.
    pub qk_norm: QkNorm,
    pub norm_placement: NormPlacement,
    /// Gemma's RMSNorm multiplies by `1 + w`: 1.0 there, 0.0 elsewhere.
    pub norm_offset: f64,
    /// Gemma: embeddings multiplied by `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    /// Attention scores scale: `1 / sqrt(this)`; Gemma's `query_pre_attn_scalar`, else head_dim.
    pub query_pre_attn_scalar: f64,
    /// Gemma 2: scores become `c * tanh(scores / c)` before the mask and softmax.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits become `c * tanh(logits / c)`.
    pub final_logit_softcapping: Option<f64>,
    /// Local attention: a query sees at most this many most recent keys (itself included), in the
    /// layers `sliding_layers` marks (every layer for Mistral, alternating ones for Gemma).
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    /// Mixture-of-experts layers (Mixtral, Qwen3-MoE).
    pub moe: Option<MoeConfig>,
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
    /// Experts in one mixture-of-experts layer.
    pub const EXPERTS: usize = 1 << 12;
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
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "smollm" | "smollm2" | "olmo2"
            | "gemma2" | "gemma3_text" | "mixtral" | "qwen2_moe" | "qwen3_moe" => Arch::Llama,
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
        let gemma = matches!(model_type.as_str(), "gemma2" | "gemma3_text");
        let act_keys: &[&str] = if gemma {
            &["hidden_activation", "hidden_act"]
        } else {
            &["hidden_act", "activation_function"]
        };
        let act_name = get(&raw, act_keys)
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
        // transformers v5 nests RoPE settings in `rope_parameters` (per layer type for Gemma 3:
        // `full_attention`, `sliding_attention`); v4 used `rope_theta` / `rope_scaling`, and Gemma 3
        // `rope_local_base_freq`.
        let nested = get(&raw, &["rope_parameters"]).filter(|r| r.get("full_attention").is_some());
        let rope = match nested {
            Some(r) => r.get("full_attention"),
            None => get(&raw, &["rope_parameters", "rope_scaling"]),
        };
        let rope_local_theta = match nested {
            Some(r) => r
                .get("sliding_attention")
                .and_then(|l| l.get("rope_theta"))
                .and_then(Value::as_f64),
            None => get(&raw, &["rope_local_base_freq"]).and_then(Value::as_f64),
        };
        if nested.is_some_and(|r| {
            r.get("sliding_attention")
                .and_then(|l| get(l, &["rope_type", "type"]))
                .and_then(Value::as_str)
                .is_some_and(|t| t != "default")
        }) {
            return Err(Error::invalid(
                path,
                "rope_parameters.sliding_attention.rope_type",
                "only the default RoPE is supported on local layers",
            ));
        }
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
        let mut rope_linear_factor = None;
        let rope_scaling = match rope_type {
            "default" => None,
            "linear" => {
                let f = rope
                    .and_then(|r| r.get("factor"))
                    .and_then(Value::as_f64)
                    .ok_or_else(|| Error::invalid(path, "rope_scaling.factor", "missing"))?;
                rope_linear_factor = Some(finite(path, "rope_scaling.factor", f, true)?);
                None
            }
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
            // transformers 4.x had no `qkv_bias` and always used the biases.
            (_, "qwen2_moe") => (bool_of("qkv_bias", true), false, false),
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
        if bool_of("use_bidirectional_attention", false) {
            return Err(Error::invalid(
                path,
                "use_bidirectional_attention",
                "bidirectional attention (an encoder) is not a causal LM",
            ));
        }
        let num_layers = usize_of(&["num_hidden_layers", "n_layer"])?;
        // Checked here as well as in `validate`: per-layer tables are built below.
        if num_layers == 0 || num_layers > limits::LAYERS {
            return Err(Error::invalid(
                path,
                "num_hidden_layers",
                format!("must be in 1..={}, found {num_layers}", limits::LAYERS),
            ));
        }
        let sliding_window = match model_type.as_str() {
            "mistral" | "mixtral" | "phi3" | "gemma2" | "gemma3_text" => {
                get(&raw, &["sliding_window"])
                    .and_then(Value::as_u64)
                    .map(|w| w as usize)
            }
            "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe"
                if bool_of("use_sliding_window", false) =>
            {
                return Err(Error::invalid(
                    path,
                    "use_sliding_window",
                    "Qwen2/Qwen3 sliding-window attention is not supported",
                ))
            }
            _ => None,
        };
        // Which layers are local: `layer_types` where the config has it, else every layer
        // (Mistral) or the model's default pattern (Gemma 2 every other, Gemma 3 five of six).
        let sliding_layers: Vec<bool> = match get(&raw, &["layer_types"]).and_then(Value::as_array)
        {
            Some(types) if sliding_window.is_some() => {
                if types.len() != num_layers {
                    return Err(Error::invalid(
                        path,
                        "layer_types",
                        format!("has {} entries for {num_layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(Error::invalid(
                            path,
                            "layer_types",
                            format!("expected sliding_attention or full_attention, found {t}"),
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            _ if sliding_window.is_none() => vec![false; num_layers],
            _ => match model_type.as_str() {
                "gemma2" => (0..num_layers).map(|i| i % 2 == 0).collect(),
                "gemma3_text" => {
                    let every = get(&raw, &["sliding_window_pattern", "_sliding_window_pattern"])
                        .and_then(Value::as_u64)
                        .unwrap_or(6)
                        .max(1) as usize;
                    (0..num_layers).map(|i| (i + 1) % every != 0).collect()
                }
                _ => vec![true; num_layers],
            },
        };
        let head_dim = get(&raw, &["head_dim"])
            .and_then(Value::as_u64)
            .map_or(hidden_size / num_heads, |x| x as usize);
        let softcap = |key: &str| -> Result<Option<f64>> {
            match get(&raw, &[key]).and_then(Value::as_f64) {
                Some(c) => Ok(Some(finite(path, key, c, true)?)),
                None => Ok(None),
            }
        };
        let moe = match model_type.as_str() {
            "mixtral" | "qwen2_moe" | "qwen3_moe" => {
                let qwen = model_type != "mixtral";
                let num_experts = usize_of(&["num_local_experts", "num_experts"])?;
                let step = get(&raw, &["decoder_sparse_step"])
                    .and_then(Value::as_u64)
                    .unwrap_or(1) as usize;
                if qwen && step == 0 {
                    return Err(Error::invalid(path, "decoder_sparse_step", "must be >= 1"));
                }
                let dense: Vec<u64> = match get(&raw, &["mlp_only_layers"]) {
                    None => vec![],
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<_>>())
                        .ok_or_else(|| {
                            Error::invalid(
                                path,
                                "mlp_only_layers",
                                "expected a list of layer numbers",
                            )
                        })?,
                };
                Some(MoeConfig {
                    num_experts,
                    top_k: usize_of(&["num_experts_per_tok"])?,
                    expert_intermediate_size: usize_of(if qwen {
                        &["moe_intermediate_size"]
                    } else {
                        &["intermediate_size"]
                    })?,
                    // Mixtral always renormalises its top-k weights.
                    norm_topk_prob: !qwen || bool_of("norm_topk_prob", false),
                    names: if qwen {
                        MoeNames::Qwen
                    } else {
                        MoeNames::Mixtral
                    },
                    sparse_layers: (0..num_layers)
                        .map(|i| !qwen || (!dense.contains(&(i as u64)) && (i + 1) % step == 0))
                        .collect(),
                    shared_expert_intermediate_size: match model_type.as_str() {
                        "qwen2_moe" => Some(usize_of(&["shared_expert_intermediate_size"])?),
                        _ => None,
                    },
                    router_aux_loss_coef: finite(
                        path,
                        "router_aux_loss_coef",
                        f64_of(&["router_aux_loss_coef"], 0.001)?,
                        false,
                    )?,
                    output_router_logits: bool_of("output_router_logits", false),
                })
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
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: usize_of(&["max_position_embeddings", "n_positions"])?,
            norm_eps: f64_of(
                &["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"],
                1e-5,
            )?,
            rope_theta,
            rope_scaling,
            rope_linear_factor,
            rope_local_theta,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings: bool_of("tie_word_embeddings", arch == Arch::Gpt2 || gemma),
            qk_norm: match model_type.as_str() {
                "qwen3" | "qwen3_moe" | "gemma3_text" => QkNorm::PerHead,
                "olmo2" => QkNorm::Full,
                _ => QkNorm::None,
            },
            norm_placement: match model_type.as_str() {
                "olmo2" => NormPlacement::Post,
                _ if gemma => NormPlacement::Both,
                _ => NormPlacement::Pre,
            },
            norm_offset: if gemma { 1.0 } else { 0.0 },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            query_pre_attn_scalar: match get(&raw, &["query_pre_attn_scalar"])
                .and_then(Value::as_f64)
            {
                Some(s) if gemma => finite(path, "query_pre_attn_scalar", s, true)?,
                _ => head_dim as f64,
            },
            attn_logit_softcapping: if gemma {
                softcap("attn_logit_softcapping")?
            } else {
                None
            },
            final_logit_softcapping: if gemma {
                softcap("final_logit_softcapping")?
            } else {
                None
            },
            fused_projections: model_type == "phi3",
            sliding_window,
            sliding_layers,
            moe,
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
        if let Some(t) = self.rope_local_theta {
            finite(path, "rope_local_base_freq", t, true)?;
        }
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
        if let Some(m) = &self.moe {
            for (key, v, max) in [
                ("num_local_experts", m.num_experts, limits::EXPERTS),
                (
                    "moe_intermediate_size",
                    m.expert_intermediate_size,
                    limits::DIM,
                ),
            ] {
                if v == 0 || v > max {
                    return Err(Error::invalid(
                        path,
                        key,
                        format!("must be in 1..={max}, found {v}"),
                    ));
                }
            }
            if m.top_k == 0 || m.top_k > m.num_experts {
                return Err(Error::invalid(
                    path,
                    "num_experts_per_tok",
                    format!("must be in 1..={}, found {}", m.num_experts, m.top_k),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen3_moe(extra: Value) -> Result<ModelConfig> {
        let mut raw = json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2,
            "vocab_size": 512, "max_position_embeddings": 256,
        });
        for (k, v) in extra.as_object().unwrap() {
            raw[k] = v.clone();
        }
        ModelConfig::from_json(raw, Path::new("config.json"))
    }

    /// Qwen3-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step`), its optional
    /// renormalisation, and Mixtral's fixed one.
    #[test]
    fn moe_layers_and_weights_follow_the_config() {
        let c = qwen3_moe(json!({})).unwrap();
        let m = c.moe.unwrap();
        assert_eq!(
            (m.num_experts, m.top_k, m.expert_intermediate_size),
            (8, 2, 48)
        );
        assert!(!m.norm_topk_prob, "transformers' default is off");
        assert_eq!(m.sparse_layers, vec![true; 6]);
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        let m = qwen3_moe(json!({"mlp_only_layers": [0, 4], "decoder_sparse_step": 2,
                                 "norm_topk_prob": true}))
        .unwrap()
        .moe
        .unwrap();
        assert!(m.norm_topk_prob);
        assert_eq!(m.sparse_layers, [false, true, false, true, false, true]);
        for (extra, key) in [
            (json!({"num_experts_per_tok": 9}), "num_experts_per_tok"),
            (json!({"num_experts": 0}), "num_local_experts"),
            (json!({"decoder_sparse_step": 0}), "decoder_sparse_step"),
            (json!({"mlp_only_layers": "all"}), "mlp_only_layers"),
        ] {
            let e = qwen3_moe(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let mixtral = ModelConfig::from_json(
            json!({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "intermediate_size": 96, "num_local_experts": 4,
                   "num_experts_per_tok": 2, "vocab_size": 512, "max_position_embeddings": 256,
                   "norm_topk_prob": false}),
            Path::new("config.json"),
        )
        .unwrap();
        let m = mixtral.moe.unwrap();
        assert!(m.norm_topk_prob && m.expert_intermediate_size == 96);
        assert_eq!(m.names, MoeNames::Mixtral);
        assert_eq!(m.shared_expert_intermediate_size, None);
    }

    /// Qwen2-MoE: Qwen3-MoE's routing with a shared expert of its own width, Qwen2's q/k/v
    /// biases (on where transformers 4.x configs have no `qkv_bias`), no q/k norms.
    #[test]
    fn qwen2_moe_has_a_shared_expert_and_qkv_biases() {
        let q2 = |extra: Value| {
            qwen3_moe(json!({"model_type": "qwen2_moe", "shared_expert_intermediate_size": 80}))
                .and_then(|c| {
                    let mut raw = c.raw.clone();
                    for (k, v) in extra.as_object().unwrap() {
                        raw[k] = v.clone();
                    }
                    ModelConfig::from_json(raw, Path::new("config.json"))
                })
        };
        let c = q2(json!({})).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.shared_expert_intermediate_size, Some(80));
        assert_eq!((m.expert_intermediate_size, m.names), (48, MoeNames::Qwen));
        assert!(!m.norm_topk_prob);
        assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
        assert_eq!(c.qk_norm, QkNorm::None);
        assert!(!q2(json!({"qkv_bias": false})).unwrap().qkv_bias);
        let mut raw = c.raw.clone();
        raw.as_object_mut()
            .unwrap()
            .remove("shared_expert_intermediate_size");
        let e = ModelConfig::from_json(raw, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shared_expert_intermediate_size"), "{e}");
        let e = q2(json!({"use_sliding_window": true}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_sliding_window"), "{e}");
    }
}
