//! One optimizer step on one rank: forward/backward over micro-batches into a flat gradient
//! buffer (sums of token NLL), the collective sum, division by the global token count, clipping,
//! AdamW. Kept apart from the run loop so parity tests can drive it with a fixture batch.

use crate::collective::Collective;
use crate::data::collate::Batch;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::Result;
use candle_core::{DType, Device, Tensor};
use herd_model::{loss::causal_lm_loss_sum, Llama};

pub struct Engine {
    pub model: Llama,
    pub optimizer: AdamW,
    /// Flat gradient of every trainable parameter, in `model.trainable()` order (all parameters,
    /// or only the LoRA adapters: the frozen base gets no gradient and no optimizer state).
    grad: Vec<f32>,
    offsets: Vec<usize>,
    loss_sum: f64,
    tokens: usize,
    max_grad_norm: f64,
    /// Where forward/backward run (CPU f32, or a GPU in bf16 after [`Engine::place`]).
    device: Device,
    /// f32 master weights per trainable parameter when the model computes in another dtype;
    /// AdamW updates these and the model gets them rounded (mixed precision, CUDA issue #5).
    master: Option<Vec<Vec<f32>>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean token loss over the global batch.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Tokens that counted in the loss, all ranks.
    pub label_tokens: usize,
}

impl Engine {
    pub fn new(model: Llama, adam: AdamWConfig, max_grad_norm: f64) -> Self {
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
            max_grad_norm,
            device: Device::Cpu,
            master: None,
        }
    }

    /// Move the model to `device` computing in `dtype`, keeping the current f32 weights as the
    /// master copy (and the optimizer state, already f32, on the host). Call once, after resume.
    pub fn place(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if dtype != DType::F32 {
            let master = self
                .model
                .trainable()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.master = Some(master);
        }
        self.model.to_device(device, dtype)?;
        self.device = device.clone();
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
        self.loss_sum = 0.0;
        self.tokens = 0;
    }

    /// Forward and backward one micro-batch, adding d(sum of token NLL)/dθ into the buffer.
    /// Returns (loss sum, counted tokens) of this micro-batch.
    pub fn accumulate(&mut self, batch: &Batch) -> Result<(f64, usize)> {
        let dev = self.device.clone();
        let shape = (batch.batch, batch.seq_len);
        let input = Tensor::from_vec(batch.input_ids.clone(), shape, &dev)?;
        let labels = Tensor::from_vec(batch.labels.clone(), shape, &dev)?;
        let (sum, count) = if dev.is_cuda() {
            // lm_head fused with the loss: no [b·t, vocab] logits; loss in f32 (CUDA issue #5)
            match self.model.forward_hidden(&input)? {
                (hidden, Some(head)) => {
                    herd_model::loss::causal_lm_loss_sum_fused(&hidden, &head, &labels)?
                }
                (_, None) => {
                    let logits = self.model.forward(&input)?.to_dtype(DType::F32)?;
                    causal_lm_loss_sum(&logits, &labels)?
                }
            }
        } else {
            let logits = self.model.forward(&input)?;
            causal_lm_loss_sum(&logits, &labels)?
        };
        if count == 0 {
            return Ok((0.0, 0));
        }
        let grads = sum.backward()?;
        for (i, (name, var)) in self.model.trainable().iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                tracing::warn!(param = %name, "parameter received no gradient");
                continue;
            };
            let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let dst = &mut self.grad[self.offsets[i]..self.offsets[i + 1]];
            dst.iter_mut().zip(&g).for_each(|(d, s)| *d += s);
        }
        let s = sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        self.loss_sum += s;
        self.tokens += count;
        Ok((s, count))
    }

    /// Sum across ranks, normalize by the global token count, clip, and apply AdamW at `lr`.
    pub fn apply(&mut self, collective: &mut dyn Collective, lr: f64) -> Result<StepStats> {
        // One rank: the local sums are the global ones (and the loss keeps its f64 sum).
        let (loss_sum, global_tokens) = if collective.world_size() > 1 {
            let mut totals = [self.loss_sum as f32, self.tokens as f32];
            collective.all_reduce_sum(&mut self.grad)?;
            collective.all_reduce_sum(&mut totals)?;
            (totals[0] as f64, totals[1].round() as usize)
        } else {
            (self.loss_sum, self.tokens)
        };
        let loss = if global_tokens > 0 {
            loss_sum / global_tokens as f64
        } else {
            0.0
        };
        if global_tokens > 0 {
            let scale = 1.0 / global_tokens as f32;
            self.grad.iter_mut().for_each(|g| *g *= scale);
        }
        let grad_norm = clip_grad_norm(&mut self.grad, self.max_grad_norm);
        for (i, (_, var)) in self.model.trainable().iter().enumerate() {
            let grad = &self.grad[self.offsets[i]..self.offsets[i + 1]];
            if let Some(master) = self.master.as_mut() {
                // mixed precision: update the f32 master, give the model its rounding
                self.optimizer.update_param(i, &mut master[i], grad, lr);
                let p = Tensor::from_slice(&master[i], var.shape(), &Device::Cpu)?;
                var.set(&p.to_dtype(var.dtype())?.to_device(var.device())?)?;
                continue;
            }
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            self.optimizer.update_param(i, &mut p, grad, lr);
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        self.optimizer.finish_step();
        Ok(StepStats {
            loss,
            grad_norm,
            learning_rate: lr,
            label_tokens: global_tokens,
        })
    }
}
