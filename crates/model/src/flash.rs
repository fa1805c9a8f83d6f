//! Attention in tiles as one op, `softmax(scale * Q K^T + mask) V`, with a hand-written
//! backward that recomputes the probabilities from each row's log-sum-exp: the GPU's attention
//! with `PREFTUNE_CUDA_KERNELS=1` (`preftune-kernels-cuda`'s flash kernels), so neither scores
//! nor probabilities (`[B, H, T, Tk]` each, kept for backward when composed) are stored.
//!
//! On the CPU the op runs a plain f64 loop, slow and exact: it is there so that the op's wiring
//! (shapes, mask rows, the backward's three gradients) is tested here against the composed
//! attention, and so that `check-kernels` runs on any device. The model's CPU path keeps its own
//! fused attention (`kernels::attention_probs`).
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
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
    let (b, groups, r, dh) = q.dims4()?;
    let (_, _, tk, _) = k.dims4()?;
    // The kernels take batch x groups on the grid's y axis (at most 65535 blocks) and assume
    // at least one query row and key.
    let empty = b * groups == 0 || r == 0 || tk == 0 || dh == 0;
    if k.dims() != [b, groups, tk, dh]
        || v.dims() != k.dims()
        || t == 0
        || r % t != 0
        || empty
        || b * groups > 65535
    {
        return Err(Error::Msg(format!(
            "flash_attention: q {:?}, k {:?}, v {:?}, t {t}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let mask = match mask {
        Some(m) if m.elem_count() != b * t * tk => {
            return Err(Error::Msg(format!(
                "flash_attention: mask {:?} for [{b}, {t}, {tk}]",
                m.dims()
            )))
        }
        Some(m) => Some(m.to_dtype(q.dtype())?.reshape((b, t, tk))?.contiguous()?),
        None => None,
    };
    let dims = Dims {
        bg: b * groups,
        groups,
        r,
        t,
        tk,
        dh,
    };
    // Under bf16 products the tensor-core kernels (bf16 operands, f32 sums) run both passes, as
    // PyTorch's autocast runs attention; in f32 the f32 kernels do.
    let tensor_cores = crate::ops::bf16_enabled() && tensor_cores_apply(q, dh);
    let op = FlashAttention {
        dims,
        scale,
        mask,
        tensor_cores,
        lse: Default::default(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
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

struct FlashAttention {
    dims: Dims,
    scale: f64,
    mask: Option<Tensor>,
    /// Both passes on tensor cores (bf16 products).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tensor_cores: bool,
    /// Each query row's log-sum-exp, from the forward pass for backward.
    lse: Arc<Mutex<Option<Tensor>>>,
}

/// The inputs of one problem as f64 rows.
struct Rows<'a> {
    d: Dims,
    scale: f64,
    q: &'a [f64],
    k: &'a [f64],
    v: &'a [f64],
    mask: Option<&'a [f64]>,
}

impl Rows<'_> {
    /// `scale * q_r . k_j + mask` for every key `j` of query row `r` of group `grp`.
    fn scores(&self, grp: usize, r: usize) -> Vec<f64> {
        let Dims {
            groups,
            r: rows,
            t,
            tk,
            dh,
            ..
        } = self.d;
        let q = &self.q[(grp * rows + r) * dh..][..dh];
        (0..tk)
            .map(|j| {
                let k = &self.k[(grp * tk + j) * dh..][..dh];
                let m = self
                    .mask
                    .map_or(0.0, |m| m[((grp / groups) * t + r % t) * tk + j]);
                q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * self.scale + m
            })
            .collect()
    }

    /// Output rows and each row's log-sum-exp.
    fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let Dims {
            bg,
            r: rows,
            tk,
            dh,
            ..
        } = self.d;
        let (mut out, mut lse) = (vec![0.0; bg * rows * dh], vec![0.0; bg * rows]);
        for grp in 0..bg {
            for r in 0..rows {
                let s = self.scores(grp, r);
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                let o = &mut out[(grp * rows + r) * dh..][..dh];
                for (j, x) in s.iter().enumerate() {
                    let p = (x - l).exp();
                    for (o, v) in o.iter_mut().zip(&self.v[(grp * tk + j) * dh..][..dh]) {
                        *o += p * v;
                    }
                }
                lse[grp * rows + r] = l;
            }
        }
        (out, lse)
    }

    /// `dq`, `dk`, `dv` flattened one after another, given the output's gradient.
    fn backward(&self, dout: &[f64], lse: &[f64]) -> Vec<f64> {
        let Dims {
            bg,
            r: rows,
            tk,
            dh,
            ..
        } = self.d;
        let (nq, nk) = (bg * rows * dh, bg * tk * dh);
        let mut g = vec![0.0; nq + 2 * nk];
        let (dq, dkv) = g.split_at_mut(nq);
        let (dk, dv) = dkv.split_at_mut(nk);
        for grp in 0..bg {
            for r in 0..rows {
                let row = grp * rows + r;
                let (q, go) = (&self.q[row * dh..][..dh], &dout[row * dh..][..dh]);
                let p: Vec<f64> = self
                    .scores(grp, r)
                    .iter()
                    .map(|x| (x - lse[row]).exp())
                    .collect();
                let dp: Vec<f64> = (0..tk)
                    .map(|j| {
                        go.iter()
                            .zip(&self.v[(grp * tk + j) * dh..][..dh])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let big_d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..tk {
                    let ds = p[j] * (dp[j] - big_d) * self.scale;
                    let key = (grp * tk + j) * dh;
                    for e in 0..dh {
                        dq[row * dh + e] += ds * self.k[key + e];
                        dk[key + e] += ds * q[e];
                        dv[key + e] += p[j] * go[e];
                    }
                }
            }
        }
        g
    }
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
        let x = CpuInputs::new(self.mask.as_ref(), [(s1, l1), (s2, l2), (s3, l3)], op)?;
        let rows = x.rows(self.dims, self.scale);
        let (out, lse) = rows.forward();
        let lse = Tensor::from_vec(lse, self.dims.bg * self.dims.r, &candle_core::Device::Cpu)?
            .to_dtype(crate::kernels::sum_dtype(s1.dtype()))?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((cpu_from_f64(out, s1.dtype(), op)?, l1.shape().clone()))
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
        let m = self.mask.as_ref().map(|t| t.storage_and_layout());
        let mask = match &m {
            Some((st, l)) => Some((crate::cuda_kernels::on_gpu(st, self.name())?, *l)),
            None => None,
        };
        let (out, lse) = crate::cuda_kernels::flash_fwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            mask,
            self.dims,
            self.scale,
            self.tensor_cores,
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
            tensor_cores: self.tensor_cores,
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
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tensor_cores: bool,
    mask: Option<Tensor>,
    /// The forward output: the GPU's dQ kernel takes `D = rowsum(dO * O)` from it; the CPU loop
    /// recomputes the probabilities and needs it not.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
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
        let x = CpuInputs::new(self.mask.as_ref(), [(s1, l1), (s2, l2), (s3, l3)], op)?;
        let rows = x.rows(self.dims, self.scale);
        let g = rows.backward(&tensor_f64(&self.dout)?, &tensor_f64(&self.lse)?);
        let n = g.len();
        Ok((cpu_from_f64(g, s1.dtype(), op)?, Shape::from(n)))
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
        let m = self.mask.as_ref().map(|t| t.storage_and_layout());
        let mask = match &m {
            Some((st, l)) => Some((crate::cuda_kernels::on_gpu(st, self.name())?, *l)),
            None => None,
        };
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
            self.tensor_cores,
        )?;
        let n = self.dims.bg * (self.dims.r + 2 * self.dims.tk) * self.dims.dh;
        Ok((flat, Shape::from(n)))
    }
}

/// Q, K, V and the mask of the CPU loops, as f64.
struct CpuInputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Option<Vec<f64>>,
}

impl CpuInputs {
    fn new(mask: Option<&Tensor>, qkv: [(&CpuStorage, &Layout); 3], op: &str) -> Result<Self> {
        let [q, k, v] = qkv.map(|(s, l)| cpu_as_f64(s, l, op));
        Ok(CpuInputs {
            q: q?,
            k: k?,
            v: v?,
            mask: mask.map(tensor_f64).transpose()?,
        })
    }

    fn rows(&self, d: Dims, scale: f64) -> Rows<'_> {
        Rows {
            d,
            scale,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            mask: self.mask.as_deref(),
        }
    }
}

fn tensor_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

use crate::kernels::{cpu_as_f64, cpu_from_f64};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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

    /// Grouped-query attention (2 KV groups of 3 query heads), 4 new positions after 5 cached
    /// ones, causal with one padded row, and without a mask: output and the three gradients
    /// against the composed ops, in f64 and f32.
    #[test]
    fn flash_attention_matches_composed_values_and_gradients() {
        let dev = Device::Cpu;
        let (b, g, rep, t, past, dh) = (2, 2, 3, 4, 5, 8);
        let tk = past + t;
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..tk {
                    if j > past + i || (bi == 1 && j < 2) {
                        m[(bi * t + i) * tk + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, tk), &dev).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for masked in [true, false] {
                let mk = |dims: &[usize]| {
                    Var::from_tensor(
                        &Tensor::randn(0f64, 1.0, dims, &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (q, k, v) = (
                    mk(&[b, g, rep * t, dh]),
                    mk(&[b, g, tk, dh]),
                    mk(&[b, g, tk, dh]),
                );
                let w = Tensor::randn(0f64, 1.0, (b, g, rep * t, dh), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let m = masked.then(|| mask.to_dtype(dtype).unwrap());
                let scale = 1.0 / (dh as f64).sqrt();
                let run = |f: &dyn Fn() -> Result<Tensor>| {
                    let y = f().unwrap();
                    let gs = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads: Vec<Tensor> = [&q, &k, &v]
                        .iter()
                        .map(|x| gs.get(x.as_tensor()).unwrap().clone())
                        .collect();
                    (y, grads)
                };
                let (y1, g1) = run(&|| {
                    flash_attention(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        t,
                        scale,
                        m.as_ref(),
                    )
                });
                let (y2, g2) = run(&|| {
                    composed(
                        q.as_tensor(),
                        k.as_tensor(),
                        v.as_tensor(),
                        t,
                        scale,
                        m.as_ref(),
                    )
                });
                assert_eq!(y1.dtype(), dtype);
                assert!(
                    max_rel(&y1, &y2) < tol,
                    "{dtype:?} masked {masked}: output {}",
                    max_rel(&y1, &y2)
                );
                for (name, (a, c)) in ["q", "k", "v"].iter().zip(g1.iter().zip(&g2)) {
                    assert!(
                        max_rel(a, c) < tol,
                        "{dtype:?} masked {masked}: d{name} {}",
                        max_rel(a, c)
                    );
                }
            }
        }
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
