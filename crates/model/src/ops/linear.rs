//! Linear layers: `x W^T + b` with LoRA, the few-row decoding product and frozen weights'
//! products.
use super::*;

/// `y = x W^T + b` with `W` stored `[out, in]` (PyTorch's `nn.Linear` layout), plus an optional
/// LoRA update `scale * B A x`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Module path (`model.layers.0.self_attn.q_proj`): names its weights and matches LoRA targets.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<crate::lora::LoraAdapter>,
    /// A quantised base weight (`ops::quant`): then `weight` is a placeholder of the right
    /// shape and dtype with no storage of its own (a broadcast zero), and products dequantise
    /// this one.
    pub quant: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            name: name.into(),
            weight,
            bias,
            lora: None,
            quant: None,
        }
    }

    /// A linear over a quantised `[out, in]` weight, frozen; `dtype` is the model's.
    pub fn quantized(
        name: impl Into<String>,
        q: std::sync::Arc<candle_core::quantized::QTensor>,
        bias: Option<Tensor>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let shape = q.shape().dims2()?;
        let placeholder = Tensor::zeros((1, 1), dtype, device)?.broadcast_as(shape)?;
        Ok(Linear {
            quant: Some(q),
            ..Linear::new(name, placeholder, bias)
        })
    }

    /// The dense weight: `weight`, or the quantised one dequantised to `weight`'s dtype.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => super::quant::dequantize(q, self.weight.dtype()),
            None => Ok(self.weight.clone()),
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

    /// Whether this layer's product of `x` is the bf16 product composed from candle ops (`bf16 =
    /// true` off the CPU's kernels: a GPU, or its code path on the CPU, in training and scoring,
    /// not in a sampling loop's packed weights) with nothing added to it (no bias, LoRA or
    /// quantised weight). Then [`Linear::forward_bf16`] gives the product in bf16 and
    /// [`Linear::forward`] takes a bf16 `x`.
    pub fn bf16_activations(&self, x: &Tensor) -> bool {
        self.bias.is_none()
            && self.lora.is_none()
            && self.quant.is_none()
            && !packing()
            && composed_bf16_applies(x, &self.weight)
    }

    /// `x W^T` left in bf16 where [`Linear::bf16_activations`] holds: the caller keeps it (the
    /// MLP's gate and up into SwiGLU, as autocast keeps them), where [`Linear::forward`] would
    /// keep the bf16 product and its f32 copy for backward.
    pub fn forward_bf16(&self, x: &Tensor) -> Result<Tensor> {
        self.on_rows(x, |x2| bf16_product(x2, &self.weight))
    }

    fn apply(&self, x: &Tensor, unread: bool) -> Result<Tensor> {
        self.on_rows(x, |x2| {
            let mut y = match &self.quant {
                Some(q) => super::quant::quant_matmul(x2, q, unread)?,
                None => self.dense_matmul(x2, unread)?,
            };
            if let Some(b) = &self.bias {
                y = y.broadcast_add(b)?;
            }
            if let Some(l) = &self.lora {
                y = (y + l.delta(x2)?)?;
            }
            Ok(y)
        })
    }

    /// `f` of `x` as rows `[N, in]`, its `[N, out]` shaped back as `x` with `out` last.
    fn on_rows(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let dims = x.dims();
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let y = f(&x.reshape((lead, in_dim))?)?;
        let mut out_shape = dims.to_vec();
        *out_shape.last_mut().expect("x has at least one dim") = out_dim;
        y.reshape(out_shape)
    }

    /// `x W^T` for `x: [N, in]` and a dense `W`, by the fastest product that applies.
    fn dense_matmul(&self, x2: &Tensor, unread: bool) -> Result<Tensor> {
        let lead = x2.dim(0)?;
        let unread = unread
            && (x2.track_op() || self.weight.track_op())
            && kernels::cpu_kernels(x2.device())
            && x2.dtype() == DType::F32
            && self.weight.dtype() == DType::F32;
        Ok(if unread {
            unread_matmul(x2, &self.weight)?
        } else if let Some(y) = packed_matmul(x2, &self.weight)? {
            y
        } else if let Some(y) = (!training_products())
            .then(|| few_rows_matmul(x2, &self.weight))
            .transpose()?
            .flatten()
        {
            y
        } else if (x2.track_op() || training_products() || lead >= BF16_MIN_ROWS)
            && bf16_applies(x2, &self.weight)
        {
            bf16_matmul(x2, &self.weight)?
        } else if composed_bf16_applies(x2, &self.weight) {
            bf16_composed_matmul(x2, &self.weight)?
        } else if x2.track_op()
            && !self.weight.track_op()
            && kernels::cpu_kernels(self.weight.device())
        {
            frozen_matmul(x2, &self.weight)?
        } else if self.weight.track_op()
            && lead > TRANSPOSED_MAX_ROWS
            && kernels::cpu_kernels(self.weight.device())
            && x2.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            f32_matmul(x2, &self.weight)?
        } else if lead <= TRANSPOSED_MAX_ROWS && kernels::cpu_kernels(self.weight.device()) {
            // Few rows (decoding): `(W x^T)^T` streams the weight in its stored layout and runs
            // about twice as fast in candle's GEMM as `x W^T`, which packs the transposed weight
            // every call. Outside autograd the product is transposed back in blocks: the
            // reshape after it would copy element by element (14% of a rollout's f32 time).
            let yt = self.weight.matmul(&x2.t()?)?;
            match yt.track_op() {
                true => yt.t()?,
                false => transposed(&yt)?,
            }
        } else {
            x2.matmul(&self.weight.t()?)?
        })
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
pub(super) fn few_rows_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
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

pub(super) struct FrozenMatmul {
    pub(super) x: Tensor,
    pub(super) w: Tensor,
    /// The value is zeros and the product is skipped (see [`Linear::forward_unread`]).
    pub(super) unread: bool,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "preftune-frozen-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.unread {
            return Ok(unread_value(self.x.dim(0)?, self.w.dim(0)?));
        }
        cpu_output(&self.x.matmul(&self.w.t()?)?, self.name())
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// A product computed with tensor ops inside a custom op's forward, as the op's output storage.
pub(crate) fn cpu_output(y: &Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
    let y = y.contiguous()?;
    let (storage, layout) = y.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: CPU only")
    };
    match layout.contiguous_offsets() {
        Some((0, end)) if end == cpu_len(cpu) => Ok((cpu.clone(), y.shape().clone())),
        _ => candle_core::bail!("{op}: unexpected output layout"),
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

/// The contiguous transpose of a 2-D CPU f32 tensor, copied in cache-sized blocks over the threads
/// (any other tensor: a transposed view). Carries no gradient.
fn transposed(t: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, m) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return t.t();
    };
    // One row or column: the transposed view is already contiguous.
    if t.dtype() != DType::F32 || !layout.is_contiguous() || n <= 1 || m <= 1 {
        return t.t();
    }
    let src = kernels::slice::<f32>(cpu, layout, "transposed")?;
    // Output rows (columns of `t`) in groups of 8 per task; each task walks `t` by row, reading 8
    // adjacent values of each.
    const COLS: usize = 8;
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(COLS * n)
        .enumerate()
        .for_each(|(c, rows)| {
            let j0 = c * COLS;
            let w = rows.len() / n;
            for (i, s) in src.chunks_exact(m).enumerate() {
                for (dj, &v) in s[j0..j0 + w].iter().enumerate() {
                    rows[dj * n + i] = v;
                }
            }
        });
    drop(storage);
    Tensor::from_vec(out, (m, n), t.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocked_transpose_is_the_transpose() {
        for (n, m) in [(37, 5), (5, 37), (64, 16), (1, 9), (130, 64)] {
            let t = Tensor::randn(0f32, 1.0, (n, m), &candle_core::Device::Cpu).unwrap();
            let got = transposed(&t).unwrap();
            assert!(got.is_contiguous());
            let want = t.t().unwrap().contiguous().unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "[{n}, {m}]"
            );
        }
    }
}
