//! AdamW exactly as `torch.optim.AdamW` (single-tensor CPU path) computes it, over flat f32
//! buffers, plus `clip_grad_norm_`. HF Trainer semantics on top: two parameter groups, weight
//! decay only for parameters that are neither biases nor norm weights.

/// HF Trainer's rule (`get_decay_parameter_names`): no decay for biases and norm weights.
pub fn decays(name: &str) -> bool {
    let last = name.rsplit('.').nth(1).unwrap_or("");
    !(name.ends_with(".bias") || last.ends_with("norm") || last.ends_with("layernorm"))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The fused AdamW's scalars (herd-kernels) for 1-based optimizer step `step` at `lr`.
    pub fn hyper(&self, lr: f64, step: i32) -> herd_kernels::AdamWHyper {
        herd_kernels::AdamWHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step,
        }
    }
}

/// Optimizer state of one parameter: the moment estimates, f32 like torch's.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    pub name: String,
    pub decay: bool,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub states: Vec<ParamState>,
    /// Completed optimizer steps (torch's `state["step"]`).
    pub steps: u64,
    /// Decay norms and biases too ([`AdamW::decay_every_parameter`]).
    pub decay_all: bool,
}

impl AdamW {
    /// Weight decay for every parameter, as DeepSpeed's optimizer applies it over the one group
    /// HF Trainer gives it when the DeepSpeed config has an `optimizer` section.
    pub fn decay_every_parameter(&mut self) {
        self.decay_all = true;
        for s in &mut self.states {
            s.decay = true;
        }
    }

    /// Whether parameter `name` is decayed.
    pub fn decays(&self, name: &str) -> bool {
        self.decay_all || decays(name)
    }

    pub fn new(config: AdamWConfig, params: &[(String, usize)]) -> Self {
        let states = params
            .iter()
            .map(|(name, len)| ParamState {
                name: name.clone(),
                decay: decays(name),
                exp_avg: vec![0.0; *len],
                exp_avg_sq: vec![0.0; *len],
            })
            .collect();
        AdamW {
            config,
            states,
            steps: 0,
            decay_all: false,
        }
    }

    /// One update of parameter `i` (call for every parameter, then [`AdamW::finish_step`]).
    /// `t` is the 1-based step number used for bias correction.
    pub fn update_param(&mut self, i: usize, param: &mut [f32], grad: &[f32], lr: f64) {
        let c = self.config;
        let t = (self.steps + 1) as i32;
        let st = &mut self.states[i];
        assert_eq!(
            param.len(),
            grad.len(),
            "parameter {} and its gradient differ in size",
            st.name
        );
        let wd = if st.decay { c.weight_decay } else { 0.0 };
        // Python-float scalars, used as f32 by torch's kernels.
        let decay_mul = (1.0 - lr * wd) as f32;
        let lerp_w = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let one_minus_b2 = (1.0 - c.beta2) as f32;
        let step_size = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let bc2_sqrt = ((1.0 - c.beta2.powi(t)).sqrt()) as f32;
        let eps = c.eps as f32;
        for (((p, &g), m), v) in param
            .iter_mut()
            .zip(grad)
            .zip(st.exp_avg.iter_mut())
            .zip(st.exp_avg_sq.iter_mut())
        {
            if wd != 0.0 {
                *p *= decay_mul;
            }
            // torch.lerp with weight < 0.5: m + w * (g - m)
            *m += lerp_w * (g - *m);
            *v = *v * b2 + one_minus_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += -step_size * (*m / denom);
        }
    }

    pub fn finish_step(&mut self) {
        self.steps += 1;
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales all gradients by min(1, max_norm / (norm + 1e-6))
/// and returns the total L2 norm before clipping. `max_norm` 0 disables clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let total = grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    clip_to_norm(grads, total, max_norm);
    total
}

/// [`clip_grad_norm`]'s scaling of `grads` for a `norm` computed elsewhere (ZeRO-2: the ranks'
/// parts added).
pub fn clip_to_norm(grads: &mut [f32], norm: f64, max_norm: f64) {
    if max_norm > 0.0 {
        let coef = clip_coefficient(norm, max_norm) as f32;
        grads.iter_mut().for_each(|g| *g *= coef);
    }
}

/// torch's clipping factor for a gradient of `norm`: min(1, max_norm / (norm + 1e-6)), or 1
/// when `max_norm` is 0 (no clipping).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_groups_follow_hf() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
        assert!(decays("lm_head.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.layers.3.post_attention_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction, Adam's first step is lr * g/|g| (up to eps).
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(cfg, &[("w".into(), 3)]);
        let mut p = vec![1.0f32, 1.0, 1.0];
        opt.update_param(0, &mut p, &[0.5, -2.0, 0.0], 0.1);
        opt.finish_step();
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 1.0,
            "{p:?}"
        );
        assert_eq!(opt.steps, 1);
    }

    #[test]
    fn weight_decay_is_decoupled_and_skips_norms() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut opt = AdamW::new(
            cfg,
            &[("a.weight".into(), 1), ("model.norm.weight".into(), 1)],
        );
        let (mut a, mut n) = (vec![2.0f32], vec![2.0f32]);
        opt.update_param(0, &mut a, &[0.0], 0.1);
        opt.update_param(1, &mut n, &[0.0], 0.1);
        assert!((a[0] - 2.0 * 0.95).abs() < 1e-6);
        assert_eq!(n[0], 2.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        assert!(((g[0] * g[0] + g[1] * g[1]).sqrt() - 1.0).abs() < 1e-5);
        let mut small = vec![0.1f32, 0.0];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0], 0.1);
    }
}
