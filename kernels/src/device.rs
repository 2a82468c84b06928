//! `--device cpu | cuda:N`: parsing, opening, and turning CUDA failures into errors that say
//! what to do. The classification is a pure function of the error text (cudarc reports the
//! driver's CUresult name), so it is tested without a GPU.

use candle_core::Device;

use crate::error::{Bytes, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        match spec {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| Error::BadDevice(spec.to_string())),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this build can drive GPUs.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// Open the device, with a clear error when CUDA is missing, absent or out of memory.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => open_cuda(n, spec),
    }
}

#[cfg(feature = "cuda")]
mod pool;

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, spec: DeviceSpec) -> Result<Device> {
    let device =
        Device::new_cuda(n).map_err(|e| classify(e, &spec.to_string(), "opening the device"))?;
    if let Device::Cuda(d) = &device {
        pool::keep_freed(d);
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: usize, spec: DeviceSpec) -> Result<Device> {
    Err(Error::NotCompiled {
        device: spec.to_string(),
    })
}

/// Free and total memory of the current CUDA context's device (None off CUDA or on failure),
/// the memory pool's unused reserve counted as free.
pub fn memory_info(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // Memory the pool keeps for reuse is free for this purpose.
        pool::trim(d);
        // The stream's context must be current on this thread for cuMemGetInfo.
        let _ = d.cuda_stream().context().bind_to_thread();
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(f, t)| (f as u64, t as u64));
    }
    let _ = device;
    None
}

/// Peak bytes allocated on a CUDA device since the process started, as the driver's default
/// memory pool records them (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`). candle's allocations go through
/// `cuMemAllocAsync` on that pool, so this is the counterpart of `torch.cuda.max_memory_allocated`
/// (tensors only: no CUDA context, no cuBLAS workspace). None off CUDA, or when the device has
/// no memory pools (then cudarc allocates synchronously and nothing records a peak).
pub fn peak_allocated(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return pool::used_high(d);
    }
    let _ = device;
    None
}

/// Refuse up front a need that cannot fit (`asked` bytes for `what`), rather than failing in
/// the middle of a step.
pub fn check_memory(device: &Device, what: &str, asked: u64) -> Result<()> {
    match memory_info(device) {
        Some((free, total)) if asked > free => Err(Error::OutOfMemory {
            device: location(device),
            what: what.to_string(),
            asked: Bytes(Some(asked)),
            free: Bytes(Some(free)),
            total: Bytes(Some(total)),
        }),
        _ => Ok(()),
    }
}

fn location(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

/// Map a candle error from CUDA work into a clear one, by the CUresult name in its text.
/// Errors that are not about the driver or memory come back as `Error::Candle` unchanged.
pub fn classify(err: candle_core::Error, device: &str, what: &str) -> Error {
    let text = err.to_string();
    let code = |names: &[&str]| {
        names
            .iter()
            .find(|n| text.contains(*n))
            .map(|n| n.to_string())
    };
    if let Some(code) = code(&[
        "CUDA_ERROR_STUB_LIBRARY",
        "CUDA_ERROR_NO_DEVICE",
        "CUDA_ERROR_INSUFFICIENT_DRIVER",
        "CUDA_ERROR_NOT_INITIALIZED",
        "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    ]) {
        return Error::NoDriver {
            device: device.to_string(),
            code,
        };
    }
    if let Some(code) = code(&["CUDA_ERROR_INVALID_DEVICE"]) {
        return Error::NoSuchDevice {
            device: device.to_string(),
            code,
            count: device_count().map_or("unknown".into(), |c| c.to_string()),
        };
    }
    if text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("out of memory") {
        // candle's allocator does not report the size it asked for; the free memory it does.
        let (free, total) = memory_now(device);
        return Error::OutOfMemory {
            device: device.to_string(),
            what: what.to_string(),
            asked: Bytes(None),
            free: Bytes(free),
            total: Bytes(total),
        };
    }
    Error::Candle(err)
}

#[cfg(feature = "cuda")]
fn device_count() -> Option<i32> {
    candle_core::cuda_backend::cudarc::driver::result::device::get_count().ok()
}

#[cfg(not(feature = "cuda"))]
fn device_count() -> Option<i32> {
    None
}

#[cfg(feature = "cuda")]
fn memory_now(_device: &str) -> (Option<u64>, Option<u64>) {
    match candle_core::cuda_backend::cudarc::driver::result::mem_get_info() {
        Ok((f, t)) => (Some(f as u64), Some(t as u64)),
        Err(_) => (None, None),
    }
}

#[cfg(not(feature = "cuda"))]
fn memory_now(_device: &str) -> (Option<u64>, Option<u64>) {
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        for bad in ["cuda:x", "tpu", "cuda:-1", ""] {
            assert!(DeviceSpec::parse(bad)
                .unwrap_err()
                .to_string()
                .contains("expected cpu or cuda:N"));
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn classifies_driver_and_memory_failures() {
        let e = |s: &str| candle_core::Error::Msg(s.into());
        let no_driver = classify(
            e("DriverError(CUDA_ERROR_STUB_LIBRARY, \"stub\")"),
            "cuda:0",
            "x",
        );
        let msg = no_driver.to_string();
        assert!(
            msg.contains("no usable CUDA driver (CUDA_ERROR_STUB_LIBRARY)"),
            "{msg}"
        );
        assert!(
            msg.contains("LD_LIBRARY_PATH") && msg.contains("libcuda.so.1"),
            "{msg}"
        );
        let oom = classify(
            e("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"),
            "cuda:1",
            "the forward pass",
        );
        let msg = oom.to_string();
        assert!(
            msg.starts_with("out of GPU memory on cuda:1: the forward pass needs"),
            "{msg}"
        );
        assert!(
            msg.contains("per_device_train_batch_size") && msg.contains("gradient_checkpointing"),
            "{msg}"
        );
        let other = classify(e("shape mismatch"), "cuda:0", "x");
        assert!(matches!(other, Error::Candle(_)));
    }

    #[test]
    fn out_of_memory_names_sizes() {
        let e = Error::OutOfMemory {
            device: "cuda:0".into(),
            what: "weights and gradients".into(),
            asked: Bytes(Some(20 << 30)),
            free: Bytes(Some(3 << 29)),
            total: Bytes(Some(80 << 30)),
        };
        assert_eq!(
            e.to_string(),
            "out of GPU memory on cuda:0: weights and gradients needs 20.00 GiB, 1.50 GiB free of \
             80.00 GiB; lower per_device_train_batch_size or model_max_length, or set \
             gradient_checkpointing: true"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = open(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(
            e.contains("built without CUDA") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
