//! Decoding steps of a fixed shape, replayed as CUDA graphs (`PREFTUNE_CUDA_GRAPHS=1`; see
//! [`DecodeSteps`]).
//!
//! A decoding step launches a few hundred small kernels. On a GPU, for a small model or batch,
//! the host's time to launch them, not the GPU's time to run them, sets the pace. A CUDA graph
//! records a step once and replays it with a single launch, but only a step whose shapes and
//! buffer addresses never change:
//!
//! - keys and values go to buffers of a fixed capacity, at a position the step reads from
//!   device memory ([`CacheSlot::Fixed`]); attention reads the whole capacity, and the mask hides
//!   what is not written yet;
//! - the inputs are written before the step into two buffers, one copy each (token ids,
//!   positions and the position written; RoPE tables and masks), and the logits land in a third.
//!
//! [`FixedDecode`] is that step. On a GPU the first step runs eagerly and is then captured; the
//! following steps replay the capture. When rows leave the batch ([`FixedDecode::select`]), new
//! buffers are made and the next step captures again. A capture or replay that fails (an op that
//! reads the host, say) is reported once, and the loop goes on with eager steps on the same
//! buffers. On the CPU the steps run eagerly: that is how this code path is tested without a GPU.
//!
//! Mixture-of-experts layers route on the device inside these steps
//! ([`crate::moe::routes_on_device`]); quantised weights take candle's fallback products, and such
//! models decode as before ([`applies`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::AttnMask;
use crate::model::{causal_padding_mask, CacheSlot, KvCache, LayerInputs, Model};

/// How a sampling loop runs its decoding steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeSteps {
    /// A KV cache that grows: every step has shapes of its own (the default).
    Growing,
    /// Fixed-shape steps, run eagerly (`PREFTUNE_CUDA_GRAPHS=fixed`): what a graph replays,
    /// without the graph.
    Fixed,
    /// Fixed-shape steps replayed from CUDA graphs on a GPU (`PREFTUNE_CUDA_GRAPHS=1`); off a
    /// GPU, as [`DecodeSteps::Fixed`].
    Graphs,
}

thread_local! {
    static FORCED: Cell<Option<DecodeSteps>> = const { Cell::new(None) };
}

/// This thread's [`DecodeSteps`]: [`Force`]'s, else `PREFTUNE_CUDA_GRAPHS` (`1` or `fixed`) from
/// the environment. Graphs stay off by default until checked on a GPU.
pub fn mode() -> DecodeSteps {
    static ENV: OnceLock<DecodeSteps> = OnceLock::new();
    FORCED.with(Cell::get).unwrap_or_else(|| {
        *ENV.get_or_init(|| match std::env::var("PREFTUNE_CUDA_GRAPHS").as_deref() {
            Ok("1") => DecodeSteps::Graphs,
            Ok("fixed") => DecodeSteps::Fixed,
            _ => DecodeSteps::Growing,
        })
    })
}

/// Whether sampling loops decode with fixed-shape steps ([`mode`]).
pub fn enabled() -> bool {
    mode() != DecodeSteps::Growing
}

/// While the guard lives, this thread's sampling loops run their steps as `mode` says, whatever
/// the environment says.
#[must_use = "applies only while the guard lives"]
pub struct Force(Option<DecodeSteps>);

impl Force {
    pub fn new(mode: DecodeSteps) -> Self {
        Force(FORCED.with(|c| c.replace(Some(mode))))
    }
}

impl Drop for Force {
    fn drop(&mut self) {
        FORCED.with(|c| c.set(self.0));
    }
}

/// Whether `model` can decode `rows` rows with fixed-shape steps when they are [`enabled`]:
/// weights not kept quantised, the same key/value shape in every layer, no LoRA dropout drawing (a
/// replay would repeat one step's masks), and for a mixture of experts, routing that reads
/// nothing back off the CPU's kernels ([`crate::moe::routes_on_device`]).
pub fn applies(model: &Model, rows: usize) -> bool {
    let shapes = model.blocks.iter().map(|b| b.kv_shape());
    let uniform = shapes.clone().all(|s| Some(s) == shapes.clone().next());
    let dev = model.device();
    let routing = model.cfg.moe.as_ref().is_none_or(|m| {
        crate::kernels::cpu_kernels(dev)
            || crate::moe::routes_on_device(dev, rows, m.num_experts, m.top_k)
    });
    enabled()
        && routing
        && !model.is_quantized()
        && uniform
        && model.lora_dropout.snapshot().is_none()
}

static CAPTURES: AtomicU64 = AtomicU64::new(0);
static REPLAYS: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// This process's CUDA graphs of decoding steps so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps recorded as a graph.
    pub captures: u64,
    /// Steps run by replaying one.
    pub replays: u64,
    /// Graphs given up on, at capture or at a replay (their loops went on with eager steps).
    pub failed: u64,
}

pub fn stats() -> GraphStats {
    GraphStats {
        captures: CAPTURES.load(Ordering::Relaxed),
        replays: REPLAYS.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// The buffers of a fixed-shape decoding step for a batch of `b` rows (see the module's text).
pub(crate) struct FixedDecode {
    b: usize,
    cap: usize,
    /// Positions written so far, the same in every row.
    len: usize,
    /// Per layer, keys and values `[B, KV heads, cap, Dh]`.
    layers: Vec<(Tensor, Tensor)>,
    /// `[2B + 1]` u32, written once a step: the rows' new tokens, their positions, and the
    /// position the step writes (`len`).
    ints: Tensor,
    /// f32, written once a step: the RoPE tables of the full and the local (sliding-window)
    /// layers (cos then sin, `[B, Dh/2]` each), then their additive masks (`[B, cap]`), those the
    /// model has ([`FloatInputs`]).
    floats: Tensor,
    parts: FloatInputs,
    /// `[B, V]` f32: the step's logits.
    out: Tensor,
    #[cfg(feature = "cuda")]
    graph: Graph,
}

/// Where [`FixedDecode`]'s float inputs start in its buffer: the full and the local layers' RoPE
/// tables and masks.
#[derive(Clone, Copy, Debug)]
struct FloatInputs {
    rope: [Option<usize>; 2],
    mask: [Option<usize>; 2],
    half: usize,
}

#[cfg(feature = "cuda")]
enum Graph {
    /// Not captured yet: the next step captures.
    None,
    Ready(candle_core::cuda_backend::cudarc::driver::CudaGraph),
    /// A capture failed: eager steps on the same buffers.
    Failed,
}

impl FixedDecode {
    /// Buffers of capacity `cap` holding what `cache` holds (one prefill's keys and values).
    pub(crate) fn new(model: &Model, cache: &KvCache, cap: usize) -> Result<Self> {
        let missing =
            || Error::Msg("fixed-shape decoding: the cache does not hold every layer".into());
        if model.blocks.is_empty() || cache.layers.len() != model.blocks.len() {
            return Err(missing());
        }
        let mut layers = Vec::with_capacity(cache.layers.len());
        for c in &cache.layers {
            let c = c.as_ref().ok_or_else(missing)?.resized(cap)?;
            layers.push((c.k, c.v));
        }
        Self::with_layers(model, layers, cache.len(), cap)
    }

    fn with_layers(
        model: &Model,
        layers: Vec<(Tensor, Tensor)>,
        len: usize,
        cap: usize,
    ) -> Result<Self> {
        let b = layers[0].0.dim(0)?;
        if len >= cap {
            return Err(Error::Msg(format!(
                "fixed-shape decoding: {len} cached positions leave no room in {cap}"
            )));
        }
        let half = model.inv_freq.len();
        let any_local = model.blocks.iter().any(|b| b.sliding);
        let any_full = model.blocks.iter().any(|b| !b.sliding);
        let rope_local = any_local && model.inv_freq_local.is_some() && half > 0;
        let mut size = 0;
        let mut place = |on: bool, n: usize| {
            let at = on.then_some(size);
            size += if on { n } else { 0 };
            at
        };
        let rope = [
            place(half > 0, 2 * b * half),
            place(rope_local, 2 * b * half),
        ];
        let mask = [place(any_full, b * cap), place(any_local, b * cap)];
        let dev = model.device();
        Ok(FixedDecode {
            b,
            cap,
            len,
            ints: Tensor::zeros(2 * b + 1, DType::U32, dev)?,
            floats: Tensor::zeros(size.max(1), DType::F32, dev)?,
            parts: FloatInputs { rope, mask, half },
            out: Tensor::zeros((b, model.lm_head_weight().dim(0)?), DType::F32, dev)?,
            layers,
            #[cfg(feature = "cuda")]
            graph: Graph::None,
        })
    }

    /// Keeps the batch rows `rows` (in that order) and forgets the first `drop` positions, as
    /// [`KvCache::select`] does; the next step captures anew.
    pub(crate) fn select(&mut self, model: &Model, rows: &[u32], drop: usize) -> Result<()> {
        let keep = self.cap - drop;
        let idx = Tensor::new(rows, model.device())?;
        let pick = |t: &Tensor| -> Result<Tensor> {
            Ok(t.narrow(2, drop, keep)?
                .contiguous()?
                .index_select(&idx, 0)?
                .contiguous()?)
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((pick(k)?, pick(v)?)))
            .collect::<Result<Vec<_>>>()?;
        *self = Self::with_layers(model, layers, self.len - drop, keep)?;
        Ok(())
    }

    /// One decoding step: `ids` are the rows' new tokens, `positions` their positions, and `mask`
    /// (`[B, len + 1]`, 1 = a real token) covers the cached positions and the new one. Returns
    /// the logits `[B, V]` (f32) of the new tokens.
    pub(crate) fn step(
        &mut self,
        model: &Model,
        ids: &[u32],
        mask: &[Vec<u32>],
        positions: &[u32],
    ) -> Result<Tensor> {
        let b = self.b;
        if ids.len() != b || positions.len() != b || mask.len() != b {
            return Err(Error::Msg(format!(
                "fixed-shape decoding: {} ids, {} positions and {} mask rows for {b} rows",
                ids.len(),
                positions.len(),
                mask.len()
            )));
        }
        if self.len >= self.cap || mask.iter().any(|r| r.len() != self.len + 1) {
            return Err(Error::Msg(format!(
                "fixed-shape decoding: the mask must cover {} positions of at most {}",
                self.len + 1,
                self.cap
            )));
        }
        let masks = self.write_inputs(model, ids, mask, positions)?;
        self.advance(model, &masks)?;
        self.len += 1;
        Ok(self.out.copy()?)
    }

    /// Writes this step's inputs into their two buffers (one copy each to a GPU); returns the
    /// masks as the CPU kernels read them.
    fn write_inputs(
        &self,
        model: &Model,
        ids: &[u32],
        mask: &[Vec<u32>],
        positions: &[u32],
    ) -> Result<[Option<AttnMask>; 2]> {
        let dev = model.device();
        model.check_positions(positions)?;
        let mut ints = Vec::with_capacity(2 * self.b + 1);
        ints.extend_from_slice(ids);
        ints.extend_from_slice(positions);
        ints.push(self.len as u32);
        self.ints.slice_set(&Tensor::new(ints, dev)?, 0, 0)?;
        let mut floats = Vec::with_capacity(self.floats.elem_count());
        for (slot, inv_freq) in [Some(&model.inv_freq), model.inv_freq_local.as_ref()]
            .into_iter()
            .enumerate()
        {
            if let (Some(_), Some(inv_freq)) = (self.parts.rope[slot], inv_freq) {
                floats.extend(crate::model::rope_values(inv_freq, positions));
            }
        }
        // The unwritten positions count as padding; the new token's row sits at `cap - 1`, past
        // every written position, and counts the real tokens as the growing cache's would.
        let rows: Vec<Vec<f32>> = mask
            .iter()
            .map(|r| {
                let mut row: Vec<f32> = r.iter().map(|&m| m as f32).collect();
                row.resize(self.cap, 0.0);
                row
            })
            .collect();
        let mut masks: [Option<AttnMask>; 2] = [None, None];
        for (slot, window) in [None, model.cfg.sliding_window].into_iter().enumerate() {
            if self.parts.mask[slot].is_none() {
                continue;
            }
            let m = causal_padding_mask(&rows, None, 1, self.cap - 1, window)
                .ok_or_else(|| Error::Msg("fixed-shape decoding: no mask".into()))?;
            floats.extend_from_slice(&m.data);
            masks[slot] = Some(m);
        }
        if !floats.is_empty() {
            self.floats.slice_set(&Tensor::new(floats, dev)?, 0, 0)?;
        }
        Ok(masks)
    }

    /// What the layers read, as views of the input buffers (cast to the model's dtype).
    fn layer_inputs(&self, model: &Model, masks: &[Option<AttnMask>; 2]) -> Result<LayerInputs> {
        let (b, half, cap, dtype) = (self.b, self.parts.half, self.cap, model.dtype());
        let part = |at: usize, n: usize, shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Ok(self
                .floats
                .narrow(0, at, n)?
                .reshape(shape)?
                .to_dtype(dtype)?)
        };
        let table = |at: Option<usize>| -> Result<Option<(Tensor, Tensor)>> {
            at.map(|at| {
                Ok((
                    part(at, b * half, (b, 1, 1, half))?,
                    part(at + b * half, b * half, (b, 1, 1, half))?,
                ))
            })
            .transpose()
        };
        let mask = |slot: usize| -> Result<Option<(AttnMask, Option<Tensor>)>> {
            match (self.parts.mask[slot], &masks[slot]) {
                (Some(at), Some(m)) => {
                    Ok(Some((m.clone(), Some(part(at, b * cap, (b, 1, 1, cap))?))))
                }
                _ => Ok(None),
            }
        };
        let rope_full = table(self.parts.rope[0])?;
        let rope_local = table(self.parts.rope[1])?.or_else(|| rope_full.clone());
        Ok(LayerInputs {
            full: (rope_full, mask(0)?),
            local: (rope_local, mask(1)?),
        })
    }

    /// The step proper: every op reads and writes the buffers only.
    fn run(&self, model: &Model, masks: &[Option<AttnMask>; 2]) -> Result<()> {
        // Mixtures route on the device however few rows are left (nothing may read back).
        let _routing = crate::moe::FixedStepRouting::new();
        let b = self.b;
        let ids = self.ints.narrow(0, 0, b)?;
        let pos = self.ints.narrow(0, b, b)?;
        let (_, kv_heads, _, head_dim) = self.layers[0].0.dims4()?;
        // Every entry the position written, as scatter takes it.
        let at = self
            .ints
            .narrow(0, 2 * b, 1)?
            .reshape((1, 1, 1, 1))?
            .broadcast_as((b, kv_heads, 1, head_dim))?
            .contiguous()?;
        let inputs = self.layer_inputs(model, masks)?;
        let mut x = model.embed_tokens(&ids, Some(&pos), b, 1)?;
        for (block, (k, v)) in model.blocks.iter().zip(&self.layers) {
            let (rope, mask) = inputs.get(block.sliding);
            x = block.forward(
                &x,
                rope,
                mask,
                Some(CacheSlot::Fixed { k, v, at: &at }),
                model.cfg.activation,
            )?;
        }
        let hidden = model.final_norm(&x)?.squeeze(1)?;
        let logits = model.logits(&hidden)?.to_dtype(DType::F32)?;
        self.out.slice_set(&logits.contiguous()?, 0, 0)?;
        Ok(())
    }

    /// Runs the step: eagerly off a GPU; on one, by replaying its graph (captured at the first
    /// step, which runs eagerly).
    fn advance(&mut self, model: &Model, masks: &[Option<AttnMask>; 2]) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (candle_core::Device::Cuda(d), DecodeSteps::Graphs) = (model.device(), mode()) {
            return self.advance_on(d, model, masks);
        }
        self.run(model, masks)
    }

    #[cfg(feature = "cuda")]
    fn advance_on(
        &mut self,
        d: &candle_core::CudaDevice,
        model: &Model,
        masks: &[Option<AttnMask>; 2],
    ) -> Result<()> {
        match &self.graph {
            Graph::Ready(g) => match g.launch() {
                Ok(()) => {
                    REPLAYS.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    give_up(&format!("a replay failed: {e}"));
                    self.graph = Graph::Failed;
                    return self.run(model, masks);
                }
            },
            Graph::Failed => return self.run(model, masks),
            Graph::None => {}
        }
        // This step's result comes from an eager run, made with candle's cache of small host
        // uploads on: the capture then finds every kernel loaded, every bf16 weight copy made and
        // every strided op's parameters on the device.
        {
            let _uploads = d.enable_cuda_graph_htod_cache();
            self.run(model, masks)?;
        }
        self.graph = match self.capture(d, model, masks) {
            Ok(g) => {
                CAPTURES.fetch_add(1, Ordering::Relaxed);
                Graph::Ready(g)
            }
            Err(e) => {
                give_up(&format!("the capture failed: {e}"));
                Graph::Failed
            }
        };
        Ok(())
    }

    /// Records [`FixedDecode::run`] as a graph; nothing runs.
    #[cfg(feature = "cuda")]
    fn capture(
        &self,
        d: &candle_core::CudaDevice,
        model: &Model,
        masks: &[Option<AttnMask>; 2],
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaGraph> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = d.cuda_stream();
        let ctx = stream.context().clone();
        let _uploads = d.enable_cuda_graph_htod_cache();
        // Off already unless PREFTUNE_CUDA_EVENT_TRACKING=1 (crate::device).
        let tracking = ctx.is_event_tracking();
        // SAFETY: candle runs all of a device's work on this one stream, so the events that
        // tracking records and waits on order the stream after itself only, and a capture may not
        // wait on events recorded outside it. The buffers made while capturing (the step's
        // temporaries) are freed inside the capture; tracking is back before anything else.
        unsafe { ctx.disable_event_tracking() };
        let ran = stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_error)
            .map(|()| self.run(model, masks));
        let graph = match ran {
            Ok(ran) => {
                let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                ran.and(ended.map_err(cuda_error))
            }
            Err(e) => Err(e),
        };
        if tracking {
            // SAFETY: as above; buffers made from here on are tracked again.
            unsafe { ctx.enable_event_tracking() };
        }
        match graph {
            Ok(Some(g)) => {
                g.upload().map_err(cuda_error)?;
                Ok(g)
            }
            Ok(None) => Err(Error::Msg("the capture recorded nothing".into())),
            Err(e) => {
                // Frees of a failed capture's temporaries may have left an error behind.
                let _ = ctx.check_err();
                Err(e)
            }
        }
    }
}

/// Counts a graph given up on, and says why the first time.
#[cfg(feature = "cuda")]
fn give_up(why: &str) {
    if FAILED.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("preftune: decoding goes on without CUDA graphs: {why}");
    }
}

#[cfg(feature = "cuda")]
fn cuda_error(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Msg(format!("CUDA: {e}"))
}
