//! RMSNorm as `LlamaRMSNorm`: y = x * rsqrt(mean(x², last dim) + eps) * weight.
//! Written with primitive ops because candle-nn's fused `rms_norm` records no backward.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor, // [hidden]
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// x: [..., hidden] -> [..., hidden]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if herd_kernels::fused(x.device()) {
            // One kernel, and its only output is the norm (no copy of x).
            return Ok(herd_kernels::add_rms_norm(x, None, &self.weight, self.eps)?.1);
        }
        // In f32 and back, as LlamaRMSNorm does (the casts are no-ops on f32 tensors).
        let x32 = x.to_dtype(DType::F32)?;
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        let normed = x32.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}
