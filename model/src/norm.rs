//! RMSNorm as `LlamaRMSNorm`: y = x * rsqrt(mean(x², last dim) + eps) * weight.
//! Written with primitive ops because candle-nn's fused `rms_norm` records no backward.

use candle_core::{Tensor, D};

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
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(&self.weight)?)
    }
}
