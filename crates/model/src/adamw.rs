//! AdamW's update on the parameters' device, in place: each moment, then the parameter, as three
//! ops on candle's storage that allocate nothing ([`preftune_kernels::adamw`]'s two-pass form on
//! the CPU; `adamw_ema` and `adamw_param` of `preftune-kernels-cuda` on a GPU, the same bits).
//! The same update from composed candle ops makes about ten temporaries of the parameter's size
//! and launches a kernel for each.
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

use crate::kernels::{f32_mut, slice};

pub use preftune_kernels::adamw::Step;

/// Whether [`update`] runs for a parameter, its moments and its gradient: all f32 and
/// contiguous, on the CPU (outside a [`crate::kernels::PortableScope`]) or on a GPU with
/// preftune's CUDA kernels (`PREFTUNE_CUDA_KERNELS=1`).
pub fn applies(ts: [&Tensor; 4]) -> bool {
    let d = ts[0].device();
    ts.iter()
        .all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(d))
        && (crate::kernels::cpu_kernels(d) || crate::kernels::cuda_kernels_apply(d))
}

/// Updates `m` and `v` from the gradient `g`, then `p` from them, in place. All four must have
/// one shape and [`applies`]; a parameter that takes no decay has `s.decay` 1.
pub fn update(s: &Step, p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> Result<()> {
    for t in [m, v, g] {
        if t.shape() != p.shape() {
            candle_core::bail!(
                "adamw: shape {:?} against the parameter's {:?}",
                t.dims(),
                p.dims()
            )
        }
    }
    m.inplace_op2(
        g,
        &Ema {
            beta: s.b1,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Ema {
            beta: s.b2,
            square: true,
        },
    )?;
    p.inplace_op3(m, v, &Param(*s))
}

/// The same update from composed candle ops, for the tensors [`update`] does not take (another
/// dtype, or a GPU without preftune's kernels): the new `[p, m, v]`, in f32. Rounds in other
/// places than [`update`] (a division by `bc2_sqrt` is a multiplication by its reciprocal).
pub fn composed(s: &Step, p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> Result<[Tensor; 3]> {
    let g = g.to_dtype(DType::F32)?;
    let m = ((m * s.b1 as f64)? + (&g * (1.0 - s.b1) as f64)?)?;
    let v = ((v * s.b2 as f64)? + (g.sqr()? * (1.0 - s.b2) as f64)?)?;
    let denom = ((v.sqrt()? / s.bc2_sqrt as f64)? + s.eps as f64)?;
    let p = p.to_dtype(DType::F32)?;
    let p = ((p * s.decay as f64)? - ((&m / denom)? * s.step_size as f64)?)?;
    Ok([p, m, v])
}

/// `a = beta a + (1 - beta) g` (`g * g` when `square`), in place.
struct Ema {
    beta: f32,
    square: bool,
}

impl candle_core::InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "preftune-adamw-ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = slice::<f32>(s2, l2, self.name())?;
        let a = f32_mut(s1, l1, self.name())?;
        if a.len() != g.len() {
            candle_core::bail!("{}: {} values against {}", self.name(), a.len(), g.len())
        }
        preftune_kernels::adamw::ema(a, g, self.beta, self.square);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_kernels::adamw_ema(s1, l1, s2, l2, self.beta, self.square)
    }
}

/// `p = p decay - step_size m / (sqrt(v) / bc2_sqrt + eps)`, in place.
struct Param(Step);

impl candle_core::InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "preftune-adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, v) = (slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let p = f32_mut(s1, l1, self.name())?;
        if m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("{}: moments of another length", self.name())
        }
        preftune_kernels::adamw::param(&self.0, p, m, v);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda_kernels::adamw_param(s1, l1, s2, l2, s3, l3, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place ops give the CPU trainer's one-pass update, bit for bit, and leave the
    /// tensors where they were (no new storage).
    #[test]
    fn in_place_update_is_the_one_pass_loop() {
        let n = 257;
        let wave = |k: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * k).sin()).collect() };
        let (p0, g) = (wave(0.3), wave(0.7));
        let t = |v: &[f32]| Tensor::from_slice(v, (1, n), &Device::Cpu).unwrap();
        let (p, m, v, gt) = (t(&p0), t(&vec![0.0; n]), t(&vec![0.0; n]), t(&g));
        let s = Step {
            b1: 0.9,
            b2: 0.999,
            bc2_sqrt: 0.0316,
            eps: 1e-8,
            step_size: 0.01,
            decay: 0.999,
        };
        assert!(applies([&p, &m, &v, &gt]));
        for _ in 0..2 {
            update(&s, &p, &m, &v, &gt).unwrap();
        }
        let (mut pw, mut mw, mut vw) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        for _ in 0..2 {
            preftune_kernels::adamw::update(&s, &mut pw, &mut mw, &mut vw, &g);
        }
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((flat(&p), flat(&m), flat(&v)), (pw, mw, vw));
        // Other shapes or dtypes are refused, and the composed path is left to the caller.
        assert!(update(&s, &p, &m, &v, &t(&g).reshape(n).unwrap()).is_err());
        let half = p.to_dtype(DType::BF16).unwrap();
        assert!(!applies([&half, &m, &v, &gt]));
    }
}
