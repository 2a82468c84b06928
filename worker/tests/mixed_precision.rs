//! bf16 mixed precision tracks the f32 CPU reference (CUDA issue #5): the parity fixtures' model
//! and batch, 20 AdamW steps each, per-step loss within 1%. The bf16 engine keeps f32 master
//! weights and AdamW state and computes forward/backward in bf16 through the fused ops. On the
//! CPU (`FusedOnCpu`, in CI) that checks everything but the CUDA C; the same test on cuda:0 is
//! ignored here and run by scripts/gpu-test.sh.

mod common;

use candle_core::{DType, Device};
use common::{batch, load_step, resized_model, torch_adam};
use herd_kernels::FusedOnCpu;
use herd_worker::collective::SingleProcess;
use herd_worker::trainer::engine::Engine;

/// Per-step (f32 CPU, bf16 on `device`) losses of 20 steps from the same start.
fn losses(device: &Device) -> Vec<[f64; 2]> {
    let step = load_step();
    let adam = torch_adam(0.0);
    let mut reference = Engine::new(resized_model(&step), adam, 1.0);
    let mut mixed = Engine::new(resized_model(&step), adam, 1.0);
    mixed.place(device, DType::BF16).unwrap();
    let batch = batch(&step);
    (0..20)
        .map(|s| {
            let mut losses = [0.0; 2];
            for (k, e) in [&mut reference, &mut mixed].into_iter().enumerate() {
                e.zero_grad().unwrap();
                e.accumulate(&batch).unwrap();
                losses[k] = e.apply(&mut SingleProcess, 1e-3).unwrap().loss;
            }
            let rel = (losses[1] - losses[0]).abs() / losses[0].abs();
            eprintln!(
                "step {s}: f32 {:.5}  bf16 {:.5}  rel {rel:.2e}",
                losses[0], losses[1]
            );
            losses
        })
        .collect()
}

fn assert_tracks(losses: &[[f64; 2]]) {
    for (s, l) in losses.iter().enumerate() {
        let rel = (l[1] - l[0]).abs() / l[0].abs();
        assert!(rel < 0.01, "step {s}: f32 {} vs bf16 {}", l[0], l[1]);
    }
    // it trained, and the bf16 run is not secretly the f32 one
    assert!(losses[19][0] < 0.9 * losses[0][0], "{losses:?}");
    assert!(
        losses.iter().any(|l| l[0] != l[1]),
        "bf16 equals f32 bit for bit"
    );
}

#[test]
fn bf16_cpu_loss_tracks_f32_over_20_steps() {
    let _fused = FusedOnCpu::enable();
    assert_tracks(&losses(&Device::Cpu));
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-test.sh)"]
fn bf16_gpu_loss_tracks_f32_cpu_over_20_steps() {
    assert_tracks(&losses(&Device::new_cuda(0).unwrap()));
}
