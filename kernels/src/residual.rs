//! A linear layer with the residual add folded in: h = x + a·Wᵀ as one autograd node. Composed
//! of a matmul and an add, the graph keeps the projection's output a·Wᵀ alive until the
//! backward, because the add's node holds both its inputs, although its backward needs neither.
//! As one node it holds x, a and W, which the graph keeps anyway (x is the residual stream, a the
//! input the projection's dW needs), so a·Wᵀ is only a transient of the forward. The arithmetic
//! is the composition's: the same GEMM, then the add in the storage dtype, bit for bit.
//! LlamaDecoderLayer's o_proj: x the residual stream, a the attention output.

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// x: [.., out] the residual; a: [.., in]; w: [out, in] (torch.nn.Linear's, no bias) ->
/// x + a·Wᵀ, [.., out]. dW is computed only when W is tracked (not for a frozen base).
pub fn linear_residual(x: &Tensor, a: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let lead = |t: &Tensor| t.dims()[..t.rank().saturating_sub(1)].to_vec();
    if a.rank() < 2
        || a.dims().last() != Some(&k)
        || x.dims().last() != Some(&n)
        || lead(x) != lead(a)
        || x.dtype() != a.dtype()
        || a.dtype() != w.dtype()
    {
        candle_core::bail!(
            "herd-linear-residual: x {:?} {:?}, a {:?} {:?}, w {:?} {:?}: expected x [.., out], a [.., in], w [out, in], one dtype",
            x.dims(),
            x.dtype(),
            a.dims(),
            a.dtype(),
            w.dims(),
            w.dtype()
        )
    }
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &w.contiguous()?, LinearResidual)
}

struct LinearResidual;

impl LinearResidual {
    /// (m, n, k): m rows of a [m, k] times Wᵀ [k, n]; Wᵀ's layout.
    fn dims(la: &Layout, lw: &Layout) -> Result<((usize, usize, usize), Layout)> {
        let k = *la.dims().last().unwrap_or(&1);
        let m = la.shape().elem_count() / k.max(1);
        Ok(((m, lw.dims()[0], k), lw.transpose(0, 1)?))
    }

    /// Either backend: r = a·Wᵀ (a transient), then x + r.
    fn fwd<S: BackendStorage>(
        x: &S,
        lx: &Layout,
        a: &S,
        la: &Layout,
        w: &S,
        lw: &Layout,
    ) -> Result<(S, Shape)> {
        let ((m, n, k), wt) = Self::dims(la, lw)?;
        let a2 = Layout::contiguous_with_offset((m, k), la.start_offset());
        let r = a.matmul(w, (1, m, n, k), &a2, &wt)?;
        let h = x.binary_impl::<Add>(&r, lx, &Layout::contiguous(lx.shape()))?;
        Ok((h, lx.shape().clone()))
    }
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "herd-linear-residual"
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
        Self::fwd(s1, l1, s2, l2, s3, l3)
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
        Self::fwd(s1, l1, s2, l2, s3, l3)
    }

    /// dh [.., out]: dx = dh; da = dh·W; dW = dhᵀ·a.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = a.elem_count() / k;
        let dh2 = dh.detach().reshape((m, n))?;
        let da = dh2.matmul(&w.detach())?.reshape(a.shape())?;
        let dw = if w.track_op() {
            Some(dh2.t()?.matmul(&a.detach().reshape((m, k))?)?)
        } else {
            None
        };
        let dx = x.track_op().then(|| dh.detach());
        Ok((dx, Some(da), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::{DType, Var};

    /// Forward bit for bit equal to x + a·Wᵀ composed of candle ops; gradients equal the
    /// composition's; a frozen W gets none.
    #[test]
    fn cpu_equals_the_composition_and_its_gradients() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&randn(&[2, 3, 6], 1).to_dtype(dtype)?)?;
            let a = Var::from_tensor(&randn(&[2, 3, 4], 2).to_dtype(dtype)?)?;
            let w = Var::from_tensor(&randn(&[6, 4], 3).to_dtype(dtype)?)?;
            let h = linear_residual(&x, &a, &w)?;
            let h0 = (x.as_tensor() + a.reshape((6, 4))?.matmul(&w.t()?)?.reshape((2, 3, 6))?)?;
            let f32s = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(f32s(&h), f32s(&h0), "{dtype:?}: forward");
            let up = randn(&[2, 3, 6], 4).to_dtype(dtype)?;
            let loss = |h: &Tensor| (h * &up)?.to_dtype(DType::F32)?.sum_all();
            let (g, g0) = (loss(&h)?.backward()?, loss(&h0)?.backward()?);
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            for v in [&x, &a, &w] {
                assert_close(g.get(v).unwrap(), g0.get(v).unwrap(), tol);
            }
        }
        let x = Var::from_tensor(&randn(&[5, 6], 5))?;
        let a = Var::from_tensor(&randn(&[5, 4], 6))?;
        let frozen = randn(&[6, 4], 7);
        let g = linear_residual(&x, &a, &frozen)?.sum_all()?.backward()?;
        assert!(g.get(&frozen).is_none(), "a frozen weight got a gradient");
        assert!(g.get(&a).is_some() && g.get(&x).is_some());
        let err = linear_residual(&x, &a, &randn(&[6, 3], 8)).unwrap_err();
        assert!(err.to_string().contains("expected x [.., out]"), "{err}");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() -> Result<()> {
        for (dtype, tol) in DTYPES {
            let host = |t: Tensor| t.to_dtype(dtype).unwrap();
            let (x, a, w) = (
                host(randn(&[2, 9, 512], 1)),
                host(randn(&[2, 9, 256], 2)),
                host(randn(&[512, 256], 3)),
            );
            let vars = |d: &candle_core::Device| -> Result<[Var; 3]> {
                Ok([
                    Var::from_tensor(&x.to_device(d)?)?,
                    Var::from_tensor(&a.to_device(d)?)?,
                    Var::from_tensor(&w.to_device(d)?)?,
                ])
            };
            let (c, g) = (vars(&candle_core::Device::Cpu)?, vars(&gpu())?);
            let up = host(randn(&[2, 9, 512], 4));
            let run = |v: &[Var; 3]| -> Result<(Tensor, candle_core::backprop::GradStore)> {
                let h = linear_residual(&v[0], &v[1], &v[2])?;
                let grads = (&h * up.to_device(h.device())?)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .backward()?;
                Ok((h, grads))
            };
            let ((ch, cg), (gh, gg)) = (run(&c)?, run(&g)?);
            assert_close(&gh, &ch, tol);
            for (cv, gv) in c.iter().zip(&g) {
                assert_close(gg.get(gv).unwrap(), cg.get(cv).unwrap(), tol);
            }
        }
        Ok(())
    }
}
