//! Causal attention as one autograd node with FlashAttention's memory profile (not its tiling):
//! the forward runs S = Q·Kᵀ (cuBLAS), the fused causal softmax and O = P·V on detached tensors,
//! so the [b, heads, t, keys] scores and probabilities are freed as soon as O exists instead of
//! being held by the graph until the backward, which recomputes them from Q and K. Grouped KV
//! heads are expanded inside, so the repeated K and V are not held either. The graph keeps Q, K,
//! V and O only.
//!
//! At TinyLlama's shape (32 heads, 4 KV heads, t = 512) that is S and P (2 × 2 bytes × 32 × 512²
//! per sequence and layer in bf16) and the two expanded K/V (2 × 2 × 512 × 2048) less per layer:
//! about 34 MB per sequence and layer. The price is one more Q·Kᵀ and softmax in the backward,
//! a quarter of the attention's FLOPs, which are ~4 % of a step's at t = 512.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

use crate::softmax::{causal_softmax, causal_softmax_backward};

/// q: [b, heads, t, d]; k, v: [b, kv_heads, keys, d] with keys ≥ t (the queries are the last t
/// positions, as with a KV cache) and kv_heads dividing heads (query head h reads KV head
/// h / (heads / kv_heads), as transformers' repeat_kv) -> softmax(scale·Q·Kᵀ, causal)·V as
/// [b, t, heads·d], the layout o_proj reads.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (bk, kv, keys, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() || kv == 0 || heads % kv != 0 || keys < t {
        candle_core::bail!(
            "herd-causal-attention: q {:?}, k {:?}, v {:?}: expected q [b, heads, t, d] and k, v \
             [b, kv_heads, keys, d] with kv_heads dividing heads and keys >= t",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = forward(&q.detach(), &k.detach(), &v.detach(), scale)?;
    q.apply_op3(
        &k,
        &v,
        Attention {
            scale,
            out: Mutex::new(Some(out)),
        },
    )
}

/// P = causal softmax of scale·Q·Kᵀ over the expanded heads: [b, heads, t, keys].
fn probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    causal_softmax(&q.matmul(&k.t()?)?, scale)
}

/// [b, kv, keys, d] -> [b, kv·n, keys, d], each KV head repeated n times consecutively.
fn expand(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, keys, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, keys, d))?
        .reshape((b, kv * n, keys, d))
}

/// The adjoint of [`expand`]: [b, kv·n, keys, d] -> [b, kv, keys, d], summing each group (in f32).
fn group_sum(x: &Tensor, kv: usize) -> Result<Tensor> {
    let (b, heads, keys, d) = x.dims4()?;
    if heads == kv {
        return Ok(x.clone());
    }
    x.to_dtype(DType::F32)?
        .reshape((b, kv, heads / kv, keys, d))?
        .sum(2)?
        .to_dtype(x.dtype())
}

/// The whole forward on detached tensors (no graph, so every temporary is freed on return).
fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let n = heads / k.dim(1)?;
    let p = probs(q, &expand(k, n)?, scale)?;
    p.matmul(&expand(v, n)?)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, heads * d))
}

/// The autograd node: its forward hands over the output computed by [`forward`] (taken, so the
/// op does not hold a second copy), its backward recomputes P.
struct Attention {
    scale: f64,
    out: Mutex<Option<Tensor>>,
}

impl Attention {
    fn take_out(&self) -> Result<Tensor> {
        let taken = self.out.lock().map(|mut o| o.take());
        match taken {
            Ok(Some(out)) => Ok(out),
            _ => candle_core::bail!("herd-causal-attention: the op's forward ran twice"),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "herd-causal-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("herd-causal-attention: output not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("herd-causal-attention: output not on the GPU"),
        }
    }

    /// dO [b, t, heads·d] -> (dQ, dK, dV), with P recomputed:
    /// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = scale·P⊙(dP − rowsum(P⊙dP)), dQ = dS·K, dK = dSᵀ·Q
    /// (dK, dV summed over each KV head's group).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (b, heads, t, d) = q.dims4()?;
        let kv = k.dim(1)?;
        let (k_x, v_x) = (expand(&k, heads / kv)?, expand(&v, heads / kv)?);
        let p = probs(&q, &k_x, self.scale)?;
        let go = grad
            .detach()
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?
            .contiguous()?; // [b, heads, t, d]
        let dv = p.t()?.matmul(&go)?; // [b, heads, keys, d]
        let dp = go.matmul(&v_x.t()?)?; // [b, heads, t, keys]
        let ds = causal_softmax_backward(&p, &dp, self.scale)?;
        drop((p, dp));
        let dq = ds.matmul(&k_x)?;
        let dk = ds.t()?.matmul(&q)?; // [b, heads, keys, d]
        Ok((
            Some(dq),
            Some(group_sum(&dk, kv)?),
            Some(group_sum(&dv, kv)?),
        ))
    }
}

/// The unfused formula from candle primitives with autograd (what herd-model computes without
/// the fused ops): the reference of the tests.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let keys = k.dim(2)?;
    let n = heads / k.dim(1)?;
    let (k, v) = (expand(k, n)?, expand(v, n)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j > i + keys - t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, keys), q.device())?;
    let s = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    let max = s.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
    p.to_dtype(v.dtype())?
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, heads * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    /// Forward and the three gradients of Σ out ⊙ r against the unfused reference.
    fn check(
        device: &candle_core::Device,
        dtype: DType,
        dims: (usize, usize, usize, usize, usize, usize),
        tol: f64,
    ) {
        let (b, heads, kv, t, keys, d) = dims;
        let scale = 1.0 / (d as f64).sqrt();
        let on = |x: Tensor| x.to_device(device).unwrap().to_dtype(dtype).unwrap();
        let q = Var::from_tensor(&on(randn(&[b, heads, t, d], 1))).unwrap();
        let k = Var::from_tensor(&on(randn(&[b, kv, keys, d], 2))).unwrap();
        let v = Var::from_tensor(&on(randn(&[b, kv, keys, d], 3))).unwrap();
        let r = on(randn(&[b, t, heads * d], 4));
        let fused = causal_attention(&q, &k, &v, scale).unwrap();
        let want = reference(&q, &k, &v, scale).unwrap();
        assert_close(&fused, &want, tol);
        let g_fused = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, w) = (g_fused.get(x).unwrap(), g_want.get(x).unwrap());
            assert_eq!(a.dims(), x.dims(), "d{name} shape");
            assert_close(a, w, tol);
        }
    }

    #[test]
    fn cpu_forward_and_gradients_match_unfused_attention() {
        let cpu = candle_core::Device::Cpu;
        check(&cpu, DType::F32, (2, 4, 2, 5, 5, 8), 1e-5); // grouped KV heads
        check(&cpu, DType::F32, (1, 3, 3, 4, 9, 6), 1e-5); // queries are the last 4 of 9 keys
        check(&cpu, DType::F32, (2, 8, 1, 33, 33, 16), 1e-5); // one KV head for all
        check(&cpu, DType::BF16, (2, 4, 2, 17, 17, 8), 1e-2);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = randn(&[1, 4, 5, 8], 1);
        let k = randn(&[1, 3, 5, 8], 2); // 3 does not divide 4
        let err = causal_attention(&q, &k, &k, 0.3).unwrap_err().to_string();
        assert!(err.contains("kv_heads dividing heads"), "{err}");
        let k = randn(&[1, 2, 4, 8], 2); // fewer keys than queries
        assert!(causal_attention(&q, &k, &k, 0.3).is_err());
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() {
        let gpu = gpu();
        for (dtype, tol) in DTYPES {
            check(&gpu, dtype, (2, 8, 2, 40, 40, 32), tol);
            check(&gpu, dtype, (1, 4, 4, 3, 70, 16), tol);
        }
    }
}
