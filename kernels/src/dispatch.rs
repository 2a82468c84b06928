//! When the model takes the fused ops: always for tensors on a CUDA device, and on the CPU only
//! where a thread has asked for it with [`FusedOnCpu`]. The CPU paths of the ops are the
//! references the kernels are tested against, so a CPU test under [`FusedOnCpu`] runs the exact
//! code path a GPU rank runs (dispatch, shapes, backward wiring, bf16 rounding) minus the CUDA C;
//! the per-op GPU tests cover that last part. Thread-local, so parallel tests do not see each
//! other's choice; candle builds and differentiates the graph on the calling thread.

use std::cell::Cell;

use candle_core::Device;

thread_local! {
    static ON_CPU: Cell<bool> = const { Cell::new(false) };
}

/// Whether tensors on `device` go through the fused ops.
pub fn fused(device: &Device) -> bool {
    device.is_cuda() || ON_CPU.with(Cell::get)
}

/// While alive, this thread's CPU tensors take the fused ops too. Dropping it restores the
/// previous choice.
#[must_use = "the fused CPU paths are on only while the guard lives"]
pub struct FusedOnCpu {
    previous: bool,
}

impl FusedOnCpu {
    pub fn enable() -> Self {
        FusedOnCpu {
            previous: ON_CPU.with(|c| c.replace(true)),
        }
    }
}

impl Drop for FusedOnCpu {
    fn drop(&mut self) {
        ON_CPU.with(|c| c.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_turns_the_cpu_path_on_and_restores_it() {
        assert!(!fused(&Device::Cpu));
        {
            let _outer = FusedOnCpu::enable();
            assert!(fused(&Device::Cpu));
            {
                let _inner = FusedOnCpu::enable();
                assert!(fused(&Device::Cpu));
            }
            assert!(
                fused(&Device::Cpu),
                "the inner guard restores the outer choice"
            );
        }
        assert!(!fused(&Device::Cpu));
        // another thread never sees this thread's choice
        let _g = FusedOnCpu::enable();
        assert!(!std::thread::spawn(|| fused(&Device::Cpu)).join().unwrap());
    }
}
