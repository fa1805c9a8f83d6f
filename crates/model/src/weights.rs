//! Hugging Face safetensors in (single file or sharded) and out.
//!
//! The only layout difference between the HF files and our internal tensors is GPT-2's `Conv1D`,
//! which stores weights `[in, out]`; we transpose on the way in and back on the way out.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::io::{parent_of, read_json, sync_dir, tmp_path};

use crate::config::Arch;
use crate::error::{Error, Result};

/// GPT-2 checkpoints exist with and without the `transformer.` prefix; we use the prefixed names.
fn canonical_name(arch: Arch, name: &str) -> String {
    let bare = ["wte.", "wpe.", "h.", "ln_f."];
    if arch == Arch::Gpt2 && bare.iter().any(|p| name.starts_with(p)) {
        format!("transformer.{name}")
    } else {
        name.to_string()
    }
}

fn is_conv1d(arch: Arch, name: &str) -> bool {
    arch == Arch::Gpt2
        && [
            ".attn.c_attn.weight",
            ".attn.c_proj.weight",
            ".mlp.c_fc.weight",
            ".mlp.c_proj.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Converts between the HF on-disk layout and ours (the transpose is its own inverse).
pub fn convert_layout(arch: Arch, name: &str, t: Tensor) -> Result<Tensor> {
    Ok(if is_conv1d(arch, name) {
        t.t()?.contiguous()?
    } else {
        t
    })
}

/// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`, from `dir`,
/// returning tensors in the internal layout.
pub fn load_hf_weights(dir: &Path, arch: Arch, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_hf_weights_as(dir, arch, device, None)
}

/// [`load_hf_weights`]; with `vars`, tensors stored in that dtype come back as variables (for
/// training) built straight from the file, instead of a tensor that `Var::from_tensor` copies
/// again: loading then holds one model, not two, and leaves no freed copy behind.
pub fn load_hf_weights_as(
    dir: &Path,
    arch: Arch,
    device: &Device,
    vars: Option<candle_core::DType>,
) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid(&index, "weight_map", "missing or not an object"))?;
        let mut shards: Vec<PathBuf> = map
            .iter()
            .map(|(tensor, f)| {
                // A shard is a plain file name in the model folder, as transformers writes it: an
                // index naming `../x` or `/etc/passwd` must not make us read outside it.
                let name = f.as_str().filter(|f| {
                    let p = Path::new(f);
                    p.components().count() == 1
                        && matches!(p.components().next(), Some(std::path::Component::Normal(_)))
                });
                name.map(|f| dir.join(f)).ok_or_else(|| {
                    Error::invalid(
                        &index,
                        format!("weight_map.{tensor}"),
                        format!("{f} is not a file name in the model folder"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        shards.sort();
        shards.dedup();
        shards
    } else {
        return Err(Error::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json",
            ),
        ));
    };
    let mut out = HashMap::new();
    for f in files {
        if !f.exists() {
            return Err(Error::io(
                &f,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "shard listed in the index is missing",
                ),
            ));
        }
        // Mapped, not read: reading the file into a buffer first held the model twice while
        // loading, and the freed buffer stayed resident in the allocator for the whole run.
        // SAFETY: the mapping lives only inside this loop iteration and every tensor is copied
        // out of it at once. As with any mmap, the file must not be truncated or rewritten while
        // it loads (that would be a SIGBUS or torn values); model files are not written in place.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&f) }
            .map_err(|e| Error::invalid(&f, "safetensors", e.to_string()))?;
        for (name, view) in st.tensors() {
            let bad = |e: candle_core::Error| Error::invalid(&f, &name, e.to_string());
            let cname = canonical_name(arch, &name);
            let direct = vars.filter(|&d| {
                device.is_cpu()
                    && !is_conv1d(arch, &cname)
                    && candle_core::DType::try_from(view.dtype()).ok() == Some(d)
            });
            let t = match direct {
                Some(d) => var_from_bytes(view.data(), view.shape(), d).map_err(bad)?,
                None => convert_layout(arch, &cname, st.load(&name, device).map_err(bad)?)?,
            };
            out.insert(cname, t);
        }
    }
    Ok(out)
}

/// A CPU variable of `dtype` holding `bytes` (little-endian values, possibly unaligned).
fn var_from_bytes(
    bytes: &[u8],
    shape: &[usize],
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    fn read<T: candle_core::WithDType>(
        bytes: &[u8],
        shape: &[usize],
    ) -> candle_core::Result<Tensor> {
        let n = bytes.len() / std::mem::size_of::<T>();
        let mut v: Vec<T> = Vec::with_capacity(n);
        // SAFETY: `v` has room for `n` values of a plain number type, every bit pattern of which
        // is valid, and `bytes` holds exactly `n` of them; the copy is bytewise, so alignment of
        // `bytes` does not matter.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                v.as_mut_ptr().cast::<u8>(),
                n * std::mem::size_of::<T>(),
            );
            v.set_len(n);
        }
        Ok(candle_core::Var::from_vec(v, shape, &Device::Cpu)?.into_inner())
    }
    use candle_core::DType as D;
    match dtype {
        D::F32 => read::<f32>(bytes, shape),
        D::BF16 => read::<half::bf16>(bytes, shape),
        D::F16 => read::<half::f16>(bytes, shape),
        D::F64 => read::<f64>(bytes, shape),
        d => candle_core::bail!("no direct load for {d:?}"),
    }
}

/// Writes tensors (internal layout) as `model.safetensors` in the HF layout, atomically.
pub fn save_safetensors(path: &Path, arch: Arch, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut hf: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        // GPT-2's Conv1D weights as transposed views: the writer copies each to the HF layout
        // as it streams it, so at most one such copy exists at a time (`convert_layout` here held
        // them all, a second copy of most of the model).
        let t = t.detach();
        hf.insert(name.clone(), if is_conv1d(arch, name) { t.t()? } else { t });
    }
    let metadata = pt_metadata();
    let entries: Vec<(&str, Data)> = hf
        .iter()
        .map(|(k, v)| (k.as_str(), Data::Tensor(v)))
        .collect();
    write_safetensors(path, &entries, Some(&metadata))
}

/// The metadata transformers and PEFT write (and `safe_open` in PyTorch mode expects).
pub fn pt_metadata() -> HashMap<String, String> {
    [("format".to_string(), "pt".to_string())].into()
}

/// What [`write_safetensors`] writes under one name.
pub enum Data<'a> {
    Tensor(&'a Tensor),
    /// A flat f32 buffer (optimiser state), written as a 1-D tensor.
    F32(&'a [f32]),
}

impl Data<'_> {
    fn dtype_and_shape(&self) -> (candle_core::DType, Vec<usize>) {
        match self {
            Data::Tensor(t) => (t.dtype(), t.dims().to_vec()),
            Data::F32(v) => (candle_core::DType::F32, vec![v.len()]),
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let t = match self {
            Data::F32(v) => return out.write_all(as_bytes(v)),
            Data::Tensor(t) => t,
        };
        let own;
        let t = if t.device().is_cpu() && t.is_contiguous() {
            *t
        } else {
            own = t
                .to_device(&Device::Cpu)
                .and_then(|t| t.contiguous())
                .map_err(std::io::Error::other)?;
            &own
        };
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(std::io::Error::other("tensor not on the CPU"));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| std::io::Error::other("tensor not contiguous"))?;
        use candle_core::CpuStorage as S;
        out.write_all(match cpu {
            S::U8(v) => as_bytes(&v[a..b]),
            S::U32(v) => as_bytes(&v[a..b]),
            S::I64(v) => as_bytes(&v[a..b]),
            S::BF16(v) => as_bytes(&v[a..b]),
            S::F16(v) => as_bytes(&v[a..b]),
            S::F32(v) => as_bytes(&v[a..b]),
            S::F64(v) => as_bytes(&v[a..b]),
            _ => return Err(std::io::Error::other("dtype not writable as safetensors")),
        })
    }
}

/// The bytes of a slice of plain numbers (little-endian on every target we build for).
fn as_bytes<T: candle_core::WithDType>(v: &[T]) -> &[u8] {
    // SAFETY: candle's element types are plain numbers (no padding, every byte initialised);
    // u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Writes a safetensors file atomically, streaming each tensor's bytes from its own storage.
/// `safetensors::serialize` builds the whole file in memory first: at the end of a run that was
/// the model again (and the optimiser state twice more, for a checkpoint) on top of peak memory.
pub fn write_safetensors(
    path: &Path,
    entries: &[(&str, Data)],
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(m).unwrap_or_default(),
        );
    }
    // Widest elements first (as `safetensors::serialize` orders them), so that every tensor
    // starts at a multiple of its element size.
    let mut order: Vec<&(&str, Data)> = entries.iter().collect();
    order.sort_by_key(|(_, d)| std::cmp::Reverse(d.dtype_and_shape().0.size_in_bytes()));
    let mut offset = 0usize;
    for (name, data) in &order {
        let (dtype, shape) = data.dtype_and_shape();
        let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let entry = serde_json::json!({
            "dtype": safetensors::Dtype::from(dtype),
            "shape": shape,
            "data_offsets": [offset, offset + len],
        });
        if header.insert(name.to_string(), entry).is_some() {
            return Err(Error::invalid(path, *name, "tensor name given twice"));
        }
        offset += len;
    }
    let mut head =
        serde_json::to_vec(&header).map_err(|e| Error::invalid(path, "header", e.to_string()))?;
    // The data that follows starts 8-byte aligned, as the format asks.
    head.resize(head.len().next_multiple_of(8), b' ');
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for (name, data) in &order {
            data.write(&mut f)
                .map_err(|e| std::io::Error::new(e.kind(), format!("tensor {name}: {e}")))?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(parent_of(path))
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
