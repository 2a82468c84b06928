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
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(herd_kernels::add_rms_norm(x, None, &self.weight, self.eps)?.1);
        }
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(&self.weight)?)
    }

    /// The residual add fused with this norm: (h = x + r, forward(h)). On CUDA tensors one
    /// herd-kernels launch (CUDA issue #5); elsewhere exactly the unfused ops.
    pub fn add_forward(&self, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(herd_kernels::add_rms_norm(
                x,
                Some(r),
                &self.weight,
                self.eps,
            )?);
        }
        let h = (x + r)?;
        let y = self.forward(&h)?;
        Ok((h, y))
    }
}
