//! `preftune check-kernels`: each fused op against its composed twin on one device, forward and
//! gradients, at model-like shapes. On a GPU this is how `preftune-kernels-cuda` is checked
//! (scripts/gpu-check.sh); on the CPU it checks the CPU kernels the same way.
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::kernels::sum_dtype;
use crate::{kernels, lse_gather, ops, Result};

/// One op in one dtype: the largest differences between fused and composed, each relative to the
/// composed value's largest magnitude.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelCheck {
    pub op: &'static str,
    pub dtype: String,
    pub device: String,
    /// Output difference.
    pub forward: f64,
    /// Largest difference over the inputs' gradients.
    pub gradient: f64,
    pub tolerance: f64,
    pub passed: bool,
}

/// The dtypes each device's fused kernels take: f32 and f64 on the CPU; bf16 too on CUDA.
fn dtypes(dev: &Device) -> Vec<DType> {
    if dev.is_cpu() {
        vec![DType::F32, DType::F64]
    } else {
        vec![DType::F32, DType::BF16, DType::F64]
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::BF16 | DType::F16 => 3e-2,
        _ => 1e-4,
    }
}

/// Seeded normal-ish values made on the host (the same on every device), as `dtype` on `dev`.
fn input(
    rng: &mut StdRng,
    dims: &[usize],
    scale: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| scale * (rng.gen::<f64>() + rng.gen::<f64>() - 1.0) * 1.7)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?)
}

/// `max |a - b| / max |b|` in f64.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
    Ok(diff / scale)
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// Output and gradients of `sum(f(inputs) * r)` for inputs `0..grads`.
fn run(f: Op, inputs: &[Tensor], r: &Tensor, grads: usize) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs[..grads]
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let mut all: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    all.extend(inputs[grads..].iter().cloned());
    let y = f(&all)?;
    let store = (y.to_dtype(DType::F64)? * r.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let g =
        vars.iter()
            .map(|v| {
                store.get(v.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("an input got no gradient".into()).into()
                })
            })
            .collect::<Result<_>>()?;
    Ok((y, g))
}

fn compare(
    op: &'static str,
    dtype: DType,
    dev: &Device,
    (fused, composed): (Op, Op),
    inputs: &[Tensor],
    grads: usize,
    rng: &mut StdRng,
) -> Result<KernelCheck> {
    let r = input(rng, composed(inputs)?.dims(), 1.0, DType::F64, dev)?;
    let (y_c, g_c) = run(composed, inputs, &r, grads)?;
    let (y_f, g_f) = run(fused, inputs, &r, grads)?;
    let forward = rel_diff(&y_f, &y_c)?;
    let mut gradient = 0f64;
    for (a, b) in g_f.iter().zip(&g_c) {
        gradient = gradient.max(rel_diff(a, b)?);
    }
    Ok(KernelCheck::new(
        op,
        dtype,
        dev,
        (forward, gradient),
        tolerance(dtype),
    ))
}

impl KernelCheck {
    /// Passed when both differences are within `tolerance`.
    fn new(
        op: &'static str,
        dtype: DType,
        dev: &Device,
        (forward, gradient): (f64, f64),
        tolerance: f64,
    ) -> Self {
        KernelCheck {
            op,
            dtype: format!("{dtype:?}").to_lowercase(),
            device: match dev.location() {
                candle_core::DeviceLocation::Cpu => "cpu".into(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                other => format!("{other:?}"),
            },
            forward,
            gradient,
            tolerance,
            passed: forward <= tolerance && gradient <= tolerance,
        }
    }
}

/// [`crate::flash::flash_decode`] against the composed attention of a decoding step, over a
/// cache buffer's view and over a whole fixed-shape buffer up to a position (`decode_attention`,
/// `decode_attention_limit`), forward only.
fn decode_checks(rng: &mut StdRng, dtype: DType, dev: &Device) -> Result<Vec<KernelCheck>> {
    let (b, groups, rep, dh, cap, tk) = (2, 3, 3, 64, 200, 150);
    let q = input(rng, &[b, groups, rep, dh], 1.0, dtype, dev)?;
    let k_buf = input(rng, &[b, groups, cap, dh], 1.0, dtype, dev)?;
    let v_buf = input(rng, &[b, groups, cap, dh], 1.0, dtype, dev)?;
    let scale = 1.0 / (dh as f64).sqrt();
    let composed = |k: &Tensor, v: &Tensor, mask: &Tensor| -> Result<Tensor> {
        let n = k.dim(2)?;
        let scores =
            (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.reshape((b, groups * rep, 1, n))?;
        Ok(ops::softmax_last(&scores.broadcast_add(mask)?)?
            .to_dtype(dtype)?
            .reshape((b, groups, rep, n))?
            .matmul(&v.contiguous()?)?)
    };
    let mask_of = |n: usize, pad: usize| -> Result<Tensor> {
        let m: Vec<f32> = (0..b * n)
            .map(|i| if i / n == 1 && i % n < pad { -1e9 } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(m, (b, 1, 1, n), dev)?)
    };
    let mut out = vec![];
    let (k, v) = (k_buf.narrow(2, 0, tk)?, v_buf.narrow(2, 0, tk)?);
    let mask = mask_of(tk, 7)?;
    let fused = crate::flash::flash_decode(&q, &k, &v, scale, Some(&mask), None)?;
    let forward = rel_diff(&fused, &composed(&k, &v, &mask)?)?;
    out.push(KernelCheck::new(
        "decode_attention",
        dtype,
        dev,
        (forward, 0.0),
        tolerance(dtype),
    ));
    // Up to position 120: the composed ops see the first 121 keys, the kernel the whole buffer.
    let at = Tensor::from_vec(vec![120u32; b * groups * dh], (b, groups, 1, dh), dev)?;
    let mask = mask_of(cap, 7)?;
    let fused = crate::flash::flash_decode(&q, &k_buf, &v_buf, scale, Some(&mask), Some(&at))?;
    let (k, v) = (k_buf.narrow(2, 0, 121)?, v_buf.narrow(2, 0, 121)?);
    let forward = rel_diff(&fused, &composed(&k, &v, &mask.narrow(3, 0, 121)?)?)?;
    out.push(KernelCheck::new(
        "decode_attention_limit",
        dtype,
        dev,
        (forward, 0.0),
        tolerance(dtype),
    ));
    Ok(out)
}

/// [`crate::adamw::update`] over two steps of a 1536 x 576 parameter with weight decay: against
/// [`crate::adamw::composed`] on the same device (`adamw`, within f32's tolerance), and against
/// the CPU trainer's loop on the host (`adamw_bits`, which must be the same bits: on a GPU, an
/// FMA contracted into the kernels or values flushed to zero would show here).
fn adamw_check(rng: &mut StdRng, dev: &Device) -> Result<[KernelCheck; 2]> {
    use crate::adamw;
    let shape = [1536, 576];
    let p0 = input(rng, &shape, 1.0, DType::F32, dev)?;
    let zeros = || Tensor::zeros(&shape[..], DType::F32, dev);
    let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let n = shape[0] * shape[1];
    // Fresh storage for the in-place side; the composed side makes new tensors each step.
    let (p, m, v) = (p0.copy()?, zeros()?, zeros()?);
    let (mut ph, mut mh, mut vh) = (host(&p0)?, vec![0f32; n], vec![0f32; n]);
    let (mut pc, mut mc, mut vc) = (p0, zeros()?, zeros()?);
    for t in 1..=2 {
        let g = input(rng, &shape, 0.1, DType::F32, dev)?;
        let s = adamw::Step::at(t, 1e-3, (0.9, 0.999), 1e-8, 0.01);
        adamw::update(&s, &p, &m, &v, &g)?;
        preftune_kernels::adamw::update(&s, &mut ph, &mut mh, &mut vh, &host(&g)?);
        [pc, mc, vc] = adamw::composed(&s, &pc, &mc, &vc, &g)?;
    }
    let moments = rel_diff(&m, &mc)?.max(rel_diff(&v, &vc)?);
    let composed = KernelCheck::new(
        "adamw",
        DType::F32,
        dev,
        (rel_diff(&p, &pc)?, moments),
        tolerance(DType::F32),
    );
    // Values that differ, as a fraction: 0 when every bit agrees.
    let differ = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count() as f64
            / n as f64
    };
    let (pd, md, vd) = (host(&p)?, host(&m)?, host(&v)?);
    let bits = KernelCheck::new(
        "adamw_bits",
        DType::F32,
        dev,
        (differ(&pd, &ph), differ(&md, &mh).max(differ(&vd, &vh))),
        0.0,
    );
    Ok([composed, bits])
}

/// Every fused op against its composed twin on `dev`, at SmolLM2-135M-like sizes (hidden 576,
/// MLP 1536, head size 64, a 49152-entry vocabulary) over a few sequences. On the CPU, the
/// log-softmax + gather runs its reference loop (its kernel is the GPU's) and attention in tiles
/// runs `preftune_kernels::flash`.
pub fn check_kernels(dev: &Device) -> Result<Vec<KernelCheck>> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut out = vec![];
    for dtype in dtypes(dev) {
        let x = input(&mut rng, &[2, 37, 576], 1.0, dtype, dev)?;
        let w = input(&mut rng, &[576], 1.0, dtype, dev)?;
        out.push(compare(
            "rms_norm",
            dtype,
            dev,
            (&|t| kernels::rms_norm(&t[0], &t[1], 1e-5), &|t| {
                ops::rms_norm_composed(&t[0], &t[1], 1e-5)
            }),
            &[x, w],
            2,
            &mut rng,
        )?);

        let g = input(&mut rng, &[2, 37, 1536], 3.0, dtype, dev)?;
        let u = input(&mut rng, &[2, 37, 1536], 1.0, dtype, dev)?;
        out.push(compare(
            "swiglu",
            dtype,
            dev,
            (&|t| kernels::swiglu(&t[0], &t[1]), &|t| {
                t[0].silu()? * &t[1]
            }),
            &[g, u],
            2,
            &mut rng,
        )?);

        let q = input(&mut rng, &[2, 9, 37, 64], 1.0, dtype, dev)?;
        let angle = input(&mut rng, &[2, 1, 37, 32], 3.0, DType::F64, dev)?;
        let (cos, sin) = (angle.cos()?.to_dtype(dtype)?, angle.sin()?.to_dtype(dtype)?);
        out.push(compare(
            "rope",
            dtype,
            dev,
            (&|t| kernels::rope(&t[0], &t[1], &t[2]), &|t| {
                ops::rope_composed(&t[0], &t[1], &t[2])
            }),
            &[q, cos, sin],
            1,
            &mut rng,
        )?);

        // Attention: 2 sequences, 3 KV groups of 3 query heads, 150 positions, causal, with 7
        // keys in the middle of the second sequence padded (as in packed or prefix-shared
        // batches; no row is wholly masked: a padding row's output is never used, and composed
        // ops round its uniform scores differently in f32 and f64).
        // Head sizes 64 (SmolLM2, Llama 3.2 1B) and 128 (7B-class models); the GPU's f64
        // kernels stop at 64.
        for (dh, name, name_bf16) in [
            (64, "attention", "attention_bf16_products"),
            (128, "attention_d128", "attention_bf16_products_d128"),
        ] {
            if dtype == DType::F64 && dh > 64 {
                continue;
            }
            let (b, groups, rep, t) = (2, 3, 3, 150);
            let q = input(&mut rng, &[b, groups, rep * t, dh], 1.0, dtype, dev)?;
            let k = input(&mut rng, &[b, groups, t, dh], 1.0, dtype, dev)?;
            let v = input(&mut rng, &[b, groups, t, dh], 1.0, dtype, dev)?;
            let mut m = vec![0f32; b * t * t];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        if j > i || (bi == 1 && (20..27).contains(&j)) {
                            m[(bi * t + i) * t + j] = -1e9;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?;
            let scale = 1.0 / (dh as f64).sqrt();
            let composed = |x: &[Tensor]| {
                let scores =
                    (x[0].matmul(&x[1].t()?)? * scale)?.reshape((b, groups * rep, t, t))?;
                ops::softmax_last(&scores.broadcast_add(&mask)?)?
                    .to_dtype(dtype)?
                    .reshape((b, groups, rep * t, t))?
                    .matmul(&x[2])
            };
            let fused = |x: &[Tensor]| {
                crate::flash::flash_attention(&x[0], &x[1], &x[2], t, scale, Some(&mask))
            };
            out.push(compare(
                name,
                dtype,
                dev,
                (&fused, &composed),
                &[q.clone(), k.clone(), v.clone()],
                3,
                &mut rng,
            )?);
            // Under bf16 products: the tensor-core kernels on a GPU (f32 and bf16 inputs), held to
            // bf16's rounding.
            if dtype != DType::F64 {
                let _bf16 = crate::ops::Bf16Scope::new(true);
                let x = [q.clone(), k.clone(), v.clone()];
                let mut c = compare(name_bf16, dtype, dev, (&fused, &composed), &x, 3, &mut rng)?;
                c.tolerance = tolerance(DType::BF16);
                c.passed = c.forward <= c.tolerance && c.gradient <= c.tolerance;
                out.push(c);
            }
        }

        // A decoding step's attention (GPU only; no backward): 2 rows of 3 KV groups of 3 query
        // heads over 150 cached keys of a 200-position buffer read in place, with padding; then
        // a fixed-shape step's buffer whose keys count up to position 120.
        if !dev.is_cpu() && dtype != DType::F64 {
            out.extend(decode_checks(&mut rng, dtype, dev)?);
        }

        // The LM head without kept logits (matmuls, the log-softmax kernels, and backward's
        // recomputation), chunks of 40 rows, against composed logits.
        let (rows, hidden, vocab) = (96, 576, 16384);
        let h = input(&mut rng, &[rows, hidden], 1.0, dtype, dev)?;
        let w = input(&mut rng, &[vocab, hidden], 0.1, dtype, dev)?;
        let labels: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let lab = Tensor::from_slice(&labels, (rows, 1), dev)?;
        let fused =
            |x: &[Tensor]| Ok(lse_gather::lm_head_logprobs(&x[0], &x[1], &labels, 1.0, 40)?.0);
        let composed = |x: &[Tensor]| {
            let z = x[0].matmul(&x[1].t()?)?.to_dtype(sum_dtype(dtype))?;
            (z.gather(&lab, 1)? - ops::logsumexp_last(&z)?)?.squeeze(1)
        };
        out.push(compare(
            "lm_head",
            dtype,
            dev,
            (&fused, &composed),
            &[h, w],
            2,
            &mut rng,
        )?);

        // LoRA dropout, forward and gradient: the op's (the CUDA kernel on a GPU) against the
        // host's, which must be the same bits.
        let x = input(&mut rng, &[2, 37, 1536], 1.0, dtype, dev)?;
        let g = input(&mut rng, &[2, 37, 1536], 1.0, dtype, dev)?;
        let [(y, y_host), (dx, dx_host)] = crate::lora::dropout_both_ways(&x, &g, 5, 0.1)?;
        out.push(KernelCheck::new(
            "lora_dropout",
            dtype,
            dev,
            (rel_diff(&y, &y_host)?, rel_diff(&dx, &dx_host)?),
            0.0,
        ));

        // AdamW's in-place update (f32 only; the CUDA kernels on a GPU) against the composed
        // ops a GPU without them runs: the parameter (forward) and the moments (gradient) after
        // two steps.
        if dtype == DType::F32 {
            out.extend(adamw_check(&mut rng, dev)?);
        }

        let (rows, vocab) = (48, 49152);
        let z = input(&mut rng, &[rows, vocab], 4.0, dtype, dev)?;
        let labels: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        for (op, temperature) in [("lse_gather", 1.0), ("lse_gather_t0.7", 0.7)] {
            let lab = Tensor::from_slice(&labels, (rows, 1), dev)?;
            let fused = |t: &[Tensor]| Ok(lse_gather::lse_gather(&t[0], &labels, temperature)?.0);
            let composed = |t: &[Tensor]| {
                let z = (t[0].to_dtype(sum_dtype(dtype))? / temperature)?;
                (z.gather(&lab, 1)? - ops::logsumexp_last(&z)?)?.squeeze(1)
            };
            out.push(compare(
                op,
                dtype,
                dev,
                (&fused, &composed),
                std::slice::from_ref(&z),
                1,
                &mut rng,
            )?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's fused kernels pass against their composed twins (as their own tests show
    /// op by op).
    #[test]
    fn cpu_kernels_pass_the_check() {
        let checks = check_kernels(&Device::Cpu).unwrap();
        let ops: Vec<_> = checks.iter().map(|c| (c.op, c.dtype.as_str())).collect();
        // ... and AdamW (against composed ops and against the host's bits), f32 only.
        assert_eq!(ops.len(), 2 * 8 + 1 + 2 + 2, "{ops:?}");
        for c in &checks {
            assert!(c.passed, "{c:?}");
        }
    }

    /// A fused op off by 0.1% in its output fails, in f32 and f64.
    #[test]
    fn a_wrong_kernel_fails_the_check() {
        let mut rng = StdRng::seed_from_u64(1);
        for dtype in [DType::F32, DType::F64] {
            let x = input(&mut rng, &[3, 40], 1.0, dtype, &Device::Cpu).unwrap();
            let w = input(&mut rng, &[40], 1.0, dtype, &Device::Cpu).unwrap();
            let composed: Op = &|t| ops::rms_norm_composed(&t[0], &t[1], 1e-5);
            let wrong: Op = &|t| kernels::rms_norm(&t[0], &t[1], 1e-5)? * 1.001;
            let c = compare(
                "rms_norm",
                dtype,
                &Device::Cpu,
                (wrong, composed),
                &[x, w],
                2,
                &mut rng,
            )
            .unwrap();
            assert!(!c.passed && c.forward > 5e-4 && c.gradient > 5e-4, "{c:?}");
        }
    }
}
