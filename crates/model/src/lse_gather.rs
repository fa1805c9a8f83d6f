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
use crate::kernels::{cpu_as_f64, cpu_from_f64};

/// Log-probs `[C]` (f32; f64 for f64 logits) of `labels` under `logits` `[C, V]` scaled by
/// `1 / temperature`, with each row's top-1 hit and mean scaled logit.
pub fn lse_gather(logits: &Tensor, labels: &[u32], temperature: f64) -> Result<(Tensor, RowStats)> {
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
    let stats = op.stats.clone();
    let lab = Tensor::from_slice(labels, c, logits.device())?;
    let lp = logits.contiguous()?.apply_op2(&lab, op)?;
    let stats = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((lp, stats))
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

/// The accumulator type for logits of `dtype`: f64 stays f64, everything else f32.
fn acc(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
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
        let dtype = acc(s1.dtype());
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
        let candle_core::Storage::Cuda(lse) = &*st else {
            return Err(Error::Msg("lse_gather: log-sum-exp not on the GPU".into()));
        };
        crate::cuda_kernels::lse_gather_bwd((s1, l1), (s2, l2), (s3, l3), (lse, ls), self.inv_temp)
    }
}
