//! Linears over quantised weights (llama.cpp's block formats), for LoRA on a quantised base
//! (QLoRA-style): the weights stay quantised in memory and are dequantised one layer at a time,
//! in forward and again in backward, so at most one layer's f32 weight exists at once.
//!
//! The product is the one a dense layer with the dequantised weight computes (same GEMM, bf16
//! under mixed precision), so a quantised model trains exactly like the f32 model whose weights
//! are the dequantised values. Decoding steps (a few rows, no gradient) use candle's quantised
//! product instead, as llama.cpp does: it multiplies the blocks directly against int8-quantised
//! activations, faster than dequantising the whole model per token, with llama.cpp's rounding.
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;

use super::*;

/// The quantised types a base's linears are stored in when quantised at load (TRL's
/// `load_in_4bit` / `load_in_8bit`). GGUF tensors that are already quantised stay as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseQuant {
    /// llama.cpp's Q4_K (256-value super-blocks), or Q4_0 (blocks of 32) for rows that do not
    /// split into 256s.
    Q4,
    /// llama.cpp's Q8_0 (blocks of 32).
    Q8,
}

impl BaseQuant {
    /// The block type for rows of `in_dim` values, or `None` when they do not split into blocks
    /// (the layer then stays dense).
    pub fn ggml_type(self, in_dim: usize) -> Option<GgmlDType> {
        let ty = match self {
            BaseQuant::Q4 if in_dim.is_multiple_of(GgmlDType::Q4K.block_size()) => GgmlDType::Q4K,
            BaseQuant::Q4 => GgmlDType::Q4_0,
            BaseQuant::Q8 => GgmlDType::Q8_0,
        };
        in_dim.is_multiple_of(ty.block_size()).then_some(ty)
    }
}

/// Whether a GGUF tensor type is a block-quantised one (not f32/f16/bf16).
pub fn is_block_quantized(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Quantises a `[out, in]` weight on the host, or `None` when its rows do not split into blocks.
pub fn quantize_weight(w: &Tensor, quant: BaseQuant) -> Result<Option<Arc<QTensor>>> {
    let (_, in_dim) = w.dims2()?;
    let Some(ty) = quant.ggml_type(in_dim) else {
        return Ok(None);
    };
    let w = w
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?;
    Ok(Some(Arc::new(quantize(&w, ty)?)))
}

/// `QTensor::quantize` of what `t` shows. candle quantises its whole storage, so a view (one
/// expert's slice of a stacked GGUF tensor, say) would bring its neighbours: quantise a copy.
pub(crate) fn quantize(t: &Tensor, ty: GgmlDType) -> Result<QTensor> {
    QTensor::quantize(&t.force_contiguous()?, ty)
}

/// The rows of a quantised `[out, in]` weight in a new order (`rows[i]` is the source row of row
/// `i`): each row is a whole number of blocks, so this moves bytes and never requantises.
pub fn permute_rows(q: &QTensor, rows: &[usize]) -> Result<QTensor> {
    let (out, in_dim) = q.shape().dims2()?;
    let ty = q.dtype();
    if rows.len() != out || !in_dim.is_multiple_of(ty.block_size()) {
        candle_core::bail!(
            "permute_rows: {} rows for a [{out}, {in_dim}] weight",
            rows.len()
        )
    }
    let row_bytes = in_dim / ty.block_size() * ty.type_size();
    let data = q.data()?;
    let mut out_bytes = Vec::with_capacity(data.len());
    for &r in rows {
        if r >= out {
            candle_core::bail!("permute_rows: row {r} of {out}")
        }
        out_bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    from_blocks(out_bytes, ty, (out, in_dim))
}

/// A quantised `[rows, cols]` weight of type `ty`, on the host, made of these blocks' bytes.
fn from_blocks(bytes: Vec<u8>, ty: GgmlDType, shape: (usize, usize)) -> Result<QTensor> {
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        &candle_core::Device::Cpu,
        ty,
    )?;
    QTensor::new(storage, shape)
}

/// llama.cpp's stacked experts (`[experts, out, in]`) as one `[out, in]` weight each: every
/// expert is a whole number of rows of blocks, so this moves bytes and never requantises.
pub fn split_experts(q: &QTensor) -> Result<Vec<QTensor>> {
    let (experts, out, in_dim) = q.shape().dims3()?;
    let ty = q.dtype();
    if !in_dim.is_multiple_of(ty.block_size()) {
        candle_core::bail!("split_experts: rows of {in_dim} do not split into {ty:?} blocks")
    }
    let bytes = out * (in_dim / ty.block_size()) * ty.type_size();
    let data = q.data()?;
    (0..experts)
        .map(|e| from_blocks(data[e * bytes..(e + 1) * bytes].to_vec(), ty, (out, in_dim)))
        .collect()
}

/// The dequantised weight in `dtype`: a temporary, dropped once the product that needs it is done.
pub fn dequantize(q: &QTensor, dtype: DType) -> Result<Tensor> {
    q.dequantize(&candle_core::Device::Cpu)?.to_dtype(dtype)
}

/// `x W^T` for a quantised `W` (`x`: `[m, in]`): gradients flow to `x` only. `unread`: the value
/// is zeros and the product is skipped ([`Linear::forward_unread`]).
pub fn quant_matmul(x: &Tensor, q: &Arc<QTensor>, unread: bool) -> Result<Tensor> {
    if !x.device().is_cpu() {
        candle_core::bail!("a quantised base (load_in_4bit / load_in_8bit) runs on the CPU only")
    }
    let (m, _) = x.dims2()?;
    if !x.track_op() {
        if m <= SMALL_M {
            let y = QMatMul::from_arc(q.clone())?.forward(&x.to_dtype(DType::F32)?)?;
            return y.to_dtype(x.dtype());
        }
        return dense_product(x, q, false);
    }
    // The unread value is f32 zeros ([`unread_value`]).
    x.apply_op1(QuantMatmul {
        x: x.detach(),
        q: q.clone(),
        unread: unread && x.dtype() == DType::F32,
    })
}

/// The product of a dense layer whose weight is `q` dequantised: the same dispatch for an
/// untracked `x`, and for a tracked one (`tracked`: the forward of [`QuantMatmul`]) the product
/// a frozen dense weight gets in training, bf16 under mixed precision.
fn dense_product(x: &Tensor, q: &QTensor, tracked: bool) -> Result<Tensor> {
    let w = dequantize(q, x.dtype())?;
    if !tracked {
        return Linear::new("dequantised", w, None).forward(x);
    }
    if bf16_applies(x, &w) {
        return bf16_matmul(x, &w);
    }
    x.matmul(&w.t()?)
}

struct QuantMatmul {
    x: Tensor,
    q: Arc<QTensor>,
    unread: bool,
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "preftune-quant-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.unread {
            return Ok(unread_value(self.x.dim(0)?, self.q.shape().dims2()?.0));
        }
        cpu_output(&dense_product(&self.x, &self.q, true)?, self.name())
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.detach();
        let w = dequantize(&self.q, DType::F32)?;
        if bf16_applies(&grad, &w) {
            return bf16_input_grad(&grad, &w).map(Some);
        }
        grad.matmul(&w.to_dtype(grad.dtype())?).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_abs as max_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Forward and the input's gradient equal those of a dense layer holding the dequantised
    /// weight, for Q4 (K and _0) and Q8, with many rows (the dequantising op) and few (untracked:
    /// candle's quantised product, within its int8 activation rounding).
    #[test]
    fn quantised_linear_is_the_dense_linear_of_its_dequantised_weight() {
        for (quant, in_dim) in [
            (BaseQuant::Q4, 256),
            (BaseQuant::Q4, 96),
            (BaseQuant::Q8, 64),
        ] {
            let w = randn((48, in_dim), 1);
            let q = quantize_weight(&w, quant).unwrap().unwrap();
            let wd = dequantize(&q, DType::F32).unwrap();
            // Quantisation error is real but bounded (4-bit: about 1/16 of the range).
            let err = max_diff(&w, &wd);
            assert!(err > 0.0 && err < 0.2, "{quant:?}: error {err}");
            let xv = Var::from_tensor(&randn((40, in_dim), 2)).unwrap();
            let x = xv.as_tensor();
            let yq = quant_matmul(x, &q, false).unwrap();
            let yd = frozen_matmul(x, &wd).unwrap();
            assert!(max_diff(&yq, &yd) < 1e-5, "{quant:?}: forward");
            let g = randn((40, 48), 3);
            let gq = (&yq * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gd = (&yd * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (gq, gd) = (gq.get(x).unwrap(), gd.get(x).unwrap());
            assert!(max_diff(gq, gd) < 1e-5, "{quant:?}: gradient");
            // The same gradient from the unread (recomputation) form, whose value is zeros.
            let yu = quant_matmul(x, &q, true).unwrap();
            assert_eq!(max_diff(&yu, &yu.zeros_like().unwrap()), 0.0);
            let gu = (&yu * &g).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(gu.get(x).unwrap(), gd) < 1e-5, "{quant:?}: unread");
            // Decoding rows: candle's quantised product, int8 activations.
            let xs = randn((2, in_dim), 4);
            let ys = quant_matmul(&xs, &q, false).unwrap();
            let yr = xs.matmul(&wd.t().unwrap()).unwrap();
            let scale = yr
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max_diff(&ys, &yr) < 0.02 * scale, "{quant:?}: decoding");
        }
    }

    #[test]
    fn split_experts_are_the_stack_s_slices() {
        for ty in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let w = randn((3 * 8, 256), 6).reshape((3, 8, 256)).unwrap();
            let q = QTensor::quantize(&w, ty).unwrap();
            let whole = q.dequantize(&Device::Cpu).unwrap();
            let parts = split_experts(&q).unwrap();
            assert_eq!(parts.len(), 3);
            for (e, p) in parts.iter().enumerate() {
                assert_eq!(p.dtype(), ty);
                let d = p.dequantize(&Device::Cpu).unwrap();
                assert_eq!(
                    max_diff(&d, &whole.get(e).unwrap()),
                    0.0,
                    "{ty:?} expert {e}"
                );
            }
        }
    }

    #[test]
    fn permuted_rows_move_whole_rows() {
        let w = randn((8, 64), 5);
        let q = quantize_weight(&w, BaseQuant::Q8).unwrap().unwrap();
        let rows = [3, 1, 0, 2, 7, 6, 5, 4];
        let p = permute_rows(&q, &rows).unwrap();
        let (wd, pd) = (
            dequantize(&q, DType::F32).unwrap(),
            dequantize(&p, DType::F32).unwrap(),
        );
        for (i, &r) in rows.iter().enumerate() {
            let a = pd.get(i).unwrap();
            let b = wd.get(r).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0, "row {i}");
        }
        assert!(permute_rows(&q, &rows[..4]).is_err());
        assert!(permute_rows(&q, &[9, 1, 0, 2, 7, 6, 5, 4]).is_err());
    }

    #[test]
    fn rows_that_do_not_split_into_blocks_stay_dense() {
        assert_eq!(BaseQuant::Q4.ggml_type(256), Some(GgmlDType::Q4K));
        assert_eq!(BaseQuant::Q4.ggml_type(64), Some(GgmlDType::Q4_0));
        assert_eq!(BaseQuant::Q8.ggml_type(48), None);
        assert!(quantize_weight(&randn((4, 48), 6), BaseQuant::Q8)
            .unwrap()
            .is_none());
    }
}
