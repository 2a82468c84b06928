//! Linear layers that share one RMSNorm'd input, y = RMSNorm(x)·g, without the graph holding y:
//! a decoder layer's q/k/v projections of the input norm and gate/up of the post-attention
//! norm. Composed of a norm and a matmul per layer, the graph keeps y [.., D] alive for the dW
//! GEMMs until the backward. Here each projection is one node over (x, g, W), which the graph
//! holds anyway (x is the residual stream), and y is recomputed, once per group, in the backward.
//!
//! The members of a group share their state: the forward computes y once for all of them and
//! drops it after the last; the backward recomputes y at the first member it reaches, and the
//! last member runs the norm's backward once on the sum of the members' dL/dy, which equals the
//! sum of their separate norm backwards (it is linear in dL/dy). So the extra cost over the
//! composition is one norm forward per group. The forward is the composition's arithmetic
//! (the same norm kernel, the same GEMM), bit for bit.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// x [.., D], g [D] (the RMSNorm weight), ws [out_i, D] (torch.nn.Linear's, no bias) ->
/// [RMSNorm(x)·g·W_iᵀ] as [.., out_i] each. dW_i is computed only when W_i is tracked. Every
/// member's output must reach the loss of a backward through any of them (as a decoder layer's
/// q, k, v and gate, up all do): x and g get their gradient from the last member reached.
pub fn norm_linear_group(x: &Tensor, g: &Tensor, eps: f64, ws: &[&Tensor]) -> Result<Vec<Tensor>> {
    let d = x.dims().last().copied().unwrap_or(0);
    let bad_w = ws
        .iter()
        .any(|w| w.rank() != 2 || w.dims()[1] != d || w.dtype() != x.dtype());
    if x.rank() < 2 || g.dims() != [d] || g.dtype() != x.dtype() || ws.is_empty() || bad_w {
        candle_core::bail!(
            "herd-norm-linear: x {:?} {:?}, g {:?}, ws {:?}: expected x [.., D], g [D], at least one w [out, D], one dtype",
            x.dims(),
            x.dtype(),
            g.dims(),
            ws.iter().map(|w| w.dims().to_vec()).collect::<Vec<_>>()
        )
    }
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    let eps = eps as f32;
    let y = crate::add_rms_norm(&x.detach(), None, &g.detach(), eps as f64)?.1;
    let group = Arc::new(Group {
        eps,
        members: ws.len(),
        forward_y: Mutex::new(Some(y)),
        backward: Mutex::new(Backward::default()),
    });
    let outs = ws
        .iter()
        .map(|w| x.apply_op3(&g, &w.contiguous()?, Member(group.clone())))
        .collect::<Result<Vec<_>>>()?;
    *lock(&group.forward_y)? = None; // y is not held past the forward
    Ok(outs)
}

struct Group {
    eps: f32,
    members: usize,
    /// y during the forward, for every member's GEMM.
    forward_y: Mutex<Option<Tensor>>,
    backward: Mutex<Backward>,
}

/// The group's backward so far: y recomputed, dL/dy summed over the members reached.
#[derive(Default)]
struct Backward {
    y: Option<Tensor>,
    dy: Option<Tensor>,
    reached: usize,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("herd-norm-linear: a poisoned group".into()))
}

struct Member(Arc<Group>);

impl Member {
    /// y·Wᵀ on one backend: (the group's y, as that backend's storage) -> [.., out].
    fn fwd<S: BackendStorage>(
        &self,
        l1: &Layout,
        w: &S,
        lw: &Layout,
        storage: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let y = lock(&self.0.forward_y)?;
        let Some(y) = y.as_ref() else {
            candle_core::bail!("herd-norm-linear: a member's forward after its group's")
        };
        let (ys, yl) = y.storage_and_layout();
        let Some(ys) = storage(&ys) else {
            candle_core::bail!("herd-norm-linear: y on another device than x")
        };
        let k = *l1.dims().last().unwrap_or(&1);
        let m = l1.shape().elem_count() / k.max(1);
        let n = lw.dims()[0];
        let y2 = Layout::contiguous_with_offset((m, k), yl.start_offset());
        let out = ys.matmul(w, (1, m, n, k), &y2, &lw.transpose(0, 1)?)?;
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((out, Shape::from(dims)))
    }
}

impl CustomOp3 for Member {
    fn name(&self) -> &'static str {
        "herd-norm-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(l1, s3, l3, |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(l1, s3, l3, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    /// dz [.., out]: y again (once per group); dW = dzᵀ·y; dL/dy += dz·W; at the group's last
    /// member, (dx, dg) by the norm's backward of the summed dL/dy.
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let group = &self.0;
        let mut state = lock(&group.backward)?;
        let y = match &state.y {
            Some(y) => y.clone(),
            None => {
                let y = crate::add_rms_norm(&x.detach(), None, &g.detach(), group.eps as f64)?.1;
                state.y = Some(y.clone());
                y
            }
        };
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let dz = dz.detach().reshape((m, n))?;
        let dw = if w.track_op() {
            Some(dz.t()?.matmul(&y.reshape((m, k))?)?)
        } else {
            None
        };
        let dy = dz.matmul(&w.detach())?.reshape(x.shape())?;
        let dy = match state.dy.take() {
            Some(sum) => (sum + dy)?,
            None => dy,
        };
        state.reached += 1;
        if state.reached < group.members {
            state.dy = Some(dy);
            return Ok((None, None, dw));
        }
        *state = Backward::default(); // y and the sum are not held past the group's backward
        let (dx, dg) = crate::rms_norm::plain_backward(x, g, &dy, group.eps)?;
        Ok((Some(dx), Some(dg), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::{DType, Var};

    /// Forward bit for bit equal to the norm then the matmuls; gradients of x, g and every W
    /// equal the composition's (its norm's backward on the summed dL/dy), within rounding.
    #[test]
    fn cpu_equals_the_composition_and_its_gradients() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let on = |t: Tensor| t.to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&on(randn(&[2, 3, 16], 1)))?;
            let g = Var::from_tensor(&on((randn(&[16], 2) + 1.0)?))?;
            let ws = [
                Var::from_tensor(&on(randn(&[8, 16], 3)))?,
                Var::from_tensor(&on(randn(&[4, 16], 4)))?,
                Var::from_tensor(&on(randn(&[4, 16], 5)))?,
            ];
            let wr: Vec<&Tensor> = ws.iter().map(|w| w.as_tensor()).collect();
            let ours = norm_linear_group(&x, &g, 1e-5, &wr)?;
            let y = crate::add_rms_norm(&x, None, &g, 1e-5)?.1;
            let plain: Vec<Tensor> = ws
                .iter()
                .map(|w| {
                    let z = y.reshape((6, 16))?.matmul(&w.t()?)?;
                    z.reshape((2, 3, ()))
                })
                .collect::<Result<_>>()?;
            let ups: Vec<Tensor> = [8, 4, 4]
                .iter()
                .enumerate()
                .map(|(i, &n)| on(randn(&[2, 3, n], 10 + i as u64)))
                .collect();
            let loss = |zs: &[Tensor]| -> Result<Tensor> {
                let mut total = Tensor::zeros((), DType::F32, zs[0].device())?;
                for (z, up) in zs.iter().zip(&ups) {
                    total = (total + (z * up)?.to_dtype(DType::F32)?.sum_all()?)?;
                }
                Ok(total)
            };
            for (a, b) in ours.iter().zip(&plain) {
                assert_eq!(host::<f32>(a), host::<f32>(b), "{dtype:?}: forward");
            }
            let (go, gp) = (loss(&ours)?.backward()?, loss(&plain)?.backward()?);
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            for v in [&x, &g].into_iter().chain(&ws) {
                assert_close(go.get(v).unwrap(), gp.get(v).unwrap(), tol);
            }
        }
        Ok(())
    }

    /// A frozen W gets no gradient; a second backward of a fresh group works (the state was
    /// reset); bad shapes are refused with what was expected.
    #[test]
    fn frozen_weights_and_bad_shapes() -> Result<()> {
        let x = Var::from_tensor(&randn(&[5, 16], 6))?;
        let g = Var::from_tensor(&randn(&[16], 7))?;
        let frozen = randn(&[4, 16], 8);
        for _ in 0..2 {
            let zs = norm_linear_group(&x, &g, 1e-6, &[&frozen, &frozen])?;
            let gr = (zs[0].sum_all()? + zs[1].sqr()?.sum_all()?)?.backward()?;
            assert!(gr.get(&frozen).is_none(), "a frozen weight got a gradient");
            assert!(gr.get(&x).is_some() && gr.get(&g).is_some());
        }
        let err = norm_linear_group(&x, &g, 1e-6, &[&randn(&[4, 15], 9)]).unwrap_err();
        assert!(err.to_string().contains("expected x [.., D]"), "{err}");
        assert!(norm_linear_group(&x, &g, 1e-6, &[]).is_err());
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() -> Result<()> {
        for (dtype, tol) in DTYPES {
            let host_t = |t: Tensor| t.to_dtype(dtype).unwrap();
            let (x, g, wq, wk) = (
                host_t(randn(&[2, 9, 256], 1)),
                host_t((randn(&[256], 2) + 1.0)?),
                host_t(randn(&[256, 256], 3)),
                host_t(randn(&[32, 256], 4)),
            );
            let ups = [
                host_t(randn(&[2, 9, 256], 5)),
                host_t(randn(&[2, 9, 32], 6)),
            ];
            let run = |d: &candle_core::Device| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
                let vars = [&x, &g, &wq, &wk]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_device(d)?))
                    .collect::<Result<Vec<_>>>()?;
                let zs = norm_linear_group(&vars[0], &vars[1], 1e-5, &[&vars[2], &vars[3]])?;
                let mut total = Tensor::zeros((), DType::F32, d)?;
                for (z, up) in zs.iter().zip(&ups) {
                    total = (total + (z * up.to_device(d)?)?.to_dtype(DType::F32)?.sum_all()?)?;
                }
                let grads = total.backward()?;
                let gs = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
                Ok((zs, gs))
            };
            let ((cz, cg), (gz, gg)) = (run(&candle_core::Device::Cpu)?, run(&gpu())?);
            for (a, b) in gz.iter().zip(&cz).chain(gg.iter().zip(&cg)) {
                assert_close(a, b, tol);
            }
        }
        Ok(())
    }
}
