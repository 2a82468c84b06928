//! Eval loss as HF `Trainer.evaluate` computes it for a causal LM: the examples in file order, in
//! batches of `per_device_eval_batch_size` (right-padded as in training), each batch's loss the mean
//! token NLL over its counted labels (train.py's masking), and `eval_loss` the mean of the batch
//! losses weighted by batch size (`loss.repeat(batch_size)` then `.mean()`). The token-weighted
//! mean over the whole file is reported beside it. Runs on detached weights: no graph is built.

use crate::data::collate::collate;
use crate::data::encode::Example;
use crate::Result;
use candle_core::{DType, Tensor};
use herd_model::loss::causal_lm_loss_sum;
use herd_model::Llama;

#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct EvalLoss {
    /// HF's `eval_loss`: batch means, weighted by the number of examples in each batch.
    pub loss: f64,
    /// Sum of token NLL / number of counted tokens over the whole set.
    pub token_loss: f64,
    /// Counted (unmasked, shifted) label tokens.
    pub tokens: usize,
    pub examples: usize,
    pub batches: usize,
}

/// Sum of token NLL and counted tokens of one padded batch, without a backward graph.
pub fn batch_loss_sum(
    net: &herd_model::llama::Net,
    batch: &crate::data::Batch,
) -> Result<(f64, usize)> {
    let dev = net.device();
    let shape = (batch.batch, batch.seq_len);
    let input = Tensor::from_slice(&batch.input_ids, shape, &dev)?;
    let labels = Tensor::from_slice(&batch.labels, shape, &dev)?;
    let logits = net.forward(&input, None)?.to_dtype(DType::F32)?; // the loss in f32
    let (sum, count) = causal_lm_loss_sum(&logits, &labels)?;
    Ok((sum.to_scalar::<f32>()? as f64, count))
}

/// The eval loss of `model` on `examples` (see the module docs).
pub fn eval_loss(
    model: &Llama,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalLoss> {
    let net = model.inference_net();
    let batch_size = batch_size.max(1);
    let mut out = EvalLoss::default();
    let (mut weighted, mut total_sum) = (0.0f64, 0.0f64);
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id);
        let (sum, count) = batch_loss_sum(&net, &batch)?;
        // A batch with no counted token has loss NaN in torch; HF would then report NaN. Skip it
        // instead (it carries no information) and say so in the counts.
        if count > 0 {
            weighted += sum / count as f64 * chunk.len() as f64;
            out.examples += chunk.len();
            out.batches += 1;
        }
        total_sum += sum;
        out.tokens += count;
    }
    if out.examples > 0 {
        out.loss = weighted / out.examples as f64;
    }
    if out.tokens > 0 {
        out.token_loss = total_sum / out.tokens as f64;
    }
    Ok(out)
}
