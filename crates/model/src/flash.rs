//! Attention in tiles as one op, `softmax(scale * Q K^T + mask) V`, with a hand-written
//! backward that recomputes the probabilities from each row's log-sum-exp, so neither scores nor
//! probabilities (`[B, H, T, Tk]` each, kept for backward when composed) are stored. On a GPU with
//! `PREFTUNE_CUDA_KERNELS=1` it runs `preftune-kernels-cuda`'s flash kernels; on the CPU,
//! `preftune_kernels::flash` (f32 and f64), which also skips the tiles a causal mask hides. The
//! model takes it on the CPU for training-length inputs ([`crate::kernels::cpu_flash_applies`]).
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};

/// An attention problem in the grouped layout the model uses: `q` is `[B, G, R, dh]` with the
/// `rep` query heads of a KV group stacked along time (`R = rep * t`), `k` and `v` are
/// `[B, G, tk, dh]`; query row `r` reads mask row `r % t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch times KV groups.
    pub bg: usize,
    pub groups: usize,
    pub r: usize,
    pub t: usize,
    pub tk: usize,
    pub dh: usize,
}

impl Dims {
    #[cfg(feature = "cuda")]
    pub(crate) fn u32s(&self) -> Result<(u32, u32, u32, u32)> {
        let c = |n: usize| {
            u32::try_from(n).map_err(|_| Error::Msg(format!("attention size {n} over u32")))
        };
        Ok((c(self.r)?, c(self.t)?, c(self.tk)?, c(self.groups)?))
    }
}

/// Attention of `q` `[B, G, R, dh]` over `k`, `v` `[B, G, tk, dh]` for `t` new positions, with an
/// additive `mask` (`[B, 1, t, tk]` or `[B, t, tk]`). Output `[B, G, R, dh]` in `q`'s dtype.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let d = dims(q, k, v, t)?;
    let (b, tk) = (d.bg / d.groups, d.tk);
    let mask = match mask {
        Some(m) if m.elem_count() != b * t * tk => {
            return Err(Error::Msg(format!(
                "flash_attention: mask {:?} for [{b}, {t}, {tk}]",
                m.dims()
            )))
        }
        Some(m) if q.device().is_cpu() => Some(Mask::Host(Arc::new(
            m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        ))),
        Some(m) => Some(Mask::Device(
            m.to_dtype(q.dtype())?.reshape((b, t, tk))?.contiguous()?,
        )),
        None => None,
    };
    apply(q, k, v, d, scale, mask)
}

/// [`flash_attention`] with the model's host mask (`[B, t, tk]`, f32), read where it lies: the
/// CPU's path.
pub fn flash_attention_host(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    scale: f64,
    mask: Option<&AttnMask>,
) -> Result<Tensor> {
    let d = dims(q, k, v, t)?;
    let (b, tk) = (d.bg / d.groups, d.tk);
    if let Some(m) = mask.filter(|m| (m.b, m.t, m.tk) != (b, t, tk)) {
        return Err(Error::Msg(format!(
            "flash_attention: mask [{}, {}, {}] for [{b}, {t}, {tk}]",
            m.b, m.t, m.tk
        )));
    }
    if !q.device().is_cpu() {
        return Err(Error::Msg("flash_attention: a host mask on a GPU".into()));
    }
    apply(q, k, v, d, scale, mask.map(|m| Mask::Host(m.data.clone())))
}

/// The problem's dimensions, once its shapes are checked.
fn dims(q: &Tensor, k: &Tensor, v: &Tensor, t: usize) -> Result<Dims> {
    let (b, groups, r, dh) = q.dims4()?;
    let (_, _, tk, _) = k.dims4()?;
    // The GPU's kernels take batch x groups on the grid's y axis (at most 65535 blocks); all
    // assume at least one query row and key.
    let empty = b * groups == 0 || r == 0 || tk == 0 || dh == 0;
    if k.dims() != [b, groups, tk, dh]
        || v.dims() != k.dims()
        || t == 0
        || r % t != 0
        || empty
        || (!q.device().is_cpu() && b * groups > 65535)
    {
        return Err(Error::Msg(format!(
            "flash_attention: q {:?}, k {:?}, v {:?}, t {t}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    Ok(Dims {
        bg: b * groups,
        groups,
        r,
        t,
        tk,
        dh,
    })
}

fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    scale: f64,
    mask: Option<Mask>,
) -> Result<Tensor> {
    let dh = dims.dh;
    // Under bf16 products both passes multiply in bf16 with f32 sums, as PyTorch's autocast runs
    // attention: on tensor cores on a GPU, in bf16 tiles on the CPU (f32 inputs); in f32 the f32
    // kernels run.
    let bf16 = crate::ops::bf16_enabled()
        && match q.device().is_cpu() {
            true => q.dtype() == DType::F32,
            false => tensor_cores_apply(q, dh),
        };
    let op = FlashAttention {
        dims,
        scale,
        mask,
        bf16,
        lse: Default::default(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Elements between consecutive KV groups of keys or values `[B, G, tk, dh]` laid out as a KV
/// cache buffer read in place (rows of `dh` contiguous, groups evenly spaced, batch rows after
/// one another), or `None` for another layout.
pub fn kv_group_stride(l: &Layout) -> Option<usize> {
    let [b, g, tk, dh] = *l.dims() else {
        return None;
    };
    let st = l.stride();
    // Size-1 dimensions may carry any stride.
    let gs = if g > 1 { st[1] } else { st[0] };
    let gs = if b * g > 1 { gs } else { tk * dh };
    let ok = (dh == 1 || st[3] == 1)
        && (tk == 1 || st[2] == dh)
        && (b == 1 || g == 1 || st[0] == g * gs)
        && gs >= tk * dh;
    ok.then_some(gs)
}

/// [`kv_group_stride`] of keys and values alike, or `None` when they differ.
pub fn kv_pair_stride(k: &Layout, v: &Layout) -> Option<usize> {
    let s = kv_group_stride(k)?;
    (kv_group_stride(v) == Some(s)).then_some(s)
}

/// A decoding step's attention (one new position a row, outside autograd) on a GPU with
/// preftune's kernels: `q` `[B, G, rep, dh]` over keys and values `[B, G, tk, dh]` read in place
/// (a cache buffer's view, [`kv_group_stride`]), with an additive `mask` (`[B, 1, 1, tk]`),
/// and, given `limit` (u32; its first value), only the keys up to that position (a fixed-shape
/// step's written ones). The query heads of a group read its keys once, split over blocks
/// (flash-decoding). Output `[B, G, rep, dh]` in `q`'s dtype. No backward.
pub fn flash_decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    limit: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, groups, r, dh) = q.dims4()?;
    let (_, _, tk, _) = k.dims4()?;
    if k.dims() != [b, groups, tk, dh] || v.dims() != k.dims() || b * groups * r * tk == 0 {
        return Err(Error::Msg(format!(
            "flash_decode: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let mask = match mask {
        Some(m) if m.elem_count() != b * tk => {
            return Err(Error::Msg(format!(
                "flash_decode: mask {:?} for [{b}, {tk}]",
                m.dims()
            )))
        }
        Some(m) => Some(m.to_dtype(q.dtype())?.reshape((b, tk))?.contiguous()?),
        None => None,
    };
    let op = FlashDecode {
        dims: Dims {
            bg: b * groups,
            groups,
            r,
            t: 1,
            tk,
            dh,
        },
        scale,
        mask,
        limit: limit.map(|l| l.flatten_all()).transpose()?,
    };
    q.contiguous()?.apply_op3_no_bwd(k, v, &op)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashDecode {
    dims: Dims,
    scale: f64,
    mask: Option<Tensor>,
    limit: Option<Tensor>,
}

impl CustomOp3 for FlashDecode {
    fn name(&self) -> &'static str {
        "preftune-flash-decode"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(Error::Msg(
            "flash_decode runs on a GPU (the CPU has its own decoding kernels)".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let m = self.mask.as_ref().map(Tensor::storage_and_layout);
        let lim = self.limit.as_ref().map(Tensor::storage_and_layout);
        let mask = crate::cuda_kernels::held(&m, self.name())?;
        let limit = crate::cuda_kernels::held(&lim, self.name())?;
        let out = crate::cuda_kernels::flash_decode(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            mask,
            limit,
            self.dims,
            self.scale,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Whether the tensor-core kernels take `q`'s dtype at head size `dh` on its device (a GPU of
/// compute capability 8.0 or newer, with kernels built for it).
fn tensor_cores_apply(q: &Tensor, dh: usize) -> bool {
    #[cfg(feature = "cuda")]
    return crate::cuda_kernels::flash_built(q.dtype(), dh, true)
        && crate::cuda_kernels::tensor_cores_available(q.device());
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, dh);
        false
    }
}

/// The additive mask, `[B, t, tk]`: a tensor on the GPU, the host's values on the CPU.
#[derive(Clone)]
enum Mask {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(Tensor),
    Host(Arc<Vec<f32>>),
}

impl Mask {
    #[cfg(feature = "cuda")]
    fn device(&self) -> Result<&Tensor> {
        match self {
            Mask::Device(t) => Ok(t),
            Mask::Host(_) => Err(Error::Msg("flash_attention: a host mask on a GPU".into())),
        }
    }

    fn host(&self) -> Result<&[f32]> {
        match self {
            Mask::Host(m) => Ok(m),
            Mask::Device(_) => Err(Error::Msg(
                "flash_attention: a device mask on the CPU".into(),
            )),
        }
    }
}

struct FlashAttention {
    dims: Dims,
    scale: f64,
    mask: Option<Mask>,
    /// Both passes with bf16 products: tensor cores on a GPU, bf16 tiles on the CPU.
    bf16: bool,
    /// Each query row's softmax statistics, from the forward pass for backward: its log-sum-exp
    /// on a GPU; on the CPU its largest score and the log of its sum, apart
    /// (`preftune_kernels::flash::forward`).
    lse: Arc<Mutex<Option<Tensor>>>,
}

/// The kernel's view of one problem on the CPU: `q`, `k`, `v` from the op's storages, checked
/// against `d` (the kernel would panic otherwise).
fn cpu_problem<'a, T: Real>(
    d: Dims,
    scale: f64,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&'a CpuStorage, &Layout); 3],
    mask: Option<&'a [f32]>,
    op: &str,
) -> Result<Problem<'a, T>> {
    let (q, k, v) = (slice(s1, l1, op)?, slice(s2, l2, op)?, slice(s3, l3, op)?);
    let (nq, nkv) = (d.bg * d.r * d.dh, d.bg * d.tk * d.dh);
    let nmask = d.bg / d.groups.max(1) * d.t * d.tk;
    if q.len() != nq || k.len() != nkv || v.len() != nkv || mask.is_some_and(|m| m.len() != nmask) {
        return Err(Error::Msg(format!("{op}: inputs do not match {d:?}")));
    }
    Ok(Problem {
        q,
        k,
        v,
        mask,
        groups: d.groups,
        r: d.r,
        t: d.t,
        tk: d.tk,
        dh: d.dh,
        scale: T::of(scale),
    })
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "preftune-flash-attention"
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
        let op = self.name();
        let mask = self.mask.as_ref().map(Mask::host).transpose()?;
        let (d, inputs) = (self.dims, [(s1, l1), (s2, l2), (s3, l3)]);
        let (out, lse) = match self.bf16 {
            true => {
                let p = cpu_problem::<f32>(d, self.scale, inputs, mask, op)?;
                forward_into(&p, preftune_kernels::flash::forward_bf16)
            }
            false => dispatch!(s1, op, |T| {
                let p = cpu_problem::<T>(d, self.scale, inputs, mask, op)?;
                Ok(forward_into(&p, preftune_kernels::flash::forward::<T>))
            })?,
        };
        let lse = Tensor::from_storage(
            candle_core::Storage::Cpu(lse),
            2 * d.bg * d.r,
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let m = match &self.mask {
            Some(m) => Some(m.device()?.storage_and_layout()),
            None => None,
        };
        let mask = crate::cuda_kernels::held(&m, self.name())?;
        let (out, lse) = crate::cuda_kernels::flash_fwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            mask,
            self.dims,
            self.scale,
            self.bf16,
        )?;
        let lse = Tensor::from_storage(
            candle_core::Storage::Cuda(lse),
            self.dims.bg * self.dims.r,
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Msg("flash_attention: backward before forward".into()))?;
        let bwd = FlashAttentionBwd {
            dims: self.dims,
            scale: self.scale,
            bf16: self.bf16,
            mask: self.mask.clone(),
            out: res.clone(),
            dout: grad.contiguous()?,
            lse,
        };
        let flat = q.apply_op3_no_bwd(k, v, &bwd)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `dq`, `dk`, `dv` of [`FlashAttention`], flattened one after another, in the inputs' dtype.
struct FlashAttentionBwd {
    dims: Dims,
    scale: f64,
    bf16: bool,
    mask: Option<Mask>,
    /// The forward output, for `D = rowsum(dO * O)`.
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
}

impl CustomOp3 for FlashAttentionBwd {
    fn name(&self) -> &'static str {
        "preftune-flash-attention-bwd"
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
        let op = self.name();
        let mask = self.mask.as_ref().map(Mask::host).transpose()?;
        let (d, inputs) = (self.dims, [(s1, l1), (s2, l2), (s3, l3)]);
        let (o, go, lse) = (
            self.out.storage_and_layout(),
            self.dout.storage_and_layout(),
            self.lse.storage_and_layout(),
        );
        match self.bf16 {
            true => {
                let p = cpu_problem::<f32>(d, self.scale, inputs, mask, op)?;
                let saved = (saved(&o, op)?, saved(&go, op)?, saved(&lse, op)?);
                backward_into(&p, saved, op, preftune_kernels::flash::backward_bf16)
            }
            false => dispatch!(s1, op, |T| {
                let p = cpu_problem::<T>(d, self.scale, inputs, mask, op)?;
                let saved = (saved(&o, op)?, saved(&go, op)?, saved(&lse, op)?);
                backward_into(&p, saved, op, preftune_kernels::flash::backward::<T>)
            }),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (o, lo) = self.out.storage_and_layout();
        let (g, lg) = self.dout.storage_and_layout();
        let (s, ls) = self.lse.storage_and_layout();
        let m = match &self.mask {
            Some(m) => Some(m.device()?.storage_and_layout()),
            None => None,
        };
        let mask = crate::cuda_kernels::held(&m, self.name())?;
        let flat = crate::cuda_kernels::flash_bwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            mask,
            (crate::cuda_kernels::on_gpu(&o, self.name())?, lo),
            (crate::cuda_kernels::on_gpu(&g, self.name())?, lg),
            (crate::cuda_kernels::on_gpu(&s, self.name())?, ls),
            self.dims,
            self.scale,
            self.bf16,
        )?;
        let n = self.dims.bg * (self.dims.r + 2 * self.dims.tk) * self.dims.dh;
        Ok((flat, Shape::from(n)))
    }
}

/// The CPU forward `f` of problem `p` into new buffers: the output and the softmax statistics.
fn forward_into<T: Real>(
    p: &Problem<T>,
    f: impl FnOnce(&Problem<T>, &mut [T], &mut [T]),
) -> (CpuStorage, CpuStorage) {
    let mut out = vec![T::zero(); p.q.len()];
    let mut stats = vec![T::zero(); 2 * p.q.len() / p.dh];
    f(p, &mut out, &mut stats);
    (storage(out), storage(stats))
}

/// The saved output, its gradient and statistics.
type Saved<'a, T> = (&'a [T], &'a [T], &'a [T]);

/// The CPU backward `f` of problem `p` into one new buffer: dq, dk and dv, one after another.
fn backward_into<T: Real>(
    p: &Problem<T>,
    saved: Saved<T>,
    op: &str,
    f: impl FnOnce(&Problem<T>, Saved<T>, &mut [T], &mut [T], &mut [T]),
) -> Result<(CpuStorage, Shape)> {
    let (nq, nk) = (p.q.len(), p.k.len());
    if saved.0.len() != nq || saved.1.len() != nq || saved.2.len() != 2 * nq / p.dh {
        return Err(Error::Msg(format!(
            "{op}: saved tensors do not match the problem"
        )));
    }
    let mut g = vec![T::zero(); nq + 2 * nk];
    let (dq, dkv) = g.split_at_mut(nq);
    let (dk, dv) = dkv.split_at_mut(nk);
    f(p, saved, dq, dk, dv);
    let n = g.len();
    Ok((storage(g), Shape::from(n)))
}

/// The values of a tensor the forward saved, on the CPU.
fn saved<'a, T: Real, G: std::ops::Deref<Target = candle_core::Storage>>(
    x: &'a (G, &Layout),
    op: &str,
) -> Result<&'a [T]> {
    match &*x.0 {
        candle_core::Storage::Cpu(s) => slice(s, x.1, op),
        _ => Err(Error::Msg(format!("{op}: saved tensors on another device"))),
    }
}

use crate::kernels::{dispatch, slice, storage, AttnMask, Real};
use preftune_kernels::flash::Problem;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The decoding kernel reads keys in place from a cache buffer's view, a whole buffer or a
    /// contiguous tensor, at any stride of a size-1 dimension, and refuses other layouts.
    #[test]
    fn kv_group_strides_of_cache_views() {
        let buf = Tensor::zeros((2, 3, 50, 8), DType::F32, &Device::Cpu).unwrap();
        let stride = |t: &Tensor| kv_group_stride(t.layout());
        assert_eq!(stride(&buf), Some(400));
        assert_eq!(stride(&buf.narrow(2, 0, 7).unwrap()), Some(400));
        // One batch row of one group: nothing to step over.
        let one = Tensor::zeros((1, 1, 50, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(stride(&one.narrow(2, 0, 1).unwrap()), Some(8));
        let single = Tensor::zeros((4, 1, 50, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(stride(&single.narrow(2, 0, 9).unwrap()), Some(400));
        // Rows not contiguous, or groups not evenly spaced.
        assert_eq!(stride(&buf.narrow(3, 0, 4).unwrap()), None);
        assert_eq!(stride(&buf.transpose(1, 2).unwrap()), None);
        assert_eq!(stride(&buf.narrow(1, 0, 2).unwrap()), None);
        assert_eq!(stride(&buf.flatten_all().unwrap()), None);
    }

    /// The model's composed attention for the same grouped layout: scores per head, the mask
    /// broadcast over heads, softmax, times V.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        t: usize,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, g, r, _) = q.dims4()?;
        let tk = k.dim(2)?;
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, g * (r / t), t, tk))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        crate::ops::softmax_last(&scores)?
            .reshape((b, g, r, tk))?
            .matmul(v)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        crate::kernel_check::rel_diff(a, b).unwrap()
    }

    /// A causal mask over `past + t` keys for `b` batch rows; batch row 1 also hides its first
    /// `pad` keys.
    fn causal(b: usize, t: usize, past: usize, pad: usize) -> Vec<f32> {
        let tk = past + t;
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..tk {
                    if j > past + i || (bi == 1 && j < pad) {
                        m[(bi * t + i) * tk + j] = -1e9;
                    }
                }
            }
        }
        m
    }

    fn var(dims: &[usize], dtype: DType) -> Var {
        let x = Tensor::randn(0f64, 1.0, dims, &Device::Cpu).unwrap();
        Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
    }

    /// `y`, and the gradients of `sum(y * w)` with respect to `xs`.
    fn with_grads(y: Tensor, w: &Tensor, xs: [&Var; 3]) -> (Tensor, Vec<Tensor>) {
        let gs = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = xs
            .iter()
            .map(|x| gs.get(x.as_tensor()).unwrap().clone())
            .collect();
        (y, grads)
    }

    /// Both outputs and every gradient within `tol` of each other (relative to the largest).
    fn assert_close(a: &(Tensor, Vec<Tensor>), b: &(Tensor, Vec<Tensor>), tol: f64, case: &str) {
        let e = max_rel(&a.0, &b.0);
        assert!(e < tol, "{case}: output {e}");
        for (name, (x, y)) in ["q", "k", "v"].iter().zip(a.1.iter().zip(&b.1)) {
            let e = max_rel(x, y);
            assert!(e < tol, "{case}: d{name} {e}");
        }
    }

    /// Grouped-query attention (2 KV groups of 3 query heads), 4 new positions after 5 cached
    /// ones, causal with one padded row, and without a mask: output and the three gradients
    /// against the composed ops, in f64 and f32.
    #[test]
    fn flash_attention_matches_composed_values_and_gradients() {
        let (b, g, rep, t, past, dh) = (2, 2, 3, 4, 5, 8);
        let tk = past + t;
        let mask = Tensor::from_vec(causal(b, t, past, 2), (b, 1, t, tk), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for masked in [true, false] {
                let (q, k, v) = (
                    var(&[b, g, rep * t, dh], dtype),
                    var(&[b, g, tk, dh], dtype),
                    var(&[b, g, tk, dh], dtype),
                );
                let w = var(&[b, g, rep * t, dh], dtype).as_tensor().clone();
                let m = masked.then(|| mask.to_dtype(dtype).unwrap());
                let scale = 1.0 / (dh as f64).sqrt();
                let (x, y, z) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let flash = flash_attention(x, y, z, t, scale, m.as_ref()).unwrap();
                assert_eq!(flash.dtype(), dtype);
                let flash = with_grads(flash, &w, [&q, &k, &v]);
                let reference = composed(x, y, z, t, scale, m.as_ref()).unwrap();
                let reference = with_grads(reference, &w, [&q, &k, &v]);
                assert_close(
                    &flash,
                    &reference,
                    tol,
                    &format!("{dtype:?} masked {masked}"),
                );
            }
        }
    }

    /// The CPU's tiled path at a training length, through the model's host mask: tiles crossed
    /// (300 rows of each of two stacked heads, 300 keys), causal, batch row 1 left-padded so
    /// that its first 37 rows see nothing. Output and gradients against the composed ops.
    #[test]
    fn host_mask_path_matches_composed_at_training_lengths() {
        let dev = Device::Cpu;
        let (b, g, rep, t, dh, pad) = (2, 2, 2, 300, 16, 37);
        let m = causal(b, t, 0, pad);
        let tensor_mask = Tensor::from_vec(m.clone(), (b, 1, t, t), &dev).unwrap();
        let host = AttnMask {
            data: Arc::new(m),
            b,
            t,
            tk: t,
        };
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let (q, k, v) = (
                var(&[b, g, rep * t, dh], dtype),
                var(&[b, g, t, dh], dtype),
                var(&[b, g, t, dh], dtype),
            );
            // In f64 the rows that see nothing (padding slots) keep only 1e-7 of their scores'
            // spread 1e9 below zero, rounded otherwise by the two paths: no loss there, as in
            // training. In f32 both make them uniform, and they carry a loss.
            let mut live = vec![1f64; b * g * rep * t * dh];
            for (row, x) in live.chunks_exact_mut(dh).enumerate() {
                let (bi, i) = (row / (g * rep * t), row % t);
                if bi == 1 && i < pad && dtype == DType::F64 {
                    x.fill(0.0);
                }
            }
            let live = Tensor::from_vec(live, (b, g, rep * t, dh), &dev).unwrap();
            let w = (var(&[b, g, rep * t, dh], dtype).as_tensor() * live.to_dtype(dtype).unwrap())
                .unwrap();
            let scale = 1.0 / (dh as f64).sqrt();
            let m = tensor_mask.to_dtype(dtype).unwrap();
            let (x, y, z) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let flash = flash_attention_host(x, y, z, t, scale, Some(&host)).unwrap();
            let flash = with_grads(flash, &w, [&q, &k, &v]);
            let reference = composed(x, y, z, t, scale, Some(&m)).unwrap();
            let reference = with_grads(reference, &w, [&q, &k, &v]);
            assert_close(&flash, &reference, tol, &format!("{dtype:?}"));
        }
        let short = AttnMask {
            data: Arc::new(vec![0.0; 4]),
            b: 1,
            t: 2,
            tk: 2,
        };
        let q = Tensor::zeros((2, 1, 2, 4), DType::F32, &dev).unwrap();
        let err = flash_attention_host(&q, &q, &q, 2, 1.0, Some(&short)).unwrap_err();
        assert!(
            err.to_string().contains("mask [1, 2, 2] for [2, 2, 2]"),
            "{err}"
        );
    }

    /// Under bf16 products the CPU's tiles multiply in bf16: the rounding shows against the f32
    /// tiles, and output and gradients stay within bf16's error of the composed f32 ops (two
    /// stacked heads of 300 rows at head size 64, causal, one batch row left-padded).
    #[test]
    fn host_mask_path_under_bf16_multiplies_in_bf16() {
        let dev = Device::Cpu;
        let (b, g, rep, t, dh, pad) = (2, 2, 2, 300, 64, 37);
        let m = causal(b, t, 0, pad);
        let tensor_mask = Tensor::from_vec(m.clone(), (b, 1, t, t), &dev).unwrap();
        let host = AttnMask {
            data: Arc::new(m),
            b,
            t,
            tk: t,
        };
        let (q, k, v) = (
            var(&[b, g, rep * t, dh], DType::F32),
            var(&[b, g, t, dh], DType::F32),
            var(&[b, g, t, dh], DType::F32),
        );
        let w = var(&[b, g, rep * t, dh], DType::F32).as_tensor().clone();
        let scale = 1.0 / (dh as f64).sqrt();
        let (x, y, z) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let tiles = |bf16: bool| {
            let _products = crate::ops::Bf16Scope::new(bf16);
            let y = flash_attention_host(x, y, z, t, scale, Some(&host)).unwrap();
            with_grads(y, &w, [&q, &k, &v])
        };
        let (f32_tiles, bf16_tiles) = (tiles(false), tiles(true));
        let reference = composed(x, y, z, t, scale, Some(&tensor_mask)).unwrap();
        let reference = with_grads(reference, &w, [&q, &k, &v]);
        assert_close(&f32_tiles, &reference, 1e-4, "f32 tiles");
        assert_close(&bf16_tiles, &reference, 3e-2, "bf16 tiles");
        let e = max_rel(&bf16_tiles.0, &f32_tiles.0);
        assert!(e > 1e-4, "bf16 tiles round like f32 ones: {e}");
    }

    #[test]
    fn flash_attention_refuses_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 6, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        let bad_k = Tensor::zeros((1, 1, 5, 8), DType::F32, &dev).unwrap();
        assert!(flash_attention(&q, &bad_k, &bad_k, 3, 1.0, None).is_err());
        assert!(
            flash_attention(&q, &k, &k, 4, 1.0, None).is_err(),
            "6 rows are not a multiple of t = 4"
        );
        let mask = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev).unwrap();
        assert!(flash_attention(&q, &k, &k, 3, 1.0, Some(&mask)).is_err());
        assert!(flash_attention(&q, &k, &k, 3, 1.0, None).is_ok());
    }
}
