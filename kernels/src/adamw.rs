//! AdamW over all parameters in one launch (cuda/adamw.cu): torch.optim.AdamW's single-tensor
//! formula in f32, with HF's decay groups as a per-parameter weight decay. The f32 master
//! weights are kept as two halves ([`crate::master`]): the parameters' own bf16 weights, updated
//! in place, and their i16 remainders in the optimizer state. So the state is 10 bytes per
//! parameter (exp_avg, exp_avg_sq, remainder) and the step writes the model's weights itself,
//! with no f32 master or bf16 copy of the model alongside. The host path is the same formula as
//! herd-worker's `optim::AdamW` (a worker test checks they agree bit for bit).

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::bf16;

use crate::master::{join, split};
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

/// Where a step's gradient is read from.
#[derive(Clone, Copy)]
pub enum Grad<'a> {
    /// One flat f32 [N] sum (several micro-batches or ranks).
    Flat(&'a Tensor),
    /// The parameters' own gradients (one micro-batch on one rank: nothing summed, so no [N]
    /// f32 copy); the same update bit for bit as `Flat` on their f32 sum.
    Table(&'a GradTable),
}

/// The parameter table: where each parameter starts in the flat buffers and whether it decays.
///
/// The state is one f32 tensor of [`FusedAdamW::state_words`] words: exp_avg [N] | exp_avg_sq
/// [N] | the master weights' low halves, i16 [N] two to a word (element 2i in the word's low
/// 16 bits, as a little-endian i16 array reads it on the GPU).
#[derive(Debug, Clone)]
pub struct FusedAdamW {
    starts: Vec<u64>,  // [P + 1]
    decays: Vec<bool>, // [P]
}

/// A host view of the state's three parts.
pub struct HostState {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The master weights, joined from the weights and their remainders.
    pub master: Vec<f32>,
}

/// Builds the state parameter by parameter ([`FusedAdamW::packer`]).
pub struct Packer<'a> {
    opt: &'a FusedAdamW,
    words: Vec<f32>,
    hi: Vec<bf16>,
    /// The next parameter.
    k: usize,
}

impl Packer<'_> {
    /// The next parameter's master weights and moments (each its element count; both moments
    /// empty: zeros, a fresh optimizer's, with nothing to copy).
    pub fn push(
        &mut self,
        master: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> crate::Result<()> {
        let n = self.opt.len();
        let Some(w) = self.opt.starts.get(self.k..self.k + 2) else {
            return Err(crate::Error::Shape(format!(
                "AdamW state: parameter {} pushed, there are {}",
                self.k,
                self.opt.decays.len()
            )));
        };
        let (a, b) = (w[0] as usize, w[1] as usize);
        let fresh = exp_avg.is_empty() && exp_avg_sq.is_empty();
        if master.len() != b - a || !fresh && [exp_avg.len(), exp_avg_sq.len()] != [b - a; 2] {
            return Err(crate::Error::Shape(format!(
                "AdamW state of parameter {} ({} elements) from master weights {}, exp_avg {}, exp_avg_sq {}",
                self.k,
                b - a,
                master.len(),
                exp_avg.len(),
                exp_avg_sq.len()
            )));
        }
        if !fresh {
            self.words[a..b].copy_from_slice(exp_avg);
            self.words[n + a..n + b].copy_from_slice(exp_avg_sq);
        }
        for (i, &x) in master.iter().enumerate() {
            let (h, l) = split(x);
            self.hi.push(h);
            set_low(&mut self.words[2 * n..], a + i, l);
        }
        self.k += 1;
        Ok(())
    }

    /// The state words and the bf16 weights [N], once every parameter is pushed.
    pub fn finish(self) -> crate::Result<(Vec<f32>, Vec<bf16>)> {
        if self.k != self.opt.decays.len() {
            return Err(crate::Error::Shape(format!(
                "AdamW state: {} of {} parameters pushed",
                self.k,
                self.opt.decays.len()
            )));
        }
        Ok((self.words, self.hi))
    }
}

fn low(words: &[f32], e: usize) -> i16 {
    (words[e / 2].to_bits() >> (16 * (e % 2))) as u16 as i16
}

fn set_low(words: &mut [f32], e: usize, lo: i16) {
    let shift = 16 * (e % 2);
    let w = words[e / 2].to_bits() & !(0xffff << shift);
    words[e / 2] = f32::from_bits(w | ((lo as u16 as u32) << shift));
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

    /// Each parameter's elements in the flat buffers.
    pub fn spans(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.starts.windows(2).map(|w| w[0] as usize..w[1] as usize)
    }

    /// f32 words of the state: 2N moments and ⌈N/2⌉ words of remainders.
    pub fn state_words(&self) -> usize {
        let n = self.len();
        2 * n + n.div_ceil(2)
    }

    /// The state (host words) of f32 `master` weights and moments, all [N]; and the bf16
    /// weights [N] the model must hold for it (the masters' high halves: not always bf16's
    /// ties-to-even rounding, so a model cast to bf16 on its own is not the same).
    pub fn pack(
        &self,
        master: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
    ) -> crate::Result<(Vec<f32>, Vec<bf16>)> {
        let mut packer = self.packer();
        for r in self.spans() {
            let (a, b, c) = (
                master.get(r.clone()),
                exp_avg.get(r.clone()),
                exp_avg_sq.get(r),
            );
            let (Some(a), Some(b), Some(c)) = (a, b, c) else {
                break; // finish() names the sizes
            };
            packer.push(a, b, c)?;
        }
        if master.len() != self.len() {
            return Err(crate::Error::Shape(format!(
                "{} master weights for {} elements",
                master.len(),
                self.len()
            )));
        }
        packer.finish()
    }

    /// [`FusedAdamW::pack`] one parameter at a time, so no flat f32 copy of the master weights
    /// or moments has to exist besides the state.
    pub fn packer(&self) -> Packer<'_> {
        Packer {
            opt: self,
            words: vec![0.0; self.state_words()],
            hi: Vec::with_capacity(self.len()),
            k: 0,
        }
    }

    /// The inverse of [`FusedAdamW::pack`]: `words` the state read back, `weights` [N] the
    /// model's bf16 weights end to end.
    pub fn unpack(&self, words: &[f32], weights: &[bf16]) -> crate::Result<HostState> {
        let n = self.len();
        if words.len() != self.state_words() || weights.len() != n {
            return Err(crate::Error::Shape(format!(
                "AdamW state of {} words and {} weights for {n} elements",
                words.len(),
                weights.len()
            )));
        }
        let lows = &words[2 * n..];
        Ok(HostState {
            exp_avg: words[..n].to_vec(),
            exp_avg_sq: words[n..2 * n].to_vec(),
            master: (0..n).map(|e| join(weights[e], low(lows, e))).collect(),
        })
    }

    /// [`FusedAdamW::unpack`] of a state tensor and the P weight tensors, read from their
    /// device.
    pub fn read(&self, state: &Tensor, weights: &[Tensor]) -> crate::Result<HostState> {
        let mut w = Vec::with_capacity(self.len());
        for t in weights {
            w.extend(t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()?);
        }
        self.unpack(&state.flatten_all()?.to_vec1::<f32>()?, &w)
    }

    /// One step: the state and the weights (the P parameters' bf16 tensors, contiguous, in
    /// order) updated in place from the gradient times `grad_scale` (applied as each element is
    /// read; the scaled gradient is not stored).
    pub fn step(
        &self,
        state: &Tensor,
        weights: &[Tensor],
        grad: Grad<'_>,
        h: AdamWHyper,
        grad_scale: f32,
    ) -> crate::Result<()> {
        let n = self.len();
        let shape_err = |what: String| Err(crate::Error::Shape(what));
        if state.dims() != [self.state_words()] || state.dtype() != DType::F32 {
            return shape_err(format!(
                "AdamW state {:?} {:?}: expected [{}] f32 for {n} elements",
                state.dims(),
                state.dtype(),
                self.state_words()
            ));
        }
        if weights.len() != self.decays.len() {
            return shape_err(format!(
                "{} weights for {} parameters",
                weights.len(),
                self.decays.len()
            ));
        }
        for (k, (w, s)) in weights.iter().zip(self.starts.windows(2)).enumerate() {
            if w.elem_count() as u64 != s[1] - s[0] || w.dtype() != DType::BF16 {
                return shape_err(format!(
                    "weight {k}: {:?} {:?}, expected {} bf16 elements",
                    w.dims(),
                    w.dtype(),
                    s[1] - s[0]
                ));
            }
            if !w.is_contiguous() {
                return shape_err(format!("weight {k} is not contiguous (updated in place)"));
            }
        }
        match grad {
            Grad::Flat(g) if g.dims() != [n] || g.dtype() != DType::F32 => {
                return shape_err(format!(
                    "AdamW gradient {:?} {:?}: expected [{n}] f32",
                    g.dims(),
                    g.dtype()
                ))
            }
            Grad::Table(t) if t.starts() != self.starts => {
                return shape_err(format!(
                    "AdamW gradients at offsets {:?} for parameters at {:?}",
                    t.starts(),
                    self.starts
                ))
            }
            _ => {}
        }
        let grad = match grad {
            Grad::Flat(g) => StepGrad::Flat(g.contiguous()?),
            Grad::Table(t) => StepGrad::Table(t),
        };
        let op = Step {
            table: self,
            s: Scalars::new(h, grad_scale),
            weights,
            grad,
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

enum StepGrad<'a> {
    Flat(Tensor),
    Table(&'a GradTable),
}

struct Step<'a> {
    table: &'a FusedAdamW,
    s: Scalars,
    weights: &'a [Tensor],
    grad: StepGrad<'a>,
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

    /// The update of parameter `k` on the host: `w` its bf16 weights, `words` the whole state,
    /// `grad` the flat gradient.
    fn host_param(&self, k: usize, w: &mut [bf16], words: &mut [f32], grad: &[f32]) {
        let n = self.table.len();
        let (moments, lows) = words.split_at_mut(2 * n);
        let (m, v) = moments.split_at_mut(n);
        let c = self.s;
        let decay_mul = if self.table.decays[k] {
            c.decay_mul
        } else {
            1.0
        };
        let start = self.table.starts[k] as usize;
        for (i, w) in w.iter_mut().enumerate() {
            let e = start + i;
            let g = grad[e] * c.grad_scale;
            // Multiplying by exactly 1.0 is the identity, so no-decay matches torch's skip.
            let mut p = join(*w, low(lows, e)) * decay_mul;
            m[e] += c.lerp_w * (g - m[e]);
            v[e] = v[e] * c.b2 + c.one_minus_b2 * g * g;
            let denom = v[e].sqrt() / c.bc2_sqrt + c.eps;
            p += -c.step_size * (m[e] / denom);
            let (hi, lo) = split(p);
            *w = hi;
            set_low(lows, e, lo);
        }
    }
}

/// Writes `self.0` over a bf16 host tensor (the host path's weight update).
struct Overwrite<'a>(&'a [bf16]);

impl InplaceOp1 for Overwrite<'_> {
    fn name(&self) -> &'static str {
        "herd-adamw-weights"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (CpuStorage::BF16(w), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("herd-adamw: a weight must be contiguous bf16")
        };
        w[a..b].copy_from_slice(self.0);
        Ok(())
    }
}

impl InplaceOp1 for Step<'_> {
    fn name(&self) -> &'static str {
        "herd-adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (CpuStorage::F32(words), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("herd-adamw: the state must be contiguous f32")
        };
        let mut update = |grad: &[f32]| -> Result<()> {
            for (k, w) in self.weights.iter().enumerate() {
                let mut host = w.flatten_all()?.to_vec1::<bf16>()?;
                self.host_param(k, &mut host, &mut words[a..b], grad);
                w.inplace_op1(&Overwrite(&host))?;
            }
            Ok(())
        };
        match &self.grad {
            // The sum is read where it lies; the table's gradients are widened into one copy.
            StepGrad::Flat(g) => {
                let (storage, layout) = g.storage_and_layout();
                let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((ga, gb))) =
                    (&*storage, layout.contiguous_offsets())
                else {
                    candle_core::bail!(
                        "herd-adamw: the gradient must be contiguous f32 on the host"
                    )
                };
                update(&v[ga..gb])
            }
            StepGrad::Table(t) => update(&t.flat_host()?),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use crate::cuda::{elems_cfg, herd_adamw, herd_adamw_table, view};
        if l.start_offset() != 0 || !l.is_contiguous() {
            candle_core::bail!("herd-adamw: the state must be a whole contiguous tensor");
        }
        let dev = s.device.clone();
        let n = self.table.len();
        let c = self.s;
        let starts = dev.clone_htod(&self.table.starts)?;
        let decay_mul = dev.clone_htod(&self.decay_muls())?;
        let weights = crate::table::device_addresses(self.weights.iter().map(Some), &dev)?;
        let p = self.table.decays.len() as i32;
        let state = s.as_cuda_slice_mut::<f32>()?;
        let cfg = elems_cfg(n);
        // SAFETY (every launch below): state holds 2n + ⌈n/2⌉ words, starts p + 1, decay_mul,
        // weights and ptrs p; weights[k] addresses parameter k's contiguous bf16 weights (checked
        // by `FusedAdamW::step`), ptrs[k] its gradient or 0, all alive for the launch.
        match &self.grad {
            StepGrad::Flat(g) => {
                let (gs, gl) = g.storage_and_layout();
                let candle_core::Storage::Cuda(gs) = &*gs else {
                    candle_core::bail!("herd-adamw: the gradient is not on the GPU")
                };
                let grad = view::<f32>(gs, gl, self.name())?;
                unsafe {
                    herd_adamw(
                        &dev,
                        cfg,
                        state,
                        &weights,
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
            StepGrad::Table(t) => {
                let ptrs = t.device_ptrs(&dev)?;
                macro_rules! go {
                    ($ty:ty) => {
                        unsafe {
                            herd_adamw_table::<$ty>(
                                &dev,
                                cfg,
                                state,
                                &weights,
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
                match t.dtype() {
                    DType::BF16 => go!(bf16),
                    _ => go!(f32),
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Device;

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

    /// The packed state of `master` with fresh moments, and its weights as tensors on `device`.
    fn packed(opt: &FusedAdamW, master: &[f32], device: &Device) -> (Tensor, Vec<Tensor>) {
        let n = opt.len();
        let (words, hi) = opt.pack(master, &vec![0.0; n], &vec![0.0; n]).unwrap();
        let weights = opt
            .spans()
            .map(|r| Tensor::from_slice(&hi[r.clone()], r.len(), device).unwrap())
            .collect();
        let state = Tensor::from_slice(&words, words.len(), device).unwrap();
        (state, weights)
    }

    /// The state words as bits: the remainders' words are arbitrary f32 patterns, NaNs too.
    pub(crate) fn bits(words: &[f32]) -> Vec<u32> {
        words.iter().map(|w| w.to_bits()).collect()
    }

    fn unpacked(opt: &FusedAdamW, state: &Tensor, weights: &[Tensor]) -> HostState {
        opt.read(state, weights).unwrap()
    }

    #[test]
    fn first_step_moves_decaying_and_plain_parameters_as_torch() -> Result<()> {
        // Parameter 0 (3 elements) decays, parameter 1 (2 elements) does not.
        let opt = FusedAdamW::new(&[(3, true), (2, false)]);
        let p0 = [1.0f32, -2.0, 0.5, 3.0, -1.0];
        let g = [0.5f32, -0.25, 1.0, -2.0, 0.125];
        let (state, weights) = packed(&opt, &p0, &Device::Cpu);
        // Handed over as g/4 with grad_scale 4: the step sees g.
        let quarter = g.map(|x| x / 4.0);
        let grad = Tensor::from_slice(&quarter, 5, &Device::Cpu)?;
        opt.step(&state, &weights, Grad::Flat(&grad), hyper(1), 4.0)
            .unwrap();
        let s = unpacked(&opt, &state, &weights);
        let w: Vec<bf16> = weights.iter().flat_map(host::<bf16>).collect();
        for e in 0..5 {
            let decay = if e < 3 { 1.0 - 2e-3 * 0.1 } else { 1.0 };
            // step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps).
            let want = p0[e] * decay as f32 - 2e-3 * g[e].signum();
            assert!(
                (s.master[e] - want).abs() < 1e-6,
                "{e}: {} vs {want}",
                s.master[e]
            );
            assert_eq!(
                w[e],
                split(s.master[e]).0,
                "the weight is the master's high half"
            );
            assert!((s.exp_avg[e] - 0.1 * g[e]).abs() < 1e-7);
            assert!((s.exp_avg_sq[e] - 0.001 * g[e] * g[e]).abs() < 1e-7);
        }
        let short = grad.narrow(0, 0, 4)?;
        let err = opt.step(&state, &weights, Grad::Flat(&short), hyper(2), 1.0);
        assert!(err.unwrap_err().to_string().contains("expected [5] f32"));
        let z = [0f32; 5];
        let err = opt
            .pack(&p0[..4], &z[..4], &z[..4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 master weights for 5 elements"), "{err}");
        let mut packer = opt.packer();
        let err = packer
            .push(&p0[..2], &z[..2], &z[..3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("parameter 0 (3 elements)"), "{err}");
        // Empty moments are a fresh optimizer's zeros: the same state as pushing zeros.
        let mut fresh = opt.packer();
        fresh.push(&p0[..3], &[], &[]).unwrap();
        fresh.push(&p0[3..], &[], &[]).unwrap();
        let (words, _) = fresh.finish().unwrap();
        assert_eq!(bits(&words), bits(&opt.pack(&p0, &z, &z).unwrap().0));
        let err = opt.step(&state, &weights[..1], Grad::Flat(&grad), hyper(2), 1.0);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("1 weights for 2 parameters"));
        Ok(())
    }

    #[test]
    fn emulated_cuda_c_matches_the_host_over_steps() -> Result<()> {
        // cuda/adamw.cu on the host emulator: parameters that straddle block boundaries, an odd
        // total (the last remainder word half used) and a one-element parameter, so the
        // kernel's binary search over `starts` meets every edge.
        let opt = FusedAdamW::new(&[(1500, true), (1, false), (600, true), (34, false)]);
        let n = opt.len();
        assert_eq!(n % 2, 1);
        let init = randn(&[n], 52).to_vec1::<f32>()?;
        let (state, weights) = packed(&opt, &init, &Device::Cpu);
        let mut emu_state = host::<f32>(&state);
        let mut emu_weights: Vec<Vec<bf16>> = weights.iter().map(host::<bf16>).collect();
        let ptrs: Vec<i64> = emu_weights
            .iter_mut()
            .map(|w| w.as_mut_ptr() as i64)
            .collect();
        for step in 1..=3 {
            let g = randn(&[n], 70 + step as u64);
            opt.step(&state, &weights, Grad::Flat(&g), hyper(step), 0.5)
                .unwrap();
            let op = Step {
                table: &opt,
                s: Scalars::new(hyper(step), 0.5),
                weights: &weights,
                grad: StepGrad::Flat(g.clone()),
            };
            let (gs, muls, c) = (host::<f32>(&g), op.decay_muls(), op.s);
            let st = emu_state.as_mut_ptr();
            emulate(crate::launch::elems(n), || unsafe {
                herd_kernels_emu::herd_adamw(
                    st,
                    ptrs.as_ptr(),
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
        assert_eq!(bits(&emu_state), bits(&host::<f32>(&state)), "state words");
        for (k, w) in weights.iter().enumerate() {
            assert_eq!(emu_weights[k], host::<bf16>(w), "weights of parameter {k}");
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu_over_steps() -> Result<()> {
        let sizes = [(4096 * 3, true), (4096, false), (1, true), (70_001, true)];
        let opt = FusedAdamW::new(&sizes);
        let n = opt.len();
        let init = randn(&[n], 51).to_vec1::<f32>()?;
        let (cs, cw) = packed(&opt, &init, &Device::Cpu);
        let (gs, gw) = packed(&opt, &init, &gpu());
        for step in 1..=3 {
            let g = randn(&[n], 60 + step as u64);
            opt.step(&cs, &cw, Grad::Flat(&g), hyper(step), 0.5)
                .unwrap();
            let gg = g.to_device(&gpu())?;
            opt.step(&gs, &gw, Grad::Flat(&gg), hyper(step), 0.5)
                .unwrap();
        }
        let (c, g) = (unpacked(&opt, &cs, &cw), unpacked(&opt, &gs, &gw));
        let t = |v: Vec<f32>| tensor(v, &[n]);
        assert_close(&t(g.master), &t(c.master), 1e-4);
        assert_close(&t(g.exp_avg), &t(c.exp_avg), 1e-4);
        assert_close(&t(g.exp_avg_sq), &t(c.exp_avg_sq), 1e-4);
        Ok(())
    }
}
