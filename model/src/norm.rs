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
            return Ok(herd_kernels::add_rms_norm(x, None, &self.weight, self.eps)?.1);
        }
        // In f32 and back, as LlamaRMSNorm does (the casts are no-ops on f32 tensors).
        let x32 = x.to_dtype(DType::F32)?;
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        let normed = x32.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }

    /// The residual add fused with this norm: (h = x + r, forward(h)). On CUDA tensors one
    /// herd-kernels launch (CUDA issue #5); elsewhere exactly the unfused ops.
    pub fn add_forward(&self, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
        if herd_kernels::fused(x.device()) {
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
