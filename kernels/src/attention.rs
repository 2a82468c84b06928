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

use crate::rope::{rope, rope_transpose};
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

/// [`causal_attention`] with the rotary embedding inside: q [b, t, heads, d] and k, v [b, t,
/// kv_heads, d] as the projections leave them (a free reshape of their output), cos, sin [t, d]
/// -> [b, t, heads·d]. The graph holds these three only: not the transposed copies, not the
/// rotated Q and K, which the backward recomputes (elementwise) before undoing the rotation on
/// dQ and dK. Queries and keys are the same t positions (no KV cache).
pub fn rope_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, heads, d) = q.dims4()?;
    let (bk, tk, kv, dk) = k.dims4()?;
    if bk != b || tk != t || dk != d || v.dims() != k.dims() || kv == 0 || heads % kv != 0 {
        candle_core::bail!(
            "herd-rope-attention: q {:?}, k {:?}, v {:?}: expected q [b, t, heads, d] and k, v \
             [b, t, kv_heads, d] with kv_heads dividing heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if cos.dims() != [t, d] || sin.dims() != [t, d] {
        candle_core::bail!(
            "herd-rope-attention: cos {:?} / sin {:?} for t = {t}, d = {d}",
            cos.dims(),
            sin.dims()
        )
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
    let (qr, kr, vt) = rotated(&q.detach(), &k.detach(), &v.detach(), &cos, &sin)?;
    let out = forward(&qr, &kr, &vt, scale)?;
    drop((qr, kr, vt));
    q.apply_op3(
        &k,
        &v,
        RopeAttention {
            attention: Attention {
                scale,
                out: Mutex::new(Some(out)),
            },
            cos,
            sin,
        },
    )
}

/// [b, t, n, d] projections -> rotated Q, K and V, each [b, n, t, d] contiguous (untracked).
fn rotated(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let heads_first = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    Ok((
        rope(&heads_first(q)?, cos, sin)?,
        rope(&heads_first(k)?, cos, sin)?,
        heads_first(v)?,
    ))
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.grads(&q.detach(), &k.detach(), &v.detach(), grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Attention {
    /// dO [b, t, heads·d] -> (dQ, dK, dV) for q [b, heads, t, d], k, v [b, kv, keys, d] (all
    /// detached), with P recomputed: dV = Pᵀ·dO, dP = dO·Vᵀ, dS = scale·P⊙(dP − rowsum(P⊙dP)),
    /// dQ = dS·K, dK = dSᵀ·Q (dK, dV summed over each KV head's group).
    fn grads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, heads, t, d) = q.dims4()?;
        let kv = k.dim(1)?;
        let (k_x, v_x) = (expand(k, heads / kv)?, expand(v, heads / kv)?);
        let p = probs(q, &k_x, self.scale)?;
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
        let dk = ds.t()?.matmul(q)?; // [b, heads, keys, d]
        Ok((dq, group_sum(&dk, kv)?, group_sum(&dv, kv)?))
    }
}

/// [`Attention`] over the projections, rotating inside (see [`rope_causal_attention`]).
struct RopeAttention {
    attention: Attention,
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp3 for RopeAttention {
    fn name(&self) -> &'static str {
        "herd-rope-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.attention.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.attention.cuda_fwd(s1, l1, s2, l2, s3, l3)
    }

    /// Rotate again, take the attention's gradients, rotate dQ and dK back (the transpose of
    /// RoPE) and return all three in the projections' [b, t, n, d] layout.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qr, kr, vt) = rotated(&q.detach(), &k.detach(), &v.detach(), &self.cos, &self.sin)?;
        let (dqr, dkr, dv) = self.attention.grads(&qr, &kr, &vt, grad)?;
        drop((qr, kr, vt));
        let back = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let dq = back(&rope_transpose(&dqr, &self.cos, &self.sin)?)?;
        let dk = back(&rope_transpose(&dkr, &self.cos, &self.sin)?)?;
        Ok((Some(dq), Some(dk), Some(back(&dv)?)))
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

    /// cos, sin [t, d] of positions 0..t (emb = cat(freqs, freqs), as the model builds them).
    fn tables(t: usize, d: usize) -> (Tensor, Tensor) {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..t {
            for i in 0..d {
                let f = 10000f32.powf(-2.0 * (i % (d / 2)) as f32 / d as f32);
                cos.push((p as f32 * f).cos());
                sin.push((p as f32 * f).sin());
            }
        }
        let dev = &candle_core::Device::Cpu;
        (
            Tensor::from_vec(cos, (t, d), dev).unwrap(),
            Tensor::from_vec(sin, (t, d), dev).unwrap(),
        )
    }

    #[test]
    fn rope_inside_matches_rope_then_attention() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let (b, t, heads, kv, d) = (2, 11, 4, 2, 8);
            let on = |x: Tensor| x.to_dtype(dtype).unwrap();
            let q = Var::from_tensor(&on(randn(&[b, t, heads, d], 11))).unwrap();
            let k = Var::from_tensor(&on(randn(&[b, t, kv, d], 12))).unwrap();
            let v = Var::from_tensor(&on(randn(&[b, t, kv, d], 13))).unwrap();
            let r = on(randn(&[b, t, heads * d], 14));
            let (cos, sin) = tables(t, d);
            let scale = 0.35;
            let fused = rope_causal_attention(&q, &k, &v, &cos, &sin, scale).unwrap();
            let heads_first = |x: &Tensor| x.transpose(1, 2).unwrap();
            let (c, s) = (on(cos.clone()), on(sin.clone())); // the unfused way casts the tables
            let want = reference(
                &crate::rope::reference(&heads_first(&q), &c, &s).unwrap(),
                &crate::rope::reference(&heads_first(&k), &c, &s).unwrap(),
                &heads_first(&v),
                scale,
            )
            .unwrap();
            assert_close(&fused, &want, tol);
            let loss = |y: &Tensor| {
                y.mul(&r)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let (ga, gb) = (
                loss(&fused).backward().unwrap(),
                loss(&want).backward().unwrap(),
            );
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, w) = (ga.get(x).unwrap(), gb.get(x).unwrap());
                assert_eq!(a.dims(), x.dims(), "d{name} shape");
                assert_close(a, w, tol);
            }
        }
        let (cos, sin) = tables(5, 8);
        let q = randn(&[1, 6, 4, 8], 1);
        let err = rope_causal_attention(&q, &q, &q, &cos, &sin, 0.3).unwrap_err();
        assert!(err.to_string().contains("for t = 6"), "{err}");
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
