//! Residual add fused with RMSNorm (cuda/rms_norm.cu). One op produces both the new residual
//! stream h = x + r and y = RMSNorm(h)·w, as a [2, ..] tensor whose halves are views, so a LLaMA
//! block reads x and r once instead of three times. Without r it is a plain RMSNorm whose only
//! output is y: h is x itself, so no copy of x is made or held by the graph.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use crate::cpu;

/// x, r: [.., D]; w: [D] -> (h = x + r, y = h·rsqrt(mean(h²) + eps)·w), both [.., D].
/// `r = None` is a plain RMSNorm (then h is x). Statistics in f32, as LlamaRMSNorm.
pub fn add_rms_norm(
    x: &Tensor,
    r: Option<&Tensor>,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let (r, has_r) = match r {
        Some(r) => (r.contiguous()?, true),
        None => (x.clone(), false),
    };
    let out = x.apply_op3(
        &r,
        &w,
        AddRmsNorm {
            eps: eps as f32,
            has_r,
        },
    )?; // [2, .., D] = (h | y) with r, y [.., D] without
    if !has_r {
        return Ok((x, out));
    }
    Ok((out.get(0)?, out.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
    has_r: bool,
}

fn rows_cols(l: &Layout) -> (usize, usize) {
    let d = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / d.max(1), d)
}

/// `[2, ..]` when `two` planes, else the shape itself.
fn planes(l: &Layout, two: bool) -> Shape {
    let mut dims = if two { vec![2] } else { vec![] };
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

/// Forward on the host: returns [2, rows, D] = (h | y) with r, in f32 with h rounded through
/// `dtype`; y [rows, D] alone without r (h is x).
fn forward(x: &[f32], r: Option<&[f32]>, w: &[f32], d: usize, eps: f32, dtype: DType) -> Vec<f32> {
    let rows = x.len() / d;
    let h: Vec<f32> = match r {
        Some(r) => x
            .iter()
            .zip(r)
            .map(|(&x, &r)| cpu::round(x + r, dtype))
            .collect(),
        None => vec![],
    };
    let hs = if r.is_some() { &h[..] } else { x };
    let mut ys = vec![0f32; x.len()];
    for row in 0..rows {
        let o = row * d;
        let ss: f32 = hs[o..o + d].iter().map(|h| h * h).sum();
        let rinv = 1.0 / (ss / d as f32 + eps).sqrt();
        for i in 0..d {
            ys[o + i] = hs[o + i] * rinv * w[i];
        }
    }
    if r.is_none() {
        return ys;
    }
    let mut out = h;
    out.extend(ys);
    out
}

/// Backward on the host: res: h first (x for a plain norm), g = (gh | gy), or gy alone when
/// `!has_gh` -> (ds | gy·n), [2, rows, D].
fn backward(res: &[f32], w: &[f32], g: &[f32], has_gh: bool, d: usize, eps: f32) -> Vec<f32> {
    let plane = if has_gh { g.len() / 2 } else { g.len() };
    let zeros;
    let (h, (gh, gy)) = if has_gh {
        (&res[..plane], g.split_at(plane))
    } else {
        zeros = vec![0f32; plane];
        (&res[..plane], (&zeros[..], g))
    };
    let mut out = vec![0f32; 2 * plane];
    for row in 0..plane / d {
        let o = row * d;
        let (mut ss, mut dot) = (0f32, 0f32);
        for i in 0..d {
            ss += h[o + i] * h[o + i];
            dot += gy[o + i] * w[i] * h[o + i];
        }
        let rinv = 1.0 / (ss / d as f32 + eps).sqrt();
        let mean_dot = dot * rinv / d as f32;
        for i in 0..d {
            let n = h[o + i] * rinv;
            out[o + i] = gh[o + i] + rinv * (gy[o + i] * w[i] - n * mean_dot);
            out[plane + o + i] = gy[o + i] * n;
        }
    }
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "herd-add-rms-norm"
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
        let x = cpu::f32s(s1, l1, self.name())?;
        let r = cpu::f32s(s2, l2, self.name())?;
        let w = cpu::f32s(s3, l3, self.name())?;
        let (_, d) = rows_cols(l1);
        let out = forward(
            &x,
            self.has_r.then_some(&r[..]),
            &w,
            d,
            self.eps,
            s1.dtype(),
        );
        Ok((cpu::store(out, s1.dtype())?, planes(l1, self.has_r)))
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
        let (rows, d) = rows_cols(l1);
        let slice = match s1.dtype() {
            DType::F32 => launch_fwd::<f32>(self, s1, l1, s2, l2, s3, l3, rows, d)?,
            DType::BF16 => launch_fwd::<half::bf16>(self, s1, l1, s2, l2, s3, l3, rows, d)?,
            dt => candle_core::bail!("herd-add-rms-norm: unsupported dtype {dt:?}"),
        };
        Ok((slice, planes(l1, self.has_r)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _r: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // h is the result's first plane with r; without r it is x (the result is only y).
        let h = if self.has_r { res } else { x };
        let (ds, dw) = backward_op(h, w, grad, self.eps, self.has_r)?;
        let dr = self.has_r.then(|| ds.clone());
        Ok((Some(ds), dr, Some(dw)))
    }
}

/// A plain RMSNorm's backward: x [.., D], w [D], gy = dL/dy [.., D] -> (dL/dx, dL/dw).
pub(crate) fn plain_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    backward_op(&x.detach(), &w.detach(), gy, eps, false)
}

/// (res: h first, w, grad = (gh | gy) or gy alone) -> (ds, dw) by the backward kernel.
fn backward_op(
    h: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    has_gh: bool,
) -> Result<(Tensor, Tensor)> {
    let grad = grad.contiguous()?;
    let out = h.apply_op3_no_bwd(w, &grad, &AddRmsNormBwd { eps, has_gh })?;
    let ds = out.get(0)?;
    let d = w.dim(0)?;
    // dw = Σ_rows gy·n, summed in f32 (a bf16 running sum over many rows loses the gradient).
    let dw = out
        .get(1)?
        .reshape(((), d))?
        .to_dtype(DType::F32)?
        .sum(0)?
        .to_dtype(w.dtype())?;
    Ok((ds, dw))
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn launch_fwd<T>(
    op: &AddRmsNorm,
    s1: &candle_core::CudaStorage,
    l1: &Layout,
    s2: &candle_core::CudaStorage,
    l2: &Layout,
    s3: &candle_core::CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
) -> Result<candle_core::CudaStorage>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::WithDType,
{
    let dev = s1.device().clone();
    let name = "herd-add-rms-norm";
    let (x, r, w) = (
        crate::cuda::view::<T>(s1, l1, name)?,
        crate::cuda::view::<T>(s2, l2, name)?,
        crate::cuda::view::<T>(s3, l3, name)?,
    );
    let planes = if op.has_r { 2 } else { 1 };
    let mut out = crate::cuda::alloc_out::<T>(&dev, planes * rows * d)?;
    let (has_r, rows_i, d_i) = (op.has_r as i32, rows as i32, d as i32);
    let grid = crate::cuda::rows_cfg(rows, d);
    // SAFETY: x, r, w hold rows × d elements, out (1 + has_r) × rows × d.
    unsafe {
        crate::cuda::herd_add_rms_norm_fwd::<T>(
            &dev, grid, &x, &r, has_r, &w, &mut out, rows_i, d_i, op.eps,
        )
    }?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
}

/// (res: h first, w, grad = (gh | gy) or gy alone) -> (ds | gy·n): the backward as its own
/// kernel.
struct AddRmsNormBwd {
    eps: f32,
    /// Whether grad holds gh (the fused add's h is an output) or only gy (a plain norm).
    has_gh: bool,
}

impl AddRmsNormBwd {
    /// The [2, ..] result's shape from grad's layout.
    fn out_shape(&self, grad: &Layout) -> Shape {
        planes(grad, !self.has_gh)
    }
}

impl CustomOp3 for AddRmsNormBwd {
    fn name(&self) -> &'static str {
        "herd-add-rms-norm-bwd"
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
        let res = cpu::f32s(s1, l1, self.name())?;
        let w = cpu::f32s(s2, l2, self.name())?;
        let g = cpu::f32s(s3, l3, self.name())?;
        let out = backward(&res, &w, &g, self.has_gh, w.len(), self.eps);
        Ok((cpu::store(out, s1.dtype())?, self.out_shape(l3)))
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
        let d = l2.shape().elem_count();
        let rows = l3.shape().elem_count() / if self.has_gh { 2 } else { 1 } / d;
        let slice = match s1.dtype() {
            DType::F32 => launch_bwd::<f32>(self, s1, l1, s2, l2, s3, l3, rows, d)?,
            DType::BF16 => launch_bwd::<half::bf16>(self, s1, l1, s2, l2, s3, l3, rows, d)?,
            dt => candle_core::bail!("herd-add-rms-norm-bwd: unsupported dtype {dt:?}"),
        };
        Ok((slice, self.out_shape(l3)))
    }
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn launch_bwd<T>(
    op: &AddRmsNormBwd,
    s1: &candle_core::CudaStorage,
    l1: &Layout,
    s2: &candle_core::CudaStorage,
    l2: &Layout,
    s3: &candle_core::CudaStorage,
    l3: &Layout,
    rows: usize,
    d: usize,
) -> Result<candle_core::CudaStorage>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::WithDType,
{
    let dev = s1.device().clone();
    let name = "herd-add-rms-norm-bwd";
    let (res, w, g) = (
        crate::cuda::view::<T>(s1, l1, name)?,
        crate::cuda::view::<T>(s2, l2, name)?,
        crate::cuda::view::<T>(s3, l3, name)?,
    );
    let mut out = crate::cuda::alloc_out::<T>(&dev, 2 * rows * d)?;
    let (has_gh, rows_i, d_i) = (op.has_gh as i32, rows as i32, d as i32);
    let grid = crate::cuda::rows_cfg(rows, d);
    // SAFETY: res holds at least rows × d elements (h first), g (1 + has_gh) × rows × d, w d,
    // out 2 × rows × d.
    unsafe {
        crate::cuda::herd_add_rms_norm_bwd::<T>(
            &dev, grid, &res, &w, &g, has_gh, &mut out, rows_i, d_i, op.eps,
        )
    }?;
    Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
}

/// The unfused formula from candle primitives (what herd-model's `RmsNorm` computes): the
/// reference of the tests, gradients by candle's autograd.
pub fn reference(x: &Tensor, r: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let h = match r {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let hf = h.to_dtype(DType::F32)?;
    let inv = (hf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let y = hf
        .broadcast_mul(&inv)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    Ok((h, y.to_dtype(x.dtype())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    #[test]
    fn cpu_forward_and_gradients_match_the_unfused_formula() -> Result<()> {
        for has_r in [true, false] {
            let x = Var::from_tensor(&randn(&[2, 3, 40], 1))?;
            let r = Var::from_tensor(&randn(&[2, 3, 40], 2))?;
            let w = Var::from_tensor(&randn(&[40], 3))?;
            let up = randn(&[2, 2, 3, 40], 4); // upstream gradients for (h, y)
            let r_opt = has_r.then_some(r.as_tensor());
            let (h, y) = add_rms_norm(&x, r_opt, &w, 1e-6)?;
            let (h0, y0) = reference(&x, r_opt, &w, 1e-6)?;
            assert_close(&h, &h0, 1e-6);
            assert_close(&y, &y0, 1e-5);
            let loss = |h: &Tensor, y: &Tensor| -> Result<Tensor> {
                (h * up.get(0)?)?.sum_all()? + (y * up.get(1)?)?.sum_all()?
            };
            let g = loss(&h, &y)?.backward()?;
            let g0 = loss(&h0, &y0)?.backward()?;
            for v in [&x, &w] {
                assert_close(g.get(v).unwrap(), g0.get(v).unwrap(), 1e-4);
            }
            if has_r {
                assert_close(g.get(&r).unwrap(), g0.get(&r).unwrap(), 1e-4);
            }
        }
        Ok(())
    }

    /// cuda/rms_norm.cu on the host emulator against the host reference: rows narrower than
    /// the block (idle threads in the reductions) and wider (strided loops), with r (two planes
    /// out, gh in the backward) and without (y alone, gy alone, h read from x).
    fn emulated_kernels_match_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        for (rows, d, has_r) in [
            (5, 300, true),
            (3, 2500, true),
            (4, 64, false),
            (2, 1500, false),
        ] {
            let dt = T::DTYPE;
            let planes = if has_r { 2 } else { 1 };
            let x = randn(&[rows, d], 41).to_dtype(dt)?;
            let r = randn(&[rows, d], 42).to_dtype(dt)?;
            let w = randn(&[d], 43).to_dtype(dt)?;
            let g_dims: &[usize] = if has_r { &[2, rows, d] } else { &[rows, d] };
            let g = randn(g_dims, 44).to_dtype(dt)?;
            let (h, y) = add_rms_norm(&x, has_r.then_some(&r), &w, 1e-5)?;
            let (fwd, res) = if has_r {
                let hy = Tensor::stack(&[h, y], 0)?;
                (hy.clone(), hy)
            } else {
                (y, x.clone())
            };
            let op = AddRmsNormBwd {
                eps: 1e-5,
                has_gh: has_r,
            };
            let bwd = res.apply_op3_no_bwd(&w, &g, &op)?;

            let (xs, rs, ws, gs, ress) = (
                host::<T>(&x),
                host::<T>(&r),
                host::<T>(&w),
                host::<T>(&g),
                host::<T>(&res),
            );
            let mut out = poisoned::<T>(planes * rows * d);
            let mut dout = poisoned::<T>(2 * rows * d);
            let (o, dop) = (out.as_mut_ptr(), dout.as_mut_ptr());
            let (rows_i, d_i) = (rows as i32, d as i32);
            let grid = crate::launch::rows(rows, d);
            emulate(grid, || unsafe {
                (k.add_rms_norm_fwd)(
                    xs.as_ptr(),
                    rs.as_ptr(),
                    has_r as i32,
                    ws.as_ptr(),
                    o,
                    rows_i,
                    d_i,
                    1e-5,
                )
            });
            emulate(grid, || unsafe {
                (k.add_rms_norm_bwd)(
                    ress.as_ptr(),
                    ws.as_ptr(),
                    gs.as_ptr(),
                    has_r as i32,
                    dop,
                    rows_i,
                    d_i,
                    1e-5,
                )
            });
            assert_close(&tensor(out, fwd.dims()), &fwd, T::TOL);
            assert_close(&tensor(dout, &[2, rows, d]), &bwd, T::TOL);
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
        for ((dtype, tol), has_r) in DTYPES.into_iter().flat_map(|d| [(d, true), (d, false)]) {
            let x = randn(&[3, 7, 4096], 5).to_dtype(dtype)?;
            let r = randn(&[3, 7, 4096], 6).to_dtype(dtype)?;
            let w = randn(&[4096], 7).to_dtype(dtype)?;
            let gx = Var::from_tensor(&x.to_device(&gpu())?)?;
            let gr = Var::from_tensor(&r.to_device(&gpu())?)?;
            let gw = Var::from_tensor(&w.to_device(&gpu())?)?;
            let cx = Var::from_tensor(&x)?;
            let cr = Var::from_tensor(&r)?;
            let cw = Var::from_tensor(&w)?;
            let (gh, gy) = add_rms_norm(&gx, has_r.then_some(gr.as_tensor()), &gw, 1e-5)?;
            let (ch, cy) = add_rms_norm(&cx, has_r.then_some(cr.as_tensor()), &cw, 1e-5)?;
            assert_close(&gh, &ch, tol);
            assert_close(&gy, &cy, tol);
            let up = randn(&[3, 7, 4096], 8).to_dtype(dtype)?;
            let gg = (gy * up.to_device(&gpu())?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            let cg = (cy * &up)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            assert_close(gg.get(&gx).unwrap(), cg.get(&cx).unwrap(), tol);
            assert_close(gg.get(&gw).unwrap(), cg.get(&cw).unwrap(), tol);
        }
        Ok(())
    }
}
