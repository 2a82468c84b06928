//! SwiGLU (cuda/swiglu.cu): y = silu(g)·u in one pass, the backward (dg | du) in one more,
//! instead of candle's silu, mul and their four backward ops. [`swiglu_linear`] also takes in
//! the down projection, so the activation is recomputed instead of stored.

use candle_core::backend::BackendStorage;
#[cfg(any(test, feature = "cuda"))]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu;

/// gate, up: [..] (same shape) -> silu(gate)·up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// silu(gate)·up·Wᵀ with the product recomputed in the backward instead of stored: gate, up
/// [.., inter]; w [out, inter] (LlamaMLP's down_proj, no bias) -> [.., out]. The graph holds
/// gate, up and W, not the [.., inter] activation the plain composition keeps for dW. The
/// forward is the same SwiGLU kernel and the same matmul; the backward redoes the (elementwise)
/// SwiGLU. dW is computed only when W is tracked (not for a frozen base under LoRA).
pub fn swiglu_linear(gate: &Tensor, up: &Tensor, w: &Tensor) -> Result<Tensor> {
    let inter = gate.dims().last().copied().unwrap_or(0);
    let (_, k) = w.dims2()?;
    if gate.dims() != up.dims() || k != inter || gate.rank() < 2 {
        candle_core::bail!(
            "herd-swiglu-linear: gate {:?}, up {:?}, w {:?}: expected gate = up = [.., inter], w [out, inter]",
            gate.dims(),
            up.dims(),
            w.dims()
        )
    }
    gate.contiguous()?
        .apply_op3(&up.contiguous()?, &w.contiguous()?, SwigluLinear)
}

/// The backward of `swiglu_linear(gate, up, w)` for the output gradient g, as a scalar root:
/// for a caller that ran `swiglu_linear` on detached inputs (no graph) and so never held the
/// [.., out] output, only gate, up and W. `backward()` of the root gives gate, up (and W when
/// tracked) exactly the gradients `swiglu_linear`'s own node would for dy = g.
pub fn swiglu_linear_pullback(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let mut out = gate.dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    if gate.dims() != up.dims() || gate.dims().last() != Some(&k) || g.dims() != out {
        candle_core::bail!(
            "herd-swiglu-linear: gate {:?}, up {:?}, w {:?}, g {:?}: expected gate = up = [.., inter], w [out, inter], g [.., out]",
            gate.dims(),
            up.dims(),
            w.dims(),
            g.dims()
        )
    }
    let root = crate::pullback::Deferred {
        op: SwigluLinear,
        g: g.detach(),
    };
    gate.contiguous()?
        .apply_op3(&up.contiguous()?, &w.contiguous()?, root)
}

struct Swiglu;
struct SwigluBwd;
struct SwigluLinear;

impl SwigluLinear {
    /// (m, n, k): m rows of the [m, k] activation times Wᵀ [k, n]; the output shape; Wᵀ's layout.
    fn dims(l1: &Layout, l3: &Layout) -> Result<((usize, usize, usize), Shape, Layout)> {
        let k = *l1.dims().last().unwrap_or(&1);
        let m = l1.shape().elem_count() / k.max(1);
        let n = l3.dims()[0];
        let mut out = l1.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok(((m, n, k), Shape::from(out), l3.transpose(0, 1)?))
    }
}

impl CustomOp3 for SwigluLinear {
    fn name(&self) -> &'static str {
        "herd-swiglu-linear"
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
        let ((m, n, k), shape, wt) = Self::dims(l1, l3)?;
        let (act, _) = Swiglu.cpu_fwd(s1, l1, s2, l2)?;
        let out = act.matmul(s3, (1, m, n, k), &Layout::contiguous((m, k)), &wt)?;
        Ok((out, shape))
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
        let ((m, n, k), shape, wt) = Self::dims(l1, l3)?;
        let (act, _) = Swiglu.cuda_fwd(s1, l1, s2, l2)?;
        let out = act.matmul(s3, (1, m, n, k), &Layout::contiguous((m, k)), &wt)?;
        Ok((out, shape))
    }

    /// dy [.., out]: act = silu(g)·u again; dact = dy·W; (dg, du) by the SwiGLU backward;
    /// dW = dyᵀ·act.
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, u, wd) = (g.detach(), u.detach(), w.detach());
        let (n, k) = wd.dims2()?;
        let m = g.elem_count() / k;
        let dy = dy.detach().reshape((m, n))?;
        let dact = dy.matmul(&wd)?.reshape(g.shape())?;
        let dgu = g.apply_op3_no_bwd(&u, &dact, &SwigluBwd)?;
        drop(dact);
        let dw = if w.track_op() {
            let act = g.apply_op2_no_bwd(&u, &Swiglu)?.reshape((m, k))?;
            Some(dy.t()?.matmul(&act)?)
        } else {
            None
        };
        Ok((Some(dgu.get(0)?), Some(dgu.get(1)?), dw))
    }
}

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "herd-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = cpu::f32s(s1, l1, self.name())?;
        let u = cpu::f32s(s2, l2, self.name())?;
        let y = g
            .iter()
            .zip(&u)
            .map(|(&a, &u)| a * sigmoid(a) * u)
            .collect();
        Ok((cpu::store(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, elems_cfg, herd_swiglu_fwd, view};
        let n = l1.shape().elem_count();
        let dev = s1.device().clone();
        macro_rules! go {
            ($ty:ty) => {{
                let g = view::<$ty>(s1, l1, self.name())?;
                let u = view::<$ty>(s2, l2, self.name())?;
                let mut y = alloc_out::<$ty>(&dev, n)?;
                // SAFETY: g, u and y hold n elements.
                unsafe { herd_swiglu_fwd::<$ty>(&dev, elems_cfg(n), &g, &u, &mut y, n) }?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-swiglu: unsupported dtype {dt:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let out = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwigluBwd)?; // [2, ..]
        Ok((Some(out.get(0)?), Some(out.get(1)?)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "herd-swiglu-bwd"
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
        let g = cpu::f32s(s1, l1, self.name())?;
        let u = cpu::f32s(s2, l2, self.name())?;
        let dy = cpu::f32s(s3, l3, self.name())?;
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        for i in 0..n {
            let (a, s) = (g[i], sigmoid(g[i]));
            out[i] = dy[i] * u[i] * s * (1.0 + a * (1.0 - s));
            out[n + i] = dy[i] * a * s;
        }
        Ok((cpu::store(out, s1.dtype())?, stacked(l1)))
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
        use crate::cuda::{alloc_out, elems_cfg, herd_swiglu_bwd, view};
        let n = l1.shape().elem_count();
        let dev = s1.device().clone();
        macro_rules! go {
            ($ty:ty) => {{
                let g = view::<$ty>(s1, l1, self.name())?;
                let u = view::<$ty>(s2, l2, self.name())?;
                let dy = view::<$ty>(s3, l3, self.name())?;
                let mut out = alloc_out::<$ty>(&dev, 2 * n)?;
                let grid = elems_cfg(n);
                // SAFETY: g, u and dy hold n elements, out 2 × n.
                unsafe { herd_swiglu_bwd::<$ty>(&dev, grid, &g, &u, &dy, &mut out, n) }?;
                candle_core::CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-swiglu-bwd: unsupported dtype {dt:?}"),
        };
        Ok((out, stacked(l1)))
    }
}

/// [2, ..dims of l]
fn stacked(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    #[test]
    fn swiglu_linear_matches_swiglu_then_matmul() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let on = |t: Tensor| t.to_dtype(dtype).unwrap();
            let g = Var::from_tensor(&on(randn(&[2, 5, 24], 31)))?;
            let u = Var::from_tensor(&on(randn(&[2, 5, 24], 32)))?;
            let w = Var::from_tensor(&on(randn(&[7, 24], 33)))?;
            let r = on(randn(&[2, 5, 7], 34));
            let y = swiglu_linear(&g, &u, &w)?;
            let y0 = swiglu(&g, &u)?.broadcast_matmul(&w.t()?)?;
            assert_close(&y, &y0, tol);
            let gr = (y * &r)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            let gr0 = (y0 * &r)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            for (name, v) in [("gate", &g), ("up", &u), ("w", &w)] {
                let (a, b) = (gr.get(v).unwrap(), gr0.get(v).unwrap());
                assert_eq!(a.dims(), b.dims(), "d{name}");
                assert_close(a, b, tol);
            }
        }
        // A frozen W gets no gradient computed: only gate and up are in the store.
        let (g, u) = (
            Var::from_tensor(&randn(&[3, 8], 35))?,
            Var::from_tensor(&randn(&[3, 8], 36))?,
        );
        let y = swiglu_linear(&g, &u, &randn(&[4, 8], 37))?;
        let gr = y.sqr()?.sum_all()?.backward()?;
        assert_eq!(gr.get_ids().count(), 2);
        assert!(swiglu_linear(&g, &u, &randn(&[4, 7], 37)).is_err());
        Ok(())
    }

    /// The deferred root gives gate, up and W the gradients of swiglu_linear's own node, bit
    /// for bit; a frozen W gets none.
    #[test]
    fn pullback_equals_the_nodes_backward() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let on = |t: Tensor| t.to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&on(randn(&[2, 5, 6], 41)))?;
            let wg = Var::from_tensor(&on(randn(&[24, 6], 42)))?;
            let (gate, up) = (
                x.broadcast_matmul(&wg.t()?)?,
                x.as_tensor().sin()?.repeat((1, 1, 4))?,
            );
            let w = Var::from_tensor(&on(randn(&[7, 24], 43)))?;
            let g = on(randn(&[2, 5, 7], 44));
            let node = pullback_plain(&swiglu_linear(&gate, &up, &w)?, &g)?;
            let root = swiglu_linear_pullback(&gate, &up, &w, &g)?.backward()?;
            for (name, v) in [("x", &x), ("wg", &wg), ("w", &w)] {
                let (a, b) = (node.get(v).unwrap(), root.get(v).unwrap());
                assert_eq!(host::<f32>(a), host::<f32>(b), "{dtype:?} d{name}");
            }
        }
        let (gate, up) = (Var::from_tensor(&randn(&[3, 8], 45))?, randn(&[3, 8], 46));
        let frozen = randn(&[4, 8], 47);
        let gr = swiglu_linear_pullback(&gate, &up, &frozen, &randn(&[3, 4], 48))?.backward()?;
        assert!(gr.get(&gate).is_some() && gr.get(&frozen).is_none());
        let err = swiglu_linear_pullback(&gate, &up, &randn(&[4, 8], 47), &randn(&[3, 5], 48));
        assert!(err.unwrap_err().to_string().contains("g [.., out]"));
        Ok(())
    }

    /// backward of sum(y ⊙ g) through y's own node.
    fn pullback_plain(y: &Tensor, g: &Tensor) -> Result<candle_core::backprop::GradStore> {
        crate::pullback::pullback_one(y, g)?.backward()
    }

    #[test]
    fn cpu_forward_and_gradients_match_silu_times_up() -> Result<()> {
        let g = Var::from_tensor(&randn(&[3, 4, 24], 21))?;
        let u = Var::from_tensor(&randn(&[3, 4, 24], 22))?;
        let up = randn(&[3, 4, 24], 23);
        let y = swiglu(&g, &u)?;
        let y0 = (g.silu()? * u.as_tensor())?;
        assert_close(&y, &y0, 1e-6);
        let gr = (y * &up)?.sum_all()?.backward()?;
        let gr0 = (y0 * &up)?.sum_all()?.backward()?;
        assert_close(gr.get(&g).unwrap(), gr0.get(&g).unwrap(), 1e-5);
        assert_close(gr.get(&u).unwrap(), gr0.get(&u).unwrap(), 1e-5);
        Ok(())
    }

    /// cuda/swiglu.cu on the host emulator against the host reference, over several blocks with
    /// a partial last one.
    fn emulated_kernels_match_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        let n = 2500;
        let g = randn(&[n], 48).to_dtype(T::DTYPE)?;
        let u = randn(&[n], 49).to_dtype(T::DTYPE)?;
        let dy = randn(&[n], 50).to_dtype(T::DTYPE)?;
        let y = swiglu(&g, &u)?;
        let dgu = g.apply_op3_no_bwd(&u, &dy, &SwigluBwd)?;

        let (gs, us, dys) = (host::<T>(&g), host::<T>(&u), host::<T>(&dy));
        let (mut y_out, mut d_out) = (poisoned::<T>(n), poisoned::<T>(2 * n));
        let (yo, dout) = (y_out.as_mut_ptr(), d_out.as_mut_ptr());
        let grid = crate::launch::elems(n);
        emulate(grid, || unsafe {
            (k.swiglu_fwd)(gs.as_ptr(), us.as_ptr(), yo, n)
        });
        emulate(grid, || unsafe {
            (k.swiglu_bwd)(gs.as_ptr(), us.as_ptr(), dys.as_ptr(), dout, n)
        });
        assert_close(&tensor(y_out, &[n]), &y, T::TOL);
        assert_close(&tensor(d_out, &[2, n]), &dgu, T::TOL);
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
            let g = randn(&[2, 9, 11008], 24).to_dtype(dtype)?;
            let u = randn(&[2, 9, 11008], 25).to_dtype(dtype)?;
            let up = randn(&[2, 9, 11008], 26).to_dtype(dtype)?;
            let (gg, gu) = (
                Var::from_tensor(&g.to_device(&gpu())?)?,
                Var::from_tensor(&u.to_device(&gpu())?)?,
            );
            let (cg, cu) = (Var::from_tensor(&g)?, Var::from_tensor(&u)?);
            let gy = swiglu(&gg, &gu)?;
            let cy = swiglu(&cg, &cu)?;
            assert_close(&gy, &cy, tol);
            let ggr = (gy * up.to_device(&gpu())?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            let cgr = (cy * &up)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            assert_close(ggr.get(&gg).unwrap(), cgr.get(&cg).unwrap(), tol);
            assert_close(ggr.get(&gu).unwrap(), cgr.get(&cu).unwrap(), tol);
        }
        Ok(())
    }
}
