//! `log_softmax(z / temperature)[label]` for rows of logits `z` `[C, V]`, as one op with a
//! hand-written backward: the LM head's loss on devices without the fused CPU LM head (CUDA).
//!
//! Composed from candle ops, it keeps the logits' shifted copy and its exponentials for backward
//! (and a scaled copy when the temperature is not 1: two or three `[C, V]` f32 tensors besides
//! the logits) and makes several passes over them. This op reads the logits once, keeps one log-sum-exp per row, and writes
//! `d z = g / T * (onehot(label) - softmax(z / T))` in one pass in backward. On CUDA it runs
//! `preftune-kernels-cuda`'s `lse_gather` kernels; on the CPU a plain loop, so that its wiring
//! is tested here against the composed ops and finite differences.
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};

use crate::fused::RowStats;
use crate::kernels::{cpu_as_f64, cpu_from_f64, sum_dtype};

/// Log-probs `[C]` (f32; f64 for f64 logits) of `labels` under `logits` `[C, V]` scaled by
/// `1 / temperature`, with each row's top-1 hit and mean scaled logit.
pub fn lse_gather(logits: &Tensor, labels: &[u32], temperature: f64) -> Result<(Tensor, RowStats)> {
    let (op, lab) = prepare(logits, labels, temperature)?;
    let stats = op.stats.clone();
    let lp = logits.contiguous()?.apply_op2(&lab, op)?;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((lp, stats))
}

/// The op for `logits` `[C, V]` and its labels on the logits' device, after checking them.
fn prepare(logits: &Tensor, labels: &[u32], temperature: f64) -> Result<(LseGather, Tensor)> {
    let (c, v) = logits.dims2()?;
    if labels.len() != c {
        return Err(Error::Msg(format!(
            "lse_gather: {} labels for {c} rows",
            labels.len()
        )));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= v) {
        return Err(Error::Msg(format!(
            "lse_gather: label {l} of row {i} is outside the vocabulary of {v}"
        )));
    }
    let op = LseGather {
        inv_temp: 1.0 / temperature,
        lse: Default::default(),
        stats: Default::default(),
    };
    Ok((op, Tensor::from_slice(labels, c, logits.device())?))
}

/// Log-probs `[N]` (f32; f64 for f64) of `labels` under the LM head `weight` `[V, H]` applied to `hidden`
/// `[N, H]`, as [`lse_gather`] of the logits, but without keeping any logits: the forward pass
/// computes them `chunk` rows at a time and keeps one log-sum-exp a row; backward computes each
/// chunk's logits again and turns them into `d hidden` and `d weight` at once (the trade of
/// TRL's and Liger's fused linear cross-entropy). Products are bf16 under bf16 products, as the
/// model's linears take them on a GPU.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &[u32],
    temperature: f64,
    chunk: usize,
) -> Result<(Tensor, RowStats)> {
    let (n, _) = hidden.dims2()?;
    let bf16 = crate::ops::bf16_enabled();
    let (h, w) = (hidden.detach(), head_operand(&weight.detach(), bf16)?);
    let (mut logp, mut chunks, mut stats) = (vec![], vec![], RowStats::default());
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(n - start);
        let z = head_product(&h.narrow(0, start, len)?, &w, bf16)?;
        let (op, lab) = prepare(&z, &labels[start..start + len], temperature)?;
        logp.push(z.apply_op2_no_bwd(&lab, &op)?);
        let lse = op.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
        let lse = lse.ok_or_else(|| Error::Msg("lse_gather: no log-sum-exp kept".into()))?;
        chunks.push(Chunk {
            start,
            len,
            labels: lab,
            lse,
        });
        let s = std::mem::take(&mut *op.stats.lock().unwrap_or_else(|e| e.into_inner()));
        stats.hits.extend(s.hits);
        stats.mean_logit.extend(s.mean_logit);
    }
    let op = LmHead {
        logp: Tensor::cat(&logp, 0)?.to_dtype(sum_dtype(hidden.dtype()))?,
        chunks,
        inv_temp: 1.0 / temperature,
        bf16,
    };
    Ok((hidden.apply_op2(weight, op)?, stats))
}

/// The LM head weight as the products take it: cast to bf16 once a pass under bf16 products
/// (not once a chunk).
fn head_operand(w: &Tensor, bf16: bool) -> Result<Tensor> {
    if bf16 {
        w.to_dtype(DType::BF16)
    } else {
        Ok(w.clone())
    }
}

/// `x W^T` for the LM head (`x` `[n, H]`, `W` `[V, H]` from [`head_operand`]).
fn head_product(x: &Tensor, w: &Tensor, bf16: bool) -> Result<Tensor> {
    product(x, &w.t()?, bf16)
}

/// `a b` with bf16 operands when `bf16` (a no-op cast for an operand already in bf16), as f32.
fn product(a: &Tensor, b: &Tensor, bf16: bool) -> Result<Tensor> {
    if bf16 {
        a.to_dtype(DType::BF16)?
            .matmul(&b.to_dtype(DType::BF16)?)?
            .to_dtype(DType::F32)
    } else {
        a.matmul(b)
    }
}

struct Chunk {
    start: usize,
    len: usize,
    labels: Tensor,
    lse: Tensor,
}

/// [`lm_head_logprobs`]' op on `(hidden, weight)`: its value was computed before it was built
/// (the forward pass above); its backward recomputes each chunk's logits.
struct LmHead {
    logp: Tensor,
    chunks: Vec<Chunk>,
    inv_temp: f64,
    bf16: bool,
}

impl CustomOp2 for LmHead {
    fn name(&self) -> &'static str {
        "preftune-lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (st, _) = self.logp.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(s) => Ok((s.clone(), self.logp.shape().clone())),
            _ => Err(Error::Msg(
                "lm_head_logprobs: log-probs not on the CPU".into(),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (st, l) = self.logp.storage_and_layout();
        let s = crate::cuda_kernels::on_gpu(&st, self.name())?;
        Ok((s.try_clone(l)?, self.logp.shape().clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen head (LoRA, or a base that is not trained) takes no gradient: its `[V, H]`
        // product is skipped, as the CPU's fused LM head skips it.
        let (want_h, want_w) = (hidden.track_op(), weight.track_op());
        let (h, w) = (hidden.detach(), head_operand(&weight.detach(), self.bf16)?);
        let (mut dh, mut dw) = (Vec::with_capacity(self.chunks.len()), None::<Tensor>);
        for c in &self.chunks {
            let hc = h.narrow(0, c.start, c.len)?;
            let z = head_product(&hc, &w, self.bf16)?;
            // The kernel reads the gradient in the logits' sum type.
            let g = grad
                .narrow(0, c.start, c.len)?
                .to_dtype(sum_dtype(z.dtype()))?
                .contiguous()?;
            let bwd = LseGatherBwd {
                inv_temp: self.inv_temp,
                lse: c.lse.clone(),
            };
            let dz = z.apply_op3_no_bwd(&c.labels, &g, &bwd)?;
            if want_h {
                dh.push(product(&dz, &w, self.bf16)?);
            }
            if want_w {
                let part = product(&dz.t()?, &hc, self.bf16)?;
                dw = Some(match dw {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        let dh = match want_h {
            true => Some(Tensor::cat(&dh, 0)?.to_dtype(hidden.dtype())?),
            false => None,
        };
        let dw = dw.map(|d| d.to_dtype(weight.dtype())).transpose()?;
        Ok((dh, dw))
    }
}

struct LseGather {
    inv_temp: f64,
    /// Each row's log-sum-exp, kept by the forward pass for backward.
    lse: Arc<Mutex<Option<Tensor>>>,
    stats: Arc<Mutex<RowStats>>,
}

impl LseGather {
    fn keep(&self, lse: Tensor, stats: RowStats) {
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }
}

fn cpu_labels<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    crate::kernels::slice::<u32>(s, l, "lse_gather")
}

impl CustomOp2 for LseGather {
    fn name(&self) -> &'static str {
        "preftune-lse-gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, v) = l1.shape().dims2()?;
        let z = cpu_as_f64(s1, l1, self.name())?;
        let labels = cpu_labels(s2, l2)?;
        let (mut logp, mut lse) = (Vec::with_capacity(c), Vec::with_capacity(c));
        let mut stats = RowStats::default();
        for (row, &label) in z.chunks(v.max(1)).zip(labels) {
            let s: Vec<f64> = row.iter().map(|x| x * self.inv_temp).collect();
            let (mut first, mut m) = (0, f64::NEG_INFINITY);
            for (i, &x) in s.iter().enumerate() {
                if x > m {
                    (first, m) = (i, x);
                }
            }
            let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            logp.push(s[label as usize] - l);
            lse.push(l);
            stats.hits.push((first == label as usize) as u8);
            stats
                .mean_logit
                .push((s.iter().sum::<f64>() / v as f64) as f32);
        }
        let dtype = sum_dtype(s1.dtype());
        let lse = Tensor::from_vec(lse, c, &candle_core::Device::Cpu)?.to_dtype(dtype)?;
        self.keep(lse, stats);
        Ok((cpu_from_f64(logp, dtype, self.name())?, Shape::from(c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = crate::cuda_kernels::lse_gather((s1, l1), (s2, l2), self.inv_temp)?;
        let c = rows.hits.len();
        let lse = Tensor::from_storage(
            candle_core::Storage::Cuda(rows.lse),
            c,
            candle_core::op::BackpropOp::none(),
            false,
        );
        let stats = RowStats {
            hits: rows.hits,
            mean_logit: rows.means,
        };
        self.keep(lse, stats);
        Ok((rows.logp, Shape::from(c)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Msg("lse_gather: backward before forward".into()))?;
        let bwd = LseGatherBwd {
            inv_temp: self.inv_temp,
            lse,
        };
        let dz = logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &bwd)?;
        Ok((Some(dz), None))
    }
}

/// `d z = g / T * (onehot(label) - exp(z / T - lse))`, in the logits' dtype.
struct LseGatherBwd {
    inv_temp: f64,
    lse: Tensor,
}

impl CustomOp3 for LseGatherBwd {
    fn name(&self) -> &'static str {
        "preftune-lse-gather-bwd"
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
        let (_, v) = l1.shape().dims2()?;
        let z = cpu_as_f64(s1, l1, self.name())?;
        let labels = cpu_labels(s2, l2)?;
        let g = cpu_as_f64(s3, l3, self.name())?;
        let lse = self.lse.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut dz = Vec::with_capacity(z.len());
        for (r, row) in z.chunks(v.max(1)).enumerate() {
            for (j, &x) in row.iter().enumerate() {
                let p = (x * self.inv_temp - lse[r]).exp();
                let hot = if j == labels[r] as usize { 1.0 } else { 0.0 };
                dz.push(g[r] * self.inv_temp * (hot - p));
            }
        }
        Ok((
            cpu_from_f64(dz, s1.dtype(), self.name())?,
            l1.shape().clone(),
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
        let (st, ls) = self.lse.storage_and_layout();
        let lse = crate::cuda_kernels::on_gpu(&st, self.name())?;
        crate::cuda_kernels::lse_gather_bwd((s1, l1), (s2, l2), (s3, l3), (lse, ls), self.inv_temp)
    }
}
