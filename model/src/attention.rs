//! `LlamaAttention`: q/k/v projections, rotary embeddings, grouped KV heads (repeat_kv), causal
//! scaled dot-product attention with a max-subtracted softmax, o_proj.
//!
//! The additive mask comes from the caller: causal ([`causal_mask`]) for plain batches, or the
//! block-diagonal causal mask of a packed batch ([`crate::layout::Layout`]).
//!
//! Causal masking of a padded batch equals transformers with an `attention_mask` for RIGHT-padded
//! batches: pads come after every real token, so no real position ever attends to a pad and the
//! logits at real positions are identical (logits at pad positions differ and must be ignored;
//! the loss ignores them through labels = -100). Left padding is not supported.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::mlp::Linear;
use crate::norm::Normed;
use crate::rope::Rope;

/// Keys and values of the positions seen so far, per layer: [b, kv_heads, past, head_dim].
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear, // [heads * head_dim, hidden]
    pub k_proj: Linear, // [kv_heads * head_dim, hidden]
    pub v_proj: Linear, // [kv_heads * head_dim, hidden]
    pub o_proj: Linear, // [hidden, heads * head_dim]
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// x: RMSNorm'd [b, t, hidden] at positions offset..offset+t (offset = tokens already in `cache`);
    /// cos/sin: [t, head_dim] or [b, 1, t, head_dim]; mask: additive, broadcastable to
    /// [b, heads, t, total]. Returns [b, t, hidden], added to `residual` when given (the
    /// decoder layer's residual stream: o_proj and the add as one node on the fused path). With a
    /// cache, the new k/v are appended.
    pub fn forward(
        &self,
        x: &Normed,
        residual: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.input().dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Training on the fused path (plain causal mask, one position table, no cache): RoPE and
        // attention as one node over the projections' own [b, t, n, d] layout, which is all the
        // graph then holds of them.
        let fused = herd_kernels::fused(x.input().device());
        if fused && mask.rank() == 2 && cos.rank() == 2 && cache.is_none() {
            // The projections as one group over the un-normed x: the normed input is not held.
            let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim));
            let [q, k, v] = x.project([&self.q_proj, &self.k_proj, &self.v_proj])?;
            let (q, k, v) = (
                heads(q, self.heads)?,
                heads(k, self.kv_heads)?,
                heads(v, self.kv_heads)?,
            );
            let out = herd_kernels::rope_causal_attention(&q, &k, &v, cos, sin, scale)?;
            return self.output(residual, &out);
        }
        // [b, t, n*d] -> [b, n, t, d]; contiguous because candle's matmul wants plain strides.
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let x = x.value()?;
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?;

        let (k, v) = match cache {
            None => (k, v),
            Some(cache) => {
                let kv = match cache.kv.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                cache.kv = Some(kv.clone());
                kv
            }
        };
        // A 2-D mask is the plain causal one ([t, total]); packed and left-padded batches bring
        // their own [b, 1, t, total] masks, which the fused kernel does not know.
        if herd_kernels::fused(x.device()) && mask.rank() == 2 {
            // With a KV cache (queries are the last t of the keys), RoPE already applied: one
            // autograd node, scale, causal mask and softmax in one kernel between the GEMMs.
            let out = herd_kernels::causal_attention(&q, &k, &v, scale)?; // [b, t, hidden]
            return self.output(residual, &out);
        }
        let k = repeat_kv(&k, self.heads / self.kv_heads)?; // [b, heads, total, d]
        let v = repeat_kv(&v, self.heads / self.kv_heads)?;
        // Softmax in f32 whatever the compute dtype, as transformers does (no-ops in f32).
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?; // [b, heads, t, total]
        let scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?; // [b, heads, t, d]
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, t, ()))?;
        self.output(residual, &out)
    }

    /// o_proj, with the residual added when there is one.
    fn output(&self, residual: Option<&Tensor>, out: &Tensor) -> Result<Tensor> {
        match residual {
            Some(r) => self.o_proj.forward_residual(r, out),
            None => self.o_proj.forward(out),
        }
    }
}

/// [b, kv, T, d] -> [b, kv * n_rep, T, d], each kv head repeated n_rep times consecutively
/// (query head h uses kv head h / n_rep), as transformers' `repeat_kv`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))?)
}

/// [t, total] additive mask for t queries at positions total-t..total: -inf where key > query.
pub fn causal_mask(t: usize, total: usize, device: &Device) -> Result<Tensor> {
    let offset = total - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

/// Softmax over the last dim from primitives (candle-nn's fused softmax has no backward).
/// The row max is subtracted for stability and detached: softmax is invariant to it, so it needs
/// no gradient (and max's backward would otherwise route gradient to ties).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
