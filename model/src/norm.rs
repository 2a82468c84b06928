//! RMSNorm as `LlamaRMSNorm`: y = x * rsqrt(mean(x², last dim) + eps) * weight.
//! Written with primitive ops because candle-nn's fused `rms_norm` records no backward.

use std::cell::OnceCell;

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::mlp::Linear;

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

/// RMSNorm(x) as the shared input of some linear layers (a decoder layer's q/k/v, or gate/up).
/// On the fused path, when every layer is a plain x Wᵀ, [`Normed::project`] makes them one
/// group of nodes over x (`herd_kernels::norm_linear_group`) that recomputes the norm in the
/// backward, so the graph never holds the normed [b, t, hidden]. Otherwise the norm is computed
/// once, with its graph, and each layer runs on it.
pub struct Normed<'a> {
    norm: &'a RmsNorm,
    x: &'a Tensor,
    value: OnceCell<Tensor>,
}

impl<'a> Normed<'a> {
    pub fn new(norm: &'a RmsNorm, x: &'a Tensor) -> Self {
        Self {
            norm,
            x,
            value: OnceCell::new(),
        }
    }

    /// The un-normed input x [b, t, hidden].
    pub fn input(&self) -> &Tensor {
        self.x
    }

    /// RMSNorm(x), with its graph, computed at the first call.
    pub fn value(&self) -> Result<&Tensor> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let v = self.norm.forward(self.x)?;
        Ok(self.value.get_or_init(|| v))
    }

    /// [layer.forward(RMSNorm(x)) for each layer], every output reaching the loss.
    pub fn project<const N: usize>(&self, layers: [&Linear; N]) -> Result<[Tensor; N]> {
        let plain: Option<Vec<&Tensor>> = layers.iter().map(|l| l.plain_weight()).collect();
        let ys = match plain {
            Some(ws) if herd_kernels::fused(self.x.device()) && self.value.get().is_none() => {
                herd_kernels::norm_linear_group(self.x, &self.norm.weight, self.norm.eps, &ws)?
            }
            _ => {
                let v = self.value()?;
                layers.iter().map(|l| l.forward(v)).collect::<Result<_>>()?
            }
        };
        Ok(ys
            .try_into()
            .unwrap_or_else(|_| unreachable!("one output per layer")))
    }
}
