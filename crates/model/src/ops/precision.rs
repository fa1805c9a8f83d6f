//! Which product a matmul runs: bf16 mixed precision (`Bf16Scope`), a training forward's products
//! (`TrainingProducts`), weights packed once for a sampling loop (`PackedWeights`), and the bf16
//! matmul op with its backward.
use super::*;

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
/// A reference model scored under it rounds as the policy's training pass does, so a policy equal
/// to its reference starts DPO at exactly ln 2.
#[must_use = "applies only while the guard lives"]
pub struct TrainingProducts(bool);

impl TrainingProducts {
    pub fn new() -> Self {
        TrainingProducts(TRAINING.with(|c| c.replace(true)))
    }
}

impl Default for TrainingProducts {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TrainingProducts {
    fn drop(&mut self) {
        TRAINING.with(|c| c.set(self.0));
    }
}

pub(crate) fn training_products() -> bool {
    TRAINING.with(|c| c.get())
}

/// Whether a [`Bf16Scope`] has switched bf16 products on for this thread.
pub fn bf16_enabled() -> bool {
    BF16.with(|c| c.get())
}

pub(super) fn bf16_applies(x: &Tensor, w: &Tensor) -> bool {
    bf16_enabled()
        && kernels::cpu_kernels(x.device())
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
}

/// Whether `x W^T` is [`bf16_composed_matmul`]'s: `bf16 = true` off the CPU's kernels (a GPU, or
/// its code path on the CPU) over an f32 weight. A bf16 `x` is an activation kept in bf16
/// ([`bf16_product`]'s callers).
pub(super) fn composed_bf16_applies(x: &Tensor, w: &Tensor) -> bool {
    bf16_enabled()
        && !kernels::cpu_kernels(x.device())
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && w.dtype() == DType::F32
}

/// `x W^T` with both operands cast to bf16 and the product cast back to f32, from candle ops: the
/// bf16 product on devices without our GEMMs (cuBLAS sums bf16 products in f32). The gradients
/// flow through the casts, so backward's products are bf16 too.
pub(super) fn bf16_composed_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    composed_with_bf16_weight(x, &w.to_dtype(DType::BF16)?)
}

/// [`bf16_composed_matmul`]'s product left in bf16.
pub(super) fn bf16_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    bf16_product_with(x, &w.to_dtype(DType::BF16)?)
}

/// `x W^T` in bf16 with `W` already in bf16 (`wb`).
fn bf16_product_with(x: &Tensor, wb: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::BF16)?.matmul(&wb.t()?)
}

/// [`bf16_composed_matmul`] with `W` already in bf16 (`wb`).
fn composed_with_bf16_weight(x: &Tensor, wb: &Tensor) -> Result<Tensor> {
    bf16_product_with(x, wb)?.to_dtype(DType::F32)
}

/// `x W^T` (`x`: `[m, k]`, `W`: `[n, k]`) in bf16 with f32 sums, in forward and backward; `W`'s
/// gradient is computed only when `W` takes one.
pub fn bf16_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul(x, w, Products::Bf16, false)
}

/// `x W^T` in f32 on the CPU, training a weight: candle's matmul gives `W` its gradient as the
/// transpose of `x^T dy`, a strided view that has to be copied before it can be read; this op's
/// backward writes `dy^T x` straight into `W`'s layout.
pub(super) fn f32_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul(x, w, Products::F32, false)
}

fn matmul(x: &Tensor, w: &Tensor, products: Products, unread: bool) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Matmul { unread, products })
}

/// `x W^T` with the backward [`Linear::forward`] would give it, and zeros as its value.
pub(super) fn unread_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if bf16_applies(x, w) {
        return matmul(x, w, Products::Bf16, true);
    }
    if !w.track_op() {
        return x.apply_op1(FrozenMatmul {
            x: x.detach(),
            w: w.detach(),
            unread: true,
        });
    }
    matmul(x, w, Products::F32, true)
}

/// The value of an unread `m x n` product: zeros, which nothing reads.
pub(super) fn unread_value(m: usize, n: usize) -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n)))
}

/// `dy W` (`dy`: `[m, n]`, `W`: `[n, k]`), the input's gradient of `x W^T`, in bf16 with f32 sums.
pub(super) fn bf16_input_grad(grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    input_grad(grad, w, Products::Bf16)
}

fn input_grad(grad: &Tensor, w: &Tensor, products: Products) -> Result<Tensor> {
    use preftune_kernels::bf16gemm::View;
    let ((m, n), k) = (grad.dims2()?, w.dim(1)?);
    let dx = product_of(grad, w, |g, wv| {
        products.nt(View::rows(g, m, n), View::transposed(wv, k, n))
    })?;
    Tensor::from_vec(dx, (m, k), grad.device())
}

/// How a [`Matmul`] multiplies, forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Products {
    /// bf16 operands, f32 sums ([`preftune_kernels::bf16gemm`]).
    Bf16,
    /// f32 throughout ([`preftune_kernels::f32gemm`]).
    F32,
}

impl Products {
    /// `A B^T` into a new buffer.
    fn nt(
        self,
        a: preftune_kernels::bf16gemm::View,
        b: preftune_kernels::bf16gemm::View,
    ) -> Vec<f32> {
        match self {
            Products::Bf16 => preftune_kernels::bf16gemm::gemm_nt_new(a, b),
            Products::F32 => preftune_kernels::f32gemm::gemm_nt_new(a, b),
        }
    }
}

/// `x W^T` on the CPU with a hand-written backward. `unread`: the value is zeros and the product
/// is skipped (see [`Linear::forward_unread`]).
pub(super) struct Matmul {
    unread: bool,
    products: Products,
}

thread_local! {
    pub(super) static PACKED: std::cell::RefCell<Option<PackedMap>> = const { std::cell::RefCell::new(None) };
}

type PackedMap = std::collections::HashMap<candle_core::TensorId, Packed>;

/// A weight as a [`PackedWeights`] guard keeps it for the loop.
#[derive(Clone)]
pub(super) enum Packed {
    /// Packed for this CPU's bf16 GEMM (AMX or AVX-512 BF16).
    Cpu(std::rc::Rc<preftune_kernels::bf16gemm::PackedB>),
    /// A bf16 copy on a device without our CPU kernels (a GPU): the composed bf16 product
    /// ([`bf16_composed_matmul`]) would cast the f32 weight again at every step.
    Device(Tensor),
}

/// While the guard lives under a [`Bf16Scope`], this thread's untracked bf16 products keep each
/// weight in the form they multiply it in, made on first use and reused:
/// - on a CPU with a bf16 GEMM (AMX or AVX-512 BF16), packed for it. Sampling multiplies the same
///   weights at every step with a few rows, where packing per call would cost more than the
///   product; packed once, a step streams the weights as bf16, half the bytes of f32;
/// - on a GPU, as a bf16 copy. Casting per product reads the f32 weight and writes its bf16 copy
///   before the GEMM reads that: four times the bytes a decoding step has to move.
///
/// On a GPU the products are the composed ones to the bit; on the CPU they are bf16 products at
/// any row count (without the guard, a product of a few rows multiplies in f32). Weights must not
/// change in place while it lives (a sampling loop does not change them); the copies are freed
/// with the guard. A guard made while another lives on the thread shares its copies (a command
/// that samples many times from the same weights packs them once).
#[must_use = "weights are packed only while the guard lives"]
pub struct PackedWeights {
    /// What the thread had before this guard, restored when it drops.
    prev: Option<PackedMap>,
    /// Made under a live guard: shares its copies and restores nothing.
    nested: bool,
}

impl PackedWeights {
    /// Active only under a [`Bf16Scope`]; otherwise a guard that does nothing.
    pub fn new() -> Self {
        if packing() {
            return PackedWeights {
                prev: None,
                nested: true,
            };
        }
        let on = bf16_enabled();
        PackedWeights {
            prev: PACKED.with(|c| c.replace(on.then(PackedMap::new))),
            nested: false,
        }
    }
}

impl Default for PackedWeights {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PackedWeights {
    fn drop(&mut self) {
        if !self.nested {
            PACKED.with(|c| *c.borrow_mut() = self.prev.take());
        }
    }
}

/// Whether a [`PackedWeights`] guard is packing on this thread.
pub(super) fn packing() -> bool {
    PACKED.with(|c| c.borrow().is_some())
}

/// `w` as this thread's [`PackedWeights`] holds it, made by `make` on first use.
fn packed(w: &Tensor, make: impl FnOnce() -> Result<Packed>) -> Result<Packed> {
    let cached = PACKED.with(|c| c.borrow().as_ref().and_then(|p| p.get(&w.id()).cloned()));
    if let Some(p) = cached {
        return Ok(p);
    }
    let p = make()?;
    PACKED.with(|c| {
        if let Some(map) = c.borrow_mut().as_mut() {
            map.insert(w.id(), p.clone());
        }
    });
    Ok(p)
}

/// The dtype a sampling loop's KV cache keeps `k` in: bf16 while a [`PackedWeights`] guard packs
/// under bf16 products on a device without our CPU kernels (a GPU), where each decoding step reads
/// the whole cache and f32 keys and values would double those reads; `k`'s own dtype otherwise
/// (the CPU's attention kernels read f32).
pub(crate) fn cache_dtype(k: &Tensor) -> DType {
    match packing()
        && bf16_enabled()
        && !kernels::cpu_kernels(k.device())
        && k.dtype() == DType::F32
    {
        true => DType::BF16,
        false => k.dtype(),
    }
}

/// `x W^T` with `W` from this thread's [`PackedWeights`] (packed on first use), when one is active
/// and the product is an untracked f32 one under bf16: on the CPU through its bf16 GEMM (none
/// without one), elsewhere with a bf16 copy of `W`.
pub(super) fn packed_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let applies = packing()
        && bf16_enabled()
        && !x.track_op()
        && !w.track_op()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32;
    if !applies {
        return Ok(None);
    }
    if !kernels::cpu_kernels(x.device()) {
        let Packed::Device(wb) = packed(w, || Ok(Packed::Device(w.to_dtype(DType::BF16)?)))? else {
            candle_core::bail!("packed_matmul: a CPU pack for a device product")
        };
        return composed_with_bf16_weight(x, &wb).map(Some);
    }
    if !preftune_kernels::bf16gemm::available() {
        return Ok(None);
    }
    let ((m, k), n) = (x.dims2()?, w.dim(0)?);
    let Packed::Cpu(pack) = packed(w, || {
        with_f32(w, |wv| {
            let v = preftune_kernels::bf16gemm::View::rows(wv, n, k);
            Packed::Cpu(std::rc::Rc::new(preftune_kernels::bf16gemm::PackedB::new(
                v,
            )))
        })
    })?
    else {
        candle_core::bail!("packed_matmul: a device copy for a CPU product")
    };
    let y = with_f32(x, |xv| {
        preftune_kernels::bf16gemm::gemm_packed_new(
            preftune_kernels::bf16gemm::View::rows(xv, m, k),
            &pack,
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
pub(super) fn product_of(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
) -> Result<Vec<f32>> {
    with_f32(a, |av| with_f32(b, |bv| f(av, bv)))?
}

impl candle_core::CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        match self.products {
            Products::Bf16 => "preftune-bf16-matmul",
            Products::F32 => "preftune-f32-matmul",
        }
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
        let y = self.products.nt(
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
        use preftune_kernels::bf16gemm::View;
        let ((m, k), n) = (x.dims2()?, w.dim(0)?);
        // dx = dy W: rows of dy against columns of W; none for an input that takes no gradient
        // (the first layer's under LoRA).
        let dx = x
            .track_op()
            .then(|| input_grad(grad, w, self.products))
            .transpose()?;
        if !w.track_op() {
            return Ok((dx, None));
        }
        // dW = dy^T x: columns of dy against columns of x, in W's own layout.
        let dw = product_of(grad, x, |g, xv| {
            self.products
                .nt(View::transposed(g, n, m), View::transposed(xv, k, m))
        })?;
        Ok((dx, Some(Tensor::from_vec(dw, (n, k), w.device())?)))
    }
}
