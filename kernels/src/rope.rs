//! Rotary position embedding (cuda/rope.cu), transformers' `apply_rotary_pos_emb`:
//! y = x·cos + rotate_half(x)·sin. Because cos/sin repeat their two halves (emb = cat(freqs,
//! freqs)), the transpose of the map is the map with −sin, so the backward reuses the forward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

/// x: [.., T, Dh] (e.g. [b, heads, T, Dh]); cos, sin: [T, Dh] -> [.., T, Dh] in x's dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(DType::F32)?.contiguous()?;
    let sin = sin.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?.apply_op3(&cos, &sin, Rope { sign: 1.0 })
}

/// The transpose of [`rope`] (rotation by −θ, the backward's map), untracked: for ops that
/// rotate inside and hand autograd their own gradients.
pub fn rope_transpose(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(DType::F32)?.contiguous()?;
    let sin = sin.to_dtype(DType::F32)?.contiguous()?;
    x.contiguous()?
        .apply_op3_no_bwd(&cos, &sin, &Rope { sign: -1.0 })
}

struct Rope {
    sign: f32,
}

fn forward(x: &[f32], cos: &[f32], sin: &[f32], t: usize, dh: usize, sign: f32) -> Vec<f32> {
    let half = dh / 2;
    (0..x.len())
        .map(|idx| {
            let i = idx % dh;
            let p = (idx / dh) % t;
            let rot = if i < half {
                -x[idx + half]
            } else {
                x[idx - half]
            };
            x[idx] * cos[p * dh + i] + sign * rot * sin[p * dh + i]
        })
        .collect()
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "herd-rope"
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
        let (t, dh) = l2.shape().dims2()?;
        let x = cpu::f32s(s1, l1, self.name())?;
        let cos = cpu::f32s(s2, l2, self.name())?;
        let sin = cpu::f32s(s3, l3, self.name())?;
        let y = forward(&x, &cos, &sin, t, dh, self.sign);
        Ok((cpu::store(y, s1.dtype())?, l1.shape().clone()))
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
        use crate::cuda::{alloc_out, elems_cfg, herd_rope, view};
        let (t, dh) = l2.shape().dims2()?;
        let n = l1.shape().elem_count();
        let dev = s1.device().clone();
        let cos = view::<f32>(s2, l2, self.name())?;
        let sin = view::<f32>(s3, l3, self.name())?;
        let (t_i, dh_i) = (t as i32, dh as i32);
        macro_rules! go {
            ($ty:ty) => {{
                let x = view::<$ty>(s1, l1, self.name())?;
                let mut y = alloc_out::<$ty>(&dev, n)?;
                // SAFETY: x and y hold n elements, cos and sin t × dh.
                unsafe {
                    herd_rope::<$ty>(
                        &dev,
                        elems_cfg(n),
                        &x,
                        &cos,
                        &sin,
                        &mut y,
                        n,
                        t_i,
                        dh_i,
                        self.sign,
                    )
                }?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-rope: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { sign: -self.sign })?;
        Ok((Some(dx), None, None))
    }
}

/// The unfused formula (herd-model's `Rope::apply`), the tests' reference.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x1 = x.narrow(candle_core::D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(candle_core::D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], candle_core::D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    /// cos/sin with repeated halves, as `herd_model::rope::Rope::cos_sin` makes them.
    pub(crate) fn cos_sin(t: usize, dh: usize) -> (Tensor, Tensor) {
        let (mut c, mut s) = (vec![], vec![]);
        for p in 0..t {
            for _ in 0..2 {
                for i in 0..dh / 2 {
                    let a = p as f32 / 10000f32.powf(2.0 * i as f32 / dh as f32);
                    c.push(a.cos());
                    s.push(a.sin());
                }
            }
        }
        let dev = candle_core::Device::Cpu;
        (
            Tensor::from_vec(c, (t, dh), &dev).unwrap(),
            Tensor::from_vec(s, (t, dh), &dev).unwrap(),
        )
    }

    #[test]
    fn cpu_forward_and_gradient_match_the_unfused_formula() -> Result<()> {
        let (cos, sin) = cos_sin(5, 16);
        let x = Var::from_tensor(&randn(&[2, 3, 5, 16], 11))?;
        let up = randn(&[2, 3, 5, 16], 12);
        let y = rope(&x, &cos, &sin)?;
        let y0 = reference(&x, &cos, &sin)?;
        assert_close(&y, &y0, 1e-6);
        let g = (y * &up)?.sum_all()?.backward()?;
        let g0 = (y0 * &up)?.sum_all()?.backward()?;
        assert_close(g.get(&x).unwrap(), g0.get(&x).unwrap(), 1e-5);
        Ok(())
    }

    /// cuda/rope.cu on the host emulator against the host reference, forward (+sin) and
    /// backward (−sin), over several blocks with a partial last one.
    fn emulated_kernel_matches_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        let (bh, t, dh) = (4, 9, 64);
        let (cos, sin) = cos_sin(t, dh);
        let x = randn(&[bh, t, dh], 47).to_dtype(T::DTYPE)?;
        let (xs, cs, ss) = (host::<T>(&x), host::<f32>(&cos), host::<f32>(&sin));
        let n = bh * t * dh;
        for sign in [1f32, -1.0] {
            let want = x.apply_op3_no_bwd(&cos, &sin, &Rope { sign })?;
            let mut y = poisoned::<T>(n);
            let yo = y.as_mut_ptr();
            emulate(crate::launch::elems(n), || unsafe {
                (k.rope)(
                    xs.as_ptr(),
                    cs.as_ptr(),
                    ss.as_ptr(),
                    yo,
                    n,
                    t as i32,
                    dh as i32,
                    sign,
                )
            });
            assert_close(&tensor(y, &[bh, t, dh]), &want, T::TOL);
        }
        Ok(())
    }

    #[test]
    fn emulated_cuda_c_matches_the_host_in_f32_and_bf16() -> Result<()> {
        emulated_kernel_matches_the_host::<f32>()?;
        emulated_kernel_matches_the_host::<half::bf16>()
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() -> Result<()> {
        let (cos, sin) = cos_sin(33, 128);
        for (dtype, tol) in DTYPES {
            let x = randn(&[2, 8, 33, 128], 13).to_dtype(dtype)?;
            let up = randn(&[2, 8, 33, 128], 14).to_dtype(dtype)?;
            let gx = Var::from_tensor(&x.to_device(&gpu())?)?;
            let cx = Var::from_tensor(&x)?;
            let gy = rope(&gx, &cos.to_device(&gpu())?, &sin.to_device(&gpu())?)?;
            let cy = rope(&cx, &cos, &sin)?;
            assert_close(&gy, &cy, tol);
            let gg = (gy * up.to_device(&gpu())?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            let cg = (cy * &up)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            assert_close(gg.get(&gx).unwrap(), cg.get(&cx).unwrap(), tol);
        }
        Ok(())
    }
}
