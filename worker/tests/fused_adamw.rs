//! herd-kernels' fused AdamW (host path, the reference of its CUDA kernel) equals the trainer's
//! torch-exact `optim::AdamW`, decay groups included, over several steps: its master weights,
//! held as the bf16 weights and their remainders, are the f32 weights bit for bit. Runs on CPU,
//! in CI.

use candle_core::{Device, Tensor};
use herd_kernels::{FusedAdamW, Grad};
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
    let (words, hi) = fused.pack(&p, &vec![0.0; n], &vec![0.0; n]).unwrap();
    let state = Tensor::from_vec(words, fused.state_words(), &Device::Cpu).unwrap();
    let weights: Vec<Tensor> = fused
        .spans()
        .map(|r| Tensor::from_slice(&hi[r.clone()], r.len(), &Device::Cpu).unwrap())
        .collect();
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
        // scale 1: g·1 is g exactly
        fused
            .step(&state, &weights, Grad::Flat(&grad), h, 1.0)
            .unwrap();
        let got = fused.read(&state, &weights).unwrap();
        assert_eq!(got.master, p, "step {step}: master weights");
        let m: Vec<f32> = reference
            .states
            .iter()
            .flat_map(|s| s.exp_avg.clone())
            .collect();
        assert_eq!(got.exp_avg, m, "step {step}: exp_avg");
    }
}
