//! The fused lm_head cross-entropy (herd-kernels, the GPU path's loss) equals the unfused
//! `causal_lm_loss_sum` in value and gradients on a random model. Runs on CPU, in CI.

mod common;

use candle_core::{Device, Tensor};
use herd_model::loss::{causal_lm_loss_sum, causal_lm_loss_sum_fused};
use herd_model::Llama;

#[test]
fn fused_loss_equals_the_unfused_loss_with_gradients() {
    for tied in [false, true] {
        check(Llama::random(common::tiny_config(tied), 7).unwrap());
    }
}

fn check(model: Llama) {
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 31 % 50) as u32).collect();
    let labels: Vec<i64> = (0..2 * 9)
        .map(|i| {
            if i % 9 < 3 {
                -100
            } else {
                (i * 17 % 50) as i64
            }
        })
        .collect();
    let input = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(labels, (2, 9), &Device::Cpu).unwrap();

    let (sum0, c0) = causal_lm_loss_sum(&model.forward(&input).unwrap(), &labels).unwrap();
    let g0 = sum0.backward().unwrap();
    let (hidden, head) = model.forward_hidden(&input).unwrap();
    let (sum, c) = causal_lm_loss_sum_fused(&hidden, &head.unwrap(), &labels).unwrap();
    let g = sum.backward().unwrap();
    assert_eq!(c, c0);
    let (a, b) = (
        sum.to_scalar::<f32>().unwrap(),
        sum0.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    for (name, var) in model.vars() {
        let x = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = g0
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff / scale < 1e-4, "{name}: relative {}", diff / scale);
    }
}
