//! A scalar root whose backward hands a given gradient to two tensors: `backward()` of
//! `pullback(a, b, g)` gives the graph under a and b the same gradients as `backward()` of
//! `sum((a + b) ⊙ g)`, bit for bit, without computing the sum, the product or their
//! backward (each a pass over a and b). herd-model's layer-by-layer backward starts every layer
//! from one: a and b are the layer output's two summands, g the gradient of the output.
//!
//! [`pullback_one`] does the same for one tensor, and [`Deferred`] for the output of a fused
//! op that was computed without a graph: its backward is the op's own for the output gradient
//! g, so the caller never holds that output (see `swiglu_linear_pullback`).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// A scalar (0, f32) whose backward gives a and b the gradient g (all three one shape). Only
/// as the root of a `backward()`: its own incoming gradient is taken to be 1.
pub fn pullback(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dims() != g.dims() || a.dtype() != g.dtype() {
        candle_core::bail!(
            "herd-pullback: a {:?}, b {:?}, g {:?} {:?}: expected one shape and a's dtype for g",
            a.dims(),
            b.dims(),
            g.dims(),
            g.dtype()
        )
    }
    a.apply_op3(b, &g.detach(), Pullback)
}

/// A scalar (0, f32) whose backward gives a the gradient g (one shape and dtype).
pub fn pullback_one(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    if a.dims() != g.dims() || a.dtype() != g.dtype() {
        candle_core::bail!(
            "herd-pullback: a {:?} {:?}, g {:?} {:?}: expected one shape and dtype",
            a.dims(),
            a.dtype(),
            g.dims(),
            g.dtype()
        )
    }
    a.apply_op1(PullbackOne(g.detach()))
}

/// The roots' value: a scalar f32 zero (never read; a root's incoming gradient is 1).
fn root_cpu() -> (CpuStorage, Shape) {
    (CpuStorage::F32(vec![0.0]), Shape::from(()))
}

#[cfg(feature = "cuda")]
fn root_cuda(s: &candle_core::CudaStorage) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::{BackendDevice, BackendStorage};
    let shape = Shape::from(());
    Ok((
        s.device().zeros_impl(&shape, candle_core::DType::F32)?,
        shape,
    ))
}

/// The forward of a three-input root op: [`root_cpu`] / [`root_cuda`].
macro_rules! root_forward3 {
    () => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            Ok(root_cpu())
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            root_cuda(s1)
        }
    };
}

struct Pullback;

impl CustomOp3 for Pullback {
    fn name(&self) -> &'static str {
        "herd-pullback"
    }

    root_forward3!();

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(g.clone()), None))
    }
}

struct PullbackOne(Tensor);

impl CustomOp1 for PullbackOne {
    fn name(&self) -> &'static str {
        "herd-pullback-one"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(root_cpu())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        root_cuda(s)
    }

    fn bwd(&self, _a: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// A scalar root whose backward is `op`'s backward for the output gradient g: the gradients
/// under op's three inputs that `op(a, b, c)` would pass on from g, for a caller that ran the
/// op's forward without a graph. Only for ops whose backward does not read their result (it
/// gets this root's scalar in its place).
pub(crate) struct Deferred<O> {
    pub(crate) op: O,
    pub(crate) g: Tensor,
}

impl<O: CustomOp3> CustomOp3 for Deferred<O> {
    fn name(&self) -> &'static str {
        "herd-deferred"
    }

    root_forward3!();

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        _grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op.bwd(a, b, c, res, &self.g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::{DType, Var};

    /// The gradients under a and b equal those of sum((a + b) ⊙ g), bit for bit, in f32 and bf16.
    #[test]
    fn gives_the_gradients_of_the_summed_product() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&randn(&[3, 8], 1).to_dtype(dtype)?)?;
            let w = Var::from_tensor(&randn(&[8, 8], 2).to_dtype(dtype)?)?;
            let a = x.matmul(&w)?.tanh()?;
            let b = (x.as_tensor() * 3.0)?;
            let g = randn(&[3, 8], 3).to_dtype(dtype)?;
            let plain = ((&a + &b)? * &g)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?;
            let ours = pullback(&a, &b, &g)?.backward()?;
            for v in [&x, &w] {
                let (p, o) = (plain.get(v).unwrap(), ours.get(v).unwrap());
                assert_eq!(host::<f32>(p), host::<f32>(o), "{dtype:?}");
            }
        }
        let err = pullback(&randn(&[2], 1), &randn(&[3], 2), &randn(&[2], 3)).unwrap_err();
        assert!(err.to_string().contains("expected one shape"), "{err}");
        Ok(())
    }

    /// pullback_one(a, g) gives the gradients of sum(a ⊙ g), bit for bit.
    #[test]
    fn one_tensor_gets_the_gradients_of_its_product() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&randn(&[3, 8], 4).to_dtype(dtype)?)?;
            let w = Var::from_tensor(&randn(&[8, 8], 5).to_dtype(dtype)?)?;
            let a = x.matmul(&w)?.tanh()?;
            let g = randn(&[3, 8], 6).to_dtype(dtype)?;
            let plain = (&a * &g)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            let ours = pullback_one(&a, &g)?.backward()?;
            for v in [&x, &w] {
                let (p, o) = (plain.get(v).unwrap(), ours.get(v).unwrap());
                assert_eq!(host::<f32>(p), host::<f32>(o), "{dtype:?}");
            }
        }
        let err = pullback_one(&randn(&[2], 1), &randn(&[3], 2)).unwrap_err();
        assert!(err.to_string().contains("expected one shape"), "{err}");
        Ok(())
    }
}
