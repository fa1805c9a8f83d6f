//! Activation recomputation ("gradient checkpointing") per decoder layer.
//!
//! A checkpointed forward pass runs the decoder layers outside autograd and records only each
//! layer's input; the final hidden state re-enters autograd as a leaf. [`Model::backward`] runs the
//! ordinary backward pass (loss, head, final norm) to get the leaf's gradient, then walks the layers
//! from the top: it recomputes one layer with autograd on, back-propagates the incoming gradient
//! through it, and adds the layer's parameter gradients to the store. Activations held at once: the
//! layer inputs (one `[B, T, H]` tensor per layer) plus one layer's intermediates.
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::model::{LayerInputs, Model};

type Rng = Option<crate::lora::DropoutStream>;

/// What backward needs to recompute one checkpointed forward pass.
#[derive(Debug)]
pub(crate) struct Segment {
    /// The embedding output, still attached to the embedding weights.
    embed_out: Tensor,
    /// The token ids, when `embed_out` is exactly their rows of the embedding.
    lookup: Option<Tensor>,
    /// Input of each layer, outside autograd.
    inputs: Vec<Tensor>,
    /// LoRA dropout state before each layer, so recomputation draws the same masks.
    rngs: Vec<Rng>,
    /// Dropout state after the last layer, restored once backward is done.
    end_rng: Rng,
    /// The last layer's output as an autograd leaf.
    leaf: Tensor,
    /// Each MoE layer's routing probabilities as an autograd leaf, when the pass recorded its
    /// load-balancing loss (`None` for dense layers).
    routes: Vec<Option<Tensor>>,
    /// RoPE tables and masks of the pass, for full and local layers.
    attn: LayerInputs,
}

/// Segments recorded by checkpointed forward passes since the last backward.
pub(crate) type Tape = Arc<Mutex<Vec<Segment>>>;

fn add_grad(grads: &mut GradStore, t: &Tensor, g: &Tensor) -> candle_core::Result<()> {
    let sum = match grads.remove(t) {
        Some(old) => (old + g)?,
        None => g.clone(),
    };
    grads.insert(t, sum);
    Ok(())
}

impl Model {
    /// Recompute decoder layers during backward instead of storing their activations (TRL's
    /// `gradient_checkpointing`). Gradients are unchanged; the backward pass must then go through
    /// [`Model::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Runs the decoder layers on the embedding output `x` without recording a graph; returns the
    /// last layer's output as an autograd leaf and records a [`Segment`]. With `real_rows` (the
    /// batch's rows, 1 for a real token) it records the pass's load-balancing loss too.
    pub(crate) fn forward_checkpointed(
        &self,
        x: Tensor,
        lookup: Option<Tensor>,
        attn: LayerInputs,
        real_rows: Option<Tensor>,
    ) -> Result<Tensor> {
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut rngs = Vec::with_capacity(self.blocks.len());
        let (mut routes, mut leaves) = (vec![], vec![]);
        // The caller holds a `TrainingProducts` guard, so these untracked products round as
        // their tracked recomputation will.
        let mut h = x.detach();
        for block in &self.blocks {
            inputs.push(h.clone());
            rngs.push(self.lora_dropout.snapshot());
            let (rope, mask) = attn.get(block.sliding);
            let (y, route) =
                block
                    .detached()
                    .forward_routed(&h, rope, mask, self.cfg.activation, false)?;
            h = y;
            // The probabilities re-enter autograd as leaves: their gradients reach the router
            // when backward recomputes the layer.
            let leaf = match route.filter(|_| real_rows.is_some()) {
                Some(mut r) => {
                    r.probs = Var::from_tensor(&r.probs)?.as_tensor().clone();
                    let leaf = r.probs.clone();
                    routes.push(r);
                    Some(leaf)
                }
                None => None,
            };
            leaves.push(leaf);
        }
        if let Some(rows) = real_rows.as_ref().filter(|_| !routes.is_empty()) {
            self.aux_losses
                .push(crate::moe::load_balancing_loss(&routes, Some(rows))?);
        }
        let leaf = Var::from_tensor(&h)?.as_tensor().clone();
        self.tape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Segment {
                embed_out: x,
                lookup,
                inputs,
                rngs,
                end_rng: self.lora_dropout.snapshot(),
                leaf: leaf.clone(),
                routes: leaves,
                attn,
            });
        Ok(leaf)
    }

    /// `loss.backward()`, completed through any checkpointed layers. Use it instead of
    /// `Tensor::backward` whenever gradient checkpointing may be on.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let segments = std::mem::take(&mut *self.tape.lock().unwrap_or_else(|e| e.into_inner()));
        let mut final_rng = None;
        for mut seg in segments.into_iter().rev() {
            final_rng.get_or_insert(seg.end_rng);
            let mut g = match grads.remove(&seg.leaf) {
                Some(g) => g,
                // Only its load-balancing loss reached the loss.
                None if seg.routes.iter().flatten().any(|r| grads.get(r).is_some()) => {
                    seg.leaf.zeros_like()?
                }
                None => continue, // this forward pass did not reach the loss
            };
            for (i, block) in self.blocks.iter().enumerate().rev() {
                self.lora_dropout.restore(seg.rngs[i]);
                // The autograd copy of the layer's input; the stored one is freed at once, so the
                // inputs shrink as the gradients grow (135 MiB at the peak on SmolLM2 8 x 128).
                let input = seg.inputs.pop().expect("one input per layer");
                let x = Var::from_tensor(&input)?;
                drop(input);
                // Only the gradient of `out` matters, so its last projection is skipped.
                let (rope, mask) = seg.attn.get(block.sliding);
                let (out, route) =
                    block.forward_routed(x.as_tensor(), rope, mask, self.cfg.activation, true)?;
                let mut objective = (out * g.detach())?.sum_all()?;
                let route_grad = seg.routes[i].as_ref().and_then(|leaf| grads.remove(leaf));
                if let (Some(dp), Some(r)) = (route_grad, route) {
                    let term = (r.probs * dp.detach())?.sum_all()?;
                    let term = term.to_dtype(objective.dtype())?;
                    objective = (objective + term)?;
                }
                let layer = objective.backward()?;
                for t in block.tensors().iter().filter(|t| t.is_variable()) {
                    if let Some(d) = layer.get(t) {
                        // Detached, so that it holds no part of this layer's graph.
                        add_grad(&mut grads, t, &d.detach())?;
                    }
                }
                g = layer
                    .get(x.as_tensor())
                    .ok_or_else(|| Error::Msg(format!("layer {i}: no gradient reached its input")))?
                    .detach();
            }
            let embed = &self.embed;
            match &seg.lookup {
                Some(ids) if embed.is_variable() => {
                    // Rows of `g` added into the embedding's gradient: in place into the LM
                    // head's contribution when tied (`index_add` would copy that 108 MiB tensor
                    // first, the step's peak), else one new buffer instead of zeros, the
                    // scattered copy and their sum.
                    let rows = g.reshape(((), g.dim(candle_core::D::Minus1)?))?;
                    let sum = match grads.remove(embed) {
                        Some(old) if AddRows::applies(&old, &rows, ids) => {
                            old.inplace_op2(&rows.contiguous()?, &AddRows(ids.to_vec1()?))?;
                            old
                        }
                        Some(old) => old.index_add(ids, &rows.to_dtype(old.dtype())?, 0)?,
                        None => {
                            embed
                                .zeros_like()?
                                .index_add(ids, &rows.to_dtype(embed.dtype())?, 0)?
                        }
                    };
                    grads.insert(embed, sum);
                }
                Some(_) => {}
                None => {
                    let emb = (seg.embed_out * g.detach())?.sum_all()?.backward()?;
                    for (_, v) in self.trainable_params() {
                        if let Some(d) = emb.get(v.as_tensor()) {
                            add_grad(&mut grads, v.as_tensor(), d)?;
                        }
                    }
                }
            }
        }
        if let Some(rng) = final_rng {
            self.lora_dropout.restore(rng);
        }
        // A gradient computed from tracked tensors records their graph, and would keep its
        // activations (a recomputed layer's, under checkpointing) alive until the optimiser step.
        for (_, v) in self.trainable_params() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), g.detach());
            }
        }
        Ok(grads)
    }

    /// Forgets checkpointed forward passes that will not be back-propagated (after an error, say).
    pub fn clear_checkpoints(&self) {
        self.tape.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// `grad[ids[r]] += rows[r]` in place, in the order of `ids` (as `index_add` adds them). Only for
/// the tied LM head's gradient once the backward pass is done with it: a fresh buffer from the
/// head's backward that no other tensor shares (the candle patch may otherwise store a shared
/// first gradient; `vendor/candle-core/PREFTUNE.md`).
struct AddRows(Vec<u32>);

impl AddRows {
    /// Contiguous f32 tensors of the same width, one row of `rows` per id.
    fn applies(grad: &Tensor, rows: &Tensor, ids: &Tensor) -> bool {
        let f32 = candle_core::DType::F32;
        ids.dtype() == candle_core::DType::U32
            && grad.dtype() == f32
            && rows.dtype() == f32
            && grad.is_contiguous()
            && crate::kernels::cpu_kernels(grad.device())
            && grad.rank() == 2
            && grad.dims().last() == rows.dims().last()
    }
}

impl candle_core::InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "preftune-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let dst = crate::kernels::f32_mut(s1, l1, "add-rows")?;
        let src = crate::kernels::slice::<f32>(s2, l2, "add-rows")?;
        let (rows, h) = l1.shape().dims2()?;
        if src.len() != self.0.len() * h {
            candle_core::bail!("add-rows: {} ids for {} rows", self.0.len(), src.len() / h)
        }
        // Checked before anything is added, so that an error leaves the gradient as it was.
        if let Some(&id) = self.0.iter().find(|&&id| id as usize >= rows) {
            candle_core::bail!("add-rows: id {id} out of {rows} rows")
        }
        for (r, &id) in self.0.iter().enumerate() {
            let id = id as usize;
            let d = &mut dst[id * h..(id + 1) * h];
            d.iter_mut()
                .zip(&src[r * h..(r + 1) * h])
                .for_each(|(a, b)| *a += b);
        }
        Ok(())
    }
}
