//! Causal-LM cross-entropy as transformers computes it: logits at position i predict the label at
//! i + 1, labels equal to -100 are ignored, mean = sum / count.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

pub const IGNORE_INDEX: i64 = -100;

/// log_softmax over the last dim from primitives: x - max - ln(sum(exp(x - max))), max detached
/// (the result does not depend on it).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// logits: [b, t, vocab] f32; labels: [b, t] i64 with -100 = ignore. Returns (sum of the negative
/// log-likelihoods of the counted tokens as a scalar tensor with graph, number counted). Summing
/// (rather than averaging) lets gradient accumulation and data parallelism divide once by the
/// global token count, as transformers does with `num_items_in_batch`.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "labels shape {:?} does not match logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    if t < 2 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    let n = b * (t - 1);
    let logits = logits.narrow(1, 0, t - 1)?.reshape((n, v))?; // predictions for 1..t
    let labels = labels
        .to_dtype(DType::I64)?
        .narrow(1, 1, t - 1)?
        .reshape(n)?;

    let label_values = labels.to_vec1::<i64>()?;
    let mut count = 0;
    let mut index = Vec::with_capacity(n);
    let mut mask = Vec::with_capacity(n);
    for &l in &label_values {
        let counted = l != IGNORE_INDEX;
        if counted && (l < 0 || l as usize >= v) {
            return Err(Error::InvalidArgument(format!(
                "label {l} outside vocabulary of {v}"
            )));
        }
        count += counted as usize;
        index.push(if counted { l as u32 } else { 0 }); // ignored rows gather index 0, then masked
        mask.push(if counted { 1f32 } else { 0f32 });
    }
    let index = Tensor::from_vec(index, (n, 1), logits.device())?;
    let mask = Tensor::from_vec(mask, n, logits.device())?;

    let log_probs = log_softmax_last_dim(&logits)?; // [n, v]
    let picked = log_probs.gather(&index, 1)?.reshape(n)?; // [n]; gather's backward is scatter_add
    let sum = (picked * mask)?.sum_all()?.neg()?;
    Ok((sum, count))
}

/// [`causal_lm_loss_sum`] with the lm_head fused in (herd-kernels): hidden [b, t, d] and the head
/// weight [vocab, d] instead of logits, so the [b·t, vocab] logits are never stored; softmax and
/// loss in f32 whatever the hidden dtype. Same value and gradients (tested against it).
pub fn causal_lm_loss_sum_fused(
    hidden: &Tensor,
    head: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, usize)> {
    let (b, t, _) = hidden.dims3()?;
    if labels.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "labels shape {:?} does not match hidden {:?}",
            labels.dims(),
            hidden.dims()
        )));
    }
    let labels = labels
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    causal_lm_loss_sum_fused_host(hidden, head, &labels)
}

/// [`causal_lm_loss_sum_fused`] with the labels as the host has them ([b, t] row-major): the
/// fused loss picks its rows on the host, so labels that live there need no trip to the GPU
/// and back (which would also wait for the forward to finish before the loss is queued).
pub fn causal_lm_loss_sum_fused_host(
    hidden: &Tensor,
    head: &Tensor,
    labels: &[i64],
) -> Result<(Tensor, usize)> {
    let (b, t, d) = hidden.dims3()?;
    if labels.len() != b * t {
        return Err(Error::InvalidArgument(format!(
            "{} labels do not match hidden {:?}",
            labels.len(),
            hidden.dims()
        )));
    }
    if t < 2 {
        return Ok((Tensor::zeros((), DType::F32, hidden.device())?, 0));
    }
    let n = b * (t - 1);
    let h = hidden.narrow(1, 0, t - 1)?.reshape((n, d))?; // predictions for 1..t
    let shifted: Vec<i64> = labels
        .chunks(t)
        .flat_map(|row| &row[1..])
        .copied()
        .collect();
    let (sum, count) = herd_kernels::fused_linear_cross_entropy(
        &h,
        head,
        &shifted,
        herd_kernels::cross_entropy::CHUNK_BUDGET_BYTES,
    )?;
    Ok((sum, count))
}
