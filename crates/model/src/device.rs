//! Where a run's tensors live: `--device cpu|cuda|cuda:N|auto` on every command, `device` in
//! configs.
//!
//! CUDA needs a binary built with `--features cuda` (scripts/build-cuda.sh). Such a binary loads
//! the CUDA driver, cuBLAS and cuRAND at run time, so it still starts on a machine without them;
//! asking it for `cuda` there is a [`DeviceError`] (the binary exits 2), and `auto` falls back to
//! the CPU.
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::Device;

/// A device as a user names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The GPU of this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first GPU when one can be opened, else the CPU.
    Auto,
}

/// The device asked for cannot be had here: no CUDA in this build, no driver, no GPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--device {spec}: {reason}")]
pub struct DeviceError {
    pub spec: DeviceSpec,
    pub reason: String,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "auto" => Ok(DeviceSpec::Auto),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device {other:?} (use cpu, cuda, cuda:N or auto)")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("device: {e}")))
    }
}

impl DeviceSpec {
    /// Opens the device: the GPU's context, cuBLAS and cuRAND handles for CUDA.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                open_cuda(n).map_err(|reason| DeviceError { spec: self, reason })
            }
            DeviceSpec::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device, String> {
    Err(
        "this preftune was built without CUDA support; rebuild with scripts/build-cuda.sh \
         (cargo build --release --features cuda)"
            .into(),
    )
}

/// Each GPU is opened once per process: candle treats two handles on one GPU as two devices
/// whose tensors cannot meet.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    static OPEN: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = open.iter().find(|(n, _)| *n == ordinal) {
        return Ok(d.clone());
    }
    let d = open_cuda_once(ordinal)?;
    open.push((ordinal, d.clone()));
    Ok(d)
}

#[cfg(feature = "cuda")]
fn open_cuda_once(ordinal: usize) -> Result<Device, String> {
    use candle_core::cuda_backend::cudarc;
    // SAFETY: each check only dlopens the library (its initialisers run, none of its functions).
    let present = unsafe {
        [
            (
                "the CUDA driver (libcuda.so.1)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "cuBLAS (libcublas.so.13)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "cuBLASLt (libcublasLt.so.13)",
                cudarc::cublaslt::sys::is_culib_present(),
            ),
            (
                "cuRAND (libcurand.so.10)",
                cudarc::curand::sys::is_culib_present(),
            ),
        ]
    };
    if let Some((name, _)) = present.iter().find(|(_, ok)| !ok) {
        let hint = if name.contains("driver") {
            "no CUDA driver on this machine"
        } else {
            "install the CUDA 13 libraries or add their folder to LD_LIBRARY_PATH"
        };
        return Err(format!("{name} could not be loaded: {hint}"));
    }
    // cudarc panics when a library it needs cannot be loaded after all; keep that an error.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(d)) => {
            if let Device::Cuda(c) = &d {
                keep_freed_memory(c);
                untracked_buffers(c);
            }
            Ok(d)
        }
        Ok(Err(e)) => Err(format!("no GPU {ordinal}: {e}")),
        Err(p) => Err(format!(
            "CUDA failed to start: {}",
            crate::error::panic_message(&*p)
        )),
    }
}

/// Makes the GPU's default memory pool keep what is freed instead of handing it back to the
/// driver at every synchronisation (its default release threshold is 0). candle allocates every
/// tensor from that pool (stream-ordered `cuMemAllocAsync`), and a training step synchronises
/// when it reads the loss; without this, each step maps its activations' memory afresh. This is
/// what PyTorch's caching allocator does. On failure (a driver without memory pools) nothing
/// changes: allocation still works, only slower.
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let ctx = d.cuda_stream().context().clone();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut threshold = u64::MAX;
    // SAFETY: `cu_device` is the device of a live context; the release-threshold attribute takes
    // a pointer to a u64, which `threshold` is, and the call only reads it.
    let _ = unsafe {
        result::device::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        })
    };
}

/// Stops cudarc from making two events for every buffer allocated from here on (and destroying
/// them with it): four driver calls per tensor, which only order work between streams, and
/// candle runs all of a device's work on one stream. A decoding step allocates hundreds of
/// tensors. `PREFTUNE_CUDA_EVENT_TRACKING=1` keeps them.
#[cfg(feature = "cuda")]
fn untracked_buffers(d: &candle_core::CudaDevice) {
    if std::env::var("PREFTUNE_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1") {
        return;
    }
    // SAFETY: the events order a buffer's uses across streams; every kernel, copy, cuBLAS and
    // cuRAND call of this device goes to the one stream candle made it with (preftune makes no
    // other), where they run in order without events.
    unsafe { d.disable_event_tracking() };
}

/// Whether `d` makes cudarc's per-buffer events ([`untracked_buffers`]); false off a GPU.
pub fn cuda_event_tracking(d: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = d {
        return c.is_event_tracking();
    }
    let _ = d;
    false
}

/// Host-to-device and device-to-host copies made by the CUDA backend in this process so far:
/// `(h2d copies, h2d bytes, d2h copies, d2h bytes)`. Zeros in a build without CUDA.
pub fn transfer_counts() -> (u64, u64, u64, u64) {
    #[cfg(feature = "cuda")]
    return candle_core::cuda_backend::transfer_counts();
    #[cfg(not(feature = "cuda"))]
    (0, 0, 0, 0)
}

static PROCESS: OnceLock<Device> = OnceLock::new();

/// Sets the device every model of this process loads on unless told otherwise (the binary's
/// `--device`). The first call wins; it overrides `device` in configs.
pub fn set_process_device(d: Device) {
    let _ = PROCESS.set(d);
}

/// The device set by [`set_process_device`], if any.
pub fn process_device() -> Option<Device> {
    PROCESS.get().cloned()
}

/// The device for a run whose config says `config`: the process's when set, else the config's,
/// else the CPU. A config's device becomes the process's, so every model the command loads later
/// (reward models, evaluation) lands beside the policy.
pub fn run_device(config: Option<DeviceSpec>) -> Result<Device, DeviceError> {
    if let Some(d) = process_device() {
        return Ok(d);
    }
    let d = config.unwrap_or_default().open()?;
    if config.is_some() {
        set_process_device(d.clone());
    }
    Ok(d)
}

/// The device [`crate::LoadOptions::default`] loads on: the process's, else the CPU.
pub fn default_device() -> Device {
    process_device().unwrap_or(Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_refuse_unknown_names() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("auto", DeviceSpec::Auto),
        ] {
            assert_eq!(s.parse::<DeviceSpec>(), Ok(d));
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:", "cuda:x", "CUDA", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("cpu, cuda, cuda:N or auto"), "{e}");
        }
    }

    #[test]
    fn cpu_opens_and_auto_falls_back_without_a_gpu() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        // Either a GPU opened (a CUDA build on a GPU machine) or the CPU: never an error.
        let auto = DeviceSpec::Auto.open().unwrap();
        assert!(auto.is_cpu() || auto.is_cuda());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(e.to_string().contains("built without CUDA support"), "{e}");
        assert!(e.to_string().starts_with("--device cuda:0: "), "{e}");
    }
}
