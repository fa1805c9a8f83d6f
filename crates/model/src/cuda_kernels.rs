//! The CUDA side of the fused ops ([`crate::kernels`], [`crate::lse_gather`]): launches
//! `preftune-kernels-cuda`'s PTX on candle's CUDA storage. The ops' backward passes are the
//! same on both devices (each builds a backward op whose `cuda_fwd` lands here), and the launch
//! shapes come from the kernels crate, whose emulated tests use the same ones.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{DType, Error, Layout, Result, Shape};
use half::bf16;
use preftune_kernels_cuda::{self as kc, Dtype, Kernel, Launch};

/// Element types with kernels, and the type each computes in.
pub(crate) trait Elem: CudaDType + DeviceRepr + Copy + 'static {
    const KIND: Dtype;
    type Acc: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static;
}

impl Elem for f32 {
    const KIND: Dtype = Dtype::F32;
    type Acc = f32;
}

impl Elem for bf16 {
    const KIND: Dtype = Dtype::Bf16;
    type Acc = f32;
}

impl Elem for f64 {
    const KIND: Dtype = Dtype::F64;
    type Acc = f64;
}

/// Runs `$body` with `$t` the Rust type of `$dtype` (f32, bf16 or f64).
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => Err(Error::Msg(format!("{}: no CUDA kernel for {other:?}", $op))),
        }
    };
}

/// Launches the entry point named `$name` with launch shape `$l` and the arguments (each a
/// reference, in the entry point's order).
macro_rules! launch {
    ($dev:expr, $name:expr, $l:expr; $($arg:expr),* $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&$name, kc::MODULE, kc::PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        // SAFETY: the arguments follow the entry point's signature in
        // crates/kernels-cuda/src/cuda (pointers to buffers of the lengths it indexes for these
        // sizes, checked by the callers), and the launch shape is the one the kernel is written for.
        unsafe { builder.launch(config($l)) }.w()?;
    }};
}

pub(crate) fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid, l.grid_y, 1),
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` that `l` describes.
pub(crate) fn input<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    view(s, l, op)
}

/// [`input`] for any element type (labels).
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: inputs must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Inputs whose shapes do not fit together.
fn shapes_error(op: &str, layouts: [&Layout; 3]) -> Error {
    let [a, b, c] = layouts.map(|l| l.dims());
    Error::Msg(format!("{op}: shapes {a:?} {b:?} {c:?}"))
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Msg(format!("{what} = {n} is over the kernels' u32 range")))
}

/// RMSNorm forward: `x` rows of `d = w.len()` values.
pub(crate) fn rms_norm(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let op = "rms-norm";
    let (n, d) = (lx.shape().elem_count(), lw.shape().elem_count());
    if d == 0 || lx.dims().last() != Some(&d) {
        return Err(Error::Msg(format!(
            "{op}: weight {:?} for input {:?}",
            lw.dims(),
            lx.dims()
        )));
    }
    let dev = &x.device;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv) = (input::<T>(x, lx, op)?, input::<T>(w, lw, op)?);
        // SAFETY: the kernel writes every element (each row's block its `d` values).
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if n > 0 {
            let du = u32_of(d, "hidden size")?;
            launch!(dev, Kernel::RmsNormFwd.name(T::KIND), kc::per_row(n / d, d); &xv, &wv, &mut out, &du, &eps);
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lx.shape().clone(),
        ))
    })
}

/// RMSNorm backward: `dx` flattened, then `dw` (the CPU op's layout).
pub(crate) fn rms_norm_bwd(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (dy, ldy): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let op = "rms-norm-bwd";
    let (n, d) = (lx.shape().elem_count(), lw.shape().elem_count());
    if d == 0 || lx.dims().last() != Some(&d) || ldy.shape() != lx.shape() {
        return Err(shapes_error(op, [lx, lw, ldy]));
    }
    let dev = &x.device;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv, gv) = (
            input::<T>(x, lx, op)?,
            input::<T>(w, lw, op)?,
            input::<T>(dy, ldy, op)?,
        );
        let rows = n / d;
        let l = kc::rmsnorm_bwd(rows, d);
        // SAFETY: `rmsnorm_bwd` writes every `dx` and zeroes every partial row before adding to
        // it; `col_sum` writes every `dw`.
        let mut out = unsafe { dev.alloc::<T>(n + d) }?;
        // SAFETY: as above.
        let mut part = unsafe { dev.alloc::<<T as Elem>::Acc>(l.grid as usize * d) }?;
        let (ru, du, parts) = (u32_of(rows, "rows")?, u32_of(d, "hidden size")?, l.grid);
        {
            let mut dx = out.slice_mut(0..n);
            launch!(dev, Kernel::RmsNormBwd.name(T::KIND), l; &xv, &wv, &gv, &mut dx, &mut part, &ru, &du, &eps);
        }
        {
            let mut dw = out.slice_mut(n..n + d);
            launch!(dev, Kernel::ColSum.name(T::KIND), kc::elementwise(d); &part, &mut dw, &parts, &du);
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(n + d),
        ))
    })
}

/// LoRA's inverted dropout of `x` in its dtype (and of a gradient, in backward): the same bits
/// as `preftune_kernels::rng::dropout` from stream `key`.
pub(crate) fn dropout(
    x: &CudaStorage,
    lx: &Layout,
    key: u64,
    p: f32,
    keep: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "dropout";
    let n = lx.shape().elem_count();
    let dev = &x.device;
    by_dtype!(x.dtype(), op, |T| {
        let xv = input::<T>(x, lx, op)?;
        // SAFETY: the grid-stride loop writes every element.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        launch!(dev, Kernel::Dropout.name(T::KIND), kc::elementwise(n); &xv, &mut out, &n, &key, &p, &keep);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lx.shape().clone(),
        ))
    })
}

/// The contiguous f32 elements of `s` that `l` describes, to write in place.
fn in_place<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: tensors must be contiguous")))?;
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// AdamW's moment update in place: `a = beta a + (1 - beta) g` (`g * g` when `square`), f32.
pub(crate) fn adamw_ema(
    a: &mut CudaStorage,
    la: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    beta: f32,
    square: bool,
) -> Result<()> {
    let op = "adamw_ema";
    let n = la.shape().elem_count();
    if lg.shape().elem_count() != n {
        return Err(Error::Msg(format!(
            "{op}: {n} values against {}",
            lg.shape().elem_count()
        )));
    }
    let dev = a.device.clone();
    let gv = input::<f32>(g, lg, op)?;
    let mut av = in_place(a, la, op)?;
    let square = square as i32;
    launch!(dev, Kernel::AdamwEma.name(Dtype::F32), kc::elementwise(n); &mut av, &gv, &n, &beta, &square);
    Ok(())
}

/// AdamW's parameter update in place from its moments, f32.
pub(crate) fn adamw_param(
    p: &mut CudaStorage,
    lp: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    s: &preftune_kernels::adamw::Step,
) -> Result<()> {
    let op = "adamw_param";
    let n = lp.shape().elem_count();
    if lm.shape().elem_count() != n || lv.shape().elem_count() != n {
        return Err(shapes_error(op, [lp, lm, lv]));
    }
    let dev = p.device.clone();
    let (mv, vv) = (input::<f32>(m, lm, op)?, input::<f32>(v, lv, op)?);
    let mut pv = in_place(p, lp, op)?;
    launch!(dev, Kernel::AdamwParam.name(Dtype::F32), kc::elementwise(n);
        &mut pv, &mv, &vv, &n, &s.bc2_sqrt, &s.eps, &s.step_size, &s.decay);
    Ok(())
}

/// SwiGLU forward, elementwise.
pub(crate) fn swiglu(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "swiglu";
    let n = lg.shape().elem_count();
    let dev = &g.device;
    by_dtype!(g.dtype(), op, |T| {
        let (gv, uv) = (input::<T>(g, lg, op)?, input::<T>(u, lu, op)?);
        // SAFETY: the grid-stride loop writes every element.
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        launch!(dev, Kernel::SwigluFwd.name(T::KIND), kc::elementwise(n); &gv, &uv, &mut out, &n);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lg.shape().clone(),
        ))
    })
}

/// SwiGLU backward: `d gate` flattened, then `d up`.
pub(crate) fn swiglu_bwd(
    (g, lg): (&CudaStorage, &Layout),
    (u, lu): (&CudaStorage, &Layout),
    (dy, ldy): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let op = "swiglu-bwd";
    let n = lg.shape().elem_count();
    if lu.shape() != lg.shape() || ldy.shape() != lg.shape() {
        return Err(shapes_error(op, [lg, lu, ldy]));
    }
    let dev = &g.device;
    by_dtype!(g.dtype(), op, |T| {
        let (gv, uv, dv) = (
            input::<T>(g, lg, op)?,
            input::<T>(u, lu, op)?,
            input::<T>(dy, ldy, op)?,
        );
        // SAFETY: the grid-stride loop writes both halves of every element.
        let mut out = unsafe { dev.alloc::<T>(2 * n) }?;
        launch!(dev, Kernel::SwigluBwd.name(T::KIND), kc::elementwise(n); &gv, &uv, &dv, &mut out, &n);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(2 * n),
        ))
    })
}

/// Rotate-half RoPE; `dims` = `(b, h, t, dh)` as checked by the op.
pub(crate) fn rope(
    (x, lx): (&CudaStorage, &Layout),
    (cos, lc): (&CudaStorage, &Layout),
    (sin, ls): (&CudaStorage, &Layout),
    (b, h, t, dh): (usize, usize, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let op = "rope";
    let rows = b * h * t;
    let dev = &x.device;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, cv, sv) = (
            input::<T>(x, lx, op)?,
            input::<T>(cos, lc, op)?,
            input::<T>(sin, ls, op)?,
        );
        // SAFETY: one thread per (row, pair) writes both values of its pair, covering each row.
        let mut out = unsafe { dev.alloc::<T>(rows * dh) }?;
        let (hu, tu, du) = (
            u32_of(h, "heads")?,
            u32_of(t, "positions")?,
            u32_of(dh, "head size")?,
        );
        launch!(dev, Kernel::Rope.name(T::KIND), kc::elementwise(rows * (dh / 2)); &xv, &cv, &sv, &mut out, &rows, &hu, &tu, &du);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lx.shape().clone(),
        ))
    })
}

/// What [`lse_gather`] gives: per row `log p(label)` and the log-sum-exp (both in the
/// accumulator type: f32, or f64 for f64 logits), and on the host the top-1 hits and mean logits.
pub(crate) struct LseRows {
    pub logp: CudaStorage,
    pub lse: CudaStorage,
    pub hits: Vec<u8>,
    pub means: Vec<f32>,
}

/// Log-softmax of `z / temperature` gathered at `labels`, one block a row of `v` logits.
/// The caller checked the labels (`< v`).
pub(crate) fn lse_gather(
    (z, lz): (&CudaStorage, &Layout),
    (labels, ll): (&CudaStorage, &Layout),
    inv_temp: f64,
) -> Result<LseRows> {
    let op = "lse-gather";
    let (rows, v) = lz.shape().dims2()?;
    let dev = &z.device;
    by_dtype!(z.dtype(), op, |T| {
        let zv = input::<T>(z, lz, op)?;
        let lv = view::<u32>(labels, ll, op)?;
        if lv.len() != rows {
            return Err(Error::Msg(format!(
                "{op}: {} labels for {rows} rows",
                lv.len()
            )));
        }
        // SAFETY: thread 0 of each row's block writes the row's four results.
        let mut logp = unsafe { dev.alloc::<<T as Elem>::Acc>(rows) }?;
        // SAFETY: as above.
        let mut lse = unsafe { dev.alloc::<<T as Elem>::Acc>(rows) }?;
        let mut hit = dev.alloc_zeros::<u8>(rows)?;
        // SAFETY: as above.
        let mut mean = unsafe { dev.alloc::<<T as Elem>::Acc>(rows) }?;
        if rows > 0 {
            let vu = u32_of(v, "vocabulary")?;
            launch!(dev, Kernel::LseGather.name(T::KIND), kc::per_row(rows, v);
                &zv, &lv, &mut logp, &mut lse, &mut hit, &mut mean, &vu, &inv_temp);
        }
        let means = CudaStorage::wrap_cuda_slice(mean, dev.clone())
            .to_dtype(&Layout::contiguous(rows), DType::F32)?;
        Ok(LseRows {
            logp: CudaStorage::wrap_cuda_slice(logp, dev.clone()),
            lse: CudaStorage::wrap_cuda_slice(lse, dev.clone()),
            hits: dev.clone_dtoh(&hit)?,
            means: dev.clone_dtoh(means.as_cuda_slice::<f32>()?)?,
        })
    })
}

/// `d z` of [`lse_gather`]'s `log p` given its gradient `g` and the forward's log-sum-exp.
pub(crate) fn lse_gather_bwd(
    (z, lz): (&CudaStorage, &Layout),
    (labels, ll): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    (lse, lls): (&CudaStorage, &Layout),
    inv_temp: f64,
) -> Result<(CudaStorage, Shape)> {
    let op = "lse-gather-bwd";
    let (rows, v) = lz.shape().dims2()?;
    let dev = &z.device;
    by_dtype!(z.dtype(), op, |T| {
        let zv = input::<T>(z, lz, op)?;
        let lv = view::<u32>(labels, ll, op)?;
        let gv = view::<<T as Elem>::Acc>(g, lg, op)?;
        let sv = view::<<T as Elem>::Acc>(lse, lls, op)?;
        if lv.len() != rows || gv.len() != rows || sv.len() != rows {
            return Err(Error::Msg(format!(
                "{op}: per-row inputs do not have {rows} rows"
            )));
        }
        // SAFETY: the grid-stride loop writes every element.
        let mut dz = unsafe { dev.alloc::<T>(rows * v) }?;
        let vu = u32_of(v, "vocabulary")?;
        launch!(dev, Kernel::LseGatherBwd.name(T::KIND), kc::elementwise(rows * v);
            &zv, &lv, &gv, &sv, &mut dz, &rows, &vu, &inv_temp);
        Ok((
            CudaStorage::wrap_cuda_slice(dz, dev.clone()),
            lz.shape().clone(),
        ))
    })
}

/// A value computed with tensor ops inside a custom op's forward (as `ops::cpu_output` on the
/// CPU), as the op's output storage: a device copy of its buffer.
pub(crate) fn gpu_output(y: &candle_core::Tensor, op: &str) -> Result<(CudaStorage, Shape)> {
    let y = y.contiguous()?;
    let (st, l) = y.storage_and_layout();
    let s = on_gpu(&st, op)?;
    // `try_clone` copies the whole buffer: it must be exactly the value.
    let len = match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.len(),
        DType::BF16 => s.as_cuda_slice::<bf16>()?.len(),
        DType::F64 => s.as_cuda_slice::<f64>()?.len(),
        _ => 0,
    };
    if l.start_offset() != 0 || len != y.elem_count() {
        return Err(Error::Msg(format!("{op}: unexpected output layout")));
    }
    Ok((s.try_clone(l)?, y.shape().clone()))
}

/// The CUDA storage of a tensor an op keeps for later (a mask, an output, its gradient, a
/// log-sum-exp), or an error naming `op` if it is elsewhere.
pub(crate) fn on_gpu<'a>(st: &'a candle_core::Storage, op: &str) -> Result<&'a CudaStorage> {
    match st {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => Err(Error::Msg(format!("{op}: a kept tensor is not on the GPU"))),
    }
}

/// [`on_gpu`] of an optional tensor's read storage, with its layout.
pub(crate) fn held<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    h: &'a Option<(G, &'a Layout)>,
    op: &str,
) -> Result<Option<(&'a CudaStorage, &'a Layout)>> {
    h.as_ref()
        .map(|(st, l)| Ok((on_gpu(st, op)?, *l)))
        .transpose()
}

/// Whether the decoding attention kernel exists for `dtype` at head size `dh` with `rep` query
/// heads a KV group.
pub(crate) fn decode_built(dtype: DType, dh: usize, rep: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
        && kc::DECODE_HEAD_SIZES.contains(&dh)
        && rep <= kc::DECODE_MAX_REP
}

/// Whether attention kernels exist for `dtype` at head size `dh`: the tensor-core ones (f32 and
/// bf16 inputs) or the CUDA-core ones.
pub(crate) fn flash_built(dtype: DType, dh: usize, tensor_cores: bool) -> bool {
    let kind = match dtype {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::Bf16,
        DType::F64 => Dtype::F64,
        _ => return false,
    };
    match tensor_cores {
        true => kind != Dtype::F64 && kc::FLASH_TC_HEAD_SIZES.contains(&dh),
        false => kc::flash_head_sizes(kind).contains(&dh),
    }
}

/// [`flash_built`] as an error naming `op`.
fn check_flash(op: &str, d: &FlashDims, dtype: DType, tensor_cores: bool) -> Result<()> {
    if flash_built(dtype, d.dh, tensor_cores) {
        return Ok(());
    }
    let which = if tensor_cores { "tensor-core " } else { "" };
    Err(Error::Msg(format!(
        "{op}: no {which}kernel for head size {} in {dtype:?}",
        d.dh
    )))
}

/// Whether the tensor-core kernels can run on `dev`: built into the PTX (`compute_80` or newer)
/// and a GPU of compute capability 8.0 or newer (bf16 `wmma`). Asked once per process.
pub(crate) fn tensor_cores_available(dev: &candle_core::Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let candle_core::Device::Cuda(d) = dev else {
        return false;
    };
    *AVAILABLE.get_or_init(|| {
        let major = d
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        kc::tensor_core_kernels_built() && major.is_ok_and(|m| m >= 8)
    })
}

/// The shape of an attention problem in the kernels' grouped layout (crate::flash::Dims).
pub(crate) use crate::flash::Dims as FlashDims;

/// A tensor argument that may be absent: the kernels take a null pointer for "no mask".
fn mask_arg<'a, T: Elem>(
    mask: Option<(&'a CudaStorage, &Layout)>,
    op: &str,
) -> Result<Option<CudaView<'a, T>>> {
    mask.map(|(s, l)| input::<T>(s, l, op)).transpose()
}

/// Attention forward: the output `[bg, r, dh]` and each row's log-sum-exp.
pub(crate) fn flash_fwd(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    d: FlashDims,
    scale: f64,
    tensor_cores: bool,
) -> Result<(CudaStorage, CudaStorage)> {
    let op = "flash-attention";
    let dev = &q.device;
    check_flash(op, &d, q.dtype(), tensor_cores)?;
    by_dtype!(q.dtype(), op, |T| {
        let (name, l) = match tensor_cores {
            true => (
                Kernel::FlashFwdTc.name_for_head(T::KIND, d.dh),
                kc::flash_tc_rows(d.bg, d.r, d.dh),
            ),
            false => (
                Kernel::FlashFwd.name_for_head(T::KIND, d.dh),
                kc::flash_rows(d.bg, d.r),
            ),
        };
        let (qv, kv, vv) = (
            input::<T>(q, lq, op)?,
            input::<T>(k, lk, op)?,
            input::<T>(v, lv, op)?,
        );
        let mv = mask_arg::<T>(mask, op)?;
        // SAFETY: every live query row's thread writes its output row and log-sum-exp, and the
        // launch covers every row.
        let mut out = unsafe { dev.alloc::<T>(d.bg * d.r * d.dh) }?;
        // SAFETY: as above.
        let mut lse = unsafe { dev.alloc::<<T as Elem>::Acc>(d.bg * d.r) }?;
        let (r, t, tk, g) = d.u32s()?;
        match &mv {
            Some(m) => {
                launch!(dev, name, l; &qv, &kv, &vv, m, &mut out, &mut lse, &r, &t, &tk, &g, &scale)
            }
            None => {
                launch!(dev, name, l; &qv, &kv, &vv, &0u64, &mut out, &mut lse, &r, &t, &tk, &g, &scale)
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            CudaStorage::wrap_cuda_slice(lse, dev.clone()),
        ))
    })
}

/// A decoding step's attention ([`crate::flash::flash_decode`]): the partial states of each
/// block of keys, then their merge into the output `[bg, r, dh]`.
pub(crate) fn flash_decode(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    limit: Option<(&CudaStorage, &Layout)>,
    d: FlashDims,
    scale: f64,
) -> Result<CudaStorage> {
    let op = "flash-decode";
    let dev = &q.device;
    if !decode_built(q.dtype(), d.dh, d.r) || d.bg > 65535 {
        return Err(Error::Msg(format!("{op}: no kernel for {d:?}")));
    }
    let stride =
        crate::flash::kv_pair_stride(lk, lv).ok_or_else(|| shapes_error(op, [lq, lk, lv]))?;
    let (r, _, tk, g) = d.u32s()?;
    let (launch, chunk) = kc::flash_decode(d.bg, d.tk);
    let splits = launch.grid as usize;
    let lim = limit.map(|(s, l)| view::<u32>(s, l, op)).transpose()?;
    by_dtype!(q.dtype(), op, |T| {
        // From each view's first element to its last group's last key.
        let span = (d.bg - 1) * stride + d.tk * d.dh;
        let (qv, kv_k, kv_v) = (
            input::<T>(q, lq, op)?,
            kv_rows::<T>(k, lk, span, op)?,
            kv_rows::<T>(v, lv, span, op)?,
        );
        let mv = mask_arg::<T>(mask, op)?;
        // SAFETY: every block writes the partials of its split for each of its group's rows.
        let mut part_o = unsafe { dev.alloc::<f32>(d.bg * d.r * splits * d.dh) }?;
        // SAFETY: as above.
        let mut part_ml = unsafe { dev.alloc::<f32>(d.bg * d.r * splits * 2) }?;
        let name = Kernel::FlashDecode.name_for_head(T::KIND, d.dh);
        let stride = stride as u64;
        match (&mv, &lim) {
            (Some(m), Some(l)) => launch!(dev, name, launch; &qv, &kv_k, &kv_v, m, l,
                &mut part_o, &mut part_ml, &r, &tk, &g, &stride, &chunk, &scale),
            (Some(m), None) => launch!(dev, name, launch; &qv, &kv_k, &kv_v, m, &0u64,
                &mut part_o, &mut part_ml, &r, &tk, &g, &stride, &chunk, &scale),
            (None, Some(l)) => launch!(dev, name, launch; &qv, &kv_k, &kv_v, &0u64, l,
                &mut part_o, &mut part_ml, &r, &tk, &g, &stride, &chunk, &scale),
            (None, None) => launch!(dev, name, launch; &qv, &kv_k, &kv_v, &0u64, &0u64,
                &mut part_o, &mut part_ml, &r, &tk, &g, &stride, &chunk, &scale),
        }
        // SAFETY: the combine kernel writes every row's `dh` outputs.
        let mut out = unsafe { dev.alloc::<T>(d.bg * d.r * d.dh) }?;
        let (splits, dh) = (u32_of(splits, "splits")?, u32_of(d.dh, "dh")?);
        launch!(dev, Kernel::FlashDecodeCombine.name(T::KIND), kc::flash_decode_combine(d.bg * d.r);
            &part_o, &part_ml, &mut out, &splits, &dh);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}

/// The `span` elements of `s` from `l`'s first one: keys or values read in place.
fn kv_rows<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    span: usize,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let all = s.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    if start + span > all.len() {
        return Err(Error::Msg(format!("{op}: keys past their buffer")));
    }
    Ok(all.slice(start..start + span))
}

/// Attention backward: `dq`, `dk`, `dv` flattened one after another.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_bwd(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    (out, lo): (&CudaStorage, &Layout),
    (dout, ldo): (&CudaStorage, &Layout),
    (lse, ll): (&CudaStorage, &Layout),
    d: FlashDims,
    scale: f64,
    tensor_cores: bool,
) -> Result<CudaStorage> {
    let op = "flash-attention-bwd";
    let dev = &q.device;
    check_flash(op, &d, q.dtype(), tensor_cores)?;
    let (dq_kernel, dkdv_kernel, rows, keys) = match tensor_cores {
        true => (
            Kernel::FlashBwdDqTc,
            Kernel::FlashBwdDkdvTc,
            kc::flash_tc_rows(d.bg, d.r, d.dh),
            kc::flash_tc_keys(d.bg, d.tk, d.dh),
        ),
        false => (
            Kernel::FlashBwdDq,
            Kernel::FlashBwdDkdv,
            kc::flash_rows(d.bg, d.r),
            kc::flash_keys(d.bg, d.tk),
        ),
    };
    by_dtype!(q.dtype(), op, |T| {
        let (qv, kv, vv) = (
            input::<T>(q, lq, op)?,
            input::<T>(k, lk, op)?,
            input::<T>(v, lv, op)?,
        );
        let (ov, gv) = (input::<T>(out, lo, op)?, input::<T>(dout, ldo, op)?);
        let lsev = view::<<T as Elem>::Acc>(lse, ll, op)?;
        let mv = mask_arg::<T>(mask, op)?;
        let (nq, nk) = (d.bg * d.r * d.dh, d.bg * d.tk * d.dh);
        // SAFETY: the dQ kernel writes every query row's gradient and D, the dK/dV kernel every
        // key's two gradients.
        let mut grads = unsafe { dev.alloc::<T>(nq + 2 * nk) }?;
        // SAFETY: as above.
        let mut dsum = unsafe { dev.alloc::<<T as Elem>::Acc>(d.bg * d.r) }?;
        let (r, t, tk, g) = d.u32s()?;
        {
            let name = dq_kernel.name_for_head(T::KIND, d.dh);
            let l = rows;
            let mut dq = grads.slice_mut(0..nq);
            match &mv {
                Some(m) => {
                    launch!(dev, name, l; &qv, &kv, &vv, m, &ov, &gv, &lsev, &mut dsum, &mut dq, &r, &t, &tk, &g, &scale)
                }
                None => {
                    launch!(dev, name, l; &qv, &kv, &vv, &0u64, &ov, &gv, &lsev, &mut dsum, &mut dq, &r, &t, &tk, &g, &scale)
                }
            }
        }
        {
            let name = dkdv_kernel.name_for_head(T::KIND, d.dh);
            let l = keys;
            let (mut head, mut dv) = grads.split_at_mut(nq + nk);
            let (_, mut dk) = head.split_at_mut(nq);
            match &mv {
                Some(m) => {
                    launch!(dev, name, l; &qv, &kv, &vv, m, &gv, &lsev, &dsum, &mut dk, &mut dv, &r, &t, &tk, &g, &scale)
                }
                None => {
                    launch!(dev, name, l; &qv, &kv, &vv, &0u64, &gv, &lsev, &dsum, &mut dk, &mut dv, &r, &t, &tk, &g, &scale)
                }
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(grads, dev.clone()))
    })
}
