//! The transformer itself: the Llama family and GPT-2 in one file, nanoGPT-style.
//!
//! Parameters are held in the internal layout (every linear weight `[out, in]`); the name of each is
//! its Hugging Face name, so saving and loading only has to fix GPT-2's Conv1D transposes.
//! Everything is differentiable: when built `trainable`, each parameter is a candle `Var`.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use crate::config::{Activation, Arch, ModelConfig, NormPlacement, QkNorm};
use crate::error::{Error, Result};
use crate::kernels::{self, AttnMask};
use crate::moe::{AuxLosses, Route};
use crate::ops::{layer_norm, rms_norm, rope, softmax_last, swiglu, BaseQuant, Linear};

/// Added to attention scores of masked keys. Finite, so a fully masked (padding) row stays NaN-free.
const MASKED: f32 = -1e9;

/// RMSNorm (Llama family) when there is no bias, LayerNorm (GPT-2) when there is.
#[derive(Clone, Debug)]
struct Norm {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    /// Gemma's RMSNorm scales by `1 + weight` (1.0), the others by `weight` (0.0).
    offset: f64,
    /// Gemma and OLMo 2 scale in f32 and round once (Llama rounds, then scales): the same in
    /// f32, one rounding less in bf16.
    scale_in_f32: bool,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            None if self.scale_in_f32 && x.dtype() != DType::F32 && x.dtype() != DType::F64 => {
                let w = (self.weight.to_dtype(DType::F32)? + self.offset)?;
                rms_norm(&x.to_dtype(DType::F32)?, &w, self.eps)?.to_dtype(x.dtype())
            }
            None if self.offset != 0.0 => rms_norm(x, &(&self.weight + self.offset)?, self.eps),
            None => rms_norm(x, &self.weight, self.eps),
            Some(b) => layer_norm(x, &self.weight, b, self.eps),
        }
    }

    fn apply(norm: &Option<Norm>, x: Tensor) -> candle_core::Result<Tensor> {
        match norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&format!("{}.weight", self.name), &mut self.weight);
        if let Some(b) = &mut self.bias {
            f(&format!("{}.bias", self.name), b);
        }
    }
}

#[derive(Clone, Debug)]
enum Qkv {
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// GPT-2's `c_attn` and Phi-3's `qkv_proj`: one projection whose output is `[q | k | v]`.
    Fused(Linear),
}

#[derive(Clone, Debug)]
struct Attention {
    qkv: Qkv,
    o: Linear,
    /// RMSNorm of queries and keys before RoPE: per head (Qwen3, Gemma 3) or over all heads
    /// (OLMo 2, `qk_norm_full`).
    qk_norm: Option<(Norm, Norm)>,
    qk_norm_full: bool,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Scores are multiplied by this (`1 / sqrt(head_dim)`, or Gemma's `query_pre_attn_scalar`).
    scale: f64,
    /// Gemma 2: `c * tanh(scores / c)` before the mask.
    softcap: Option<f64>,
}

#[derive(Clone, Debug)]
enum Mlp {
    /// SwiGLU: `down(act(gate(x)) * up(x))`.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// Phi-3's SwiGLU with one projection whose output is `[gate | up]`.
    GatedFused {
        gate_up: Linear,
        down: Linear,
        inter: usize,
    },
    Plain {
        fc: Linear,
        proj: Linear,
    },
    /// A sparse mixture of experts (each a [`Mlp::Gated`]): the router's softmax in f32 picks each
    /// token's `top_k` experts, whose outputs are summed weighted by their probabilities
    /// (renormalised over the `top_k` with `norm_topk_prob`), as transformers' Mixtral and
    /// Qwen3-MoE blocks do.
    Moe {
        router: Linear,
        experts: Vec<Mlp>,
        top_k: usize,
        norm_topk_prob: bool,
        /// Qwen2-MoE's shared expert, which every token goes through, and its gate (`[1, H]`):
        /// `sigmoid(gate x) * shared(x)` is added to the routed experts' sum.
        shared: Option<Box<(Mlp, Linear)>>,
        /// `[experts, experts]`, 1 where the column's expert comes before the row's: how
        /// [`crate::moe::top_k_mask`] breaks ties on the device, kept there.
        tie_order: Tensor,
    },
}

/// A decoder layer. Norms before (`norm1`, `norm2`) and after (`post1`, `post2`) the attention
/// and the MLP, as the architecture places them ([`NormPlacement`]).
#[derive(Clone, Debug)]
pub(crate) struct Block {
    norm1: Option<Norm>,
    attn: Attention,
    post1: Option<Norm>,
    norm2: Option<Norm>,
    mlp: Mlp,
    post2: Option<Norm>,
    /// Local (sliding-window) attention with its own RoPE base, where the model has such layers.
    pub(crate) sliding: bool,
}

impl Attention {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v, &mut self.o],
            Qkv::Fused(l) => vec![l, &mut self.o],
        }
    }
}

impl Mlp {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Gated { gate, up, down } => vec![gate, up, down],
            Mlp::GatedFused { gate_up, down, .. } => vec![gate_up, down],
            Mlp::Plain { fc, proj } => vec![fc, proj],
            Mlp::Moe {
                router,
                experts,
                shared,
                ..
            } => {
                let mut v = vec![router];
                v.extend(experts.iter_mut().flat_map(Mlp::linears_mut));
                if let Some(sh) = shared {
                    let (mlp, gate) = &mut **sh;
                    v.extend(mlp.linears_mut());
                    v.push(gate);
                }
                v
            }
        }
    }
}

impl Block {
    /// Residual block: `x + post1(attn(norm1(x)))`, then `+ post2(mlp(norm2(.)))`, each norm
    /// where the architecture has one.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope_tables: Option<&(Tensor, Tensor)>,
        mask: Option<&(AttnMask, Option<Tensor>)>,
        cache: Option<CacheSlot<'_>>,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        Ok(self.apply(x, rope_tables, mask, cache, act, false)?.0)
    }

    /// [`Block::forward`] in training, with the routing of a MoE layer. `for_backward`: for
    /// back-propagation only; the gradients are the same, but the MLP's last projection is not
    /// computed ([`Linear::forward_unread`]), so the value is not the block's output.
    /// Checkpointed backward recomputes layers this way.
    pub(crate) fn forward_routed(
        &self,
        x: &Tensor,
        rope_tables: Option<&(Tensor, Tensor)>,
        mask: Option<&(AttnMask, Option<Tensor>)>,
        act: Activation,
        for_backward: bool,
    ) -> candle_core::Result<(Tensor, Option<Route>)> {
        self.apply(x, rope_tables, mask, None, act, for_backward)
    }

    fn apply(
        &self,
        x: &Tensor,
        rope_tables: Option<&(Tensor, Tensor)>,
        mask: Option<&(AttnMask, Option<Tensor>)>,
        cache: Option<CacheSlot<'_>>,
        act: Activation,
        unread: bool,
    ) -> candle_core::Result<(Tensor, Option<Route>)> {
        let h = Norm::apply(&self.norm1, x.clone())?;
        let a = Norm::apply(
            &self.post1,
            self.attn.forward(&h, rope_tables, mask, cache)?,
        )?;
        let x = (x + a)?;
        let h = Norm::apply(&self.norm2, x.clone())?;
        // The MLP's last projection feeds a norm after it: no longer a value nobody reads.
        let unread = unread && self.post2.is_none();
        let (m, route) = self.mlp.forward_routed(&h, act, unread)?;
        let m = Norm::apply(&self.post2, m)?;
        Ok(((x + m)?, route))
    }

    /// `(KV heads, head size)` of its attention.
    pub(crate) fn kv_shape(&self) -> (usize, usize) {
        (self.attn.num_kv_heads, self.attn.head_dim)
    }

    /// Every tensor of the block, LoRA adapters included (the trainable ones are `Var`s).
    pub(crate) fn tensors(&self) -> Vec<Tensor> {
        let mut b = self.clone();
        let mut out = vec![];
        b.visit_mut(&mut |_, t| out.push(t.clone()));
        for l in b.linears_mut() {
            if let Some(a) = &l.lora {
                out.extend([a.a.clone(), a.b.clone()]);
            }
        }
        out
    }

    /// A copy outside autograd (shares storage).
    pub(crate) fn detached(&self) -> Block {
        let mut b = self.clone();
        b.visit_mut(&mut |_, t| *t = t.detach());
        for l in b.linears_mut() {
            if let Some(a) = &mut l.lora {
                a.a = a.a.detach();
                a.b = a.b.detach();
            }
        }
        b
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.attn.linears_mut();
        v.extend(self.mlp.linears_mut());
        v
    }

    /// Visits parameters in load order: norm1, attention, post1, norm2, MLP, post2.
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        if let Some(n) = &mut self.norm1 {
            n.visit_mut(f);
        }
        self.attn
            .linears_mut()
            .into_iter()
            .for_each(|l| l.visit_mut(f));
        if let Some((qn, kn)) = &mut self.attn.qk_norm {
            qn.visit_mut(f);
            kn.visit_mut(f);
        }
        for n in [&mut self.post1, &mut self.norm2].into_iter().flatten() {
            n.visit_mut(f);
        }
        self.mlp
            .linears_mut()
            .into_iter()
            .for_each(|l| l.visit_mut(f));
        if let Some(n) = &mut self.post2 {
            n.visit_mut(f);
        }
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
}

/// Where an attention layer puts the keys and values of the positions it is given.
pub(crate) enum CacheSlot<'a> {
    /// A cache that grows ([`LayerCache::append`]): attention reads the filled positions.
    Grow(&'a mut Option<LayerCache>),
    /// Buffers of a fixed capacity `[B, KV heads, capacity, Dh]`, written (one new position a
    /// row) where `at` (`[B, KV heads, 1, Dh]`, u32, every entry the position) says; attention
    /// reads the whole capacity and the mask hides what is not written yet. Nothing of such a
    /// step depends on host values, so a CUDA graph can replay it ([`crate::decode_graph`]).
    Fixed {
        k: &'a Tensor,
        v: &'a Tensor,
        at: &'a Tensor,
    },
}

/// Keys and values `[B, KV heads, capacity, Dh]`, of which the first `len` positions are filled.
/// New positions are written in place; the buffers double when full, so decoding copies the
/// history only `log(T)` times instead of once per token.
#[derive(Debug)]
pub(crate) struct LayerCache {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Appends `k`, `v` (`[B, KV heads, T, Dh]`) and returns views of everything cached so far.
    fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        // The cache keeps the dtype it was made with ([`crate::ops::cache_dtype`]).
        let dtype = slot
            .as_ref()
            .map_or_else(|| crate::ops::cache_dtype(k), |c| c.k.dtype());
        let (k, v) = (&k.to_dtype(dtype)?, &v.to_dtype(dtype)?);
        let (len, cap) = slot
            .as_ref()
            .map_or((0, 0), |c| (c.len, c.k.dim(2).unwrap_or(0)));
        if len + t > cap {
            let cap = (2 * cap).max(len + t + 64);
            *slot = Some(match slot.as_ref() {
                Some(c) => c.resized(cap)?,
                None => {
                    let zeros = || Tensor::zeros((b, h, cap, d), k.dtype(), k.device());
                    LayerCache {
                        k: zeros()?,
                        v: zeros()?,
                        len: 0,
                    }
                }
            });
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

impl LayerCache {
    /// The cached positions in new buffers of capacity `cap` (at least `len`), zeros after them.
    pub(crate) fn resized(&self, cap: usize) -> candle_core::Result<LayerCache> {
        let grow = |old: &Tensor| -> candle_core::Result<Tensor> {
            let (b, h, _, d) = old.dims4()?;
            let buf = Tensor::zeros((b, h, cap, d), old.dtype(), old.device())?;
            if self.len > 0 {
                buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        };
        Ok(LayerCache {
            k: grow(&self.k)?,
            v: grow(&self.v)?,
            len: self.len,
        })
    }
}

impl Clone for LayerCache {
    /// A deep copy: the buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        LayerCache {
            k: self.k.copy().expect("copying a cache buffer"),
            v: self.v.copy().expect("copying a cache buffer"),
            len: self.len,
        }
    }
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(c)) => c.len,
            _ => 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the first `len` cached positions (all of them if fewer), with no spare
    /// capacity and sharing nothing.
    pub fn prefix_copy(&self, len: usize) -> candle_core::Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|c| {
                c.as_ref()
                    .map(|c| -> candle_core::Result<LayerCache> {
                        let n = c.len.min(len);
                        Ok(LayerCache {
                            k: c.k.narrow(2, 0, n)?.force_contiguous()?,
                            v: c.v.narrow(2, 0, n)?.force_contiguous()?,
                            len: n,
                        })
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// The dtype of the cached keys and values (`None` while nothing is cached): bf16 for a
    /// sampling loop under bf16 on a GPU ([`crate::ops::PackedWeights`]), else the model's.
    pub fn dtype(&self) -> Option<DType> {
        self.layers.iter().flatten().next().map(|c| c.k.dtype())
    }

    /// Bytes of the cached positions' keys and values (spare capacity not counted).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|c| {
                let (b, h, _, d) = c.k.dims4().unwrap_or((0, 0, 0, 0));
                2 * b * h * c.len * d * c.k.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Keeps the batch rows `rows` (in that order) and forgets the first `drop` positions of
    /// every row (continuous batching: finished sequences leave, and the left padding no row
    /// still reads goes with them).
    ///
    /// With `drop` 0 the spare capacity stays, so the next positions need no regrowth.
    pub fn select(&mut self, rows: &[u32], drop: usize) -> candle_core::Result<()> {
        for c in self.layers.iter_mut().flatten() {
            let keep = c.len.saturating_sub(drop);
            let idx = Tensor::new(rows, c.k.device())?;
            let pick = |t: &Tensor| -> candle_core::Result<Tensor> {
                if keep == c.len {
                    return t.index_select(&idx, 0)?.contiguous();
                }
                t.narrow(2, c.len - keep, keep)?
                    .contiguous()?
                    .index_select(&idx, 0)?
                    .contiguous()
            };
            *c = LayerCache {
                k: pick(&c.k)?,
                v: pick(&c.v)?,
                len: keep,
            };
        }
        Ok(())
    }

    /// Appends `other`'s batch rows after this cache's. The one holding fewer positions is padded
    /// on the left with zeros, which the caller's attention mask must cover.
    pub fn join(&mut self, other: KvCache) -> candle_core::Result<()> {
        if self.layers.iter().all(Option::is_none) {
            *self = other;
            return Ok(());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let (Some(a), Some(b)) = (mine.as_mut(), theirs.as_ref()) else {
                candle_core::bail!("KvCache::join: a cache without every layer");
            };
            let t = a.len.max(b.len);
            let padded = |x: &Tensor, len: usize| -> candle_core::Result<Tensor> {
                let x = x.narrow(2, 0, len)?;
                if len == t {
                    return Ok(x);
                }
                let (bb, h, _, d) = x.dims4()?;
                let z = Tensor::zeros((bb, h, t - len, d), x.dtype(), x.device())?;
                Tensor::cat(&[&z, &x], 2)
            };
            let dtype = a.k.dtype();
            let (bk, bv) = (&b.k.to_dtype(dtype)?, &b.v.to_dtype(dtype)?);
            let k = Tensor::cat(&[padded(&a.k, a.len)?, padded(bk, b.len)?], 0)?;
            let v = Tensor::cat(&[padded(&a.v, a.len)?, padded(bv, b.len)?], 0)?;
            *a = LayerCache {
                k: k.contiguous()?,
                v: v.contiguous()?,
                len: t,
            };
        }
        Ok(())
    }
}

/// A causal LM backbone with its LM head, and optionally the scalar head of a reward or value model
/// (`score.weight`, as transformers' `*ForSequenceClassification` names it; see `reward.rs`).
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) wpe: Option<Tensor>,
    pub(crate) blocks: Vec<Block>,
    norm_f: Norm,
    lm_head: Tensor,
    /// `[1, H]`: the reward/value head; such a model is saved without an LM head.
    pub(crate) score: Option<Tensor>,
    pub(crate) inv_freq: Vec<f32>,
    /// Gemma 3's local layers' RoPE frequencies (their own base).
    pub(crate) inv_freq_local: Option<Vec<f32>>,
    dtype: DType,
    /// Shared by every LoRA adapter of this model: seeded during training steps, off otherwise.
    pub(crate) lora_dropout: crate::lora::DropoutRng,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    pub(crate) checkpointing: bool,
    /// Layer inputs recorded by checkpointed forward passes, consumed by [`Model::backward`].
    pub(crate) tape: crate::checkpointing::Tape,
    /// Record training passes' load-balancing losses ([`Model::set_router_aux_loss`]).
    pub(crate) router_aux: bool,
    pub(crate) aux_losses: AuxLosses,
}

/// Hands out named tensors from a weight map, checking shapes.
struct Params<'a> {
    tensors: HashMap<String, Tensor>,
    /// Linear weights already quantised (a GGUF file's blocks), kept as they are.
    quantized: HashMap<String, Arc<QTensor>>,
    /// Quantise the other linear weights at load (LoRA on a quantised base).
    quantize: Option<BaseQuant>,
    origin: &'a Path,
    dtype: DType,
    trainable: bool,
}

impl Params<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.take_raw(name, shape)?;
        let t = t.to_dtype(self.dtype)?;
        Ok(if self.trainable {
            Var::from_tensor(&t)?.as_tensor().clone()
        } else {
            t
        })
    }

    /// The tensor as stored, its shape checked.
    fn take_raw(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.into(),
                name: name.into(),
            })?;
        self.check_shape(name, shape, t.dims())?;
        Ok(t)
    }

    fn check_shape(&self, name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::Shape {
                path: self.origin.into(),
                name: name.into(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// A linear's weight, quantised when the base is: as stored in a GGUF file, or quantised
    /// here (rows that do not split into blocks stay dense).
    fn quantized_weight(&mut self, name: &str, shape: [usize; 2]) -> Result<Option<Arc<QTensor>>> {
        if let Some(q) = self.quantized.remove(name) {
            self.check_shape(name, &shape, q.shape().dims())?;
            return Ok(Some(q));
        }
        let Some(quant) = self.quantize else {
            return Ok(None);
        };
        if quant.ggml_type(shape[1]).is_none() {
            return Ok(None);
        }
        let t = self.take_raw(name, &shape)?;
        crate::ops::quantize_weight(&t, quant)
            .map_err(|e| Error::invalid(self.origin, name, e.to_string()))
    }

    fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        if let Some(q) = self.quantized_weight(&name, [out_dim, in_dim])? {
            return Ok(Linear::quantized(
                prefix,
                q,
                bias,
                self.dtype,
                &candle_core::Device::Cpu,
            )?);
        }
        let weight = self.take(&name, &[out_dim, in_dim])?;
        Ok(Linear::new(prefix, weight, bias))
    }

    /// A linear without bias that stays dense under a quantised base: a mixture's router, whose
    /// choices int8 activations would flip (llama.cpp keeps routers in f32 too).
    fn dense_linear(&mut self, prefix: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        if let Some(q) = self.quantized.remove(&name) {
            let w = q
                .dequantize(&candle_core::Device::Cpu)
                .map_err(|e| Error::invalid(self.origin, &name, e.to_string()))?;
            self.tensors.insert(name.clone(), w);
        }
        let weight = self.take(&name, &[out_dim, in_dim])?;
        Ok(Linear::new(prefix, weight, None))
    }

    fn norm(&mut self, prefix: &str, dim: usize, cfg: &ModelConfig) -> Result<Norm> {
        let weight = self.take(&format!("{prefix}.weight"), &[dim])?;
        let bias = match cfg.arch {
            Arch::Llama => None,
            Arch::Gpt2 => Some(self.take(&format!("{prefix}.bias"), &[dim])?),
        };
        Ok(Norm {
            name: prefix.to_string(),
            weight,
            bias,
            eps: cfg.norm_eps,
            offset: cfg.norm_offset,
            scale_in_f32: cfg.norm_offset != 0.0 || cfg.norm_placement == NormPlacement::Post,
        })
    }
}

/// Where a quantised base's linear weights come from ([`Model::from_parts`]).
#[derive(Default)]
pub struct QuantizedBase {
    /// Already-quantised weights by Hugging Face name (a GGUF file's blocks, rows in our layout).
    pub quantized: HashMap<String, Arc<QTensor>>,
    /// Quantise the remaining linear weights to this at load.
    pub quantize: Option<BaseQuant>,
}

/// Tensors that Hugging Face checkpoints carry but that are buffers, not parameters.
fn is_ignorable_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
}

impl Model {
    /// Builds a model from tensors in the internal layout keyed by Hugging Face names.
    /// `origin` names the source in errors. Unknown tensors are an error: a silently ignored
    /// weight (a Qwen3 q_norm under a qwen2 config, say) would give wrong outputs.
    pub fn from_tensors(
        cfg: ModelConfig,
        tensors: HashMap<String, Tensor>,
        origin: &Path,
        dtype: DType,
        trainable: bool,
    ) -> Result<Self> {
        Self::from_parts(
            cfg,
            tensors,
            QuantizedBase::default(),
            origin,
            dtype,
            trainable,
        )
    }

    /// [`Model::from_tensors`] with a quantised base: linear weights from `base.quantized` stay
    /// quantised, and with `base.quantize` the dense ones are quantised here. Such a model is
    /// frozen (train it with LoRA) and lives on the CPU.
    pub fn from_parts(
        cfg: ModelConfig,
        tensors: HashMap<String, Tensor>,
        base: QuantizedBase,
        origin: &Path,
        dtype: DType,
        trainable: bool,
    ) -> Result<Self> {
        let quantizing = base.quantize.is_some() || !base.quantized.is_empty();
        if quantizing && trainable {
            return Err(Error::invalid(
                origin,
                "load_in_4bit",
                "a quantised base is frozen: train LoRA adapters on it (use_peft = true)",
            ));
        }
        if quantizing && tensors.values().any(|t| !t.device().is_cpu()) {
            return Err(Error::invalid(
                origin,
                "load_in_4bit",
                "a quantised base runs on the CPU only (use --device cpu)",
            ));
        }
        let mut p = Params {
            tensors,
            quantized: base.quantized,
            quantize: base.quantize,
            origin,
            dtype,
            trainable,
        };
        let (h, nh, nkv, hd, inter) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        );
        let (embed, wpe, blocks, norm_f);
        match cfg.arch {
            Arch::Llama => {
                embed = p.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
                wpe = None;
                let mut bs = Vec::with_capacity(cfg.num_layers);
                for i in 0..cfg.num_layers {
                    let pre = format!("model.layers.{i}");
                    let a = format!("{pre}.self_attn");
                    let hf = |name: &str| format!("{pre}.{name}");
                    // Norms by placement: HF names them by position, so one name can be either.
                    let (pre1, post1, pre2, post2) = match cfg.norm_placement {
                        NormPlacement::Pre => (
                            Some("input_layernorm"),
                            None,
                            Some("post_attention_layernorm"),
                            None,
                        ),
                        NormPlacement::Post => (
                            None,
                            Some("post_attention_layernorm"),
                            None,
                            Some("post_feedforward_layernorm"),
                        ),
                        NormPlacement::Both => (
                            Some("input_layernorm"),
                            Some("post_attention_layernorm"),
                            Some("pre_feedforward_layernorm"),
                            Some("post_feedforward_layernorm"),
                        ),
                    };
                    let mut norm = |name: Option<&str>| -> Result<Option<Norm>> {
                        name.map(|n| p.norm(&hf(n), h, &cfg)).transpose()
                    };
                    let (norm1, post1) = (norm(pre1)?, norm(post1)?);
                    let (norm2, post2) = (norm(pre2)?, norm(post2)?);
                    let qkv = if cfg.fused_projections {
                        Qkv::Fused(p.linear(
                            &format!("{a}.qkv_proj"),
                            (nh + 2 * nkv) * hd,
                            h,
                            cfg.qkv_bias,
                        )?)
                    } else {
                        Qkv::Split {
                            q: p.linear(&format!("{a}.q_proj"), nh * hd, h, cfg.qkv_bias)?,
                            k: p.linear(&format!("{a}.k_proj"), nkv * hd, h, cfg.qkv_bias)?,
                            v: p.linear(&format!("{a}.v_proj"), nkv * hd, h, cfg.qkv_bias)?,
                        }
                    };
                    let o = p.linear(&format!("{a}.o_proj"), h, nh * hd, cfg.o_bias)?;
                    let qk_norm = match cfg.qk_norm {
                        QkNorm::None => None,
                        QkNorm::PerHead => Some((
                            p.norm(&format!("{a}.q_norm"), hd, &cfg)?,
                            p.norm(&format!("{a}.k_norm"), hd, &cfg)?,
                        )),
                        QkNorm::Full => Some((
                            p.norm(&format!("{a}.q_norm"), nh * hd, &cfg)?,
                            p.norm(&format!("{a}.k_norm"), nkv * hd, &cfg)?,
                        )),
                    };
                    let moe = cfg.moe.as_ref().filter(|m| m.sparse_layers[i]);
                    let mlp = if let Some(m) = moe {
                        let (block, [g, u, d]) = (m.names.block(), m.names.projections());
                        let ei = m.expert_intermediate_size;
                        let mut experts = Vec::with_capacity(m.num_experts);
                        for e in 0..m.num_experts {
                            let ex = format!("{pre}.{block}.experts.{e}");
                            experts.push(Mlp::Gated {
                                gate: p.linear(&format!("{ex}.{g}"), ei, h, false)?,
                                up: p.linear(&format!("{ex}.{u}"), ei, h, false)?,
                                down: p.linear(&format!("{ex}.{d}"), h, ei, false)?,
                            });
                        }
                        let router =
                            p.dense_linear(&format!("{pre}.{block}.gate"), m.num_experts, h)?;
                        let shared = match m.shared_expert_intermediate_size {
                            None => None,
                            Some(si) => {
                                let sx = format!("{pre}.{block}.shared_expert");
                                let mlp = Mlp::Gated {
                                    gate: p.linear(&format!("{sx}.{g}"), si, h, false)?,
                                    up: p.linear(&format!("{sx}.{u}"), si, h, false)?,
                                    down: p.linear(&format!("{sx}.{d}"), h, si, false)?,
                                };
                                // Dense like the router: one output, which a quantised
                                // product's rounding would move for every token.
                                let gate = p.dense_linear(
                                    &format!("{pre}.{block}.shared_expert_gate"),
                                    1,
                                    h,
                                )?;
                                Some(Box::new((mlp, gate)))
                            }
                        };
                        let tie_order =
                            crate::moe::tie_order(m.num_experts, router.weight.device())?;
                        Mlp::Moe {
                            router,
                            experts,
                            top_k: m.top_k,
                            norm_topk_prob: m.norm_topk_prob,
                            shared,
                            tie_order,
                        }
                    } else if cfg.fused_projections {
                        Mlp::GatedFused {
                            gate_up: p.linear(
                                &format!("{pre}.mlp.gate_up_proj"),
                                2 * inter,
                                h,
                                cfg.mlp_bias,
                            )?,
                            down: p.linear(
                                &format!("{pre}.mlp.down_proj"),
                                h,
                                inter,
                                cfg.mlp_bias,
                            )?,
                            inter,
                        }
                    } else {
                        Mlp::Gated {
                            gate: p.linear(
                                &format!("{pre}.mlp.gate_proj"),
                                inter,
                                h,
                                cfg.mlp_bias,
                            )?,
                            up: p.linear(&format!("{pre}.mlp.up_proj"), inter, h, cfg.mlp_bias)?,
                            down: p.linear(
                                &format!("{pre}.mlp.down_proj"),
                                h,
                                inter,
                                cfg.mlp_bias,
                            )?,
                        }
                    };
                    bs.push(Block {
                        norm1,
                        attn: Attention {
                            qkv,
                            o,
                            qk_norm,
                            qk_norm_full: cfg.qk_norm == QkNorm::Full,
                            num_heads: nh,
                            num_kv_heads: nkv,
                            head_dim: hd,
                            scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                            softcap: cfg.attn_logit_softcapping,
                        },
                        post1,
                        norm2,
                        mlp,
                        post2,
                        sliding: cfg.sliding_layers.get(i).copied().unwrap_or(false),
                    });
                }
                blocks = bs;
                norm_f = p.norm("model.norm", h, &cfg)?;
            }
            Arch::Gpt2 => {
                embed = p.take("transformer.wte.weight", &[cfg.vocab_size, h])?;
                wpe = Some(p.take("transformer.wpe.weight", &[cfg.max_position_embeddings, h])?);
                let mut bs = Vec::with_capacity(cfg.num_layers);
                for i in 0..cfg.num_layers {
                    let pre = format!("transformer.h.{i}");
                    bs.push(Block {
                        norm1: Some(p.norm(&format!("{pre}.ln_1"), h, &cfg)?),
                        attn: Attention {
                            qkv: Qkv::Fused(p.linear(
                                &format!("{pre}.attn.c_attn"),
                                3 * h,
                                h,
                                true,
                            )?),
                            o: p.linear(&format!("{pre}.attn.c_proj"), h, h, true)?,
                            qk_norm: None,
                            qk_norm_full: false,
                            num_heads: nh,
                            num_kv_heads: nh,
                            head_dim: hd,
                            scale: 1.0 / (hd as f64).sqrt(),
                            softcap: None,
                        },
                        post1: None,
                        norm2: Some(p.norm(&format!("{pre}.ln_2"), h, &cfg)?),
                        mlp: Mlp::Plain {
                            fc: p.linear(&format!("{pre}.mlp.c_fc"), inter, h, true)?,
                            proj: p.linear(&format!("{pre}.mlp.c_proj"), h, inter, true)?,
                        },
                        post2: None,
                        sliding: false,
                    });
                }
                blocks = bs;
                norm_f = p.norm("transformer.ln_f", h, &cfg)?;
            }
        }
        let score = match p.tensors.get("score.weight").map(|t| t.dims().to_vec()) {
            Some(d) if d.len() == 2 && d[0] == 1 => Some(p.take("score.weight", &[1, h])?),
            Some(d) => {
                return Err(Error::invalid(
                    origin,
                    "score.weight",
                    format!("expected [1, {h}] (one label), found {d:?}"),
                ))
            }
            None => None,
        };
        // A checkpoint that says it is tied but carries its own head keeps that head, as
        // transformers 5 does (its weights then differ from the embedding's).
        let mut cfg = cfg;
        if cfg.tie_word_embeddings && p.tensors.contains_key("lm_head.weight") {
            cfg.tie_word_embeddings = false;
        }
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else if score.is_some() && !p.tensors.contains_key("lm_head.weight") {
            // A sequence-classification checkpoint has no LM head; the embedding stands in, unused.
            embed.clone()
        } else {
            p.take("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let mut left: Vec<&String> = p
            .tensors
            .keys()
            .chain(p.quantized.keys())
            .filter(|k| !is_ignorable_buffer(k))
            .collect();
        left.sort();
        if let Some(name) = left.first() {
            return Err(Error::invalid(
                origin,
                name.as_str(),
                format!(
                    "unexpected tensor ({} in all) for a {:?} model with this config",
                    left.len(),
                    cfg.arch
                ),
            ));
        }
        let inv_freq = if cfg.arch == Arch::Llama {
            rope_inv_freq(&cfg, cfg.rope_theta, true)
        } else {
            vec![]
        };
        let inv_freq_local = cfg
            .rope_local_theta
            .map(|theta| rope_inv_freq(&cfg, theta, false));
        Ok(Model {
            cfg,
            embed,
            wpe,
            blocks,
            norm_f,
            lm_head,
            score,
            inv_freq,
            inv_freq_local,
            dtype,
            lora_dropout: Default::default(),
            checkpointing: false,
            tape: Default::default(),
            router_aux: false,
            aux_losses: Default::default(),
        })
    }

    /// Visits every base parameter (not LoRA adapters) with its Hugging Face name, in load order.
    /// A tied LM head is visited once, as the embedding, and re-tied afterwards.
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        let (embed, wpe) = match self.cfg.arch {
            Arch::Llama => ("model.embed_tokens.weight", ""),
            Arch::Gpt2 => ("transformer.wte.weight", "transformer.wpe.weight"),
        };
        f(embed, &mut self.embed);
        if let Some(w) = &mut self.wpe {
            f(wpe, w);
        }
        for b in &mut self.blocks {
            b.visit_mut(f);
        }
        self.norm_f.visit_mut(f);
        if let Some(s) = &mut self.score {
            f("score.weight", s);
        }
        if self.cfg.tie_word_embeddings {
            self.lm_head = self.embed.clone();
        } else if self.score.is_none() {
            f("lm_head.weight", &mut self.lm_head);
        }
    }

    /// Every base parameter with its Hugging Face name, in load order (a tied head appears once).
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        self.clone()
            .visit_mut(&mut |n, t| out.push((n.to_string(), t.clone())));
        out
    }

    /// Every linear layer of the transformer blocks (the LM head is not one).
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(Block::linears_mut)
            .collect()
    }

    /// Whether some linear keeps a quantised weight (LoRA on a quantised base).
    pub fn is_quantized(&self) -> bool {
        self.clone().linears_mut().iter().any(|l| l.quant.is_some())
    }

    /// Bytes held by quantised linear weights (0 for a dense model).
    pub fn quantized_bytes(&self) -> usize {
        self.clone()
            .linears_mut()
            .iter()
            .filter_map(|l| l.quant.as_ref())
            .map(|q| q.storage_size_in_bytes())
            .sum()
    }

    /// The trainable tensors as named `Var`s: base parameters (HF names) when built `trainable`, and
    /// LoRA adapters (PEFT names).
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut all = self.named_params();
        all.extend(self.lora_params());
        all.into_iter()
            .filter(|(_, t)| t.is_variable())
            .filter_map(|(n, t)| Var::from_tensor(&t).ok().map(|v| (n, v)))
            .collect()
    }

    /// The trainable tensors as `Var`s.
    pub fn vars(&self) -> Vec<Var> {
        self.trainable_params()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Whether any parameter or adapter is tracked by autograd.
    pub fn is_trainable(&self) -> bool {
        !self.trainable_params().is_empty()
    }

    /// A copy sharing the same storage but outside autograd: use it for sampling, where a recorded
    /// graph would pin every intermediate (and the whole KV cache history) in memory.
    pub fn detached(&self) -> Result<Self> {
        let mut m = self.clone();
        m.visit_mut(&mut |_, t| *t = t.detach());
        for l in m.linears_mut() {
            if let Some(a) = &mut l.lora {
                a.a = a.a.detach();
                a.b = a.b.detach();
            }
        }
        // A reference or a sampler: its passes are not the policy's.
        m.router_aux = false;
        m.aux_losses = Default::default();
        Ok(m)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Final hidden states `[B, T, H]`.
    ///
    /// `attention_mask` (`[B, past + T]`, 1 = real token) covers cached and new positions;
    /// `None` means no padding. `position_ids` (`[B, T]`) default to `cumsum(mask) - 1` clamped at 0,
    /// the left-padding convention of transformers. Both are read on the host: on any device
    /// they can live on the CPU, which spares a GPU a copy each way.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mask = match attention_mask {
            Some(m) => {
                let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                if m.len() != b || m.iter().any(|r| r.len() != past + t) {
                    return Err(Error::Msg(format!(
                        "attention_mask must be [{b}, {}] (cached + new positions)",
                        past + t
                    )));
                }
                m
            }
            None => vec![vec![1.0; past + t]; b],
        };
        let positions: Vec<Vec<u32>> = match position_ids {
            Some(p) => p.to_dtype(DType::U32)?.to_vec2::<u32>()?,
            None => mask
                .iter()
                .map(|row| {
                    let mut c = 0u32;
                    let all: Vec<u32> = row
                        .iter()
                        .map(|&m| {
                            c += (m > 0.0) as u32;
                            c.saturating_sub(1)
                        })
                        .collect();
                    all[past..].to_vec()
                })
                .collect(),
        };
        // Packed rows (explicit positions that restart at 0 mid-row) hold several sequences that
        // must not see each other: a real token at position 0 opens a new segment.
        let segments: Option<Vec<Vec<u32>>> = (position_ids.is_some() && past == 0).then(|| {
            positions
                .iter()
                .zip(&mask)
                .map(|(pos, m)| {
                    let mut seg = 0;
                    pos.iter()
                        .zip(m)
                        .map(|(&p, &mk)| {
                            seg += (p == 0 && mk != 0.0) as u32;
                            seg
                        })
                        .collect()
                })
                .collect()
        });
        let dev = self.device();
        // The composed attention adds the mask as a `[B, 1, T, Tk]` tensor; the kernel reads it as
        // is. Soft-capped attention always composes.
        let fused = kernels::applies(&self.embed) && self.cfg.attn_logit_softcapping.is_none();
        let mask_for = |window: Option<usize>| -> Result<Option<(AttnMask, Option<Tensor>)>> {
            let Some(m) = causal_padding_mask(&mask, segments.as_deref(), t, past, window) else {
                return Ok(None);
            };
            let tensor = match fused {
                false => Some(
                    Tensor::from_vec(m.data.to_vec(), (m.b, 1, m.t, m.tk), dev)?
                        .to_dtype(self.dtype)?,
                ),
                true => None,
            };
            Ok(Some((m, tensor)))
        };
        let any_local = self.blocks.iter().any(|b| b.sliding);
        let any_full = self.blocks.iter().any(|b| !b.sliding);
        let full_mask = if any_full { mask_for(None)? } else { None };
        let local_mask = if any_local {
            mask_for(self.cfg.sliding_window)?
        } else {
            None
        };

        let flat_ids = input_ids.flatten_all()?;
        let pos_flat: Vec<u32> = positions.iter().flatten().copied().collect();
        self.check_positions(&pos_flat)?;
        let pos = match self.wpe {
            Some(_) => Some(Tensor::from_vec(pos_flat.clone(), b * t, dev)?),
            None => None,
        };
        let mut x = self.embed_tokens(&flat_ids, pos.as_ref(), b, t)?;
        let rope_full = if self.inv_freq.is_empty() {
            None
        } else {
            Some(self.rope_tables(&self.inv_freq, &pos_flat, b, t)?)
        };
        let rope_local = match &self.inv_freq_local {
            Some(f) if any_local => Some(self.rope_tables(f, &pos_flat, b, t)?),
            _ => rope_full.clone(),
        };
        let inputs = LayerInputs {
            full: (rope_full, full_mask),
            local: (rope_local, local_mask),
        };

        let training = cache.is_none() && self.is_trainable();
        // A training forward picks the products a tracked one would (bf16 at any row count under
        // bf16), with or without checkpointing: the checkpointed forward runs outside autograd
        // and must round as its recomputation will, and under LoRA the first layer's products
        // take no gradient and would otherwise run in f32 at few rows.
        let _same = training.then(crate::ops::TrainingProducts::new);
        // The load-balancing loss counts real tokens only: one weight per row of the batch.
        let real_rows = match self.records_routes(cache.is_some()) {
            true => Some(Tensor::from_vec(
                mask.iter().flatten().copied().collect::<Vec<f32>>(),
                (b * t, 1),
                dev,
            )?),
            false => None,
        };
        if self.checkpointing && training {
            // `x` is the bare lookup when there are no learned positions: backward can then add its
            // gradient to the embedding's rows directly.
            let lookup = (self.wpe.is_none() && self.cfg.embed_scale.is_none()).then_some(flat_ids);
            x = self.forward_checkpointed(x, lookup, inputs, real_rows)?;
        } else if let Some(rows) = real_rows {
            let mut routes = vec![];
            for block in &self.blocks {
                let (rope, mask) = inputs.get(block.sliding);
                let (y, route) =
                    block.forward_routed(&x, rope, mask, self.cfg.activation, false)?;
                x = y;
                routes.extend(route);
            }
            // A mixture whose layers are all dense (Qwen's `mlp_only_layers`) has no loss.
            if !routes.is_empty() {
                self.aux_losses
                    .push(crate::moe::load_balancing_loss(&routes, Some(&rows))?);
            }
        } else {
            for (i, block) in self.blocks.iter().enumerate() {
                let layer_cache = cache.as_mut().map(|c| {
                    if c.layers.len() != self.blocks.len() {
                        c.layers = (0..self.blocks.len()).map(|_| None).collect();
                    }
                    CacheSlot::Grow(&mut c.layers[i])
                });
                let (rope, mask) = inputs.get(block.sliding);
                x = block.forward(&x, rope, mask, layer_cache, self.cfg.activation)?;
            }
        }
        Ok(self.norm_f.forward(&x)?)
    }

    /// Learned positions (GPT-2's) end at `max_position_embeddings`: an error names the first
    /// position past them. Always fine for RoPE models.
    pub(crate) fn check_positions(&self, positions: &[u32]) -> Result<()> {
        let limit = self.cfg.max_position_embeddings;
        match positions.iter().find(|&&p| p as usize >= limit) {
            Some(p) if self.wpe.is_some() => Err(Error::Msg(format!(
                "position {p} exceeds the model's {limit} learned positions"
            ))),
            _ => Ok(()),
        }
    }

    /// The embeddings `[B, T, H]` of `ids` (`[B * T]`), scaled as the architecture does, plus
    /// the learned embeddings of `positions` (`[B * T]`, u32; models with learned positions).
    pub(crate) fn embed_tokens(
        &self,
        ids: &Tensor,
        positions: Option<&Tensor>,
        b: usize,
        t: usize,
    ) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let mut x = self.embed.index_select(ids, 0)?.reshape((b, t, h))?;
        if let Some(scale) = self.cfg.embed_scale {
            // Gemma: the scale rounded to the weights' dtype first, as transformers multiplies.
            x = (x * round_to(scale, self.dtype))?;
        }
        if let (Some(wpe), Some(pos)) = (&self.wpe, positions) {
            x = x.broadcast_add(&wpe.index_select(pos, 0)?.reshape((b, t, h))?)?;
        }
        Ok(x)
    }

    /// Logits `[.., V]` from hidden states `[.., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = Linear::new("lm_head", self.lm_head.clone(), None).forward(hidden)?;
        Ok(match self.cfg.final_logit_softcapping {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// The final norm over hidden states `[.., H]`.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm_f.forward(x)?)
    }

    /// The LM head weight `[V, H]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// `cos`, `sin` tables `[B, 1, T, Dh/2]` for the given positions, computed in f32 as transformers does.
    fn rope_tables(
        &self,
        inv_freq: &[f32],
        positions: &[u32],
        b: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        // One copy to a GPU for both tables.
        let both = Tensor::from_vec(
            rope_values(inv_freq, positions),
            (2, b, 1, t, half),
            self.device(),
        )?
        .to_dtype(self.dtype)?;
        Ok((both.get(0)?, both.get(1)?))
    }
}

/// The RoPE tables' values for `positions`, computed in f32 as transformers does: the cosines
/// `[positions, inv_freq]`, then the sines.
pub(crate) fn rope_values(inv_freq: &[f32], positions: &[u32]) -> Vec<f32> {
    let angles = || {
        positions
            .iter()
            .flat_map(|&p| inv_freq.iter().map(move |&f| p as f32 * f))
    };
    angles()
        .map(f32::cos)
        .chain(angles().map(f32::sin))
        .collect()
}

/// `x` as the nearest value of `dtype` (transformers multiplies by a scalar tensor of that dtype).
fn round_to(x: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    }
}

/// What a forward pass gives each layer's attention: RoPE tables and the mask, for the full and
/// the sliding-window (local) layers.
#[derive(Clone, Debug)]
pub(crate) struct LayerInputs {
    pub(crate) full: RopeAndMask,
    pub(crate) local: RopeAndMask,
}

pub(crate) type RopeAndMask = (Option<(Tensor, Tensor)>, Option<(AttnMask, Option<Tensor>)>);
type RopeAndMaskRef<'a> = (
    Option<&'a (Tensor, Tensor)>,
    Option<&'a (AttnMask, Option<Tensor>)>,
);

impl LayerInputs {
    pub(crate) fn get(&self, sliding: bool) -> RopeAndMaskRef<'_> {
        let (r, m) = if sliding { &self.local } else { &self.full };
        (r.as_ref(), m.as_ref())
    }
}

/// RoPE inverse frequencies of base `theta`, with the config's rescaling (Llama 3's long-context
/// one, or linear) when `scaled` (Gemma 3's local layers take none).
fn rope_inv_freq(cfg: &ModelConfig, theta: f64, scaled: bool) -> Vec<f32> {
    let hd = cfg.head_dim;
    let base = theta as f32;
    let mut inv: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / hd as f32))
        .collect();
    if let (Some(f), true) = (cfg.rope_linear_factor, scaled) {
        inv.iter_mut().for_each(|x| *x /= f as f32);
    }
    if let (Some(s), true) = (&cfg.rope_scaling, scaled) {
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f as f64;
            let v = *f as f64;
            *f = if wavelen > low_wavelen {
                (v / s.factor) as f32
            } else if wavelen < high_wavelen {
                v as f32
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                ((1.0 - smooth) * v / s.factor + smooth * v) as f32
            };
        }
    }
    inv
}

/// Additive mask `[B, T, past+T]`: query `i` (absolute `past+i`) sees key `j` iff `j <= past+i`, key
/// `j` is not padding, (with a sliding window `w`) fewer than `w` real tokens separate them (their
/// positions' distance, as transformers counts it, whatever padding lies between: a prefix run
/// once sits before its rows' padding), and (with packed rows) both lie in the same segment.
/// `None` when nothing is masked (a single new token, no padding, inside the window).
pub(crate) fn causal_padding_mask(
    mask: &[Vec<f32>],
    segments: Option<&[Vec<u32>]>,
    t: usize,
    past: usize,
    window: Option<usize>,
) -> Option<AttnMask> {
    let tk = past + t;
    let padded = mask.iter().any(|r| r.contains(&0.0));
    let window = window.unwrap_or(usize::MAX);
    if t == 1 && !padded && tk <= window && segments.is_none() {
        return None;
    }
    let mut v = Vec::with_capacity(mask.len() * t * tk);
    for (r, row) in mask.iter().enumerate() {
        let seg = segments.map(|s| &s[r]);
        // Real tokens up to and including each slot.
        let real: Vec<usize> = row
            .iter()
            .scan(0, |c, &m| {
                *c += (m != 0.0) as usize;
                Some(*c)
            })
            .collect();
        for i in 0..t {
            for (j, &m) in row.iter().enumerate() {
                let same_segment = seg.is_none_or(|s| s[j] == s[past + i]);
                v.push(
                    if j <= past + i
                        && real[past + i] - real[j] < window
                        && m != 0.0
                        && same_segment
                    {
                        0.0
                    } else {
                        MASKED
                    },
                );
            }
        }
    }
    Some(AttnMask {
        data: Arc::new(v),
        b: mask.len(),
        t,
        tk,
    })
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope_tables: Option<&(Tensor, Tensor)>,
        mask: Option<&(AttnMask, Option<Tensor>)>,
        cache: Option<CacheSlot<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            // Three GEMMs, not one over stacked weights: stacking copies the weights on every
            // call (8% of a rollout's time went to that copy) and gained nothing in prefill.
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(l) => {
                let y = l.forward(x)?;
                (
                    y.narrow(2, 0, nh * hd)?,
                    y.narrow(2, nh * hd, nkv * hd)?,
                    y.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let (q, k) = match (&self.qk_norm, self.qk_norm_full) {
            // OLMo 2: over all heads, before the split.
            (Some((qn, kn)), true) => {
                (qn.forward(&q.contiguous()?)?, kn.forward(&k.contiguous()?)?)
            }
            _ => (q, k),
        };
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        let (mut q, mut k, mut v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        if let (Some((qn, kn)), false) = (&self.qk_norm, self.qk_norm_full) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        if let Some((cos, sin)) = rope_tables {
            q = rope(&q, cos, sin)?;
            k = rope(&k, cos, sin)?;
        }
        // A fixed-shape step's keys count up to the position it writes.
        let mut limit = None;
        match cache {
            Some(CacheSlot::Grow(slot)) => (k, v) = LayerCache::append(slot, &k, &v)?,
            Some(CacheSlot::Fixed { k: kb, v: vb, at }) => {
                kb.scatter_set(at, &k.to_dtype(kb.dtype())?.contiguous()?, 2)?;
                vb.scatter_set(at, &v.to_dtype(vb.dtype())?.contiguous()?, 2)?;
                (k, v) = (kb.clone(), vb.clone());
                limit = Some(at);
            }
            None => {}
        }
        // A bf16 cache (on a GPU under bf16): the products with it run in bf16 as autocast's
        // would, scores and softmax in f32.
        q = q.to_dtype(k.dtype())?;
        let tk = k.dim(2)?;
        // Grouped-query attention without copying K/V per head: the `rep` query heads that share a
        // KV head are stacked along the time axis (query head h uses KV head h / rep, as repeat_kv).
        let rep = nh / nkv;
        let scale = self.scale;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let untracked = !(q.track_op() || k.track_op() || v.track_op());
        // Not in a training forward: a checkpointed layer's untracked pass must sum as its
        // tracked recomputation will, or the two differ by rounding (bf16 flips it into 1% of a
        // gradient on a CPU without AVX-512).
        // Soft-capped scores (Gemma 2) take the composed path: the kernels do not cap.
        let kernel = kernels::applies(&q) && self.softcap.is_none();
        let out = if untracked
            && kernel
            && !crate::ops::training_products()
            && q.dtype() == DType::F32
            && v.dtype() == DType::F32
            && rep * t <= kernels::UNTRACKED_MAX_ROWS
        {
            kernels::attention_untracked(&q, &k, &v, t, scale, mask.map(|(m, _)| m))?
        } else if t == 1
            && untracked
            && self.softcap.is_none()
            && kernels::decode_applies(&q, &k, &v)
        {
            // A decoding step on a GPU with preftune's kernels: a group's query heads read its
            // cached keys and values once, in place, in blocks spread over the GPU.
            let mask = mask.and_then(|(_, t)| t.as_ref());
            crate::flash::flash_decode(&q, &k, &v, scale, mask, limit)?
        } else if t > 1 && self.softcap.is_none() && kernels::flash_applies(&q, hd) {
            // On a GPU with preftune's kernels: no scores or probabilities are stored. Not for
            // decoding steps (t = 1): a block a KV group would walk the whole cache alone, where
            // the composed products spread it over the GPU.
            let mask = mask.and_then(|(_, t)| t.as_ref());
            crate::flash::flash_attention(&q, &k, &v, t, scale, mask)?
        } else if kernel && kernels::cpu_flash_applies(&q, t, tk) {
            // Training-length inputs on the CPU: in tiles, nothing of `[B, H, T, Tk]` stored.
            crate::flash::flash_attention_host(&q, &k, &v, t, scale, mask.map(|(m, _)| m))?
        } else {
            let probs = if kernel {
                kernels::attention_probs(&q, &k, t, scale, mask.map(|(m, _)| m))?
            } else {
                // `k` as it is: a decoding step's cache view is strided, and cuBLAS (and the
                // CPU's GEMM) read it in place where a contiguous copy would move the cached keys
                // once more at every step.
                let mut scores =
                    (q.matmul(&k.t()?)?.to_dtype(x.dtype())? * scale)?.reshape((b, nh, t, tk))?;
                if let Some(c) = self.softcap {
                    scores = ((scores / c)?.tanh()? * c)?;
                }
                let scores = match mask.and_then(|(_, t)| t.as_ref()) {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                softmax_last(&scores)?
                    .to_dtype(v.dtype())?
                    .reshape((b, nkv, rep * t, tk))?
            };
            probs.matmul(&v)?
        };
        let out = out.reshape((b, nh, t, hd))?.to_dtype(x.dtype())?;
        self.o
            .forward(&out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }
}

impl Mlp {
    /// `unread`: the last projection as [`Linear::forward_unread`].
    fn forward(
        &self,
        x: &Tensor,
        act_kind: Activation,
        unread: bool,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward_routed(x, act_kind, unread)?.0)
    }

    /// [`Mlp::forward`] with a mixture's routing.
    fn forward_routed(
        &self,
        x: &Tensor,
        act_kind: Activation,
        unread: bool,
    ) -> candle_core::Result<(Tensor, Option<Route>)> {
        let last = |l: &Linear, x: &Tensor| match unread {
            true => l.forward_unread(x),
            false => l.forward(x),
        };
        let act = |x: Tensor| match act_kind {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Relu => x.relu(),
        };
        let y = match self {
            Mlp::Gated { gate, up, down } if matches!(act_kind, Activation::Silu) => {
                // bf16 products off the CPU's kernels: gate, up and SwiGLU stay in bf16, as
                // autocast keeps them (an f32 copy of each would be most of a layer's memory).
                let bf16 = [gate, up, down].iter().all(|l| l.bf16_activations(x));
                match bf16 {
                    true => last(down, &swiglu(&gate.forward_bf16(x)?, &up.forward_bf16(x)?)?),
                    false => last(down, &swiglu(&gate.forward(x)?, &up.forward(x)?)?),
                }
            }
            Mlp::Gated { gate, up, down } => {
                last(down, &(act(gate.forward(x)?)? * up.forward(x)?)?)
            }
            Mlp::GatedFused {
                gate_up,
                down,
                inter,
            } => {
                let y = gate_up.forward(x)?;
                let d = y.rank() - 1;
                let (g, u) = (y.narrow(d, 0, *inter)?, y.narrow(d, *inter, *inter)?);
                let h = if matches!(act_kind, Activation::Silu) {
                    swiglu(&g.contiguous()?, &u.contiguous()?)?
                } else {
                    (act(g)? * u)?
                };
                last(down, &h)
            }
            Mlp::Plain { fc, proj } => last(proj, &act(fc.forward(x)?)?),
            Mlp::Moe {
                router,
                experts,
                top_k,
                norm_topk_prob,
                shared,
                tie_order,
            } => {
                // Routing picks rows per expert, so the last projections are computed (no
                // unread form): checkpointed backward recomputes them, at the same gradients.
                let dims = x.dims().to_vec();
                let hidden = *dims.last().unwrap_or(&0);
                let xf = x.reshape(((), hidden))?.contiguous()?;
                let n = xf.dim(0)?;
                // The router's softmax in f32 (f64 stays f64, for gradient checks).
                let logits = router.forward(&xf)?;
                let logits = match logits.dtype() {
                    DType::F64 => logits,
                    _ => logits.to_dtype(DType::F32)?,
                };
                let probs = softmax_last(&logits)?;
                let weights = |mask: &Tensor| -> candle_core::Result<Tensor> {
                    let mut w = (&probs * mask)?;
                    if *norm_topk_prob {
                        w = w.broadcast_div(&w.sum_keepdim(1)?)?;
                    }
                    w.to_dtype(x.dtype())
                };
                let on_device = crate::moe::routes_on_device(x.device(), n, experts.len(), *top_k);
                let (mut y, picks) = if on_device {
                    // Few rows (decoding): picks made where the probabilities are, and every
                    // expert run on every row, weighted by zero where it was not picked. Nothing
                    // is read back, so a decoding step can be a CUDA graph; a step reads every
                    // expert's weights either way once the rows pick most experts.
                    let mask = crate::moe::top_k_mask(&probs, *top_k, tie_order)?;
                    let w = weights(&mask)?;
                    let mut y: Option<Tensor> = None;
                    for (e, expert) in experts.iter().enumerate() {
                        let ye = expert
                            .forward(&xf, act_kind, false)?
                            .broadcast_mul(&w.narrow(1, e, 1)?)?;
                        y = Some(match y {
                            None => ye,
                            Some(acc) => (acc + ye)?,
                        });
                    }
                    let y = y.ok_or_else(|| candle_core::Error::Msg("MoE: no experts".into()))?;
                    (y, mask)
                } else {
                    let (mask, rows) =
                        top_k_routes(&probs.to_dtype(DType::F32)?.to_vec2::<f32>()?, *top_k);
                    let mask = Tensor::from_vec(mask, (n, experts.len()), x.device())?
                        .to_dtype(probs.dtype())?;
                    let w = weights(&mask)?;
                    // Every expert's weighted rows, then one sum into place (one `[rows, hidden]`
                    // buffer, not one per expert).
                    let (mut ys, mut order) = (vec![], vec![]);
                    for (e, (expert, rows)) in experts.iter().zip(&rows).enumerate() {
                        if rows.is_empty() {
                            continue;
                        }
                        let idx = Tensor::new(rows.as_slice(), x.device())?;
                        let y = expert.forward(&xf.index_select(&idx, 0)?, act_kind, false)?;
                        let we = w.narrow(1, e, 1)?.contiguous()?.index_select(&idx, 0)?;
                        ys.push(y.broadcast_mul(&we)?);
                        order.extend_from_slice(rows);
                    }
                    let idx = Tensor::new(order.as_slice(), x.device())?;
                    let y = xf.zeros_like()?.index_add(&idx, &Tensor::cat(&ys, 0)?, 0)?;
                    (y, mask)
                };
                let route = Route {
                    probs: probs.clone(),
                    picks,
                };
                if let Some(sh) = shared {
                    let (mlp, gate) = &**sh;
                    let g = crate::ops::sigmoid(&gate.forward(&xf)?)?;
                    y = (y + mlp.forward(&xf, act_kind, false)?.broadcast_mul(&g)?)?;
                }
                return Ok((y.reshape(dims)?, Some(route)));
            }
        };
        Ok((y?, None))
    }
}

/// Each row's `k` most probable experts (ties to the lower index): a `[rows, experts]` 0/1 mask,
/// row-major, and for each expert the rows routed to it, in order.
pub(crate) fn top_k_routes(probs: &[Vec<f32>], k: usize) -> (Vec<f32>, Vec<Vec<u32>>) {
    let experts = probs.first().map_or(0, Vec::len);
    let mut mask = vec![0f32; probs.len() * experts];
    let mut rows = vec![vec![]; experts];
    for (i, p) in probs.iter().enumerate() {
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        for &e in order.iter().take(k) {
            mask[i * experts + e] = 1.0;
            rows[e].push(i as u32);
        }
    }
    (mask, rows)
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// Appending in steps of varying size, across several growths, holds what concatenation holds.
    #[test]
    fn cache_appends_in_place_and_grows() {
        let dev = Device::Cpu;
        let mut slot = None;
        let mut all: Option<(Tensor, Tensor)> = None;
        for (i, t) in [5usize, 1, 1, 70, 1, 130, 1].into_iter().enumerate() {
            let k = Tensor::randn(0f32, 1.0, (2, 3, t, 4), &dev).unwrap();
            let v = (k.clone() * (i as f64 + 2.0)).unwrap();
            let (ck, cv) = LayerCache::append(&mut slot, &k, &v).unwrap();
            all = Some(match all {
                None => (k, v),
                Some((pk, pv)) => (
                    Tensor::cat(&[&pk, &k], 2).unwrap(),
                    Tensor::cat(&[&pv, &v], 2).unwrap(),
                ),
            });
            let (ek, ev) = all.as_ref().unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                a.contiguous()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(&ck, ek) && same(&cv, ev), "after append {i}");
        }
        let c = slot.unwrap();
        assert_eq!(c.len, 209);
        assert!(c.k.dim(2).unwrap() >= 209);
    }
}
