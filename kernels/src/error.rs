//! The one error type of `herd-kernels`: what a user must act on when a CUDA device cannot be
//! used (which library or driver, what to lower), plus shape and label misuse of the ops.

pub type Result<T> = std::result::Result<T, Error>;

/// Printed with every "the driver/libraries are not there" error.
pub const LD_HINT: &str = "herd built with the cuda feature loads libcuda.so.1 (the NVIDIA \
driver) and the CUDA 13 runtime libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, \
libcurand.so.10, libnccl.so.2) at start; point LD_LIBRARY_PATH at them, e.g. the nvidia/cu13/lib \
and nvidia/nccl/lib folders of a PyTorch venv (see README, CUDA)";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device `{0}`: expected cpu or cuda:N")]
    BadDevice(String),
    #[error("device `{device}`: this herd was built without CUDA; rebuild with `--features cuda` or use --device cpu")]
    NotCompiled { device: String },
    /// cuInit failed: no driver, the link-time stub library, or a driver too old.
    #[error("device `{device}`: no usable CUDA driver ({code}). Is this a GPU machine with the NVIDIA driver (nvidia-smi)? {hint}", hint = LD_HINT)]
    NoDriver { device: String, code: String },
    #[error("device `{device}`: no such GPU ({code}); {count} visible (CUDA_VISIBLE_DEVICES?)")]
    NoSuchDevice {
        device: String,
        code: String,
        count: String,
    },
    #[error(
        "out of GPU memory on {device}: {what} needs {asked}, {free} free of {total}; lower \
         per_device_train_batch_size or model_max_length, or set gradient_checkpointing: true"
    )]
    OutOfMemory {
        device: String,
        what: String,
        asked: Bytes,
        free: Bytes,
        total: Bytes,
    },
    #[error("NCCL failed on rank {rank} of {world}: {message}")]
    Nccl {
        rank: usize,
        world: usize,
        message: String,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("label {label} outside vocabulary of {vocab}")]
    Label { label: i64, vocab: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A byte count printed in GiB/MiB ("unknown" when the allocator did not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub Option<u64>);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => write!(f, "an unknown amount"),
            Some(b) if b >= 1 << 30 => write!(f, "{:.2} GiB", b as f64 / (1u64 << 30) as f64),
            Some(b) => write!(f, "{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        }
    }
}
