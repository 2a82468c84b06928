//! Mixed precision's optimizer side (CUDA issue #5; the speed issue's "fused optimizer" and "no
//! host round trips"): the f32 master weights and both AdamW moments live on the compute
//! device, and herd-kernels' fused AdamW steps every parameter in one launch. The master weights
//! are held as two halves (`herd_kernels::master`): the model's own bf16 weights, which the
//! step updates in place, and their i16 remainders beside the moments; so no f32 master and no
//! bf16 copy of the model exist besides the model itself (10 bytes per parameter of state).
//! The step's gradient is either the parameters' own gradients as backward left them (one
//! micro-batch on one rank: nothing to sum, so the norm and AdamW read them through a
//! `GradTable`) or, once a second micro-batch or a collective needs a sum, one flat f32 [N]
//! tensor on the device, allocated on first use and zeroed in place after. Per step only the loss, the
//! gradient norm and — when the ranks sum over a host collective (not NCCL) — the gradient
//! cross to the host. The host `AdamW` keeps the config and the step count; its moments are filled from the
//! device only when a checkpoint is written ([`MixedState::moments_into`]).
//!
//! Under ZeRO-1 (`trainer::zero`) the AdamW state covers only the rank's own parameters: the
//! gradient sum still spans every parameter (it is all-reduced whole and its norm is the
//! global one), and the step reads the run of it that the rank owns. Under ZeRO-2 the sum
//! covers the owned run only ([`MixedState::keep_owned_gradient_only`]): the engine reduces
//! each micro-batch's gradients into their owners ([`MixedState::add_owned`]) and passes the
//! step the global sum of squares that the ranks' [`MixedState::local_sum_squares`] add up to.
//!
//! The update is the host optimizer's formula bit for bit (herd-kernels' AdamW test); the
//! gradient norm is summed on the device in f32 per block (fixed order, so runs repeat bit for
//! bit) and the partials added in f64.

use candle_core::{DType, Device, Tensor, Var};
use herd_kernels::{AdamWHyper, FusedAdamW, Grad, GradTable};

use crate::collective::Collective;
use crate::optim::{clip_coefficient, AdamW};
use crate::Result;

pub struct MixedState {
    /// AdamW over the owned parameters (all of them unless ZeRO-1 shards the state).
    adamw: FusedAdamW,
    /// The parameters (indices into `trainable()`) whose state this holds: a contiguous run.
    owned: std::ops::Range<usize>,
    /// Elements of all parameters.
    total: usize,
    /// ZeRO-2: the gradient sum covers the owned run only (the engine reduces into it).
    owned_gradient: bool,
    /// f32 words: exp_avg | exp_avg_sq | the master weights' low halves (`FusedAdamW`'s layout).
    state: Tensor,
    /// [N] f32: the step's gradient sum, allocated the first time a step needs one and zeroed
    /// in place between steps.
    grad: Option<Tensor>,
    /// Whether `grad` holds anything since it was last zeroed.
    dirty: bool,
    /// The step's only micro-batch's gradients so far, not yet added anywhere.
    pending: Option<Vec<Option<Tensor>>>,
    /// (offset, length) of each parameter in the gradient sum, in `trainable()` order.
    spans: Vec<(usize, usize)>,
}

impl MixedState {
    /// The state of `params[owned]` (still f32: their values become the master weights) and
    /// their moments in `optimizer` (fresh or resumed), on `device`; with every parameter's
    /// bf16 weights on `device`, in its shape, which the model must then hold (the masters'
    /// high halves; they differ from a plain bf16 cast where the f32 lies exactly halfway).
    pub fn new(
        params: &[(String, Var)],
        owned: std::ops::Range<usize>,
        optimizer: &AdamW,
        device: &Device,
    ) -> Result<(Self, Vec<Tensor>)> {
        let table: Vec<(usize, bool)> = params[owned.clone()]
            .iter()
            .map(|(name, v)| (v.elem_count(), optimizer.decays(name)))
            .collect();
        let adamw = FusedAdamW::new(&table);
        let mut spans = Vec::with_capacity(params.len());
        let mut total = 0;
        for (_, v) in params {
            spans.push((total, v.elem_count()));
            total += v.elem_count();
        }
        let mut packer = adamw.packer();
        // The bf16 weights: the packer makes the owned parameters' high halves; the others'
        // are split here (a ZeRO-1 shard holds no state for them).
        let mut others = Vec::with_capacity(params.len());
        for (i, (_, v)) in params.iter().enumerate() {
            let master = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            let master = master.to_vec1::<f32>()?;
            if owned.contains(&i) {
                let s = &optimizer.states[i];
                packer.push(&master, &s.exp_avg, &s.exp_avg_sq)?;
                others.push(None);
            } else {
                let hi: Vec<_> = master
                    .iter()
                    .map(|&x| herd_kernels::master::split(x).0)
                    .collect();
                others.push(Some(Tensor::from_vec(hi, v.shape(), device)?));
            }
        }
        let (words, hi) = packer.finish()?;
        let base = spans.get(owned.start).map_or(0, |s| s.0);
        let weights = others
            .into_iter()
            .zip(params)
            .zip(&spans)
            .map(|((w, (_, v)), &(off, len))| match w {
                Some(w) => Ok(w),
                None => Tensor::from_slice(&hi[off - base..off - base + len], v.shape(), device),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let words = Tensor::from_vec(words, adamw.state_words(), device)?;
        let state = MixedState {
            adamw,
            owned,
            total,
            owned_gradient: false,
            state: words,
            grad: None,
            dirty: false,
            pending: None,
            spans,
        };
        Ok((state, weights))
    }

    /// Bytes this state holds on the device per parameter, at most: 10 for the moments and the
    /// master weights' low halves (the high halves are the model's bf16 weights), 4 for the
    /// gradient sum (only with gradient accumulation or several ranks). A step makes no other
    /// buffer of the model's size.
    pub const BYTES_PER_PARAMETER: u64 = 14;

    /// ZeRO-2: the gradient sum holds the owned run only, filled by [`MixedState::add_owned`]
    /// (not `add`/`all_reduce`), and `step` is given the global sum of squares.
    pub fn keep_owned_gradient_only(&mut self) {
        self.owned_gradient = true;
    }

    /// Adds a flat f32 gradient (the ranks' reduced sum of a bucket) into the sum, at `at`
    /// elements from the start of the owned run.
    pub fn add_owned(&mut self, flat: &Tensor, at: usize) -> Result<()> {
        debug_assert!(self.owned_gradient);
        if flat.elem_count() == 0 {
            return Ok(());
        }
        let sum = self.sum()?.clone();
        herd_kernels::accumulate(&sum, at, flat)?;
        self.dirty = true;
        Ok(())
    }

    /// ZeRO-2: the sum of squares of this rank's run of the gradient sum (unscaled).
    pub fn local_sum_squares(&mut self) -> Result<f64> {
        if self.adamw.is_empty() {
            return Ok(0.0);
        }
        Ok(herd_kernels::sum_squares(self.sum()?)?)
    }

    /// Bytes of the gradient sum this holds (0 before a step needed one).
    pub fn gradient_bytes(&self) -> usize {
        self.grad.as_ref().map_or(0, |g| 4 * g.elem_count())
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        self.pending = None;
        if self.dirty {
            if let Some(g) = &self.grad {
                herd_kernels::grad::zero(g)?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Takes one micro-batch's gradients (one per parameter, in order; None: not reached). The
    /// first of a step is kept as it is; a second one starts the flat sum.
    pub fn add(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if self.pending.is_none() && !self.dirty {
            self.pending = Some(grads.to_vec());
            return Ok(());
        }
        self.flush()?;
        self.accumulate(grads)
    }

    /// The flat sum, allocated (zeros) on first use.
    fn sum(&mut self) -> Result<&Tensor> {
        let sum = match self.grad.take() {
            Some(g) => g,
            None => {
                let len = if self.owned_gradient {
                    self.adamw.len()
                } else {
                    self.total
                };
                Tensor::zeros(len, DType::F32, self.state.device())?
            }
        };
        Ok(self.grad.insert(sum))
    }

    /// Each gradient added in place at its span of the sum.
    fn accumulate(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let sum = self.sum()?.clone();
        for (g, &(off, _)) in grads.iter().zip(&self.spans) {
            if let Some(g) = g {
                herd_kernels::accumulate(&sum, off, g)?;
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// Moves the kept micro-batch (if any) into the sum.
    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(grads) => self.accumulate(&grads),
            None => Ok(()),
        }
    }

    /// Sums the gradient across ranks: in place on the GPU with NCCL, through host memory for
    /// a host collective.
    pub fn all_reduce(&mut self, collective: &mut dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        self.flush()?;
        let sum = self.sum()?.clone();
        self.grad = Some(collective.all_reduce_sum_tensor(sum)?);
        self.dirty = true;
        Ok(())
    }

    /// Scales the summed gradient by `scale` (1 / global count), clips it to `max_norm` as
    /// `clip_grad_norm_` does (0: no clipping), steps AdamW, which writes the new weights into
    /// `params` (bf16, the ones [`MixedState::new`] gave). Returns the norm before clipping. The
    /// scale and the clipping coefficient reach AdamW as one factor; the norm is `scale`·‖sum‖.
    /// The gradient is used up: it is zero afterwards. With one micro-batch on one rank the norm
    /// and AdamW read the gradients themselves; the result is the same bit for bit. `sum_sq`:
    /// under ZeRO-2 the global sum of squares of the unscaled sum (the ranks' local ones added).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        scale: f32,
        max_norm: f64,
        hyper: AdamWHyper,
        sum_sq: Option<f64>,
    ) -> Result<f64> {
        if self.owned.len() != self.spans.len() {
            // A shard reads a run of the sum (with one rank there is no shard).
            self.flush()?;
        }
        let table = match self.pending.take() {
            Some(grads) => {
                let sizes: Vec<usize> = self.spans.iter().map(|s| s.1).collect();
                Some(GradTable::new(grads, &sizes)?)
            }
            None => None,
        };
        let sum_sq = match (&table, sum_sq) {
            (_, Some(global)) => global,
            (Some(t), None) => herd_kernels::sum_squares_of(t)?,
            (None, None) => herd_kernels::sum_squares(self.sum()?)?,
        };
        let norm = scale as f64 * sum_sq.sqrt();
        let coef = clip_coefficient(norm, max_norm);
        let grad_scale = (scale as f64 * coef) as f32;
        let weights = self.owned_weights(params);
        match &table {
            Some(t) => self
                .adamw
                .step(&self.state, &weights, Grad::Table(t), hyper, grad_scale)?,
            None => {
                let sum = self.sum()?.clone();
                if !weights.is_empty() {
                    let off = match self.owned_gradient {
                        true => 0,
                        false => self.spans[self.owned.start].0,
                    };
                    let own = sum.narrow(0, off, self.adamw.len())?;
                    self.adamw
                        .step(&self.state, &weights, Grad::Flat(&own), hyper, grad_scale)?;
                }
                herd_kernels::grad::zero(&sum)?;
            }
        }
        drop(table);
        self.dirty = false;
        Ok(norm)
    }

    /// The bf16 weights of the owned parameters, which the step updates in place.
    fn owned_weights(&self, params: &[(String, Var)]) -> Vec<Tensor> {
        params[self.owned.clone()]
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    /// Bytes of AdamW state this holds on the device (moments and low halves).
    pub fn state_bytes(&self) -> usize {
        self.state.elem_count() * 4
    }

    /// The parameters whose state this holds.
    pub fn owned(&self) -> std::ops::Range<usize> {
        self.owned.clone()
    }

    /// The owned parameters' master weights and moments on the host, each flat over the owned
    /// run (`params`: the model's, as given to `step`).
    pub fn owned_state(&self, params: &[(String, Var)]) -> Result<herd_kernels::HostState> {
        Ok(self.adamw.read(&self.state, &self.owned_weights(params))?)
    }

    /// The master weights of each owned parameter, on the host.
    pub fn master(&self, params: &[(String, Var)]) -> Result<Vec<Vec<f32>>> {
        let host = self.owned_state(params)?;
        Ok(self.per_owned(&host.master))
    }

    /// A flat run over the owned parameters cut into one vector per parameter.
    fn per_owned(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        let base = self.owned_base();
        self.spans[self.owned.clone()]
            .iter()
            .map(|&(off, len)| flat[off - base..off - base + len].to_vec())
            .collect()
    }

    /// Where the owned run starts in the gradient sum.
    fn owned_base(&self) -> usize {
        self.spans.get(self.owned.start).map_or(0, |s| s.0)
    }

    /// Copies the device moments of the owned parameters into `optimizer` (before it is saved;
    /// its own moments may be empty, as the engine frees them once they live here).
    pub fn moments_into(&self, optimizer: &mut AdamW) -> Result<()> {
        let n = self.adamw.len();
        let m = self.per_owned(&span_to_host(&self.state, 0, n)?);
        let v = self.per_owned(&span_to_host(&self.state, n, n)?);
        for ((s, m), v) in optimizer.states[self.owned.clone()]
            .iter_mut()
            .zip(m)
            .zip(v)
        {
            s.exp_avg = m;
            s.exp_avg_sq = v;
        }
        Ok(())
    }
}

/// Elements of `t` (1-D f32) from `start` on the host. On a GPU candle's `to_vec1` of a view
/// first copies the view's whole storage to the host, so a span of the optimizer state would
/// cost the whole state (11 GB at 1.1B parameters) per read: the span is copied out on the
/// device in bounded pieces instead (256 MiB each), and only those cross to the host.
fn span_to_host(t: &Tensor, start: usize, len: usize) -> Result<Vec<f32>> {
    span_to_host_in(t, start, len, 1 << 26)
}

fn span_to_host_in(t: &Tensor, start: usize, len: usize, piece: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(len);
    for a in (0..len).step_by(piece.max(1)) {
        let view = t.narrow(0, start + a, piece.min(len - a))?;
        // The host reads a view in place; a GPU view is first made its own storage.
        let view = match t.device().is_cuda() {
            true => view.force_contiguous()?,
            false => view,
        };
        out.extend(view.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleProcess;
    use crate::optim::{clip_grad_norm, AdamWConfig};

    /// The master weights of `params` in a fresh state, and the bf16 parameters the model holds.
    fn placed(params: &[(String, Var)], host: &AdamW) -> (MixedState, Vec<(String, Var)>) {
        let (mixed, weights) =
            MixedState::new(params, 0..params.len(), host, &Device::Cpu).unwrap();
        let bf16 = params
            .iter()
            .zip(weights)
            .map(|((n, _), w)| (n.clone(), Var::from_tensor(&w).unwrap()))
            .collect();
        (mixed, bf16)
    }

    fn words(m: &MixedState) -> Vec<u32> {
        let w = m.state.to_vec1::<f32>().unwrap();
        w.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_span_is_read_piece_by_piece_whole_and_in_order() {
        let t = Tensor::arange(0f32, 20., &Device::Cpu).unwrap();
        let want: Vec<f32> = (5..16).map(|v| v as f32).collect();
        for piece in [1, 3, 11, 64] {
            assert_eq!(
                span_to_host_in(&t, 5, 11, piece).unwrap(),
                want,
                "piece {piece}"
            );
        }
        assert!(span_to_host(&t, 20, 0).unwrap().is_empty());
    }

    /// The device state's master weights step as the host optimizer's f32 weights, up to the
    /// clipping coefficient, which comes from an f32 norm here and an f64 one on the host;
    /// gradients accumulated over two micro-batches, clipping on. The model's bf16 weights are
    /// the masters' high halves after every step.
    #[test]
    fn device_steps_equal_the_host_optimizer() {
        let names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"];
        let shapes = [(3usize, 4usize), (1, 5)];
        let params: Vec<(String, Var)> = names
            .iter()
            .zip(shapes)
            .enumerate()
            .map(|(k, (n, s))| {
                let v: Vec<f32> = (0..s.0 * s.1).map(|i| (i + k) as f32 * 0.1 - 0.4).collect();
                let t = Tensor::from_vec(v, s, &Device::Cpu).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let sizes: Vec<(String, usize)> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.elem_count()))
            .collect();
        let mut host = AdamW::new(cfg, &sizes);
        let mut host_p: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let (mut mixed, params) = placed(&params, &host);
        for step in 1..=3 {
            let micro = |m: usize| -> Vec<Tensor> {
                shapes
                    .iter()
                    .map(|&s| {
                        let v: Vec<f32> = (0..s.0 * s.1)
                            .map(|i| ((i * 7 + step * 3 + m) % 11) as f32 - 5.0)
                            .collect();
                        Tensor::from_vec(v, s, &Device::Cpu).unwrap()
                    })
                    .collect()
            };
            let mut flat: Vec<f32> = vec![];
            for m in 0..2 {
                let g = micro(m);
                mixed
                    .add(&g.iter().cloned().map(Some).collect::<Vec<_>>())
                    .unwrap();
                let gv: Vec<f32> = g
                    .iter()
                    .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .collect();
                if flat.is_empty() {
                    flat = gv;
                } else {
                    flat.iter_mut().zip(&gv).for_each(|(a, b)| *a += b);
                }
            }
            mixed.all_reduce(&mut SingleProcess).unwrap();
            let scale = 1.0 / 7.0;
            flat.iter_mut().for_each(|g| *g *= scale);
            let host_norm = clip_grad_norm(&mut flat, 1.0);
            let lr = 1e-2;
            let mut off = 0;
            for (i, p) in host_p.iter_mut().enumerate() {
                let n = p.len();
                host.update_param(i, p, &flat[off..off + n], lr);
                off += n;
            }
            host.finish_step();
            let hyper = cfg.hyper(lr, step as i32);
            let norm = mixed.step(&params, scale, 1.0, hyper, None).unwrap();
            assert!(
                (norm - host_norm).abs() <= 1e-5 * host_norm,
                "{norm} vs {host_norm}"
            );
            let master = mixed.master(&params).unwrap();
            for (k, (_, v)) in params.iter().enumerate() {
                let weights: Vec<f32> = v
                    .as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let high: Vec<f32> = master[k]
                    .iter()
                    .map(|&x| herd_kernels::master::split(x).0.to_f32())
                    .collect();
                assert_eq!(weights, high, "step {step} param {k}: the weights");
                let diff = master[k]
                    .iter()
                    .zip(&host_p[k])
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-6, "step {step} param {k}: {diff}");
            }
        }
        let mut saved = host.clone();
        mixed.moments_into(&mut saved).unwrap();
        for (a, b) in saved.states.iter().zip(&host.states) {
            let d = a
                .exp_avg
                .iter()
                .zip(&b.exp_avg)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d < 1e-5, "{d}");
        }
    }

    /// One micro-batch on one rank never allocates the flat sum: the norm and AdamW read the
    /// gradients themselves, and give what the sum path gives (forced here by a second, all-zero
    /// micro-batch), bit for bit, over steps; one parameter backward did not reach reads as 0.
    #[test]
    fn one_micro_batch_reads_the_gradients_in_place_bit_for_bit() {
        let shapes = [(5usize, 3usize), (1, 4), (2, 2)];
        let params = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    let v: Vec<f32> = (0..s.0 * s.1)
                        .map(|i| ((i * 5 + k) % 9) as f32 * 0.1 - 0.3)
                        .collect();
                    let t = Tensor::from_vec(v, s, &Device::Cpu).unwrap();
                    (
                        format!("model.layers.{k}.mlp.up_proj.weight"),
                        Var::from_tensor(&t).unwrap(),
                    )
                })
                .collect()
        };
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (pa, pb) = (params(), params());
        let sizes: Vec<(String, usize)> = pa
            .iter()
            .map(|(n, v)| (n.clone(), v.elem_count()))
            .collect();
        let host = AdamW::new(cfg, &sizes);
        let (mut a, pa) = placed(&pa, &host);
        let (mut b, pb) = placed(&pb, &host);
        for step in 1..=3 {
            let grads: Vec<Option<Tensor>> = shapes
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    (k != 2 || step == 1).then(|| {
                        let v: Vec<f32> = (0..s.0 * s.1)
                            .map(|i| ((i * 3 + step) % 7) as f32 - 3.1)
                            .collect();
                        Tensor::from_vec(v, s, &Device::Cpu).unwrap()
                    })
                })
                .collect();
            let zeros: Vec<Option<Tensor>> = shapes
                .iter()
                .map(|&s| Some(Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap()))
                .collect();
            a.zero_grad().unwrap();
            b.zero_grad().unwrap();
            a.add(&grads).unwrap();
            b.add(&grads).unwrap();
            b.add(&zeros).unwrap();
            assert!(a.grad.is_none(), "one micro-batch allocated the flat sum");
            assert!(b.grad.is_some());
            let hyper = cfg.hyper(1e-2, step as i32);
            let na = a.step(&pa, 1.0 / 3.0, 1.0, hyper, None).unwrap();
            let nb = b.step(&pb, 1.0 / 3.0, 1.0, hyper, None).unwrap();
            assert_eq!(na, nb, "step {step}: norm");
            assert_eq!(words(&a), words(&b), "step {step}");
            for ((_, x), (_, y)) in pa.iter().zip(&pb) {
                let f = |v: &Var| -> Vec<f32> {
                    let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                    t.flatten_all().unwrap().to_vec1().unwrap()
                };
                assert_eq!(f(x), f(y), "step {step}: weights");
            }
        }
    }
}
