//! herd-kernels' fused AdamW (host path, the reference of its CUDA kernel) equals the trainer's
//! torch-exact `optim::AdamW`, decay groups included, over several steps. Runs on CPU, in CI.

use candle_core::{Device, Tensor};
use herd_kernels::FusedAdamW;
use herd_worker::optim::{decays, AdamW, AdamWConfig};

#[test]
fn fused_adamw_equals_the_trainer_optimizer_bit_for_bit() {
    let params = [
        ("model.layers.0.self_attn.q_proj.weight", 12),
        ("model.layers.0.input_layernorm.weight", 4),
        ("lm_head.weight", 7),
    ];
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let sizes: Vec<(String, usize)> = params.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    let mut reference = AdamW::new(cfg, &sizes);
    let fused = FusedAdamW::new(
        &params
            .iter()
            .map(|(n, s)| (*s, decays(n)))
            .collect::<Vec<_>>(),
    );
    let n = fused.len();
    let mut p: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
    let mut init = p.clone();
    init.extend(vec![0f32; 2 * n]);
    let state = Tensor::from_vec(init, (3, n), &Device::Cpu).unwrap();
    for step in 1..=5 {
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let lr = 1e-3 * step as f64;
        let mut off = 0;
        for (i, (_, len)) in params.iter().enumerate() {
            reference.update_param(i, &mut p[off..off + len], &g[off..off + len], lr);
            off += len;
        }
        reference.finish_step();
        let grad = Tensor::from_slice(&g, n, &Device::Cpu).unwrap();
        let h = cfg.hyper(lr, step as i32);
        fused.step(&state, &grad, h, 1.0).unwrap(); // scale 1: g·1 is g exactly
        let got = state.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, p, "step {step}");
    }
}
