//! `LlamaMLP`: down_proj(silu(gate_proj(x)) * up_proj(x)) (SwiGLU), and the `Linear` it uses.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::LoraDropout;

/// y = x W^T (+ b), W: [out, in] as in torch.nn.Linear; with a LoRA adapter (PEFT's
/// `lora.Linear`) y += (dropout(x) A^T) B^T * scale.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraPath>,
}

/// The adapter branch of a LoRA `Linear`.
#[derive(Debug, Clone)]
pub struct LoraPath {
    pub a: Tensor, // [r, in]
    pub b: Tensor, // [out, r]
    /// alpha / r (alpha / sqrt(r) with rsLoRA).
    pub scale: f64,
    /// None when lora_dropout is 0 or in inference nets.
    pub dropout: Option<LoraDropout>,
}

impl Linear {
    /// W when y = x Wᵀ exactly (no bias, no LoRA): what a fused lm_head loss may use.
    pub fn plain_weight(&self) -> Option<&Tensor> {
        (self.bias.is_none() && self.lora.is_none()).then_some(&self.weight)
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn with_lora(mut self, path: LoraPath) -> Self {
        self.lora = Some(path);
        self
    }

    /// x: [b, t, in] -> [b, t, out]. Flattening to 2-D keeps it one plain matmul (whose backward
    /// candle records) instead of a broadcast matmul that copies W per batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let x2 = x.reshape((b * t, d_in))?;
        let y = if !self.weight.is_variable() && x2.track_op() && x2.device().is_cpu() {
            // A frozen weight under a graph that needs d/dx (LoRA): candle's matmul backward
            // would also compute d/dW, a weight-sized matmul and buffer per layer for nothing.
            // (Host op; on a GPU the plain matmul pays that extra product.)
            x2.apply_op1(FrozenMatmul(self.weight.clone()))?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                let mask = match &l.dropout {
                    Some(d) => match d.mask(b, t, d_in, x.device())? {
                        Some(m) => Some(m.to_dtype(x.dtype())?),
                        None => None,
                    },
                    None => None,
                };
                let xa = match mask {
                    Some(m) => (&x2 * m)?,
                    None => x2.clone(),
                };
                (y + (xa.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?
            }
            None => y,
        };
        Ok(y.reshape((b, t, ()))?)
    }
}

/// x W^T for a frozen W: forward as the plain matmul, backward only dx = dy W.
struct FrozenMatmul(Tensor);

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        use candle_core::CpuStorage;
        let cpu = &candle_core::Device::Cpu;
        let x = match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), cpu)?,
            CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], l.shape(), cpu)?,
            _ => return Err(candle_core::Error::Msg("frozen-matmul: f32 or bf16".into())),
        };
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        let y = y.flatten_all()?;
        let out = match s {
            CpuStorage::BF16(_) => CpuStorage::BF16(y.to_vec1()?),
            _ => CpuStorage::F32(y.to_vec1()?),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
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
        if herd_kernels::fused(x.device()) {
            let (g, u) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
            return self.down_proj.forward(&herd_kernels::swiglu(&g, &u)?); // CUDA issue #5
        }
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
