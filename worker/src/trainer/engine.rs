//! One optimizer step on one rank: forward/backward over micro-batches into a flat gradient
//! buffer (sums of token NLL), the collective sum, division by the global token count, clipping,
//! AdamW. Kept apart from the run loop so parity tests can drive it with a fixture batch.

use super::mixed::MixedState;
use super::zero::{self, Shard};
use crate::collective::Collective;
use crate::data::collate::Batch;
use crate::optim::{clip_grad_norm, clip_to_norm, AdamW, AdamWConfig};
use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use herd_model::lora::dropout_row_key;
use herd_model::loss::{causal_lm_loss_sum, causal_lm_loss_sum_fused_host};
use herd_model::{Llama, RewardModel};

mod overlap;
mod sharding;

pub use overlap::{bucket_elems, bucket_plan, DEFAULT_BUCKET_CAP_MB};

/// A model the engine can train: its parameters that get gradients, in a fixed order, and how
/// it moves between devices and dtypes.
pub trait Trainable: Sized {
    /// Whether steps report the fraction of pairs ranked right.
    const REPORTS_ACCURACY: bool = false;
    fn trainable(&self) -> &[(String, Var)];
    /// Every weight to `device` as `dtype`, in fresh vars.
    fn to_device(&mut self, device: &Device, dtype: DType) -> herd_model::Result<()>;
    /// A copy on `device` as `dtype` that shares no vars with `self`.
    fn copy_to(&self, device: &Device, dtype: DType) -> herd_model::Result<Self>;
}

impl Trainable for Llama {
    fn trainable(&self) -> &[(String, Var)] {
        Llama::trainable(self)
    }
    fn to_device(&mut self, device: &Device, dtype: DType) -> herd_model::Result<()> {
        Llama::to_device(self, device, dtype)
    }
    fn copy_to(&self, device: &Device, dtype: DType) -> herd_model::Result<Self> {
        Llama::copy_to(self, device, dtype)
    }
}

impl Trainable for RewardModel {
    const REPORTS_ACCURACY: bool = true;
    fn trainable(&self) -> &[(String, Var)] {
        RewardModel::trainable(self)
    }
    fn to_device(&mut self, device: &Device, dtype: DType) -> herd_model::Result<()> {
        RewardModel::to_device(self, device, dtype)
    }
    fn copy_to(&self, device: &Device, dtype: DType) -> herd_model::Result<Self> {
        RewardModel::copy_to(self, device, dtype)
    }
}

/// The step machinery for any [`Trainable`]; the loss is a sum over counted units (label tokens
/// of a causal LM, pairs of a reward model) and the step divides by the global count.
pub struct Engine<M: Trainable = Llama> {
    pub model: M,
    pub optimizer: AdamW,
    /// Flat gradient of every trainable parameter, in `model.trainable()` order (all parameters,
    /// or only the LoRA adapters: the frozen base gets no gradient and no optimizer state).
    grad: Vec<f32>,
    offsets: Vec<usize>,
    loss_sum: f64,
    tokens: usize,
    /// Pairs ranked right (reward models; stays 0 for a causal LM).
    correct: usize,
    max_grad_norm: f64,
    /// Salts the LoRA dropout masks (the job seed); see `herd_model::lora::dropout_row_key`.
    pub dropout_seed: u64,
    /// NEFTune's `neftune_noise_alpha` (0: none): noise on the training forwards' embeddings.
    pub neftune_alpha: f64,
    /// Recompute each decoder layer in backward instead of keeping its activations
    /// (`gradient_checkpointing`): less memory, one more forward.
    recompute: bool,
    /// Where forward/backward run (CPU f32, or a GPU in bf16 after [`Engine::place`]).
    device: Device,
    /// Mixed precision (CUDA issue #5): f32 master weights, AdamW moments and the gradient on
    /// the compute device; the model's bf16 weights are the master weights' high halves.
    mixed: Option<MixedState>,
    /// ZeRO-1: which parameters' optimizer state this rank holds and updates (None: all).
    shard: Option<Shard>,
    /// ZeRO-2: each micro-batch's gradients go to the rank that owns them
    /// ([`Engine::reduce_micro_batch`]); this rank keeps the sum of its own part only.
    reduce_to_owner: bool,
    /// ZeRO-2: this micro-batch's gradients, not yet reduced (f32 sums if several were added).
    pending: Option<Vec<Option<Tensor>>>,
    /// ZeRO: elements per bucket of the gradient reduces and weight broadcasts
    /// ([`zero::BUCKET_ELEMS`]; tests cut smaller).
    pub bucket_elems: usize,
    /// f32 elements per bucket of the gradient sum overlapped with the backward
    /// (`ddp_bucket_cap_mb`; see [`Engine::overlapped`]).
    pub ddp_bucket_elems: usize,
    /// Which parameters' gradients this micro-batch's backward already added into `grad`, as
    /// each became final (so the gradient tensors are freed during the backward).
    folded: Vec<bool>,
    /// During an overlapped micro-batch: the buckets still to send.
    overlap: Option<overlap::Overlap>,
    /// `grad` already holds the sum across ranks (an overlapped backward summed it).
    grad_reduced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean token loss over the global batch.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Tokens (pairs for a reward model) that counted in the loss, all ranks.
    pub label_tokens: usize,
    /// Reward models: the fraction of the global batch's pairs with r_a > r_b.
    pub accuracy: Option<f64>,
}

impl<M: Trainable> Engine<M> {
    pub fn new(model: M, adam: AdamWConfig, max_grad_norm: f64) -> Self {
        let sizes: Vec<(String, usize)> = model
            .trainable()
            .iter()
            .map(|(n, v)| (n.clone(), v.elem_count()))
            .collect();
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        let mut total = 0;
        for (_, n) in &sizes {
            offsets.push(total);
            total += n;
        }
        offsets.push(total);
        let optimizer = AdamW::new(adam, &sizes);
        Engine {
            model,
            optimizer,
            grad: vec![0.0; total],
            offsets,
            loss_sum: 0.0,
            tokens: 0,
            correct: 0,
            max_grad_norm,
            dropout_seed: 0,
            neftune_alpha: 0.0,
            recompute: false,
            device: Device::Cpu,
            mixed: None,
            shard: None,
            reduce_to_owner: false,
            pending: None,
            bucket_elems: zero::BUCKET_ELEMS,
            ddp_bucket_elems: bucket_elems(DEFAULT_BUCKET_CAP_MB),
            folded: vec![false; sizes.len()],
            overlap: None,
            grad_reduced: false,
        }
    }

    /// Bytes of gradient sum this rank holds (the host buffer, or under mixed precision the
    /// device sum once a step has needed one).
    pub fn gradient_bytes(&self) -> usize {
        4 * self.grad.len() + self.mixed.as_ref().map_or(0, MixedState::gradient_bytes)
    }

    /// Bytes of optimizer state this rank holds: the host moments, or under mixed precision
    /// the device's moments and master low halves.
    pub fn optimizer_state_bytes(&self) -> usize {
        let host: usize = (self.optimizer.states.iter())
            .map(|s| 4 * (s.exp_avg.len() + s.exp_avg_sq.len()))
            .sum();
        host + self.mixed.as_ref().map_or(0, MixedState::state_bytes)
    }

    /// Move the model to `device` computing in `dtype`: f32, or bf16 with the current f32
    /// weights and the optimizer's moments becoming the device-resident [`MixedState`] (whose
    /// master weights' high halves are then the model's weights). Call once, after resume.
    pub fn place(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if dtype == DType::BF16 {
            // Not used under mixed precision; freed before the device state is built.
            self.grad = Vec::new();
            if self.optimizer.steps == 0 {
                // A fresh optimizer's moments are zeros: the device state starts from zeros
                // without them, so the host holds no model-sized pair of zero vectors meanwhile.
                self.free_host_moments();
            }
        }
        let mixed = match dtype {
            DType::F32 => None,
            DType::BF16 => {
                let (mut m, weights) = MixedState::new(
                    self.model.trainable(),
                    self.owned(),
                    &self.optimizer,
                    device,
                )?;
                if self.reduce_to_owner {
                    m.keep_owned_gradient_only();
                }
                Some((m, weights))
            }
            other => {
                return Err(crate::Error::Unsupported {
                    key: "dtype",
                    reason: format!("{other:?} compute (f32, or bf16 with f32 master weights)"),
                })
            }
        };
        Trainable::to_device(&mut self.model, device, dtype)?;
        if let Some((mixed, weights)) = mixed {
            for ((_, var), w) in self.model.trainable().iter().zip(weights) {
                var.set(&w)?;
            }
            self.mixed = Some(mixed);
            self.free_host_moments();
        }
        self.device = device.clone();
        Ok(())
    }

    /// Under mixed precision the moments live in the device state, and a checkpoint reads them
    /// back (`optimizer_to_save`); the host keeps only the config and the step count.
    fn free_host_moments(&mut self) {
        for s in &mut self.optimizer.states {
            s.exp_avg = Vec::new();
            s.exp_avg_sq = Vec::new();
        }
    }

    /// The model as the f32 master weights say, on the host, for checkpoints and the final save;
    /// None when the model itself computes in f32 (then it is what to save). Sharded (ZeRO-1),
    /// every rank must call this at the same step, and only rank 0's answer is whole.
    pub fn master_model(&self, collective: &mut dyn Collective) -> Result<Option<M>> {
        let Some(mixed) = &self.mixed else {
            return Ok(None);
        };
        let params = self.model.trainable();
        let mut master = mixed.master(params)?;
        if let Some(shard) = &self.shard {
            let mine: Vec<f32> = master.concat();
            let Some(all) = zero::gather_to_first(collective, mine, &shard.elems)? else {
                return Ok(None);
            };
            master = self.per_param(&all);
        }
        let copy = self.model.copy_to(&Device::Cpu, DType::F32)?;
        for ((_, var), m) in copy.trainable().iter().zip(&master) {
            var.set(&Tensor::from_slice(m, var.shape(), &Device::Cpu)?)?;
        }
        Ok(Some(copy))
    }

    /// A flat buffer over every parameter cut into one vector per parameter.
    fn per_param(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        self.offsets
            .windows(2)
            .map(|w| flat[w[0]..w[1]].to_vec())
            .collect()
    }

    /// The optimizer as a checkpoint saves it: under mixed precision with the moments read back
    /// from the device; sharded (ZeRO-1) with every rank's moments, on rank 0 (every rank must
    /// call this at the same step).
    pub fn optimizer_to_save(
        &self,
        collective: &mut dyn Collective,
    ) -> Result<std::borrow::Cow<'_, AdamW>> {
        if self.mixed.is_none() && self.shard.is_none() {
            return Ok(std::borrow::Cow::Borrowed(&self.optimizer));
        }
        let mut opt = self.optimizer.clone();
        if let Some(mixed) = &self.mixed {
            mixed.moments_into(&mut opt)?;
        }
        let Some(shard) = &self.shard else {
            return Ok(std::borrow::Cow::Owned(opt));
        };
        // Each rank's part: its parameters' exp_avg, then their exp_avg_sq.
        let owned = &opt.states[shard.owned()];
        let mut mine: Vec<f32> = owned
            .iter()
            .flat_map(|s| s.exp_avg.iter())
            .copied()
            .collect();
        mine.extend(owned.iter().flat_map(|s| s.exp_avg_sq.iter()));
        let counts: Vec<usize> = shard.elems.iter().map(|e| 2 * e).collect();
        if let Some(all) = zero::gather_to_first(collective, mine, &counts)? {
            let mut at = 0;
            for (part, &n) in shard.parts.iter().zip(&shard.elems) {
                let (m, v) = all[at..at + 2 * n].split_at(n);
                let mut off = 0;
                for i in part.clone() {
                    let len = self.offsets[i + 1] - self.offsets[i];
                    let s = &mut opt.states[i];
                    s.exp_avg = m[off..off + len].to_vec();
                    s.exp_avg_sq = v[off..off + len].to_vec();
                    off += len;
                }
                at += 2 * n;
            }
        }
        Ok(std::borrow::Cow::Owned(opt))
    }

    /// Where forward and backward run.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// With `on`, activations are recomputed layer by layer in backward (same gradients).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
        if let Some(m) = self.mixed.as_mut() {
            m.zero_grad()?;
        }
        self.pending = None;
        self.grad_reduced = false;
        self.loss_sum = 0.0;
        self.tokens = 0;
        self.correct = 0;
        Ok(())
    }

    /// Backward of a micro-batch's loss `sum` over `count` units (`correct` of them pairs ranked
    /// right), adding d(sum)/dθ into the buffer. Returns the loss sum.
    pub fn add_loss(&mut self, sum: &Tensor, count: usize, correct: usize) -> Result<f64> {
        if count == 0 {
            return Ok(0.0);
        }
        let store = sum.backward()?;
        let grads: Vec<Option<Tensor>> = self
            .model
            .trainable()
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).cloned())
            .collect();
        self.add_gradients(sum, &grads, count, correct)
    }

    /// Adds the gradients of a micro-batch's loss `sum` (one per trainable parameter, in order)
    /// into the buffer. Returns the loss sum.
    fn add_gradients(
        &mut self,
        sum: &Tensor,
        grads: &[Option<Tensor>],
        count: usize,
        correct: usize,
    ) -> Result<f64> {
        let params = self.model.trainable().iter().zip(grads).zip(&self.folded);
        for (((name, _), g), &folded) in params {
            if g.is_none() && !folded {
                tracing::warn!(param = %name, "parameter received no gradient");
            }
        }
        self.folded.fill(false);
        match self.mixed.as_mut() {
            _ if self.reduce_to_owner => self.hold_for_reduce(grads)?,
            Some(m) => m.add(grads)?, // stays on the device
            None => {
                for (i, g) in grads.iter().enumerate() {
                    let Some(g) = g else { continue };
                    add_into(&mut self.grad[self.offsets[i]..self.offsets[i + 1]], g)?;
                }
            }
        }
        let s = sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        self.loss_sum += s;
        self.tokens += count;
        self.correct += correct;
        Ok(s)
    }

    /// Sum across ranks, normalize by the global token count, clip, and apply AdamW at `lr`.
    pub fn apply(&mut self, collective: &mut dyn Collective, lr: f64) -> Result<StepStats> {
        // ZeRO-2: the last micro-batch's gradients go to their owners; the ranks' sums of
        // squares travel with the totals.
        let mut sum_sq = None;
        if self.reduce_to_owner {
            self.reduce_micro_batch(collective)?;
            sum_sq = Some(self.local_sum_squares()?);
        }
        // One rank: the local sums are the global ones (and the loss keeps its f64 sum).
        let (loss_sum, global_tokens, correct) = if collective.world_size() > 1 {
            let mut totals = [
                self.loss_sum as f32,
                self.tokens as f32,
                self.correct as f32,
                sum_sq.unwrap_or(0.0) as f32,
            ];
            match self.mixed.as_mut() {
                _ if self.reduce_to_owner => {}
                Some(m) => m.all_reduce(collective)?,
                None if self.grad_reduced => {} // summed during the backward
                None => {
                    let t = std::time::Instant::now();
                    collective.all_reduce_sum(&mut self.grad)?;
                    let waited_ms = (t.elapsed().as_secs_f64() * 1e4).round() / 10.0;
                    tracing::debug!(waited_ms, "gradient sum after the backward");
                }
            }
            collective.all_reduce_sum(&mut totals)?;
            sum_sq = sum_sq.map(|_| totals[3] as f64);
            (
                totals[0] as f64,
                totals[1].round() as usize,
                totals[2].round() as usize,
            )
        } else {
            (self.loss_sum, self.tokens, self.correct)
        };
        let loss = if global_tokens > 0 {
            loss_sum / global_tokens as f64
        } else {
            0.0
        };
        let scale = if global_tokens > 0 {
            1.0 / global_tokens as f32
        } else {
            1.0
        };
        let grad_norm = match self.mixed.as_mut() {
            Some(m) => {
                let hyper = self
                    .optimizer
                    .config
                    .hyper(lr, (self.optimizer.steps + 1) as i32);
                m.step(
                    self.model.trainable(),
                    scale,
                    self.max_grad_norm,
                    hyper,
                    sum_sq,
                )?
            }
            None => self.host_step(scale, lr, sum_sq)?,
        };
        self.share_updated_weights(collective)?;
        self.optimizer.finish_step();
        Ok(self.stats(loss, grad_norm, lr, global_tokens, correct))
    }

    /// The host update of plain f32 training: scale, clip, torch-exact AdamW per parameter.
    /// `sum_sq` (ZeRO-2): the global sum of squares of the unscaled sum, whose buffer here is
    /// this rank's part only.
    fn host_step(&mut self, scale: f32, lr: f64, sum_sq: Option<f64>) -> Result<f64> {
        self.grad.iter_mut().for_each(|g| *g *= scale);
        let grad_norm = match sum_sq {
            None => clip_grad_norm(&mut self.grad, self.max_grad_norm),
            Some(sq) => {
                let norm = scale as f64 * sq.sqrt();
                clip_to_norm(&mut self.grad, norm, self.max_grad_norm);
                norm
            }
        };
        let owned = self.owned();
        // Where the buffer starts: 0, or under ZeRO-2 the owned part's first element.
        let base = if self.reduce_to_owner {
            self.offsets[owned.start]
        } else {
            0
        };
        for (i, (_, var)) in self.model.trainable().iter().enumerate() {
            if !owned.contains(&i) {
                continue; // another rank's part (ZeRO-1): its weights arrive by broadcast
            }
            let grad = &self.grad[self.offsets[i] - base..self.offsets[i + 1] - base];
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            self.optimizer.update_param(i, &mut p, grad, lr);
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(grad_norm)
    }

    /// What `apply` reports after the update.
    fn stats(
        &self,
        loss: f64,
        grad_norm: f64,
        lr: f64,
        global_tokens: usize,
        correct: usize,
    ) -> StepStats {
        let accuracy = (M::REPORTS_ACCURACY && global_tokens > 0)
            .then(|| correct as f64 / global_tokens as f64);
        StepStats {
            loss,
            grad_norm,
            learning_rate: lr,
            label_tokens: global_tokens,
            accuracy,
        }
    }
}

impl Engine<Llama> {
    /// Forward and backward one micro-batch, adding d(sum of token NLL)/dθ into the buffer.
    /// Returns (loss sum, counted tokens) of this micro-batch.
    pub fn accumulate(&mut self, batch: &Batch) -> Result<(f64, usize)> {
        let neftune = self.neftune_alpha > 0.0;
        if self.model.has_lora_dropout() || neftune {
            let keys: Vec<u64> = (0..batch.batch)
                .map(|i| {
                    let mask = &batch.attention_mask[i * batch.seq_len..(i + 1) * batch.seq_len];
                    let tokens: Vec<u32> = batch
                        .row(i)
                        .iter()
                        .zip(mask)
                        .filter(|(_, &m)| m == 1)
                        .map(|(&t, _)| t)
                        .collect();
                    dropout_row_key(self.dropout_seed, self.optimizer.steps, &tokens)
                })
                .collect();
            if neftune {
                self.model
                    .set_embedding_noise(Some((self.neftune_alpha, keys.clone())));
            }
            self.model.set_lora_dropout_keys(Some(keys));
        }
        let result = self.forward_backward(batch);
        self.model.set_lora_dropout_keys(None);
        self.model.set_embedding_noise(None);
        result
    }

    /// The forward and backward, with packing layout and activation recompute as configured.
    /// Where the fused ops run (GPU ranks, bf16 ranks) the lm_head is fused with the loss, so
    /// the [b·t, vocab] logits are never stored; the loss is f32 either way (CUDA issue #5).
    fn forward_backward(&mut self, batch: &Batch) -> Result<(f64, usize)> {
        if batch.label_tokens() == 0 {
            return Ok((0.0, 0));
        }
        let dev = self.device.clone();
        let shape = (batch.batch, batch.seq_len);
        let input = Tensor::from_vec(batch.input_ids.clone(), shape, &dev)?;
        let fused = herd_kernels::fused(&dev);
        // The host f32 sum takes each gradient as soon as it is final (and an overlapped step
        // sends it on); mixed precision and ZeRO-2 take them all after the backward.
        let fold = self.mixed.is_none() && !self.reduce_to_owner;
        let (grad, folded, overlap, offsets) = (
            &mut self.grad,
            &mut self.folded,
            &mut self.overlap,
            &self.offsets,
        );
        let (sum, count, grads) = self.model.loss_and_gradients_with(
            &input,
            batch.layout.as_ref(),
            self.recompute,
            |top| match top.plain_head_weight() {
                Some(head) if fused => {
                    causal_lm_loss_sum_fused_host(&top.normed()?, head, &batch.labels)
                }
                _ => {
                    let labels = Tensor::from_vec(batch.labels.clone(), shape, &dev)?;
                    causal_lm_loss_sum(&top.logits()?.to_dtype(DType::F32)?, &labels)
                }
            },
            |grads, idx| {
                if !fold {
                    return Ok(());
                }
                for &i in idx {
                    if let Some(g) = grads[i].take() {
                        add_into(&mut grad[offsets[i]..offsets[i + 1]], &g)?;
                        folded[i] = true;
                    }
                }
                if let Some(o) = overlap.as_mut() {
                    o.send_ready(folded, grad, offsets);
                }
                Ok(())
            },
        )?;
        let s = self.add_gradients(&sum, &grads, count, 0)?;
        Ok((s, count))
    }
}

/// dst += g, g any float tensor of dst's length.
fn add_into(dst: &mut [f32], g: &Tensor) -> candle_core::Result<()> {
    let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    dst.iter_mut().zip(&g).for_each(|(d, s)| *d += s);
    Ok(())
}
