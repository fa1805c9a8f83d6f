//! Fused LM head + log-softmax + gather, with a hand-written backward.
//!
//! Composed from candle ops, `log p(label)` over a 49k vocabulary keeps the logits, their shifted
//! copy and their exponentials for backward and makes ten passes over them. This op computes the
//! logits in row chunks, keeps only one log-prob per row, and recomputes each chunk's logits in
//! backward, so no `[N, V]` tensor outlives its chunk: the trade TRL's fused LM head makes too.
//! The row loops are `preftune_kernels::lm_head`'s; this op chunks the rows and runs the products.
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use preftune_kernels::bf16gemm::{gemm_nt, gemm_packed, PackedB, View};
use preftune_kernels::lm_head::{logprob_grad_rows, logprob_rows};

/// Rows of logits computed at a time (`ROWS x V` f32 values live at once).
const ROWS: usize = 256;

/// Per-row side results of the forward pass.
#[derive(Clone, Debug, Default)]
pub struct RowStats {
    /// 1 where the label is the argmax of the row.
    pub hits: Vec<u8>,
    /// Mean over the vocabulary of the (temperature-scaled) logits.
    pub mean_logit: Vec<f32>,
}

pub struct LmHeadLogprob {
    hidden: Tensor,
    weight: Tensor,
    labels: Vec<u32>,
    inv_temp: f32,
    /// bf16 products ([`crate::ops::Bf16Scope`] was on when the op was built).
    bf16: bool,
    /// `W` packed as the right operand of `h W^T` for every chunk: made by the forward pass and
    /// taken by backward's recomputation, so it does not live on through the rest of backward
    /// (the graph keeps this op until the whole pass ends).
    packed: Mutex<Option<PackedB>>,
    /// Filled by the forward pass; shared so the caller can read it after `apply_op3` took the op.
    pub stats: std::sync::Arc<Mutex<RowStats>>,
}

impl LmHeadLogprob {
    /// `hidden: [N, H]`, `weight: [V, H]`, one label per row.
    pub fn new(
        hidden: &Tensor,
        weight: &Tensor,
        labels: Vec<u32>,
        temperature: f64,
    ) -> Result<Self> {
        let hidden = hidden.detach().to_dtype(DType::F32)?.contiguous()?;
        let weight = weight.detach().to_dtype(DType::F32)?;
        Ok(LmHeadLogprob {
            bf16: crate::ops::bf16_enabled() && crate::kernels::cpu_kernels(hidden.device()),
            hidden,
            weight,
            labels,
            inv_temp: (1.0 / temperature) as f32,
            packed: Mutex::new(None),
            stats: Default::default(),
        })
    }

    /// `W` packed for bf16 products (packed now if the forward pass has not, or backward took it).
    fn packed(&self) -> Result<PackedB> {
        if let Some(p) = self.packed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Ok(p);
        }
        let (v, h) = self.weight.dims2()?;
        crate::ops::with_f32(&self.weight, |w| PackedB::new(View::rows(w, v, h)))
    }

    /// Scaled logits of rows `[start, start + n)`, flattened; `packed` for bf16 products.
    fn logits(&self, start: usize, n: usize, packed: Option<&PackedB>) -> Result<Vec<f32>> {
        let mut l: Vec<f32> = if let Some(w) = packed {
            let h = self.weight.dim(1)?;
            crate::ops::with_f32(&self.hidden, |hid| {
                let rows = View::rows(&hid[start * h..(start + n) * h], n, h);
                preftune_kernels::bf16gemm::gemm_packed_new(rows, w)
            })?
        } else {
            self.hidden
                .narrow(0, start, n)?
                .matmul(&self.weight.t()?)?
                .flatten_all()?
                .to_vec1()?
        };
        if self.inv_temp != 1.0 {
            l.iter_mut().for_each(|x| *x *= self.inv_temp);
        }
        Ok(l)
    }
}

impl CustomOp3 for LmHeadLogprob {
    fn name(&self) -> &'static str {
        "lm-head-logprob"
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
        let (n, _) = self.hidden.dims2()?;
        let v = self.weight.dim(0)?;
        let mut out = vec![0f32; n];
        let mut stats = RowStats {
            hits: vec![0; n],
            mean_logit: vec![0.0; n],
        };
        let packed = self.bf16.then(|| self.packed()).transpose()?;
        for start in (0..n).step_by(ROWS) {
            let m = ROWS.min(n - start);
            let mut l = self.logits(start, m, packed.as_ref())?;
            let rows = logprob_rows(&mut l, v, &self.labels[start..start + m]);
            for (i, r) in rows.into_iter().enumerate() {
                out[start + i] = r.logprob;
                stats.hits[start + i] = u8::from(r.hit);
                stats.mean_logit[start + i] = r.mean;
            }
        }
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        *self.packed.lock().unwrap_or_else(|e| e.into_inner()) = packed;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// `d lp_i / d z_i = inv_temp * (onehot(label_i) - softmax(z_i))`; then the two matmuls of the LM
    /// head, chunk by chunk with the logits recomputed.
    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, _) = self.hidden.dims2()?;
        let v = self.weight.dim(0)?;
        let g: Vec<f32> = grad_res.to_dtype(DType::F32)?.to_vec1()?;
        let dev = self.hidden.device();
        if self.bf16 {
            return self.bwd_bf16(arg1, arg2, &g);
        }
        let mut grad_h = Vec::with_capacity(n.div_ceil(ROWS));
        let mut grad_w: Option<Tensor> = None;
        for start in (0..n).step_by(ROWS) {
            let m = ROWS.min(n - start);
            let dz = Tensor::from_vec(self.dz(start, m, &g, None)?, (m, v), dev)?;
            grad_h.push(dz.matmul(&self.weight)?);
            // A frozen head (LoRA, tied embeddings left alone) needs no weight gradient.
            if !arg2.track_op() {
                continue;
            }
            let gw = dz.t()?.matmul(&self.hidden.narrow(0, start, m)?)?;
            grad_w = Some(match grad_w {
                Some(acc) => (acc + gw)?,
                None => gw,
            });
        }
        let grad_h = Tensor::cat(&grad_h, 0)?.to_dtype(arg1.dtype())?;
        let grad_w = grad_w.map(|w| w.to_dtype(arg2.dtype())).transpose()?;
        Ok((Some(grad_h), grad_w, None))
    }
}

impl LmHeadLogprob {
    /// `dz = dlp/dz` of a chunk, in place of its recomputed logits.
    fn dz(&self, start: usize, m: usize, g: &[f32], packed: Option<&PackedB>) -> Result<Vec<f32>> {
        let v = self.weight.dim(0)?;
        let mut l = self.logits(start, m, packed)?;
        let labels = &self.labels[start..start + m];
        logprob_grad_rows(&mut l, v, labels, &g[start..start + m], self.inv_temp);
        Ok(l)
    }

    /// Backward with bf16 products: `dh = dz W` and `dW += dz^T h` chunk by chunk.
    fn bwd_bf16(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        g: &[f32],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h) = self.hidden.dims2()?;
        let v = self.weight.dim(0)?;
        // `W^T`, the right operand of `dz W`, for every chunk.
        let wt = crate::ops::with_f32(&self.weight, |w| PackedB::new(View::transposed(w, h, v)))?;
        let packed = self.packed()?;
        let mut grad_h = vec![0f32; n * h];
        let mut grad_w = arg2.track_op().then(|| vec![0f32; v * h]);
        for start in (0..n).step_by(ROWS) {
            let m = ROWS.min(n - start);
            let dz = self.dz(start, m, g, Some(&packed))?;
            gemm_packed(
                View::rows(&dz, m, v),
                &wt,
                &mut grad_h[start * h..(start + m) * h],
                false,
            );
            // A frozen head (LoRA, tied embeddings left alone) needs no weight gradient.
            if let Some(gw) = &mut grad_w {
                crate::ops::with_f32(&self.hidden, |hid| {
                    gemm_nt(
                        View::transposed(&dz, v, m),
                        View::transposed(&hid[start * h..(start + m) * h], h, m),
                        gw,
                        true,
                    )
                })?;
            }
        }
        let dev = self.hidden.device();
        let grad_h = Tensor::from_vec(grad_h, (n, h), dev)?.to_dtype(arg1.dtype())?;
        let grad_w = grad_w
            .map(|w| Tensor::from_vec(w, (v, h), dev)?.to_dtype(arg2.dtype()))
            .transpose()?;
        Ok((Some(grad_h), grad_w, None))
    }
}
