//! AdamW (decoupled weight decay, as PyTorch's `torch.optim.AdamW`) with transformers' parameter
//! groups, global-norm gradient clipping, and learning-rate schedules.
//!
//! State is kept in f32 whatever the parameters' dtype, and updated in place over slices
//! (`preftune_kernels::adamw`, as candle in-place ops; CUDA kernels on a GPU): a dozen composed
//! tensor ops per parameter per step would each allocate.
use preftune_kernels::adamw::Step;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};

use crate::config::LrSchedulerType;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// transformers' rule: no weight decay on biases and normalisation weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("norm")
        || name.contains(".ln_")
        || name.starts_with("ln_"))
}

/// A parameter's first and second moments, borrowed or (zeros) owned.
pub(crate) type Moments<'a> = (std::borrow::Cow<'a, [f32]>, std::borrow::Cow<'a, [f32]>);

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimiser steps taken (for bias correction).
    pub t: u64,
    pub names: Vec<String>,
    /// Each parameter's number of values.
    pub(crate) sizes: Vec<usize>,
    /// First and second moments on the host: empty until a host step first needs them (zeros
    /// then), and while the moments live on the device (no host copy of a GPU model's optimiser
    /// state; [`AdamW::sync_to_host`] fills them for a checkpoint, and the next device step frees
    /// them again).
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Per-parameter multiplier of the scheduled learning rate (1 unless a trainer sets one, e.g.
    /// for a freshly initialised head).
    pub lr_scale: Vec<f64>,
    /// `(m, v)` on the parameters' device for [`AdamW::step_tensors`] (GPUs): made from `m` and
    /// `v` (zeros where empty) at the first such step; [`AdamW::sync_to_host`] copies them back
    /// for a checkpoint.
    device_state: Option<Vec<(Tensor, Tensor)>>,
    /// Whether `m` and `v` hold the device's moments as of now (set by `sync_to_host`).
    host_synced: bool,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &[(String, Var)]) -> Self {
        AdamW {
            cfg,
            t: 0,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            sizes: params.iter().map(|(_, p)| p.elem_count()).collect(),
            m: vec![Vec::new(); params.len()],
            v: vec![Vec::new(); params.len()],
            lr_scale: vec![1.0; params.len()],
            device_state: None,
            host_synced: false,
        }
    }

    /// Parameter `i`'s moments as a checkpoint stores them: zeros before its first step. Fails
    /// while the moments live on the device and were not copied back by [`AdamW::sync_to_host`]
    /// (a checkpoint would otherwise hold stale or missing state).
    pub(crate) fn checkpoint_moments(&self, i: usize) -> Result<Moments<'_>> {
        use std::borrow::Cow;
        if self.device_state.is_some() && !self.host_synced {
            return Err(Error::Msg(
                "optimizer: the moments are on the device; sync_to_host before a checkpoint".into(),
            ));
        }
        fn moment(x: &[f32], size: usize) -> Cow<'_, [f32]> {
            match x.is_empty() {
                true => Cow::Owned(vec![0.0; size]),
                false => Cow::Borrowed(x),
            }
        }
        let size = self.sizes[i];
        Ok((moment(&self.m[i], size), moment(&self.v[i], size)))
    }

    /// Advances `t` to the next step and returns it.
    fn next_step(&mut self) -> i32 {
        self.t += 1;
        self.t as i32
    }

    /// Step `t`'s constants for parameter `i` (`name`) at the scheduled learning rate `lr`.
    fn step_of(&self, t: i32, i: usize, name: &str, lr: f64) -> Step {
        let lr = lr * self.lr_scale.get(i).copied().unwrap_or(1.0);
        let c = &self.cfg;
        let wd = if decays(name) { c.weight_decay } else { 0.0 };
        Step::at(t, lr, (c.beta1, c.beta2), c.eps, wd)
    }

    /// [`AdamW::step`] with the gradients, moments and update on the parameters' device, from
    /// candle ops: no parameter, gradient or moment leaves the device. The same arithmetic as the
    /// in-place update, in f32.
    pub fn step_tensors(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
    ) -> Result<()> {
        self.step_tensors_on(params, grads, lr, None)
    }

    /// [`AdamW::step_tensors`] with the in-place ops of [`preftune_model::adamw`] where they
    /// apply (`fused` None), or always the composed ones (`Some(false)`, for tests).
    fn step_tensors_on(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
        fused: Option<bool>,
    ) -> Result<()> {
        if self.device_state.is_none() {
            let state = params
                .iter()
                .zip(self.m.iter().zip(&self.v))
                .map(|((_, p), (m, v))| {
                    let up = |x: &[f32]| match x.is_empty() {
                        true => Tensor::zeros(p.shape(), DType::F32, p.device()),
                        false => Tensor::from_slice(x, p.shape(), p.device()),
                    };
                    Ok((up(m)?, up(v)?))
                })
                .collect::<Result<Vec<_>>>()?;
            self.device_state = Some(state);
        }
        // The host copies (loaded from a checkpoint, or synced for one) are stale from here.
        self.host_synced = false;
        for x in self.m.iter_mut().chain(self.v.iter_mut()) {
            if !x.is_empty() {
                *x = Vec::new();
            }
        }
        let t = self.next_step();
        let steps: Vec<Step> = params
            .iter()
            .enumerate()
            .map(|(i, (name, _))| self.step_of(t, i, name, lr))
            .collect();
        let state = self.device_state.as_mut().expect("made above");
        for (((name, var), g), ((m, v), s)) in
            params.iter().zip(grads).zip(state.iter_mut().zip(steps))
        {
            if g.shape() != var.shape() {
                return Err(Error::Msg(format!(
                    "optimizer: gradient of {name} has shape {:?}, parameter {:?}",
                    g.dims(),
                    var.dims()
                )));
            }
            // A first gradient is often a transposed view (a linear's `x W^T`): made contiguous
            // here (one copy then, none otherwise), the in-place ops take it.
            let g = g.to_dtype(DType::F32)?.contiguous()?.detach();
            let p = var.as_tensor();
            if fused != Some(false) && preftune_model::adamw::applies([p, &*m, &*v, &g]) {
                // In place, no temporaries: the CPU trainer's arithmetic, bit for bit.
                preftune_model::adamw::update(&s, p, &*m, &*v, &g)?;
                continue;
            }
            let [p, new_m, new_v] = preftune_model::adamw::composed(&s, &p.detach(), m, v, &g)?;
            (*m, *v) = (new_m, new_v);
            var.set(&p.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// One update from the step's gradients, where they are: in place on the host, or on the
    /// device.
    pub(crate) fn apply(&mut self, params: &[(String, Var)], grads: &Grads, lr: f64) -> Result<()> {
        match grads {
            Grads::Host(g) => self.step(params, g, lr),
            Grads::Device(g) => self.step_tensors(params, &device_grads(g)?, lr),
        }
    }

    /// Copies moments kept on the device back into `m` and `v` (before a checkpoint is written).
    pub fn sync_to_host(&mut self) -> Result<()> {
        if let Some(state) = &self.device_state {
            for ((m, v), (hm, hv)) in state.iter().zip(self.m.iter_mut().zip(self.v.iter_mut())) {
                *hm = m.flatten_all()?.to_vec1()?;
                *hv = v.flatten_all()?.to_vec1()?;
            }
            self.host_synced = true;
        }
        Ok(())
    }

    /// Forgets moments kept on the device: `m` and `v` were just loaded from a checkpoint.
    pub(crate) fn reset_device_state(&mut self) {
        self.device_state = None;
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `params[i]` (already
    /// accumulated and clipped).
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        let t = self.next_step();
        for (i, ((name, var), g)) in params.iter().zip(grads).enumerate() {
            if g.len() != var.elem_count() {
                return Err(Error::Msg(format!(
                    "optimizer: gradient of {name} has {} values, parameter {}",
                    g.len(),
                    var.elem_count()
                )));
            }
            let s = self.step_of(t, i, name, lr);
            for x in [&mut self.m[i], &mut self.v[i]] {
                if x.is_empty() {
                    *x = vec![0.0; g.len()];
                }
            }
            let update = Update {
                g,
                m: Mutex::new(&mut self.m[i]),
                v: Mutex::new(&mut self.v[i]),
                s,
            };
            let t = var.as_tensor();
            if t.dtype() == DType::F32
                && preftune_model::kernels::cpu_kernels(t.device())
                && t.is_contiguous()
            {
                t.inplace_op1(&update)?;
            } else {
                // Other dtypes (and devices, where trainers use `step_tensors`): through an f32
                // copy (master weights are then the parameter's own dtype).
                let mut p: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                update.apply(&mut p);
                var.set(&Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(t.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// An update's gradients, summed over its micro-batches. On the CPU kernels they are host
/// buffers, which AdamW updates in place. Elsewhere (a GPU) they are tensors on the device, so a
/// step copies no gradient or parameter to the host: only the norm comes back, for the log.
pub(crate) enum Grads {
    /// Each parameter's first gradient becomes its accumulator (no zeroed buffer: one model's
    /// worth of memory and a pass over it saved per update); empty until then.
    Host(Vec<Vec<f32>>),
    Device(Vec<Option<Tensor>>),
}

impl Grads {
    pub(crate) fn new(n: usize, on_device: bool) -> Self {
        if on_device {
            Grads::Device(vec![None; n])
        } else {
            Grads::Host(vec![Vec::new(); n])
        }
    }

    pub(crate) fn add(&mut self, i: usize, g: Tensor) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        match self {
            Grads::Host(gs) => {
                let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
                if gs[i].is_empty() {
                    gs[i] = v;
                } else {
                    gs[i].iter_mut().zip(v).for_each(|(a, b)| *a += b);
                }
            }
            Grads::Device(gs) => {
                gs[i] = Some(match gs[i].take() {
                    None => g,
                    Some(acc) => (acc + g)?,
                });
            }
        }
        Ok(())
    }

    /// Parameters no loss reached (a frozen branch of this batch) take zeros.
    pub(crate) fn fill_missing(&mut self, params: &[(String, candle_core::Var)]) -> Result<()> {
        for (i, (_, p)) in params.iter().enumerate() {
            match self {
                Grads::Host(gs) if gs[i].is_empty() => gs[i] = vec![0f32; p.elem_count()],
                Grads::Device(gs) if gs[i].is_none() => {
                    gs[i] = Some(Tensor::zeros(p.shape(), DType::F32, p.device())?)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Clips to the global norm `max_norm` (0: no clipping) and returns the norm before clipping.
    pub(crate) fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let gs = match self {
            Grads::Host(gs) => return Ok(clip_grad_norm(gs, max_norm)),
            Grads::Device(gs) => gs,
        };
        let tensors = device_grads(gs)?;
        // One sum of squares per parameter in f32, added in f64 on the host: the one copy back.
        let sums = tensors
            .iter()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = match sums.first() {
            None => 0.0,
            Some(_) => Tensor::stack(&sums, 0)?
                .to_vec1::<f64>()?
                .iter()
                .sum::<f64>()
                .sqrt(),
        };
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for g in gs.iter_mut().flatten() {
                *g = (&*g * scale)?;
            }
        }
        Ok(norm)
    }

    pub(crate) fn to_host(&self) -> Result<std::borrow::Cow<'_, [Vec<f32>]>> {
        Ok(match self {
            Grads::Host(gs) => std::borrow::Cow::Borrowed(gs.as_slice()),
            Grads::Device(gs) => std::borrow::Cow::Owned(
                device_grads(gs)?
                    .iter()
                    .map(|g| g.flatten_all()?.to_vec1())
                    .collect::<candle_core::Result<_>>()?,
            ),
        })
    }
}

/// The device gradients, every one present ([`Grads::fill_missing`] has run).
fn device_grads(gs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    gs.iter()
        .map(|g| {
            g.clone()
                .ok_or_else(|| Error::Msg("a gradient is missing after fill_missing".into()))
        })
        .collect()
}

/// One parameter's AdamW update, applied in place to the parameter's storage.
struct Update<'a> {
    g: &'a [f32],
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
    s: Step,
}

impl Update<'_> {
    /// PyTorch's AdamW: decoupled decay, then the bias-corrected step; two threads for large tensors.
    fn apply(&self, p: &mut [f32]) {
        let mut m = self.m.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.v.lock().unwrap_or_else(|e| e.into_inner());
        let run = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            preftune_kernels::adamw::update(&self.s, p, m, v, g)
        };
        let half = p.len() / 2;
        if half < 1 << 16 {
            run(p, &mut m[..], &mut v[..], self.g);
            return;
        }
        let (p1, p2) = p.split_at_mut(half);
        let (m1, m2) = m.split_at_mut(half);
        let (v1, v2) = v.split_at_mut(half);
        let (g1, g2) = self.g.split_at(half);
        std::thread::scope(|s| {
            s.spawn(|| run(p1, m1, v1, g1));
            run(p2, m2, v2, g2);
        });
    }
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        self.apply(preftune_model::kernels::f32_mut(storage, layout, "adamw")?);
        Ok(())
    }
}

pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    use rayon::prelude::*;
    let norm = grads.iter().map(|g| sum_sq(g)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x *= scale));
        }
    }
    norm
}

const CHUNK: usize = 1 << 16;

/// Sum of squares in f64: chunks in parallel, eight partial sums each. One sequential f64 sum
/// does not vectorise; over SmolLM2's gradients it was 2% of a DPO step. The chunks' sums are
/// added in order, so the norm does not depend on how rayon split the work.
fn sum_sq(g: &[f32]) -> f64 {
    use rayon::prelude::*;
    let parts: Vec<f64> = g
        .par_chunks(CHUNK)
        .map(|c| {
            let mut acc = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for x in &mut it {
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += v as f64 * v as f64;
                }
            }
            let tail: f64 = it.remainder().iter().map(|&v| v as f64 * v as f64).sum();
            acc.iter().sum::<f64>() + tail
        })
        .collect();
    parts.iter().sum()
}

/// Learning rate at optimiser step `step` (0-based), as transformers' schedulers compute it.
pub fn lr_at(kind: LrSchedulerType, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total.max(1) as f64);
    if kind != LrSchedulerType::Constant && step < warmup {
        return base * s / w.max(1.0);
    }
    match kind {
        LrSchedulerType::Linear => base * ((t - s) / (t - w).max(1.0)).max(0.0),
        LrSchedulerType::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
        LrSchedulerType::Constant | LrSchedulerType::ConstantWithWarmup => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// lr 0.1, PyTorch's betas and eps, weight decay 0.01.
    fn test_config() -> AdamWConfig {
        AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    #[test]
    fn adamw_matches_the_pytorch_formula() {
        // Two steps by hand for p = [1, -2], g1 = [0.5, 0.1], g2 = [-0.3, 0.2], lr 0.1, wd 0.01.
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        let params = vec![
            ("layer.weight".to_string(), w.clone()),
            ("layer.bias".to_string(), b.clone()),
        ];
        let mut opt = AdamW::new(test_config(), &params);
        let mut p = [1f64, -2.0];
        let mut pb = 0.5f64;
        let (mut m, mut v, mut mb, mut vb) = ([0f64; 2], [0f64; 2], 0f64, 0f64);
        for (t, (g, gb)) in [([0.5, 0.1], 0.2), ([-0.3, 0.2], -0.4)].iter().enumerate() {
            let t = (t + 1) as i32;
            opt.step(
                &params,
                &[g.iter().map(|&x| x as f32).collect(), vec![*gb as f32]],
                0.1,
            )
            .unwrap();
            for j in 0..2 {
                m[j] = 0.9 * m[j] + 0.1 * g[j];
                v[j] = 0.999 * v[j] + 0.001 * g[j] * g[j];
                p[j] *= 1.0 - 0.1 * 0.01;
                p[j] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[j]
                    / (v[j].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
            }
            mb = 0.9 * mb + 0.1 * gb;
            vb = 0.999 * vb + 0.001 * gb * gb;
            pb -= 0.1 / (1.0 - 0.9f64.powi(t)) * mb
                / (vb.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
        }
        // The update runs in f32, as PyTorch's does; the reference is f64.
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] as f64 - p[0]).abs() < 5e-6 && (got[1] as f64 - p[1]).abs() < 5e-6,
            "{got:?} vs {p:?}"
        );
        let gb = b.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((gb - pb).abs() < 5e-6, "bias is not decayed: {gb} vs {pb}");
    }

    /// The device update (candle ops, for GPUs) follows the in-place one step for step, with
    /// learning-rate scales, weight decay groups, and moments copied back for checkpoints.
    #[test]
    fn device_update_matches_the_in_place_update() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let shapes = [
            ("a.weight", (3, 5)),
            ("a.bias", (1, 5)),
            ("norm.weight", (1, 7)),
        ];
        let make = |vals: &[Vec<f32>]| -> Vec<(String, Var)> {
            shapes
                .iter()
                .zip(vals)
                .map(|((n, s), v)| {
                    let t = Tensor::from_vec(v.clone(), *s, &Device::Cpu).unwrap();
                    (n.to_string(), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let init: Vec<Vec<f32>> = shapes.iter().map(|(_, (r, c))| draw(r * c)).collect();
        // `dev` takes the in-place ops (what a GPU with preftune's kernels runs), `composed` the
        // candle ops (a GPU without them).
        let (host, dev, composed) = (make(&init), make(&init), make(&init));
        let (mut a, mut b, mut c) = (
            AdamW::new(test_config(), &host),
            AdamW::new(test_config(), &dev),
            AdamW::new(test_config(), &composed),
        );
        // Nothing allocated before a step; a checkpoint then holds zeros.
        assert!(a.m.iter().chain(&a.v).all(Vec::is_empty));
        let (m0, v0) = a.checkpoint_moments(2).unwrap();
        assert_eq!((m0.len(), v0.iter().sum::<f32>()), (7, 0.0));
        a.lr_scale[1] = 3.0;
        b.lr_scale[1] = 3.0;
        c.lr_scale[1] = 3.0;
        // Where each device moment's values live: the in-place ops keep them there.
        let places = |o: &AdamW| -> Vec<usize> {
            let state = o.device_state.as_ref().expect("device moments");
            state
                .iter()
                .flat_map(|(m, v)| [m, v])
                .map(|t| match &*t.storage_and_layout().0 {
                    candle_core::Storage::Cpu(CpuStorage::F32(x)) => x.as_ptr() as usize,
                    _ => panic!("f32 on the CPU"),
                })
                .collect()
        };
        let mut first_places = None;
        for step in 0..3 {
            let g: Vec<Vec<f32>> = shapes.iter().map(|(_, (r, c))| draw(r * c)).collect();
            a.step(&host, &g, 0.05).unwrap();
            // The first parameter's gradient as a transposed view, as a linear's often is.
            let gt: Vec<Tensor> = g
                .iter()
                .zip(&shapes)
                .map(|(v, (_, (r, c)))| match r {
                    3 => {
                        // The same matrix, stored as its transpose and viewed back.
                        let vt: Vec<f32> = (0..r * c).map(|k| v[(k % r) * c + k / r]).collect();
                        Tensor::from_vec(vt, (*c, *r), &Device::Cpu)
                            .unwrap()
                            .t()
                            .unwrap()
                    }
                    _ => Tensor::from_vec(v.clone(), (*r, *c), &Device::Cpu).unwrap(),
                })
                .collect();
            assert!(!gt[0].is_contiguous());
            b.step_tensors(&dev, &gt, 0.05).unwrap();
            let now = places(&b);
            match step {
                0 => first_places = Some(now),
                _ => assert_eq!(Some(now), first_places, "moments updated in place"),
            }
            c.step_tensors_on(&composed, &gt, 0.05, Some(false))
                .unwrap();
            // No host copy of the device's moments, and no checkpoint from stale ones.
            assert!(b.m.iter().chain(&b.v).all(Vec::is_empty));
            assert!(b.checkpoint_moments(0).is_err());
        }
        b.sync_to_host().unwrap();
        c.sync_to_host().unwrap();
        assert_eq!(b.checkpoint_moments(0).unwrap().0.len(), 15);
        for i in 0..shapes.len() {
            let flat = |v: &Var| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            // The in-place ops: the host loop's bits.
            assert_eq!(flat(&host[i].1), flat(&dev[i].1), "{}", shapes[i].0);
            assert_eq!((&a.m[i], &a.v[i]), (&b.m[i], &b.v[i]), "{}", shapes[i].0);
            // The composed ops round in other places.
            for (x, y) in flat(&host[i].1).iter().zip(flat(&composed[i].1)) {
                assert!((x - y).abs() < 1e-6, "{}: {x} vs {y}", shapes[i].0);
            }
            for (x, y) in a.m[i].iter().zip(&c.m[i]).chain(a.v[i].iter().zip(&c.v[i])) {
                assert!((x - y).abs() < 1e-7, "{}: moments {x} vs {y}", shapes[i].0);
            }
        }
        assert_eq!((a.t, b.t, c.t), (3, 3, 3));
    }

    #[test]
    fn parameter_groups_follow_transformers() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("transformer.h.0.ln_1.weight"));
        assert!(!decays("transformer.ln_f.bias"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
    }

    #[test]
    fn clipping_rescales_to_the_max_norm() {
        let mut g = vec![vec![3f32, 0.0], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        let after = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((after - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.3f32]];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.3);
    }

    #[test]
    fn schedules_match_transformers() {
        // linear with 10 warmup of 110 total: 0 -> base at step 10, then to 0 at 110.
        assert_eq!(lr_at(LrSchedulerType::Linear, 1.0, 0, 10, 110), 0.0);
        assert!((lr_at(LrSchedulerType::Linear, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(LrSchedulerType::Linear, 1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(LrSchedulerType::Linear, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(LrSchedulerType::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(
            (lr_at(LrSchedulerType::Cosine, 1.0, 35, 10, 110)
                - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()))
            .abs()
                < 1e-12
        );
        assert_eq!(lr_at(LrSchedulerType::Constant, 1.0, 0, 10, 110), 1.0);
        assert!((lr_at(LrSchedulerType::ConstantWithWarmup, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(
            lr_at(LrSchedulerType::ConstantWithWarmup, 1.0, 100, 10, 110),
            1.0
        );
    }
}
