//! `LlamaMLP`: down_proj(silu(gate_proj(x)) * up_proj(x)) (SwiGLU), and the `Linear` it uses.

use candle_core::Tensor;

use crate::error::Result;

/// y = x W^T (+ b), W: [out, in] as in torch.nn.Linear.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// x: [b, t, in] -> [b, t, out]. Flattening to 2-D keeps it one plain matmul (whose backward
    /// candle records) instead of a broadcast matmul that copies W per batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let y = x.reshape((b * t, d_in))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        Ok(y.reshape((b, t, ()))?)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear, // [inter, hidden]
    pub up_proj: Linear,   // [inter, hidden]
    pub down_proj: Linear, // [hidden, inter]
}

impl Mlp {
    /// x: [b, t, hidden] -> [b, t, hidden]. candle-core's `silu` records its backward
    /// (backprop.rs, UnaryOp::Silu), unlike the fused candle-nn ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
