//! Differentiable building blocks, composed only from candle ops that have a backward pass.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope` and `sdpa` have no backward
//! and silently drop gradients, so nothing here may call them. Norms and softmax run in f32 whatever
//! the weights' dtype, as transformers does.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::kernels;

/// Row counts up to which [`Linear::forward`] multiplies the other way round (measured on SmolLM2's
/// shapes: 2x faster at 16 rows, even at 48, slower from ~96).
const SMALL_M: usize = 32;

/// Untracked products (sampling) take the bf16 path from this many rows: each call packs the
/// weight, which a decoding step's few rows do not repay.
const BF16_MIN_ROWS: usize = 64;

/// `y = x W^T + b` with `W` stored `[out, in]` (PyTorch's `nn.Linear` layout), plus an optional
/// LoRA update `scale * B A x`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Module path (`model.layers.0.self_attn.q_proj`): names its weights and matches LoRA targets.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<crate::lora::LoraAdapter>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            name: name.into(),
            weight,
            bias,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// [`Linear::forward`] for a recomputation whose output backward never reads: the gradients
    /// are the same, but `x W^T` is not computed (its value is zeros). A product's backward needs
    /// `x`, `W` and the incoming gradient, never the product itself, so recomputing a
    /// checkpointed layer can skip its last projection, a quarter of the layer's FLOPs.
    pub fn forward_unread(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, unread: bool) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let dims = x.dims();
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, in_dim))?;
        let unread = unread
            && (x2.track_op() || self.weight.track_op())
            && kernels::cpu_kernels(x2.device())
            && x2.dtype() == DType::F32
            && self.weight.dtype() == DType::F32;
        let mut y = if unread {
            unread_matmul(&x2, &self.weight)?
        } else if let Some(y) = packed_matmul(&x2, &self.weight)? {
            y
        } else if let Some(y) = (!training_products())
            .then(|| few_rows_matmul(&x2, &self.weight))
            .transpose()?
            .flatten()
        {
            y
        } else if (x2.track_op() || training_products() || lead >= BF16_MIN_ROWS)
            && bf16_applies(&x2, &self.weight)
        {
            bf16_matmul(&x2, &self.weight)?
        } else if bf16_enabled()
            && !kernels::cpu_kernels(x2.device())
            && x2.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            bf16_composed_matmul(&x2, &self.weight)?
        } else if x2.track_op()
            && !self.weight.track_op()
            && kernels::cpu_kernels(self.weight.device())
        {
            frozen_matmul(&x2, &self.weight)?
        } else if lead <= SMALL_M && kernels::cpu_kernels(self.weight.device()) {
            // Few rows (decoding): `(W x^T)^T` streams the weight in its stored layout and runs
            // about twice as fast in candle's GEMM as `x W^T`, which packs the transposed weight
            // every call.
            self.weight.matmul(&x2.t()?)?.t()?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            y = (y + l.delta(&x2)?)?;
        }
        let mut out_shape = dims.to_vec();
        *out_shape.last_mut().expect("x has at least one dim") = out_dim;
        y.reshape(out_shape)
    }

    /// Visits `weight` then `bias` with their full names.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        f(&format!("{}.weight", self.name), &mut self.weight);
        if let Some(b) = &mut self.bias {
            f(&format!("{}.bias", self.name), b);
        }
    }
}

/// `x W^T` through [`preftune_kernels::gemv`] when it applies: few rows, no gradient, f32 on an AVX2 CPU.
fn few_rows_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let n = w.dim(0)?;
    // `kernels::applies` also honours `set_fused(false)` (`bench --composed-ops`).
    let fits = m <= preftune_kernels::gemv::max_rows()
        && kernels::applies(x)
        && !x.track_op()
        && !w.track_op()
        && kernels::cpu_kernels(x.device())
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && preftune_kernels::gemv::available();
    if !fits {
        return Ok(None);
    }
    let y = with_f32(x, |xv| {
        with_f32(w, |wv| preftune_kernels::gemv::matmul_t(xv, m, wv, n, k))
    })??;
    Tensor::from_vec(y, (m, n), x.device()).map(Some)
}

thread_local! {
    static BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mixed precision on this thread while the guard lives (`bf16 = true` in a run's config):
/// linears' products round both operands to bf16 and sum in f32 ([`preftune_kernels::bf16gemm`]); weights,
/// gradients, optimiser state, norms and softmax stay f32. Per thread, so one run's setting never
/// leaks into another's (tests run in parallel); dropping the guard restores the previous one.
#[must_use = "bf16 applies only while the guard lives"]
pub struct Bf16Scope(bool);

/// Whether this CPU multiplies in bf16 natively (AMX or AVX-512 BF16). Without it `bf16 = true`
/// still gives bf16 numbers, through an f32 GEMM on rounded operands, but no speed.
pub fn bf16_gemm_available() -> bool {
    preftune_kernels::bf16gemm::available()
}

/// The bf16 product in use: `amx`, `avx512-bf16` or `f32-fallback` (benchmarks print it).
pub fn bf16_gemm_name() -> &'static str {
    preftune_kernels::bf16gemm::backend().name()
}

impl Bf16Scope {
    pub fn new(on: bool) -> Self {
        Bf16Scope(BF16.with(|c| c.replace(on)))
    }
}

impl Drop for Bf16Scope {
    fn drop(&mut self) {
        BF16.with(|c| c.set(self.0));
    }
}

thread_local! {
    static TRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the guard lives, this thread's untracked linears pick the product a tracked one would
/// (bf16 at any row count under [`Bf16Scope`], no decoding kernels), so that a checkpointed
/// forward pass, which runs outside autograd, rounds as its recomputation will. Other untracked
/// paths (attention, stacked q/k/v) still differ from the tracked ones by f32 summation order.
#[must_use = "applies only while the guard lives"]
pub(crate) struct TrainingProducts(bool);

impl TrainingProducts {
    pub(crate) fn new() -> Self {
        TrainingProducts(TRAINING.with(|c| c.replace(true)))
    }
}

impl Drop for TrainingProducts {
    fn drop(&mut self) {
        TRAINING.with(|c| c.set(self.0));
    }
}

fn training_products() -> bool {
    TRAINING.with(|c| c.get())
}

/// Whether a [`Bf16Scope`] has switched bf16 products on for this thread.
pub fn bf16_enabled() -> bool {
    BF16.with(|c| c.get())
}

fn bf16_applies(x: &Tensor, w: &Tensor) -> bool {
    bf16_enabled()
        && kernels::cpu_kernels(x.device())
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
}

/// `x W^T` with both operands cast to bf16 and the product cast back to f32, from candle ops: the
/// bf16 product on devices without our GEMMs (cuBLAS sums bf16 products in f32). The gradients
/// flow through the casts, so backward's products are bf16 too.
fn bf16_composed_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::BF16)?
        .matmul(&w.to_dtype(DType::BF16)?.t()?)?
        .to_dtype(DType::F32)
}

/// `x W^T` (`x`: `[m, k]`, `W`: `[n, k]`) in bf16 with f32 sums, in forward and backward; `W`'s
/// gradient is computed only when `W` takes one.
pub fn bf16_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Bf16Matmul { unread: false })
}

/// `x W^T` with the backward [`Linear::forward`] would give it, and zeros as its value.
fn unread_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if bf16_applies(x, w) {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, Bf16Matmul { unread: true });
    }
    if !w.track_op() {
        return x.apply_op1(FrozenMatmul {
            x: x.detach(),
            w: w.detach(),
            unread: true,
        });
    }
    x.apply_op2(w, UnreadMatmul)
}

/// The value of an unread `m x n` product: zeros, which nothing reads.
fn unread_value(m: usize, n: usize) -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n)))
}

/// The f32 product of [`unread_matmul`]: backward as candle's `x.matmul(&w.t())` computes it.
struct UnreadMatmul;

impl candle_core::CustomOp2 for UnreadMatmul {
    fn name(&self) -> &'static str {
        "preftune-unread-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((m, _), (n, _)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        Ok(unread_value(m, n))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient computed from tracked tensors records their graph, and the
        // weight's gradient, which backward never consumes, would keep the whole layer alive.
        let wants_dx = x.track_op();
        let (x, w, grad) = (x.detach(), w.detach(), grad.detach());
        let dx = wants_dx.then(|| grad.matmul(&w)).transpose()?;
        let dw = x.t()?.matmul(&grad)?.t()?;
        Ok((dx, Some(dw)))
    }
}

/// `unread`: the value is zeros and the product is skipped (see [`Linear::forward_unread`]).
struct Bf16Matmul {
    unread: bool,
}

thread_local! {
    static PACKED: std::cell::RefCell<Option<PackedMap>> = const { std::cell::RefCell::new(None) };
}

type PackedMap = std::collections::HashMap<
    candle_core::TensorId,
    std::rc::Rc<preftune_kernels::bf16gemm::PackedB>,
>;

/// While the guard lives, this thread's untracked bf16 products (AMX or AVX-512 BF16) pack each
/// weight once and reuse it. Sampling multiplies the same weights at every step with a few rows,
/// where packing per call would cost more than the product; packed once, a step streams the
/// weights as bf16, half the bytes of f32. Weights must not change in place while it lives (a sampling loop does
/// not change them); the packs are freed with the guard.
#[must_use = "weights are packed only while the guard lives"]
pub struct PackedWeights(Option<PackedMap>);

impl PackedWeights {
    /// Active only under a [`Bf16Scope`] on a CPU with a bf16 GEMM; otherwise a guard that does
    /// nothing.
    pub fn new() -> Self {
        let on = bf16_enabled() && preftune_kernels::bf16gemm::available();
        PackedWeights(PACKED.with(|c| c.replace(on.then(PackedMap::new))))
    }
}

impl Default for PackedWeights {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PackedWeights {
    fn drop(&mut self) {
        PACKED.with(|c| *c.borrow_mut() = self.0.take());
    }
}

/// Whether a [`PackedWeights`] guard is packing on this thread.
fn packing() -> bool {
    PACKED.with(|c| c.borrow().is_some())
}

/// `x W^T` with `W` from this thread's [`PackedWeights`] (packed on first use), when one is active
/// and the product is untracked f32 on the CPU.
fn packed_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let applies = packing() && !x.track_op() && !w.track_op() && bf16_applies(x, w);
    if !applies {
        return Ok(None);
    }
    let ((m, k), n) = (x.dims2()?, w.dim(0)?);
    let cached = PACKED.with(|c| c.borrow().as_ref().and_then(|p| p.get(&w.id()).cloned()));
    let packed = match cached {
        Some(p) => p,
        None => {
            let p = std::rc::Rc::new(with_f32(w, |wv| {
                preftune_kernels::bf16gemm::PackedB::new(preftune_kernels::bf16gemm::View::rows(
                    wv, n, k,
                ))
            })?);
            PACKED.with(|c| {
                if let Some(map) = c.borrow_mut().as_mut() {
                    map.insert(w.id(), p.clone());
                }
            });
            p
        }
    };
    let y = with_f32(x, |xv| {
        preftune_kernels::bf16gemm::gemm_packed_new(
            preftune_kernels::bf16gemm::View::rows(xv, m, k),
            &packed,
        )
    })?;
    Tensor::from_vec(y, (m, n), x.device()).map(Some)
}

/// Runs `f` on the f32 values of `t` (a contiguous copy only if `t` is not contiguous).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        candle_core::bail!("with_f32: CPU tensors only")
    };
    Ok(f(kernels::slice::<f32>(c, l, "with_f32")?))
}

/// `f(a, b)` over the f32 values of two tensors.
fn product_of(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
) -> Result<Vec<f32>> {
    with_f32(a, |av| with_f32(b, |bv| f(av, bv)))?
}

impl candle_core::CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "preftune-bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((m, k), (n, k2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != k2 {
            candle_core::bail!("bf16_matmul: inner dimensions {k} and {k2} differ")
        }
        if self.unread {
            return Ok(unread_value(m, n));
        }
        let x = kernels::slice::<f32>(s1, l1, self.name())?;
        let w = kernels::slice::<f32>(s2, l2, self.name())?;
        let y = preftune_kernels::bf16gemm::gemm_nt_new(
            preftune_kernels::bf16gemm::View::rows(x, m, k),
            preftune_kernels::bf16gemm::View::rows(w, n, k),
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use preftune_kernels::bf16gemm::{gemm_nt_new, View};
        let ((m, k), n) = (x.dims2()?, w.dim(0)?);
        // dx = dy W: rows of dy against columns of W; none for an input that takes no gradient
        // (the first layer's under LoRA).
        let dx = x
            .track_op()
            .then(|| {
                let dx = product_of(grad, w, |g, wv| {
                    gemm_nt_new(View::rows(g, m, n), View::transposed(wv, k, n))
                })?;
                Tensor::from_vec(dx, (m, k), x.device())
            })
            .transpose()?;
        if !w.track_op() {
            return Ok((dx, None));
        }
        // dW = dy^T x: columns of dy against columns of x.
        let dw = product_of(grad, x, |g, xv| {
            gemm_nt_new(View::transposed(g, n, m), View::transposed(xv, k, m))
        })?;
        Ok((dx, Some(Tensor::from_vec(dw, (n, k), w.device())?)))
    }
}

/// `x W^T` for a weight that takes no gradient (LoRA's base, a frozen layer): candle's matmul
/// backward computes both operands' gradients, and the weight's would be a third of the layer's
/// FLOPs spent on a tensor nobody reads. This op's backward gives `x` its gradient only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op1(FrozenMatmul {
        x: x.detach(),
        w: w.detach(),
        unread: false,
    })
}

struct FrozenMatmul {
    x: Tensor,
    w: Tensor,
    /// The value is zeros and the product is skipped (see [`Linear::forward_unread`]).
    unread: bool,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "preftune-frozen-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.unread {
            return Ok(unread_value(self.x.dim(0)?, self.w.dim(0)?));
        }
        let y = self.x.matmul(&self.w.t()?)?.contiguous()?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("frozen_matmul: CPU only")
        };
        let out = match layout.contiguous_offsets() {
            Some((0, end)) if end == cpu_len(cpu) => cpu.clone(),
            _ => candle_core::bail!("frozen_matmul: unexpected output layout"),
        };
        Ok((out, y.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

fn cpu_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        _ => usize::MAX,
    }
}

/// Several linears of the same input (`q`/`k`/`v`, `gate`/`up`) as one GEMM over their stacked
/// weights when that pays: many rows without gradients (prefill, reference and scoring passes)
/// and no LoRA. In training each linear runs on its own: the backward of the stacked output's
/// narrowed parts pads each part's gradient with zeros to the full width and adds them up, which
/// cost 0.9 GB of peak memory on SmolLM2 8 x 128 (4.0 -> 3.1 GB) and some time.
pub fn linear_group(x: &Tensor, ls: &[&Linear]) -> Result<Vec<Tensor>> {
    let dims = x.dims();
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let same_bias = ls.iter().all(|l| l.bias.is_some()) || ls.iter().all(|l| l.bias.is_none());
    // Stacking copies the weights into a new tensor; under [`PackedWeights`] that would pack the
    // copy on every call instead of reusing each weight's pack.
    if lead <= SMALL_M
        || ls.iter().any(|l| l.lora.is_some())
        || !same_bias
        || ls.len() < 2
        || packing()
        || x.track_op()
    {
        return ls.iter().map(|l| l.forward(x)).collect();
    }
    let weights: Vec<&Tensor> = ls.iter().map(|l| &l.weight).collect();
    let biases: Vec<&Tensor> = ls.iter().filter_map(|l| l.bias.as_ref()).collect();
    let stacked = Linear::new(
        "stacked",
        Tensor::cat(&weights, 0)?,
        (!biases.is_empty())
            .then(|| Tensor::cat(&biases, 0))
            .transpose()?,
    );
    let y = stacked.forward(x)?;
    let last = dims.len() - 1;
    let mut start = 0;
    ls.iter()
        .map(|l| {
            let n = l.weight.dim(0)?;
            let part = y.narrow(last, start, n)?;
            start += n;
            Ok(part)
        })
        .collect()
}

/// Half-precision inputs are computed in f32 (as transformers does); f32 and f64 stay as they are.
fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 | DType::F32 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// Softmax over the last dimension, in at least f32. The max is detached: it only stabilises.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log(sum(exp(x)))` over the last dimension, kept as size 1, in at least f32.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: normalise in at least f32, cast back, then scale.
/// The fused kernel when it applies, else composed.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::applies(x) && weight.dtype() == x.dtype() {
        return kernels::rms_norm(x, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
}

/// [`rms_norm`] from candle ops.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = upcast(x)?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centered
        .broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Rotate-half RoPE (transformers' layout). `x`: `[B, H, T, Dh]`; `cos`, `sin`: `[B, 1, T, Dh/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if kernels::applies(x) && cos.dtype() == x.dtype() {
        return kernels::rope(x, cos, sin);
    }
    rope_composed(x, cos, sin)
}

/// [`rope`] from candle ops.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let out2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[out1, out2], D::Minus1)
}

/// `silu(gate) * up`, the gated MLP's activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::applies(gate) && up.dtype() == gate.dtype() {
        return kernels::swiglu(gate, up);
    }
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The patched candle backward (vendor/candle-core/PREFTUNE.md) stores a tensor's first
    /// gradient as it is: a tensor reached through a sum, a difference, a transpose and a product
    /// must still get the sum of all four contributions, and the shared upstream gradient must not
    /// be changed by that sum. `L = sum(w * (a + b - a^T + a * b))`.
    #[test]
    fn backward_sums_shared_and_viewed_gradients() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap();
        let (at, bt) = (a.as_tensor(), b.as_tensor());
        let y = ((at + bt).unwrap() - at.t().unwrap()).unwrap();
        let y = (y + at.mul(bt).unwrap()).unwrap();
        let g = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let v2 = |t: &Tensor| -> Vec<Vec<f64>> { t.to_vec2().unwrap() };
        let (av, bv, wv) = (v2(at), v2(bt), v2(&w));
        let (ga, gb) = (v2(g.get(at).unwrap()), v2(g.get(bt).unwrap()));
        for i in 0..3 {
            for j in 0..3 {
                let want_a = wv[i][j] - wv[j][i] + wv[i][j] * bv[i][j];
                let want_b = wv[i][j] + wv[i][j] * av[i][j];
                assert!((ga[i][j] - want_a).abs() < 1e-12, "dL/da[{i}][{j}]");
                assert!((gb[i][j] - want_b).abs() < 1e-12, "dL/db[{i}][{j}]");
            }
        }
    }

    /// Each op's gradient against central finite differences of the summed, randomly weighted output.
    fn check_grad(f: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, f(x.as_tensor()).unwrap().shape(), &dev).unwrap();
        let loss = |t: &Tensor| f(t).unwrap().mul(&w).unwrap().sum_all().unwrap();
        let grads = loss(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches input")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let lp = loss(&Tensor::from_vec(plus, shape, &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let lm = loss(&Tensor::from_vec(minus, shape, &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                "element {i}: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn ops_match_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f64, 0.1, 6, &dev).unwrap();
        let b = Tensor::randn(0f64, 0.1, 6, &dev).unwrap();
        check_grad(softmax_last, &[3, 6]);
        check_grad(logsumexp_last, &[3, 6]);
        check_grad(|x| rms_norm(x, &w, 1e-5), &[4, 6]);
        check_grad(|x| layer_norm(x, &w, &b, 1e-5), &[4, 6]);
        let cos = Tensor::randn(0f64, 1.0, (1, 1, 3, 2), &dev).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (1, 1, 3, 2), &dev).unwrap();
        check_grad(|x| rope(x, &cos, &sin), &[1, 2, 3, 4]);
        let lin = Linear::new(
            "lin",
            Tensor::randn(0f64, 1.0, (5, 6), &dev).unwrap(),
            Some(b.narrow(0, 0, 5).unwrap()),
        );
        check_grad(|x| lin.forward(x), &[2, 3, 6]);
    }

    #[test]
    fn unread_forward_gives_forwards_gradients_and_records_no_graph_in_them() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 1.0, (70, 5), &dev).unwrap();
        let xv = Tensor::randn(0f32, 1.0, (70, 6), &dev).unwrap();
        let wv = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        for (bf16, trainable) in [(false, true), (false, false), (true, true), (true, false)] {
            let _scope = Bf16Scope::new(bf16);
            let x = Var::from_tensor(&xv).unwrap();
            let w = match trainable {
                true => Var::from_tensor(&wv).unwrap().as_tensor().clone(),
                false => wv.clone(),
            };
            let l = Linear::new("l", w.clone(), None);
            let grads = |y: Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let plain = grads(l.forward(x.as_tensor()).unwrap());
            let y = l.forward_unread(x.as_tensor()).unwrap();
            assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let unread = grads(y);
            let case = format!("bf16 {bf16}, trainable {trainable}");
            let mut pairs = vec![(x.as_tensor(), "x")];
            if trainable {
                pairs.push((&w, "W"));
            } else {
                assert!(
                    unread.get(&w).is_none(),
                    "{case}: a frozen W gets no gradient"
                );
            }
            for (t, name) in pairs {
                let (a, b) = (plain.get(t).unwrap(), unread.get(t).unwrap());
                assert!(max_abs(a, b) < 1e-5, "{case}: {name}'s gradient differs");
                // A recorded graph would keep the layer's activations alive with the gradient.
                assert!(!b.track_op(), "{case}: {name}'s gradient records a graph");
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_the_same_one() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = Linear::new("l", w.clone(), None)
            .forward(x.as_tensor())
            .unwrap();
        assert!(max_abs(&plain, &frozen) < 1e-6, "same forward");
        let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gf = (frozen * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // candle's matmul stores a gradient for its `W^T` operand too; the frozen op does not.
        assert_eq!(gp.get_ids().count(), 3, "x, x W^T and W^T");
        assert_eq!(gf.get_ids().count(), 2, "x and the output only");
        assert!(gf.get(&w).is_none());
        let (dp, df) = (
            gp.get(x.as_tensor()).unwrap(),
            gf.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs(dp, df) < 1e-5, "same input gradient");
    }

    /// Under a [`Bf16Scope`] a linear's output and both gradients are the f64 products of the
    /// bf16-rounded operands (dy rounded too, as backward's products round their inputs), and
    /// without the scope the same linear is plain f32 again.
    #[test]
    fn bf16_linear_rounds_operands_in_forward_and_backward() {
        let dev = Device::Cpu;
        let (m, n, k) = (40, 24, 70);
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let lin = Linear::new("l", w.as_tensor().clone(), None);
        let y = {
            let _bf16 = Bf16Scope::new(true);
            lin.forward(x.as_tensor()).unwrap()
        };
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let r = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let (xr, wr, gr) = (r(x.as_tensor()), r(w.as_tensor()), r(&g));
        let close = |got: &Tensor, want: Tensor, what: &str| {
            let d = (got.to_dtype(DType::F64).unwrap() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0];
            assert!(d < 1e-4, "{what}: off by {d}");
        };
        close(&y, xr.matmul(&wr.t().unwrap()).unwrap(), "forward");
        close(
            grads.get(x.as_tensor()).expect("x gets a gradient"),
            gr.matmul(&wr).unwrap(),
            "dx",
        );
        close(
            grads.get(w.as_tensor()).expect("W gets a gradient"),
            gr.t().unwrap().matmul(&xr).unwrap(),
            "dW",
        );
        // Not plain f32: the rounding shows at this size.
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert!(max_abs(&plain, &y) > 1e-3, "bf16 products differ from f32");
        assert!(!bf16_enabled(), "the scope restored the previous setting");
        assert!(max_abs(&plain, &lin.forward(x.as_tensor()).unwrap()) < 1e-4);
    }

    /// Under a [`PackedWeights`] guard (bf16, with a bf16 GEMM) untracked products at any row
    /// count are the bf16 products, from one pack per weight; without either, the guard changes
    /// nothing.
    #[test]
    fn packed_weights_give_bf16_products_from_one_pack() {
        let dev = Device::Cpu;
        let (n, k) = (48, 70);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let lin = Linear::new("l", w.clone(), None);
        let r = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let packs = || PACKED.with(|c| c.borrow().as_ref().map(|m| m.len()));
        {
            let _plain = PackedWeights::new();
            assert_eq!(packs(), None, "no bf16 scope, no packing");
        }
        let _bf16 = Bf16Scope::new(true);
        let guard = PackedWeights::new();
        for m in [1, 16, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let got = lin.forward(&x).unwrap();
            let plain = x.matmul(&w.t().unwrap()).unwrap();
            if preftune_kernels::bf16gemm::available() {
                let want = r(&x).matmul(&r(&w).t().unwrap()).unwrap();
                assert!(max_abs(&got, &want) < 1e-4, "{m} rows: bf16 product");
                assert!(
                    max_abs(&got, &plain) > 1e-3,
                    "{m} rows: not the f32 product"
                );
                assert_eq!(packs(), Some(1), "one pack for the weight");
            } else {
                assert_eq!(packs(), None);
                assert!(max_abs(&got, &plain) < 1e-4, "{m} rows: f32");
            }
        }
        drop(guard);
        assert_eq!(packs(), None, "the packs go with the guard");
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn f32_ops_agree_with_reference_formulas() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 9.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2.0, -1.0], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.2, 0.3, 0.4], &dev).unwrap();
        let rows = x.to_vec2::<f32>().unwrap();
        let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let sm = softmax_last(&x).unwrap().to_vec2::<f32>().unwrap();
        let lse = logsumexp_last(&x).unwrap().to_vec2::<f32>().unwrap();
        let rms = rms_norm(&x, &w, 1e-5).unwrap().to_vec2::<f32>().unwrap();
        let ln = layer_norm(&x, &w, &b, 1e-5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in rows.iter().enumerate() {
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            let mean = row.iter().sum::<f32>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            assert!((lse[r][0] - z.ln()).abs() < 1e-5);
            for c in 0..4 {
                assert!((sm[r][c] - row[c].exp() / z).abs() < 1e-6);
                assert!((rms[r][c] - row[c] / (ms + 1e-5).sqrt() * wv[c]).abs() < 1e-5);
                assert!(
                    (ln[r][c] - ((row[c] - mean) / (var + 1e-5).sqrt() * wv[c] + bv[c])).abs()
                        < 1e-5
                );
            }
        }
    }

    /// Stacked linears give what separate ones give, values and gradients, with and without biases.
    #[test]
    fn linear_group_equals_separate_linears() {
        let dev = Device::Cpu;
        for with_bias in [false, true] {
            let mk = |name: &str, out: usize| {
                let w =
                    Var::from_tensor(&Tensor::randn(0f64, 1.0, (out, 6), &dev).unwrap()).unwrap();
                let b = with_bias.then(|| {
                    Var::from_tensor(&Tensor::randn(0f64, 1.0, out, &dev).unwrap())
                        .unwrap()
                        .as_tensor()
                        .clone()
                });
                Linear::new(name, w.as_tensor().clone(), b)
            };
            let ls = [mk("a", 5), mk("b", 3), mk("c", 4)];
            let refs: Vec<&Linear> = ls.iter().collect();
            let x = Tensor::randn(0f64, 1.0, (4, 16, 6), &dev).unwrap();
            let grouped = linear_group(&x, &refs).unwrap();
            let separate: Vec<Tensor> = ls.iter().map(|l| l.forward(&x).unwrap()).collect();
            let loss = |ys: &[Tensor]| {
                ys.iter()
                    .enumerate()
                    .map(|(i, y)| (y.sqr().unwrap().sum_all().unwrap() * (i + 1) as f64).unwrap())
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap()
            };
            let (ga, gb) = (
                loss(&grouped).backward().unwrap(),
                loss(&separate).backward().unwrap(),
            );
            for (y1, y2) in grouped.iter().zip(&separate) {
                let d = (y1 - y2)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d < 1e-12, "outputs differ by {d}");
            }
            for l in &ls {
                let mut ts = vec![&l.weight];
                ts.extend(l.bias.as_ref());
                for t in ts {
                    let d = (ga.get(t).unwrap() - gb.get(t).unwrap())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert!(d < 1e-10, "{}: gradients differ by {d}", l.name);
                }
            }
        }
    }
}
