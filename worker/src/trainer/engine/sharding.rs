//! ZeRO on the engine ([`super::zero`] decides who owns what): stage 1's sharded optimizer
//! state and weight share, stage 2's gradient reduce into the owners.

use super::zero::{self, Shard};
use super::{Engine, Trainable};
use crate::collective::Collective;
use crate::Result;
use candle_core::{DType, Tensor};

impl<M: Trainable> Engine<M> {
    /// Sharding decides what the mixed-precision state holds, so it must come first.
    fn not_placed_yet(&self) -> Result<()> {
        match self.mixed {
            Some(_) => Err(crate::Error::Unsupported {
                key: "zero_stage",
                reason: "sharding after the mixed-precision state was built".into(),
            }),
            None => Ok(()),
        }
    }

    /// Elements of each trainable parameter, in order.
    fn parameter_sizes(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// ZeRO-1 over `world` ranks, this one `rank`: keep optimizer state only for this rank's
    /// part of the parameters ([`zero::partition`]) and share updated weights after each step.
    /// Call after a resume has loaded the (whole) optimizer and before [`Engine::place`] (the
    /// mixed-precision state is built for the shard).
    pub fn shard_optimizer(&mut self, rank: usize, world: usize) -> Result<()> {
        self.not_placed_yet()?;
        if world < 2 {
            return Ok(());
        }
        let sizes = self.parameter_sizes();
        let shard = Shard::new(&sizes, rank, world);
        let owned = shard.owned();
        for (i, s) in self.optimizer.states.iter_mut().enumerate() {
            if !owned.contains(&i) {
                s.exp_avg = Vec::new();
                s.exp_avg_sq = Vec::new();
            }
        }
        tracing::info!(
            rank,
            world,
            parameters = owned.len(),
            elements = shard.elems[rank],
            "ZeRO-1: this rank holds the optimizer state of its part"
        );
        self.shard = Some(shard);
        Ok(())
    }

    /// ZeRO-2 on top of [`Engine::shard_optimizer`]: the gradient is sharded too. Each
    /// micro-batch's gradients are reduced into the ranks that own them
    /// ([`Engine::reduce_micro_batch`]), so this rank's gradient sum covers its own part only;
    /// the norm is the ranks' sums of squares added. A no-op on one rank; call before
    /// [`Engine::place`].
    pub fn shard_gradients(&mut self) -> Result<()> {
        self.not_placed_yet()?;
        let Some(shard) = &self.shard else {
            return Ok(());
        };
        self.grad = vec![0.0; shard.elems[shard.rank]];
        self.reduce_to_owner = true;
        tracing::info!(
            rank = shard.rank,
            elements = shard.elems[shard.rank],
            "ZeRO-2: this rank keeps the gradient of its part"
        );
        Ok(())
    }

    /// The ZeRO-1 shard, when the optimizer state is sharded.
    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref()
    }

    /// The parameters this rank updates.
    pub(super) fn owned(&self) -> std::ops::Range<usize> {
        match &self.shard {
            Some(s) => s.owned(),
            None => 0..self.offsets.len() - 1,
        }
    }

    /// ZeRO-2: keeps a micro-batch's gradients until [`Engine::reduce_micro_batch`]; a second
    /// one before that is added in f32 (a local sum, as without ZeRO-2).
    pub(super) fn hold_for_reduce(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let Some(held) = self.pending.as_mut() else {
            self.pending = Some(grads.to_vec());
            return Ok(());
        };
        for (h, g) in held.iter_mut().zip(grads) {
            *h = match (h.take(), g) {
                (Some(a), Some(b)) => Some((a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?)?),
                (a, b) => a.or_else(|| b.clone()),
            };
        }
        Ok(())
    }

    /// ZeRO-2: sends the gradients of the micro-batch(es) accumulated since the last call to
    /// the ranks that own them, each rank's part in buckets of whole parameters
    /// (`Collective::reduce_tensor`, [`zero::buckets`]), and adds this rank's part of the sums
    /// into its gradient. Collective: every rank calls it
    /// the same number of times per step, with or without a micro-batch of its own (then it
    /// sends zeros). The trainer calls it after each micro-batch but the last; `apply` makes
    /// the last call. A no-op without ZeRO-2.
    pub fn reduce_micro_batch(&mut self, collective: &mut dyn Collective) -> Result<()> {
        if !self.reduce_to_owner {
            return Ok(());
        }
        let Some(shard) = &self.shard else {
            return Ok(());
        };
        let pending = self.pending.take();
        let sizes = self.parameter_sizes();
        for (root, part) in shard.parts.iter().enumerate() {
            let first = self.offsets[part.start];
            for bucket in zero::buckets(&sizes, part.clone(), self.bucket_elems) {
                let (from, to) = (self.offsets[bucket.start], self.offsets[bucket.end]);
                if from == to {
                    continue;
                }
                let flat = match &pending {
                    None => Tensor::zeros(to - from, DType::F32, &self.device)?,
                    Some(grads) => {
                        let pieces = bucket
                            .map(|i| match &grads[i] {
                                Some(g) => g.flatten_all()?.to_dtype(DType::F32),
                                None => Tensor::zeros(sizes[i], DType::F32, &self.device),
                            })
                            .collect::<candle_core::Result<Vec<_>>>()?;
                        Tensor::cat(&pieces, 0)?
                    }
                };
                let flat = collective.reduce_tensor(flat, root)?;
                if root != shard.rank {
                    continue;
                }
                match self.mixed.as_mut() {
                    Some(m) => m.add_owned(&flat, from - first)?,
                    None => {
                        let sum = flat.to_vec1::<f32>()?;
                        let dst = &mut self.grad[from - first..to - first];
                        dst.iter_mut().zip(&sum).for_each(|(d, s)| *d += s);
                    }
                }
            }
        }
        Ok(())
    }

    /// ZeRO-2: the sum of squares of this rank's part of the (unscaled) gradient sum.
    pub(super) fn local_sum_squares(&mut self) -> Result<f64> {
        Ok(match self.mixed.as_mut() {
            Some(m) => m.local_sum_squares()?,
            None => self.grad.iter().map(|&g| g as f64 * g as f64).sum(),
        })
    }

    /// ZeRO-1: each rank broadcasts the parameters it updated, so all ranks hold the same
    /// weights again (bit for bit: a broadcast copies). One rank's part at a time travels as
    /// one flat f32 tensor on the compute device (bf16 weights widen exactly).
    pub(super) fn share_updated_weights(&mut self, collective: &mut dyn Collective) -> Result<()> {
        let Some(shard) = &self.shard else {
            return Ok(());
        };
        let params = self.model.trainable();
        let sizes = self.parameter_sizes();
        for (root, part) in shard.parts.iter().enumerate() {
            for bucket in zero::buckets(&sizes, part.clone(), self.bucket_elems) {
                let vars = &params[bucket.clone()];
                let n: usize = sizes[bucket].iter().sum();
                if n == 0 {
                    continue;
                }
                // bf16 weights (mixed precision) travel as bf16: they are all the others need
                // (their masters' high halves), in half the bytes.
                let dtype = match vars.iter().all(|(_, v)| v.dtype() == DType::BF16) {
                    true => DType::BF16,
                    false => DType::F32,
                };
                let flat = if root == shard.rank {
                    let pieces = vars
                        .iter()
                        .map(|(_, v)| v.as_tensor().flatten_all()?.to_dtype(dtype))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&pieces, 0)?
                } else {
                    Tensor::zeros(n, dtype, &self.device)?
                };
                let flat = collective.broadcast_tensor(flat, root)?;
                if root == shard.rank {
                    continue;
                }
                let mut off = 0;
                for (_, var) in vars {
                    let len = var.elem_count();
                    let w = flat.narrow(0, off, len)?.reshape(var.shape())?;
                    var.set(&w.to_dtype(var.dtype())?)?;
                    off += len;
                }
            }
        }
        Ok(())
    }
}
