//! `--device` and `--dtype` of the inference commands (generate, predict, eval, score): where the
//! loaded model runs and in which dtype. Models load as f32 on the host and move once.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use herd_kernels::device::DeviceSpec;
use herd_kernels::FusedOnCpu;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InferenceDtype {
    /// bf16 on a CUDA device (transformers' torch_dtype=bfloat16), f32 on the CPU.
    Auto,
    F32,
    Bf16,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, or cuda:N with a build that has the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The weights' dtype while answering (logits, losses and sampling stay f32).
    #[arg(long, value_enum, default_value_t = InferenceDtype::Auto)]
    pub dtype: InferenceDtype,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        DeviceArgs {
            device: "cpu".into(),
            dtype: InferenceDtype::Auto,
        }
    }
}

/// An opened device and the dtype to run on it. On the CPU in bf16 it holds the guard that
/// sends this thread's CPU tensors through the fused ops' host code, the path a bf16 training
/// rank takes (and, but for the CUDA C, the one a GPU takes), so its answers are a GPU's.
pub struct Placed {
    pub device: Device,
    pub dtype: DType,
    _fused: Option<FusedOnCpu>,
}

impl DeviceArgs {
    /// The dtype for `spec` (a pure function of the flags).
    pub fn dtype_on(&self, spec: DeviceSpec) -> DType {
        match (self.dtype, spec.is_cuda()) {
            (InferenceDtype::F32, _) | (InferenceDtype::Auto, false) => DType::F32,
            (InferenceDtype::Bf16, _) | (InferenceDtype::Auto, true) => DType::BF16,
        }
    }

    pub fn open(&self) -> Result<Placed> {
        let spec = DeviceSpec::parse(&self.device)?;
        let dtype = self.dtype_on(spec);
        let device = herd_kernels::device::open(spec).context("opening --device")?;
        let fused = (!spec.is_cuda() && dtype == DType::BF16).then(FusedOnCpu::enable);
        Ok(Placed {
            device,
            dtype,
            _fused: fused,
        })
    }
}

impl Placed {
    /// Whether a model loaded on the host (f32) must move.
    pub fn moves(&self) -> bool {
        !matches!((&self.device, self.dtype), (Device::Cpu, DType::F32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_bf16_on_cuda_and_f32_on_the_cpu() {
        let args = |dtype| DeviceArgs {
            device: String::new(),
            dtype,
        };
        let (cpu, gpu) = (DeviceSpec::Cpu, DeviceSpec::Cuda(1));
        assert_eq!(args(InferenceDtype::Auto).dtype_on(cpu), DType::F32);
        assert_eq!(args(InferenceDtype::Auto).dtype_on(gpu), DType::BF16);
        assert_eq!(args(InferenceDtype::F32).dtype_on(gpu), DType::F32);
        assert_eq!(args(InferenceDtype::Bf16).dtype_on(cpu), DType::BF16);
    }

    #[test]
    fn bf16_on_the_cpu_takes_the_fused_path_while_placed() {
        let cpu = Device::Cpu;
        let placed = DeviceArgs {
            device: "cpu".into(),
            dtype: InferenceDtype::Bf16,
        }
        .open()
        .unwrap();
        assert!(placed.moves() && herd_kernels::fused(&cpu));
        drop(placed);
        assert!(!herd_kernels::fused(&cpu));
        let f32_cpu = DeviceArgs::default().open().unwrap();
        assert!(!f32_cpu.moves() && !herd_kernels::fused(&cpu));
    }
}
