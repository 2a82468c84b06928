//! AdamW over all parameters in one launch (cuda/adamw.cu): torch.optim.AdamW's single-tensor
//! formula in f32 on a flat state [3, N] = (master weights | exp_avg | exp_avg_sq) and a flat f32
//! gradient [N], with HF's decay groups as a per-parameter weight decay. The host path is the
//! same formula as herd-worker's `optim::AdamW` (a worker test checks they agree bit for bit).

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};

use crate::table::GradTable;

/// The step's scalars, derived from the config exactly as herd-worker's optimizer does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step number (bias correction).
    pub step: i32,
}

/// The parameter table: where each parameter starts in the flat buffers and whether it decays.
#[derive(Debug, Clone)]
pub struct FusedAdamW {
    starts: Vec<u64>,  // [P + 1]
    decays: Vec<bool>, // [P]
}

impl FusedAdamW {
    /// `params`: (element count, decays?) of each parameter, in flat-buffer order.
    pub fn new(params: &[(usize, bool)]) -> Self {
        FusedAdamW {
            starts: crate::table::starts_of(params.iter().map(|p| p.0)),
            decays: params.iter().map(|(_, d)| *d).collect(),
        }
    }

    pub fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One step: state [3, N] f32 updated in place from the gradient `grad_scale`·grad, grad
    /// [N] f32 (the scale is applied as each element is read; the scaled gradient is not
    /// stored).
    pub fn step(
        &self,
        state: &Tensor,
        grad: &Tensor,
        h: AdamWHyper,
        grad_scale: f32,
    ) -> crate::Result<()> {
        let n = self.len();
        if state.dims() != [3, n] || grad.dims() != [n] {
            return Err(crate::Error::Shape(format!(
                "AdamW state {:?} / grad {:?} for {n} elements",
                state.dims(),
                grad.dims()
            )));
        }
        let op = Step {
            table: self,
            s: Scalars::new(h, grad_scale),
        };
        state.inplace_op2(&grad.contiguous()?, &op)?;
        Ok(())
    }

    /// [`FusedAdamW::step`] with the gradient read from the parameters' own gradients (one
    /// micro-batch, one rank: nothing to sum, so no flat [N] f32 copy). The same update bit for
    /// bit as `step` on their flat f32 sum.
    pub fn step_table(
        &self,
        state: &Tensor,
        grads: &GradTable,
        h: AdamWHyper,
        grad_scale: f32,
    ) -> crate::Result<()> {
        let n = self.len();
        if state.dims() != [3, n] || grads.starts() != self.starts {
            return Err(crate::Error::Shape(format!(
                "AdamW state {:?} / gradients at offsets {:?} for parameters at {:?}",
                state.dims(),
                grads.starts(),
                self.starts
            )));
        }
        let op = TableStep {
            step: Step {
                table: self,
                s: Scalars::new(h, grad_scale),
            },
            grads,
        };
        state.inplace_op1(&op)?;
        Ok(())
    }
}

/// The f32 scalars of one step (Python floats used as f32 by torch's kernels).
#[derive(Debug, Clone, Copy)]
struct Scalars {
    decay_mul: f32,
    lerp_w: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

impl Scalars {
    fn new(h: AdamWHyper, grad_scale: f32) -> Self {
        Scalars {
            decay_mul: (1.0 - h.lr * h.weight_decay) as f32,
            lerp_w: (1.0 - h.beta1) as f32,
            b2: h.beta2 as f32,
            one_minus_b2: (1.0 - h.beta2) as f32,
            step_size: (h.lr / (1.0 - h.beta1.powi(h.step))) as f32,
            bc2_sqrt: (1.0 - h.beta2.powi(h.step)).sqrt() as f32,
            eps: h.eps as f32,
            grad_scale,
        }
    }
}

struct Step<'a> {
    table: &'a FusedAdamW,
    s: Scalars,
}

impl Step<'_> {
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    /// Per parameter: the factor the kernel multiplies the weights by (1 for no-decay groups).
    fn decay_muls(&self) -> Vec<f32> {
        let d = self.s.decay_mul;
        self.table
            .decays
            .iter()
            .map(|&decays| if decays { d } else { 1.0 })
            .collect()
    }

    /// The update on the host: state = (p | m | v), grad flat, both f32.
    fn host(&self, state: &mut [f32], grad: &[f32]) {
        let n = self.table.len();
        let (p, mv) = state.split_at_mut(n);
        let (m, v) = mv.split_at_mut(n);
        let c = self.s;
        for (k, w) in self.table.starts.windows(2).enumerate() {
            let decay_mul = if self.table.decays[k] {
                c.decay_mul
            } else {
                1.0
            };
            for e in w[0] as usize..w[1] as usize {
                let g = grad[e] * c.grad_scale;
                // Multiplying by exactly 1.0 is the identity, so no-decay matches torch's skip.
                p[e] *= decay_mul;
                m[e] += c.lerp_w * (g - m[e]);
                v[e] = v[e] * c.b2 + c.one_minus_b2 * g * g;
                let denom = v[e].sqrt() / c.bc2_sqrt + c.eps;
                p[e] += -c.step_size * (m[e] / denom);
            }
        }
    }
}

impl InplaceOp2 for Step<'_> {
    fn name(&self) -> &'static str {
        "herd-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(state), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("herd-adamw: state and grad must be f32")
        };
        let (Some((a, b)), Some((ga, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("herd-adamw: state and grad must be contiguous")
        };
        let n = self.table.len();
        self.host(&mut state[a..b], &grad[ga..ga + n]);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        use crate::cuda::{elems_cfg, herd_adamw, view};
        if l1.start_offset() != 0 || !l1.is_contiguous() {
            candle_core::bail!("herd-adamw: state must be a whole contiguous tensor");
        }
        let dev = s1.device.clone();
        let n = self.table.len();
        let c = self.s;
        let decay_mul = self.decay_muls();
        let starts = dev.clone_htod(&self.table.starts)?;
        let decay_mul = dev.clone_htod(&decay_mul)?;
        let p = self.table.decays.len() as i32;
        let grad = view::<f32>(s2, l2, self.name())?;
        let state = s1.as_cuda_slice_mut::<f32>()?;
        // SAFETY: state holds 3 × n elements (checked by the caller's layout), grad n, starts
        // p + 1, decay_mul p.
        unsafe {
            herd_adamw(
                &dev,
                elems_cfg(n),
                state,
                &grad,
                &starts,
                &decay_mul,
                p,
                n,
                c.lerp_w,
                c.b2,
                c.one_minus_b2,
                c.step_size,
                c.bc2_sqrt,
                c.eps,
                c.grad_scale,
            )
        }
    }
}

/// [`Step`] reading the gradient through a [`GradTable`].
struct TableStep<'a> {
    step: Step<'a>,
    grads: &'a GradTable,
}

impl InplaceOp1 for TableStep<'_> {
    fn name(&self) -> &'static str {
        "herd-adamw-table"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(state) = s else {
            candle_core::bail!("herd-adamw: the state must be f32")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("herd-adamw: the state must be contiguous")
        };
        let grad = self.grads.flat_host()?;
        self.step.host(&mut state[a..b], &grad);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use crate::cuda::{elems_cfg, herd_adamw_table};
        use candle_core::DType;
        if l.start_offset() != 0 || !l.is_contiguous() {
            candle_core::bail!("herd-adamw: state must be a whole contiguous tensor");
        }
        let dev = s.device.clone();
        let step = &self.step;
        let n = step.table.len();
        let c = step.s;
        let starts = dev.clone_htod(&step.table.starts)?;
        let decay_mul = dev.clone_htod(&step.decay_muls())?;
        let ptrs = self.grads.device_ptrs(&dev)?;
        let p = step.table.decays.len() as i32;
        let state = s.as_cuda_slice_mut::<f32>()?;
        macro_rules! go {
            ($ty:ty) => {
                // SAFETY: state holds 3 × n elements, starts p + 1, decay_mul and ptrs p; each
                // non-null ptrs[k] addresses parameter k's gradient, alive in self.grads.
                unsafe {
                    herd_adamw_table::<$ty>(
                        &dev,
                        elems_cfg(n),
                        state,
                        &ptrs,
                        &starts,
                        &decay_mul,
                        p,
                        n,
                        c.lerp_w,
                        c.b2,
                        c.one_minus_b2,
                        c.step_size,
                        c.bc2_sqrt,
                        c.eps,
                        c.grad_scale,
                    )
                }
            };
        }
        match self.grads.dtype() {
            DType::BF16 => go!(half::bf16),
            _ => go!(f32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn hyper(step: i32) -> AdamWHyper {
        AdamWHyper {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        }
    }

    #[test]
    fn first_step_moves_decaying_and_plain_parameters_as_torch() -> Result<()> {
        // Parameter 0 (3 elements) decays, parameter 1 (2 elements) does not.
        let opt = FusedAdamW::new(&[(3, true), (2, false)]);
        let p0 = [1.0f32, -2.0, 0.5, 3.0, -1.0];
        let g = [0.5f32, -0.25, 1.0, -2.0, 0.125];
        let mut init = p0.to_vec();
        init.extend([0f32; 10]);
        let state = Tensor::from_vec(init, (3, 5), &candle_core::Device::Cpu)?;
        // Handed over as g/4 with grad_scale 4: the step sees g.
        let quarter = g.map(|x| x / 4.0);
        let grad = Tensor::from_slice(&quarter, 5, &candle_core::Device::Cpu)?;
        opt.step(&state, &grad, hyper(1), 4.0).unwrap();
        let s = state.to_vec2::<f32>()?;
        for e in 0..5 {
            let decay = if e < 3 { 1.0 - 2e-3 * 0.1 } else { 1.0 };
            // step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps).
            let want = p0[e] * decay as f32 - 2e-3 * g[e].signum();
            assert!((s[0][e] - want).abs() < 1e-5, "{e}: {} vs {want}", s[0][e]);
            assert!((s[1][e] - 0.1 * g[e]).abs() < 1e-7);
            assert!((s[2][e] - 0.001 * g[e] * g[e]).abs() < 1e-7);
        }
        assert!(opt
            .step(&state, &grad.narrow(0, 0, 4)?, hyper(2), 1.0)
            .is_err());
        Ok(())
    }

    #[test]
    fn emulated_cuda_c_matches_the_host_over_steps() -> Result<()> {
        // cuda/adamw.cu on the host emulator: parameters that straddle block boundaries and a
        // one-element one, so the kernel's binary search over `starts` meets every edge.
        let opt = FusedAdamW::new(&[(1500, true), (1, false), (600, true), (33, false)]);
        let n = opt.len();
        let mut init = randn(&[n], 52).to_vec1::<f32>()?;
        init.extend(vec![0f32; 2 * n]);
        let host_state = Tensor::from_vec(init.clone(), (3, n), &candle_core::Device::Cpu)?;
        let mut emu_state = init;
        for step in 1..=3 {
            let g = randn(&[n], 70 + step as u64);
            opt.step(&host_state, &g, hyper(step), 0.5).unwrap();
            let op = Step {
                table: &opt,
                s: Scalars::new(hyper(step), 0.5),
            };
            let (gs, muls, c) = (host::<f32>(&g), op.decay_muls(), op.s);
            let st = emu_state.as_mut_ptr();
            emulate(crate::launch::elems(n), || unsafe {
                herd_kernels_emu::herd_adamw(
                    st,
                    gs.as_ptr(),
                    opt.starts.as_ptr(),
                    muls.as_ptr(),
                    muls.len() as i32,
                    n,
                    c.lerp_w,
                    c.b2,
                    c.one_minus_b2,
                    c.step_size,
                    c.bc2_sqrt,
                    c.eps,
                    c.grad_scale,
                )
            });
        }
        assert_close(&tensor(emu_state, &[3, n]), &host_state, 1e-6);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu_over_steps() -> Result<()> {
        let sizes = [(4096 * 3, true), (4096, false), (1, true), (70_001, true)];
        let opt = FusedAdamW::new(&sizes);
        let n = opt.len();
        let mut init = randn(&[n], 51).flatten_all()?.to_vec1::<f32>()?;
        init.extend(vec![0f32; 2 * n]);
        let cs = Tensor::from_vec(init, (3, n), &candle_core::Device::Cpu)?;
        let gs = cs.to_device(&gpu())?;
        for step in 1..=3 {
            let g = randn(&[n], 60 + step as u64);
            opt.step(&cs, &g, hyper(step), 0.5).unwrap();
            opt.step(&gs, &g.to_device(&gpu())?, hyper(step), 0.5)
                .unwrap();
        }
        assert_close(&gs, &cs, 1e-4);
        Ok(())
    }
}
