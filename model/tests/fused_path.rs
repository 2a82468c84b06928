//! The GPU code path, run on the CPU: under `FusedOnCpu` every block takes its herd-kernels op
//! (RMSNorm with the residual, RoPE, SwiGLU, causal attention) and the loss fuses the lm_head, the
//! way a GPU rank computes. Loss and every gradient equal the plain candle path's (f32), plain
//! rows and packed ones, with and without recompute, tied head or not. What this cannot check
//! is the CUDA C itself; the kernels' own tests do that on the GPU machine.

mod common;

use candle_core::{Device, Tensor};
use herd_kernels::FusedOnCpu;
use herd_model::loss::{causal_lm_loss_sum, causal_lm_loss_sum_fused};
use herd_model::recompute::Gradients;
use herd_model::{Layout, Llama};

const B: usize = 2;
const T: usize = 9;

fn batch() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..B * T).map(|i| (i * 31 % 50) as u32).collect();
    let labels: Vec<i64> = (0..B * T)
        .map(|i| {
            if i % T < 3 {
                -100
            } else {
                (i * 17 % 50) as i64
            }
        })
        .collect();
    (
        Tensor::from_vec(ids, (B, T), &Device::Cpu).unwrap(),
        Tensor::from_vec(labels, (B, T), &Device::Cpu).unwrap(),
    )
}

/// (loss sum, label tokens, gradients) the plain way or the fused way.
fn run(
    model: &Llama,
    layout: Option<&Layout>,
    recompute: bool,
    fused: bool,
) -> (f32, usize, Gradients) {
    let (ids, labels) = batch();
    let _guard = fused.then(FusedOnCpu::enable);
    let (sum, count, grads) = model
        .loss_and_gradients(&ids, layout, recompute, |top| {
            match (fused, top.plain_head_weight()) {
                (true, Some(head)) => causal_lm_loss_sum_fused(&top.normed()?, head, &labels),
                _ => causal_lm_loss_sum(&top.logits()?, &labels),
            }
        })
        .unwrap();
    (sum.to_scalar::<f32>().unwrap(), count, grads)
}

#[test]
fn the_fused_path_equals_the_plain_path_with_gradients() {
    // Row 0 holds examples of 4 and 5 tokens; row 1 one of 6 and 3 pads.
    let packed = Layout::from_lengths(T, &[vec![4, 5], vec![6]]).unwrap();
    for tied in [false, true] {
        let model = Llama::random(common::tiny_config(tied), 7).unwrap();
        for layout in [None, Some(&packed)] {
            for recompute in [false, true] {
                let case = format!(
                    "tied {tied}, packed {}, recompute {recompute}",
                    layout.is_some()
                );
                let (s0, c0, g0) = run(&model, layout, recompute, false);
                let (s1, c1, g1) = run(&model, layout, recompute, true);
                assert_eq!(c0, c1, "{case}");
                assert!(
                    (s0 - s1).abs() <= 1e-5 * s0.abs(),
                    "{case}: loss {s1} vs {s0}"
                );
                for ((name, _), (a, b)) in model.trainable().iter().zip(g0.iter().zip(&g1)) {
                    let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                    let rel = common::max_abs_diff(a, b) / common::max_abs(a).max(1e-12);
                    assert!(rel < 1e-4, "{case}: {name} relative {rel}");
                }
            }
        }
    }
}

#[test]
fn the_fused_path_really_takes_the_fused_ops() {
    // The fused RMSNorm, RoPE, softmax and SwiGLU compute in f32 and round once; with bf16
    // weights their result differs from candle's bf16 ops, which round at every step. Equal
    // outputs would mean the guard changed nothing.
    let mut model = Llama::random(common::tiny_config(false), 7).unwrap();
    model
        .to_device(&Device::Cpu, candle_core::DType::BF16)
        .unwrap();
    let (ids, _) = batch();
    let f32 = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let plain = f32(model.forward(&ids).unwrap());
    let fused = {
        let _g = FusedOnCpu::enable();
        f32(model.forward(&ids).unwrap())
    };
    assert!(common::max_abs_diff(&plain, &fused) > 0.0);
    let rel = common::max_abs_diff(&plain, &fused) / common::max_abs(&plain);
    assert!(rel < 0.05, "bf16 fused vs plain relative {rel}");
}
