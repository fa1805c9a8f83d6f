//! Fused CPU kernels with hand-written backward passes: RMSNorm, RoPE, SwiGLU and the attention
//! probabilities `softmax(scale * Q K^T + mask)`.
//!
//! Composed from candle ops, each of these makes several passes over memory and keeps every
//! intermediate for backward (an RMSNorm keeps five tensors the size of its input, a softmax six the
//! size of the scores). These make one pass and keep only their inputs (and, for attention, the
//! probabilities, which `P V` needs anyway); backward recomputes the cheap rest. Each is checked
//! against finite differences and against the composed version in `ops`. They run on CPU in f32 and
//! f64; other dtypes and devices take the composed path.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, WithDType,
};
use num_traits::Zero;
use preftune_kernels::fused;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// The element types the kernels are written for: those of the slice loops
/// ([`preftune_kernels::fused::Real`]) that candle stores.
pub trait Real: preftune_kernels::fused::Real + WithDType {}
impl<T: preftune_kernels::fused::Real + WithDType> Real for T {}

static FUSED: AtomicBool = AtomicBool::new(true);

/// Switches the fused kernels on or off for the whole process (the benchmark compares both).
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the guard lives, this thread runs CPU tensors the way it runs tensors on any other
/// device (CUDA): every op composed from candle ops, no CPU kernels (fused ops, bf16 and
/// decoding GEMMs, in-place updates). This is how the GPU's code path is tested on machines
/// without one. Per thread, like [`crate::ops::Bf16Scope`].
#[must_use = "applies only while the guard lives"]
pub struct PortableScope(bool);

impl PortableScope {
    pub fn new(on: bool) -> Self {
        PortableScope(PORTABLE.with(|c| c.replace(on)))
    }
}

impl Drop for PortableScope {
    fn drop(&mut self) {
        PORTABLE.with(|c| c.set(self.0));
    }
}

/// Whether tensors on `d` take our CPU kernels: on the CPU, outside a [`PortableScope`].
pub fn cpu_kernels(d: &candle_core::Device) -> bool {
    d.is_cpu() && !PORTABLE.with(|c| c.get())
}

/// Whether the fused CPU kernels handle `x`: switched on, CPU kernels ([`cpu_kernels`]), f32 or
/// f64.
pub fn applies(x: &Tensor) -> bool {
    FUSED.load(Ordering::Relaxed)
        && cpu_kernels(x.device())
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether RMSNorm, SwiGLU and RoPE on `x` take a fused op: the CPU's ([`applies`]) or, on a GPU,
/// `preftune-kernels-cuda`'s ([`cuda_kernels_apply`]) in f32, bf16 or f64. (The other fused
/// ops, attention and the LM head, are CPU-only.)
pub fn elementwise_applies(x: &Tensor) -> bool {
    applies(x)
        || (FUSED.load(Ordering::Relaxed)
            && x.elem_count() > 0
            && cuda_kernels_apply(x.device())
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F64))
}

/// Whether attention with queries `q` (head size `dh`) runs as [`crate::flash::flash_attention`]:
/// on a GPU with [`cuda_kernels_apply`], in f32, bf16 or f64, at a head size the kernels are
/// built for (`preftune_kernels_cuda::flash_head_sizes`).
pub fn flash_applies(q: &Tensor, dh: usize) -> bool {
    #[cfg(feature = "cuda")]
    return FUSED.load(Ordering::Relaxed)
        && cuda_kernels_apply(q.device())
        && crate::cuda_kernels::flash_built(q.dtype(), dh, false);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, dh);
        false
    }
}

/// Whether a decoding step's attention (one new position a row, outside autograd) runs
/// [`crate::flash::flash_decode`]: on a GPU with preftune's kernels, in f32 or bf16 (queries,
/// keys and values alike), at most `DECODE_MAX_REP` query heads a KV group (`q`:
/// `[B, G, rep, dh]`), a head size the kernel is built for, and keys and values laid out as a
/// cache buffer ([`crate::flash::kv_group_stride`]).
pub fn decode_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        let (Ok((_, _, rep, dh)), dtype) = (q.dims4(), q.dtype()) else {
            return false;
        };
        FUSED.load(Ordering::Relaxed)
            && cuda_kernels_apply(q.device())
            && k.dtype() == dtype
            && v.dtype() == dtype
            && crate::cuda_kernels::decode_built(dtype, dh, rep)
            && crate::flash::kv_pair_stride(k.layout(), v.layout()).is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v);
        false
    }
}

/// Keys from which attention on the CPU runs in tiles ([`crate::flash::flash_attention_host`]):
/// neither scores nor probabilities stored, and the tiles a causal mask hides skipped. Below it
/// the probabilities op and one GEMM with V are as fast (one tile would hold every key).
pub const CPU_FLASH_MIN_KEYS: usize = 256;

/// [`CPU_FLASH_MIN_KEYS`] under bf16 products, where the tiles multiply in bf16 and the composed
/// path in f32: `bench --workload fwd-bwd --train-batch 8 --seq-len 128 --bf16` ran at 317 / 332
/// model GFLOP/s from 256 keys, 349 / 396 from 128 (alternating).
pub const CPU_FLASH_MIN_KEYS_BF16: usize = 128;

/// Whether attention with queries `q` for `t` new positions over `tk` keys runs in tiles on the
/// CPU: not for a decoding step (`t` = 1), which reads a KV cache in place.
pub fn cpu_flash_applies(q: &Tensor, t: usize, tk: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let min = match crate::ops::bf16_enabled() && q.dtype() == DType::F32 {
        true => CPU_FLASH_MIN_KEYS_BF16,
        false => CPU_FLASH_MIN_KEYS,
    };
    applies(q)
        && t > 1
        && tk >= min
        && !*OFF.get_or_init(|| std::env::var("PREFTUNE_CPU_FLASH").is_ok_and(|v| v == "0"))
}

/// Whether tensors on `d` take preftune's own CUDA kernels (`preftune-kernels-cuda`): a CUDA
/// device in a `cuda` build, with `PREFTUNE_CUDA_KERNELS=1`. Off by default until
/// `scripts/gpu-check.sh` has compared them with the composed ops on a GPU; without them every
/// op on the GPU is composed from candle's.
pub fn cuda_kernels_apply(d: &candle_core::Device) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda")
        && d.is_cuda()
        && *ON.get_or_init(|| std::env::var("PREFTUNE_CUDA_KERNELS").is_ok_and(|v| v == "1"))
}

pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(Error::Msg(format!("{op}: inputs must be contiguous"))),
    }
}

/// The contiguous f32 values `l` describes in `s`, to write in place (an in-place op's
/// destination).
pub fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        return Err(Error::Msg(format!("{op}: f32 only")));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => Err(Error::Msg(format!("{op}: contiguous tensors only"))),
    }
}

/// The contiguous values of a CPU storage of any float type, as f64: the exact reference loop of
/// an op whose real kernel runs on the GPU ([`crate::lse_gather`]).
pub(crate) fn cpu_as_f64(s: &CpuStorage, l: &Layout, op: &str) -> Result<Vec<f64>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: inputs must be contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        _ => return Err(Error::Msg(format!("{op}: float inputs expected"))),
    })
}

/// The dtype a kernel sums in for inputs of `dtype` (and returns per-row results such as
/// log-sum-exps in): f64 for f64, f32 for everything else.
pub(crate) fn sum_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `values` as a CPU storage of `dtype` (a float type).
pub(crate) fn cpu_from_f64(values: Vec<f64>, dtype: DType, op: &str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(values),
        DType::F32 => CpuStorage::F32(values.into_iter().map(|x| x as f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f64).collect()),
        other => return Err(Error::Msg(format!("{op}: no {other:?} output"))),
    })
}

/// Dispatches a kernel generic over `Real` on the dtype of the first storage.
macro_rules! dispatch {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => Err(Error::Msg(format!("{}: only f32 and f64", $name))),
        }
    };
}
pub(crate) use dispatch;

pub(crate) fn storage<T: Real>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "preftune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), |T| {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let out = fused::rms_norm(x, w, self.eps);
            Ok((storage(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda_kernels::rms_norm(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        // A copy of `d` values, not a view: the weight's gradient stays in the gradient store until
        // the optimiser step, and a view would keep the whole `[rows, d]` buffer of `dx` alive
        // with it. (`copy` would not do: on the CPU it clones the whole buffer.)
        let dw = flat
            .narrow(0, n, d)?
            .reshape(w.shape())?
            .force_contiguous()?;
        Ok((Some(dx), Some(dw)))
    }
}

/// With `n = x * inv` and `g = dy * w`: `dx = inv * (g - n * mean(g * n))`, `dw = sum_rows(dy * n)`.
/// Output: `dx` flattened, then `dw`.
struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "preftune-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), |T| {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            let (n, d) = (x.len(), w.len());
            let mut out = vec![T::zero(); n + d];
            fused::rms_norm_bwd(x, w, dy, self.eps, &mut out);
            Ok((storage(out), Shape::from(n + d)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda_kernels::rms_norm_bwd((s1, l1), (s2, l2), (s3, l3), self.eps)
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "preftune-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(Error::Msg("swiglu: gate and up differ in shape".into()));
        }
        dispatch!(s1, self.name(), |T| {
            let g = slice::<T>(s1, l1, self.name())?;
            let u = slice::<T>(s2, l2, self.name())?;
            let row = *l1.dims().last().unwrap_or(&1);
            let out = fused::swiglu(g, u, row);
            Ok((storage(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(Error::Msg("swiglu: gate and up differ in shape".into()));
        }
        crate::cuda_kernels::swiglu(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let flat = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBwd)?;
        let dg = flat.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = flat.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// `d gate = dy * up * s * (1 + gate * (1 - s))`, `d up = dy * gate * s` with `s = sigmoid(gate)`.
/// Output: `d gate` flattened, then `d up`.
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "preftune-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, self.name(), |T| {
            let g = slice::<T>(s1, l1, self.name())?;
            let u = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            let n = g.len();
            let row = *l1.dims().last().unwrap_or(&1);
            let out = fused::swiglu_bwd(g, u, dy, row);
            Ok((storage(out), Shape::from(2 * n)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        crate::cuda_kernels::swiglu_bwd((s1, l1), (s2, l2), (s3, l3))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE. `x`: `[B, H, T, Dh]`; `cos`, `sin`: `[B, 1, T, Dh/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

/// The rotation is orthogonal: its backward is the same rotation by `-sin`.
struct Rope;

/// `(b, h, t, dh)` of RoPE's `x`, with `cos` and `sin` checked against them.
fn rope_dims(x: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (b, h, t, dh) = x.shape().dims4()?;
    let half = dh / 2;
    if dh % 2 != 0 || cos.shape().dims() != [b, 1, t, half] || sin.shape() != cos.shape() {
        return Err(Error::Msg(format!(
            "rope: x {:?} needs an even head size and cos/sin [{b}, 1, {t}, {half}], got {:?}",
            x.dims(),
            cos.shape()
        )));
    }
    Ok((b, h, t, dh))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "preftune-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, h, t, dh) = rope_dims(l1, l2, l3)?;
        dispatch!(s1, self.name(), |T| {
            let x = slice::<T>(s1, l1, self.name())?;
            let cos = slice::<T>(s2, l2, self.name())?;
            let sin = slice::<T>(s3, l3, self.name())?;
            let out = fused::rope(x, cos, sin, h, t, dh);
            Ok((storage(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = rope_dims(l1, l2, l3)?;
        crate::cuda_kernels::rope((s1, l1), (s2, l2), (s3, l3), dims)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities

/// An additive attention mask `[B, T, Tk]` (0 or a large negative value), shared by all layers.
#[derive(Clone, Debug)]
pub struct AttnMask {
    pub data: Arc<Vec<f32>>,
    pub b: usize,
    pub t: usize,
    pub tk: usize,
}

/// `softmax(scale * Q K^T + mask)` for grouped-query attention laid out as the model does:
/// `q: [B, G, R*T, Dh]` (the `R` query heads sharing KV group `G` stacked along time),
/// `k: [B, G, Tk, Dh]`; result `[B, G, R*T, Tk]`. The scores never exist as a tensor of their own:
/// the graph keeps `q`, `k` and the probabilities only.
pub fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    t: usize,
    scale: f64,
    mask: Option<&AttnMask>,
) -> Result<Tensor> {
    q.contiguous()?.apply_op2(
        &rows_contiguous(k)?,
        AttnProbs {
            t,
            scale,
            mask: mask.cloned(),
        },
    )
}

/// `x` (`[B, G, T, Dh]`) as is when its rows are contiguous (a view into a preallocated KV cache:
/// batch and group strided), else a contiguous copy.
fn rows_contiguous(x: &Tensor) -> Result<Tensor> {
    match x.stride() {
        [_, _, s2, 1] if *s2 == x.dim(3)? => Ok(x.clone()),
        // Not `contiguous()`: candle counts a size-1 dimension as contiguous whatever its stride
        // (one key, as at a one-token prompt), and would hand back the odd stride.
        _ => x.force_contiguous(),
    }
}

/// Checks that `mask` (if any) covers `[b, t, tk]` scores.
fn check_mask(mask: Option<&AttnMask>, b: usize, t: usize, tk: usize, op: &str) -> Result<()> {
    match mask {
        Some(m) if (m.b, m.t, m.tk) != (b, t, tk) => Err(Error::Msg(format!(
            "{op}: mask is [{}, {}, {}], scores need [{b}, {t}, {tk}]",
            m.b, m.t, m.tk
        ))),
        _ => Ok(()),
    }
}

/// Whether two layouts of one shape step through memory alike: strides of dimensions of extent 1
/// never move, so they may differ (one key/value head: `k` made contiguous by RoPE, `v` a
/// transposed view).
fn same_strides(a: &Layout, b: &Layout) -> bool {
    a.dims()
        .iter()
        .zip(a.stride().iter().zip(b.stride()))
        .all(|(&n, (x, y))| n == 1 || x == y)
}

/// Batch and group strides of K (or V) laid out as [`rows_contiguous`] leaves it.
fn kv_strides(l: &Layout, dh: usize, op: &str) -> Result<(usize, usize)> {
    match l.stride() {
        [s0, s1, s2, 1] if *s2 == dh => Ok((*s0, *s1)),
        _ => Err(Error::Msg(format!(
            "{op}: k (and v) rows must be contiguous"
        ))),
    }
}

struct AttnProbs {
    t: usize,
    scale: f64,
    mask: Option<AttnMask>,
}

impl CustomOp2 for AttnProbs {
    fn name(&self) -> &'static str {
        "preftune-attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, g, rt, dh) = l1.shape().dims4()?;
        let (kb, kg, tk, kdh) = l2.shape().dims4()?;
        if (kb, kg, kdh) != (b, g, dh) || rt % self.t != 0 {
            return Err(Error::Msg(format!(
                "attention: q {:?} and k {:?} do not match",
                l1.shape(),
                l2.shape()
            )));
        }
        check_mask(self.mask.as_ref(), b, self.t, tk, "attention")?;
        let (ks0, ks1) = kv_strides(l2, dh, "attention")?;
        dispatch!(s1, self.name(), |T| {
            let q = slice::<T>(s1, l1, self.name())?;
            let k = &s2.as_slice::<T>()?[l2.start_offset()..];
            let mut out = vec![T::zero(); b * g * rt * tk];
            let shape = fused::ProbsShape {
                g,
                rt,
                tk,
                dh,
                ks0,
                ks1,
            };
            let mask = self.mask.as_ref().map(|m| (&m.data[..], self.t));
            fused::attention_probs(q, k, shape, self.scale, mask, &mut out);
            Ok((storage(out), Shape::from((b, g, rt, tk))))
        })
    }

    /// `dS = scale * P * (dP - rowsum(dP * P))`, then `dQ = dS K`, `dK = dS^T Q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// `scale * P * (dP - rowsum(dP * P))` over the last dimension.
struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "preftune-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let row = *l1.dims().last().unwrap_or(&1);
        dispatch!(s1, self.name(), |T| {
            let p = slice::<T>(s1, l1, self.name())?;
            let dp = slice::<T>(s2, l2, self.name())?;
            let mut out = vec![T::zero(); p.len()];
            fused::softmax_bwd(p, dp, row, self.scale, &mut out);
            Ok((storage(out), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Attention without a graph (decoding)

/// Query rows per KV group up to which [`attention_untracked`] applies: a decoding step's few
/// rows, where the GEMM calls of [`attention_probs`] and `P V` (two per group and layer, each
/// packing its operands) cost far more than their arithmetic. Longer inputs keep the GEMMs.
pub const UNTRACKED_MAX_ROWS: usize = 32;

/// `softmax(scale Q K^T + mask) V` in one pass per KV group, for inputs without gradients, in
/// f32: `q: [B, G, R*T, Dh]`, `k`, `v`: `[B, G, Tk, Dh]` (views into a KV cache are fine: rows
/// contiguous, batch and group strided); result `[B, G, R*T, Dh]`. Neither scores nor
/// probabilities are stored.
pub fn attention_untracked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
    mask: Option<&AttnMask>,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &rows_contiguous(k)?,
        &rows_contiguous(v)?,
        &AttnUntracked {
            t,
            scale: scale as f32,
            mask: mask.cloned(),
        },
    )
}

struct AttnUntracked {
    t: usize,
    scale: f32,
    mask: Option<AttnMask>,
}

impl CustomOp3 for AttnUntracked {
    fn name(&self) -> &'static str {
        "preftune-attention-untracked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (b, g, rt, dh) = l1.shape().dims4()?;
        let (_, _, tk, _) = l2.shape().dims4()?;
        if l2.shape() != l3.shape()
            || l2.shape().dims4()? != (b, g, tk, dh)
            || rt % self.t != 0
            || !same_strides(l2, l3)
        {
            return Err(Error::Msg(format!(
                "{name}: q {:?}, k {:?}, v {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )));
        }
        check_mask(self.mask.as_ref(), b, self.t, tk, name)?;
        let (ks0, ks1) = kv_strides(l2, dh, name)?;
        let q = slice::<f32>(s1, l1, name)?;
        let k = &s2.as_slice::<f32>()?[l2.start_offset()..];
        let v = &s3.as_slice::<f32>()?[l3.start_offset()..];
        let mut out = vec![0f32; b * g * rt * dh];
        let group = |grp: usize, o: &mut [f32]| {
            let at = (grp / g) * ks0 + (grp % g) * ks1;
            let (kg, vg) = (&k[at..][..tk * dh], &v[at..][..tk * dh]);
            let mask = self
                .mask
                .as_ref()
                .map(|m| (&m.data[(grp / g) * self.t * tk..], self.t));
            let qg = &q[grp * rt * dh..][..rt * dh];
            let g = preftune_kernels::attention::Group {
                q: qg,
                k: kg,
                v: vg,
                mask,
                scale: self.scale,
                tk,
                dh,
            };
            preftune_kernels::attention::attend(&g, o)
        };
        use rayon::prelude::*;
        if b * g * rt * tk * dh < 1 << 16 {
            out.chunks_mut(rt * dh)
                .enumerate()
                .for_each(|(i, o)| group(i, o));
        } else {
            out.par_chunks_mut(rt * dh)
                .enumerate()
                .for_each(|(i, o)| group(i, o));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g, rt, dh))))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops;
    use candle_core::{Device, Storage, Var};

    type Op<'a> = dyn Fn(&[Tensor]) -> Result<Tensor> + 'a;

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Gradients of `sum(f(inputs) * w)` with respect to the first `n` inputs.
    fn grads(f: &Op, inputs: &[Tensor], w: &Tensor, n: usize) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let g = out.mul(w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = ts[..n]
            .iter()
            .map(|t| g.get(t).expect("gradient reaches every input").clone())
            .collect();
        (out, gs)
    }

    /// A tensor's values as f64, flattened.
    pub(crate) fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
        let (a, b) = (flat(a), flat(b));
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// The fused op against finite differences (f64) for every input with a gradient, and against
    /// the composed op in f64 and f32 (values and gradients).
    fn check(fused: &Op, composed: &Op, shapes: &[&[usize]], n_grads: usize) {
        let inputs: Vec<Tensor> = shapes.iter().map(|s| randn(s, DType::F64)).collect();
        let out_shape = fused(&inputs).unwrap().dims().to_vec();
        let w = randn(&out_shape, DType::F64);
        let (out, g) = grads(fused, &inputs, &w, n_grads);
        let (out_c, g_c) = grads(composed, &inputs, &w, n_grads);
        assert_close(&out, &out_c, 1e-12, "f64 output vs composed");
        for i in 0..n_grads {
            assert_close(&g[i], &g_c[i], 1e-10, &format!("f64 grad {i} vs composed"));
            // Central differences on every element.
            let base = flat(&inputs[i]);
            let gi = flat(&g[i]);
            let eps = 1e-6;
            for e in 0..base.len() {
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[e] += delta;
                    let mut xs = inputs.clone();
                    xs[i] = Tensor::from_vec(v, shapes[i], &Device::Cpu).unwrap();
                    fused(&xs)
                        .unwrap()
                        .mul(&w)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
                assert!(
                    (fd - gi[e]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "input {i} element {e}: kernel gradient {} vs finite difference {fd}",
                    gi[e]
                );
            }
        }
        let inputs32: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let (out, g) = grads(fused, &inputs32, &w32, n_grads);
        let (out_c, g_c) = grads(composed, &inputs32, &w32, n_grads);
        assert_close(&out, &out_c, 1e-5, "f32 output vs composed");
        for i in 0..n_grads {
            assert_close(&g[i], &g_c[i], 1e-4, &format!("f32 grad {i} vs composed"));
        }
    }

    #[test]
    fn rms_norm_matches_composed_and_finite_differences() {
        check(
            &|x| rms_norm(&x[0], &x[1], 1e-5),
            &|x| ops::rms_norm_composed(&x[0], &x[1], 1e-5),
            &[&[2, 3, 8], &[8]],
            2,
        );
    }

    /// The norm weight's gradient is kept until the optimiser step; as a view it would pin the
    /// `[rows, d]` buffer it was cut from (30 layers x 2 norms x a batch of rows, in SmolLM2).
    #[test]
    fn rms_norm_weight_gradient_owns_its_storage() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 8), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, 8, &dev).unwrap()).unwrap();
        let g = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dw = g.get(w.as_tensor()).unwrap();
        let (st, _) = dw.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(buf)) = &*st else {
            panic!("f32 CPU gradient expected")
        };
        assert_eq!(
            buf.len(),
            8,
            "the gradient of w is a view into a larger buffer"
        );
    }

    #[test]
    fn swiglu_matches_composed_and_finite_differences() {
        check(
            &|x| swiglu(&x[0], &x[1]),
            &|x| x[0].silu()? * &x[1],
            &[&[2, 3, 5], &[2, 3, 5]],
            2,
        );
    }

    #[test]
    fn rope_matches_composed_and_finite_differences() {
        check(
            &|x| rope(&x[0], &x[1], &x[2]),
            &|x| ops::rope_composed(&x[0], &x[1], &x[2]),
            &[&[2, 3, 4, 6], &[2, 1, 4, 3], &[2, 1, 4, 3]],
            1,
        );
    }

    /// Grouped-query layout (2 KV groups of 2 query heads), a padded key and causal masking.
    /// The untracked kernel against probabilities times V, with a mask, grouped query heads, a
    /// head size off the 16-lane width, and K/V as views into a larger (cache) buffer.
    #[test]
    fn untracked_attention_matches_probs_times_v() {
        for (t, dh) in [(1, 64), (2, 20)] {
            let (b, g, r, tk, cap) = (3, 2, 3, 37, 50);
            let mut m = vec![0f32; b * t * tk];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..tk {
                        if j > tk - t + i || (bi == 1 && j < 5) {
                            m[(bi * t + i) * tk + j] = -1e9;
                        }
                    }
                }
            }
            let mask = AttnMask {
                data: Arc::new(m),
                b,
                t,
                tk,
            };
            let q = randn(&[b, g, r * t, dh], DType::F32);
            let k = randn(&[b, g, cap, dh], DType::F32)
                .narrow(2, 0, tk)
                .unwrap();
            let v = randn(&[b, g, cap, dh], DType::F32)
                .narrow(2, 0, tk)
                .unwrap();
            let scale = 1.0 / (dh as f64).sqrt();
            for mk in [None, Some(&mask)] {
                let got = attention_untracked(&q, &k, &v, t, scale, mk).unwrap();
                let want = attention_probs(&q, &k, t, scale, mk)
                    .unwrap()
                    .matmul(&v.contiguous().unwrap())
                    .unwrap();
                assert_close(&got, &want, 1e-5, "untracked attention");
            }
        }
    }

    #[test]
    fn attention_probs_match_composed_and_finite_differences() {
        let (b, g, r, t, tk, dh) = (2, 2, 2, 3, 4, 5);
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..tk {
                    // one cached position, then causal; batch 1 has its first key padded
                    if j > i + 1 || (bi == 1 && j == 0) {
                        m[(bi * t + i) * tk + j] = -1e9;
                    }
                }
            }
        }
        let mask = AttnMask {
            data: Arc::new(m.clone()),
            b,
            t,
            tk,
        };
        let scale = 1.0 / (dh as f64).sqrt();
        let mask_t = Tensor::from_vec(m, (b, 1, t, tk), &Device::Cpu).unwrap();
        check(
            &|x| attention_probs(&x[0], &x[1], t, scale, Some(&mask)),
            &|x| {
                let s = (x[0].matmul(&x[1].t()?)? * scale)?.reshape((b, g * r, t, tk))?;
                let s = s.broadcast_add(&mask_t.to_dtype(s.dtype())?)?;
                ops::softmax_last(&s)?.reshape((b, g, r * t, tk))
            },
            &[&[b, g, r * t, dh], &[b, g, tk, dh]],
            2,
        );
    }

    /// Inputs large enough to be split across threads give what the composed ops give.
    #[test]
    fn threaded_kernels_match_composed() {
        let cmp = |fused: &Op, composed: &Op, shapes: &[&[usize]], n: usize| {
            let inputs: Vec<Tensor> = shapes.iter().map(|s| randn(s, DType::F32)).collect();
            let out_shape = fused(&inputs).unwrap().dims().to_vec();
            assert!(out_shape.iter().product::<usize>() >= 1 << 14);
            let w = randn(&out_shape, DType::F32);
            let (a, ga) = grads(fused, &inputs, &w, n);
            let (b, gb) = grads(composed, &inputs, &w, n);
            assert_close(&a, &b, 1e-5, "output");
            for i in 0..n {
                assert_close(&ga[i], &gb[i], 1e-4, &format!("grad {i}"));
            }
        };
        cmp(
            &|x| rms_norm(&x[0], &x[1], 1e-5),
            &|x| ops::rms_norm_composed(&x[0], &x[1], 1e-5),
            &[&[67, 300], &[300]],
            2,
        );
        cmp(
            &|x| swiglu(&x[0], &x[1]),
            &|x| x[0].silu()? * &x[1],
            &[&[67, 300], &[67, 300]],
            2,
        );
        cmp(
            &|x| rope(&x[0], &x[1], &x[2]),
            &|x| ops::rope_composed(&x[0], &x[1], &x[2]),
            &[&[3, 5, 37, 32], &[3, 1, 37, 16], &[3, 1, 37, 16]],
            1,
        );
        cmp(
            &|x| attention_probs(&x[0], &x[1], 37, 0.125, None),
            &|x| ops::softmax_last(&(x[0].matmul(&x[1].t()?)? * 0.125)?),
            &[&[3, 5, 37, 16], &[3, 5, 37, 16]],
            2,
        );
    }
}
