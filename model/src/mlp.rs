//! `LlamaMLP`: down_proj(silu(gate_proj(x)) * up_proj(x)) (SwiGLU), and the `Linear` it uses.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::LoraDropout;
use crate::norm::Normed;

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
        let y = if !self.weight.is_variable() && x2.track_op() {
            // A frozen weight under a graph that needs d/dx (LoRA): candle's matmul backward
            // would also compute d/dW — a weight-sized GEMM, and a weight-sized gradient kept
            // until the backward ends, per linear layer — for nothing.
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
                let xa = match &l.dropout {
                    Some(d) => d.apply(&x2, b, t)?,
                    None => x2.clone(),
                };
                (y + (xa.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?
            }
            None => y,
        };
        Ok(y.reshape((b, t, ()))?)
    }
}

impl Linear {
    /// residual + forward(x), for an output projection followed by the residual add. On the
    /// fused path with a plain weight one node (`herd_kernels::linear_residual`), so the graph
    /// does not keep forward(x) alive; elsewhere exactly the two ops.
    pub fn forward_residual(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = self.plain_weight() {
            if herd_kernels::fused(x.device()) {
                return Ok(herd_kernels::linear_residual(residual, x, w)?);
            }
        }
        Ok((residual + self.forward(x)?)?)
    }
}

/// x Wᵀ for a frozen W: forward is the backend's own matmul (BLAS / cuBLAS) on the storages,
/// no copy; backward only dx = dy W.
struct FrozenMatmul(Tensor);

impl FrozenMatmul {
    /// (m, n, k) of x [m, k] · Wᵀ [k, n], and Wᵀ as a view.
    fn dims(
        &self,
        l: &candle_core::Layout,
    ) -> candle_core::Result<((usize, usize, usize), Tensor)> {
        let (m, k) = l.shape().dims2()?;
        let wt = self.0.t()?;
        let (kw, n) = wt.dims2()?;
        if kw != k {
            candle_core::bail!("frozen-matmul: x [{m}, {k}] against W [{n}, {kw}]")
        }
        Ok(((m, n, k), wt))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let ((m, n, k), wt) = self.dims(l)?;
        let (w, wl) = wt.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen-matmul: x on the CPU, W elsewhere")
        };
        Ok((s.matmul(w, (1, m, n, k), l, wl)?, (m, n).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let ((m, n, k), wt) = self.dims(l)?;
        let (w, wl) = wt.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen-matmul: x on the GPU, W elsewhere")
        };
        Ok((s.matmul(w, (1, m, n, k), l, wl)?, (m, n).into()))
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
    /// x: RMSNorm'd [b, t, hidden] -> [b, t, hidden]. candle-core's `silu` records its backward
    /// (backprop.rs, UnaryOp::Silu), unlike the fused candle-nn ops.
    pub fn forward(&self, x: &Normed) -> Result<Tensor> {
        if herd_kernels::fused(x.input().device()) {
            let [g, u] = x.project([&self.gate_proj, &self.up_proj])?;
            if let Some(w) = self.down_proj.plain_weight() {
                // SwiGLU and down_proj as one node: the [b, t, inter] activation is recomputed
                // in backward, not held (with LoRA on down_proj its adapter needs it anyway).
                return Ok(herd_kernels::swiglu_linear(&g, &u, w)?);
            }
            return self.down_proj.forward(&herd_kernels::swiglu(&g, &u)?); // CUDA issue #5
        }
        let x = x.value()?;
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }

    /// [`Mlp::forward`] for a caller that starts the backward itself (the layer-by-layer
    /// backward): the output's value, and where its backward starts. On the fused path with a
    /// plain down_proj the output is computed without a graph, so holding the graph does not
    /// hold the [b, t, hidden] output, only what its backward needs (gate, up, W).
    pub(crate) fn forward_deferred(&self, x: &Normed) -> Result<(Tensor, MlpGraph)> {
        if let Some(w) = self.down_proj.plain_weight() {
            if herd_kernels::fused(x.input().device()) {
                let [gate, up] = x.project([&self.gate_proj, &self.up_proj])?;
                let value = herd_kernels::swiglu_linear(&gate.detach(), &up.detach(), &w.detach())?;
                let w = w.clone();
                return Ok((value, MlpGraph::SwigluLinear { gate, up, w }));
            }
        }
        let y = self.forward(x)?;
        Ok((y.detach(), MlpGraph::Output(y)))
    }
}

/// Where the backward of an MLP output starts (see [`Mlp::forward_deferred`]).
pub(crate) enum MlpGraph {
    /// The output itself, with its graph.
    Output(Tensor),
    /// `swiglu_linear(gate, up, w)`'s inputs, gate and up with their graph; the output was
    /// computed without one.
    SwigluLinear { gate: Tensor, up: Tensor, w: Tensor },
}

impl MlpGraph {
    /// The scalar root whose `backward()` gives the graph under h and this MLP output the
    /// gradient g of their sum h + mlp (a decoder layer's output): that of sum((h + mlp) ⊙ g),
    /// computing neither.
    pub(crate) fn root(&self, h: &Tensor, g: &Tensor) -> Result<Tensor> {
        Ok(match self {
            MlpGraph::Output(mlp) => herd_kernels::pullback(h, mlp, g)?,
            MlpGraph::SwigluLinear { gate, up, w } => {
                (herd_kernels::pullback_one(h, g)?
                    + herd_kernels::swiglu_linear_pullback(gate, up, w, g)?)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_frozen_weight_gets_no_gradient_computed() {
        // LoRA's base linear: x tracked, W a plain tensor. Only dx may be computed; candle's
        // own matmul backward would also leave a W-sized gradient (of Wᵀ) in the store.
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let x = Var::from_tensor(
            &(Tensor::arange(0f32, 8.0, &dev).unwrap() * 0.1)
                .unwrap()
                .reshape((1, 2, 4))
                .unwrap(),
        )
        .unwrap();
        let lin = Linear::new(w.clone(), None);
        let y = lin.forward(&x).unwrap();
        let want = x
            .as_tensor()
            .reshape((2, 4))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap();
        assert_eq!(
            y.reshape((2, 3)).unwrap().to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        // L = Σ y²: dL/dy = 2y (sqr's backward touches nothing but y).
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get_ids().count(), 1, "only x's gradient is kept");
        let dx = grads.get(&x).unwrap().reshape((2, 4)).unwrap();
        let want = (want * 2.0).unwrap().matmul(&w).unwrap();
        assert_eq!(dx.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }
}
