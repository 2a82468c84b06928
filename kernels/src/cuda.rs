//! Launch helpers of the `cuda_fwd` paths: the PTX modules nvcc built (build.rs), typed views of
//! candle's CUDA storage, and output allocation (NaN-poisoned under `cfg(test)`, so a kernel that
//! leaves an element unwritten fails its test instead of passing on leftover memory).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};

pub(crate) struct Module {
    pub name: &'static str,
    pub ptx: &'static str,
}

macro_rules! module {
    ($id:ident, $file:literal) => {
        pub(crate) const $id: Module = Module {
            name: concat!("herd_", $file),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        };
    };
}
module!(RMS_NORM, "rms_norm");
module!(ROPE, "rope");
module!(SWIGLU, "swiglu");
module!(SOFTMAX, "softmax");
module!(CROSS_ENTROPY, "cross_entropy");
module!(ADAMW, "adamw");
module!(ACCUMULATE, "accumulate");
module!(SUM_SQUARES, "sum_squares");

/// A loaded kernel and the device's stream it launches on.
pub(crate) struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// `base` + `_f32` / `_bf16` (the kernels are instantiated once per storage dtype).
pub(crate) fn func(dev: &CudaDevice, m: &Module, base: &str, dtype: DType) -> Result<Kernel> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => bail!("{base}: unsupported dtype {other:?} (f32 or bf16)"),
    };
    plain_func(dev, m, &format!("{base}_{suffix}"))
}

pub(crate) fn plain_func(dev: &CudaDevice, m: &Module, name: &str) -> Result<Kernel> {
    let func = dev.get_or_load_custom_func(name, m.name, m.ptx)?;
    Ok(Kernel {
        stream: dev.cuda_stream(),
        func: func.into_cuda_function(),
    })
}

/// The contiguous elements of `s` under `l`.
pub(crate) fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &'static str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An output buffer of `n` elements. Uninitialized in production (every kernel writes all of
/// it); NaN in tests.
pub(crate) fn alloc_out<T: DeviceRepr + WithDType + 'static>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    if cfg!(test) {
        dev.clone_htod(&vec![T::from_f64(f64::NAN); n])
    } else {
        // SAFETY: the kernel launched next writes every element.
        unsafe { dev.alloc::<T>(n) }
    }
}

/// One block per row (see [`crate::launch::rows`]).
pub(crate) fn rows_cfg(rows: usize, cols: usize) -> LaunchConfig {
    config(crate::launch::rows(rows, cols))
}

/// One thread per element (see [`crate::launch::elems`]).
pub(crate) fn elems_cfg(n: usize) -> LaunchConfig {
    config(crate::launch::elems(n))
}

pub(crate) fn config(g: crate::launch::Grid) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.blocks, 1, 1),
        block_dim: (g.threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
