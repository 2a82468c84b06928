//! Causal scaled softmax of attention scores (cuda/softmax.cu), between the cuBLAS batched
//! GEMMs S = Q·Kᵀ and O = P·V: scale, mask and softmax in one pass instead of candle's mul, add
//! (of a materialized mask), max, sub, exp, sum, div; and the backward in one more.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu;

/// scores: [.., T, S] (queries are the last T of S positions) -> P = softmax(scale·scores) over
/// keys j <= i + (S − T), masked entries 0. Rows in f32.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

/// The backward of [`causal_softmax`] as a function (for ops that recompute P):
/// dS = scale·P⊙(dP − rowsum(P⊙dP)), untracked.
pub fn causal_softmax_backward(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    p.contiguous()?.apply_op2_no_bwd(
        &dp.contiguous()?,
        &CausalSoftmaxBwd {
            scale: scale as f32,
        },
    )
}

struct CausalSoftmax {
    scale: f32,
}
struct CausalSoftmaxBwd {
    scale: f32,
}

fn dims_ts(l: &Layout) -> Result<(usize, usize)> {
    let d = l.dims();
    if d.len() < 2 || d[d.len() - 2] > d[d.len() - 1] {
        candle_core::bail!("herd-causal-softmax: scores must be [.., T, S] with T <= S, got {d:?}")
    }
    Ok((d[d.len() - 2], d[d.len() - 1]))
}

fn forward(s: &[f32], t: usize, keys: usize, scale: f32) -> Vec<f32> {
    let mut p = vec![0f32; s.len()];
    for (row, (src, dst)) in s.chunks(keys).zip(p.chunks_mut(keys)).enumerate() {
        let last = row % t + (keys - t);
        let m = src[..=last]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(scale * x));
        let z: f32 = src[..=last].iter().map(|&x| (scale * x - m).exp()).sum();
        for j in 0..=last {
            dst[j] = (scale * src[j] - m).exp() / z;
        }
    }
    p
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "herd-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, keys) = dims_ts(l)?;
        let p = forward(&cpu::f32s(s, l, self.name())?, t, keys, self.scale);
        Ok((cpu::store(p, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, herd_causal_softmax_fwd, rows_cfg, view};
        let (t, keys) = dims_ts(l)?;
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let (t_i, s_i) = (t as i32, keys as i32);
        macro_rules! go {
            ($ty:ty) => {{
                let x = view::<$ty>(s, l, self.name())?;
                let mut p = alloc_out::<$ty>(&dev, n)?;
                let grid = rows_cfg(n / keys, keys);
                // SAFETY: x and p hold n elements, rows of `keys`.
                unsafe {
                    herd_causal_softmax_fwd::<$ty>(&dev, grid, &x, &mut p, t_i, s_i, self.scale)
                }?;
                candle_core::CudaStorage::wrap_cuda_slice(p, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-causal-softmax: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ds =
            res.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?;
        Ok(Some(ds))
    }
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "herd-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, keys) = dims_ts(l1)?;
        let p = cpu::f32s(s1, l1, self.name())?;
        let dp = cpu::f32s(s2, l2, self.name())?;
        let mut ds = vec![0f32; p.len()];
        for ((p, dp), ds) in p.chunks(keys).zip(dp.chunks(keys)).zip(ds.chunks_mut(keys)) {
            let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
            for j in 0..keys {
                ds[j] = self.scale * p[j] * (dp[j] - dot);
            }
        }
        Ok((cpu::store(ds, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, herd_causal_softmax_bwd, rows_cfg, view};
        let (_, keys) = dims_ts(l1)?;
        let n = l1.shape().elem_count();
        let dev = s1.device().clone();
        let s_i = keys as i32;
        macro_rules! go {
            ($ty:ty) => {{
                let p = view::<$ty>(s1, l1, self.name())?;
                let dp = view::<$ty>(s2, l2, self.name())?;
                let mut ds = alloc_out::<$ty>(&dev, n)?;
                let grid = rows_cfg(n / keys, keys);
                // SAFETY: p, dp and ds hold n elements, rows of `keys`.
                unsafe {
                    herd_causal_softmax_bwd::<$ty>(&dev, grid, &p, &dp, &mut ds, s_i, self.scale)
                }?;
                candle_core::CudaStorage::wrap_cuda_slice(ds, dev)
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-causal-softmax-bwd: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The unfused path of herd-model's attention: scale, additive −inf mask, max-subtracted
/// softmax. The tests' reference.
pub fn reference(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (t, keys) = (
        scores.dim(candle_core::D::Minus2)?,
        scores.dim(candle_core::D::Minus1)?,
    );
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
    let mask = Tensor::from_vec(mask, (t, keys), scores.device())?.to_dtype(scores.dtype())?;
    let x = (scores * scale)?.broadcast_add(&mask)?;
    let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    #[test]
    fn cpu_forward_and_gradient_match_the_masked_softmax() -> Result<()> {
        // T < S too: a query block at the end of a longer key range (generation with a cache).
        for (t, keys) in [(6, 6), (3, 7)] {
            let s = Var::from_tensor(&randn(&[2, 3, t, keys], 31))?;
            let up = randn(&[2, 3, t, keys], 32);
            let p = causal_softmax(&s, 0.125)?;
            let p0 = reference(&s, 0.125)?;
            assert_close(&p, &p0, 1e-6);
            let g = (p * &up)?.sum_all()?.backward()?;
            let g0 = (p0 * &up)?.sum_all()?.backward()?;
            assert_close(g.get(&s).unwrap(), g0.get(&s).unwrap(), 1e-5);
        }
        Ok(())
    }

    /// cuda/softmax.cu on the host emulator against the host reference: square and T < S rows
    /// narrower than the block, and rows wider than 1024 keys (strided loops).
    fn emulated_kernels_match_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        for (bh, t, keys) in [(3, 6, 6), (2, 3, 7), (1, 3, 1500)] {
            let s = randn(&[bh, t, keys], 45).to_dtype(T::DTYPE)?;
            let dp = randn(&[bh, t, keys], 46).to_dtype(T::DTYPE)?;
            let p = causal_softmax(&s, 0.125)?;
            let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxBwd { scale: 0.125 })?;

            let (ss, ps, dps) = (host::<T>(&s), host::<T>(&p), host::<T>(&dp));
            let n = bh * t * keys;
            let (mut p_out, mut ds_out) = (poisoned::<T>(n), poisoned::<T>(n));
            let (po, dso) = (p_out.as_mut_ptr(), ds_out.as_mut_ptr());
            let (t_i, keys_i) = (t as i32, keys as i32);
            let grid = crate::launch::rows(bh * t, keys);
            emulate(grid, || unsafe {
                (k.causal_softmax_fwd)(ss.as_ptr(), po, t_i, keys_i, 0.125)
            });
            emulate(grid, || unsafe {
                (k.causal_softmax_bwd)(ps.as_ptr(), dps.as_ptr(), dso, keys_i, 0.125)
            });
            assert_close(&tensor(p_out, &[bh, t, keys]), &p, T::TOL);
            assert_close(&tensor(ds_out, &[bh, t, keys]), &ds, T::TOL);
        }
        Ok(())
    }

    #[test]
    fn emulated_cuda_c_matches_the_host_in_f32_and_bf16() -> Result<()> {
        emulated_kernels_match_the_host::<f32>()?;
        emulated_kernels_match_the_host::<half::bf16>()
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() -> Result<()> {
        for (dtype, tol) in DTYPES {
            let s = randn(&[2, 4, 129, 129], 33).to_dtype(dtype)?;
            let up = randn(&[2, 4, 129, 129], 34).to_dtype(dtype)?;
            let gs = Var::from_tensor(&s.to_device(&gpu())?)?;
            let cs = Var::from_tensor(&s)?;
            let gp = causal_softmax(&gs, 0.088)?;
            let cp = causal_softmax(&cs, 0.088)?;
            assert_close(&gp, &cp, tol);
            let gg = (gp * up.to_device(&gpu())?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            let cg = (cp * &up)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            assert_close(gg.get(&gs).unwrap(), cg.get(&cs).unwrap(), tol);
        }
        Ok(())
    }
}
