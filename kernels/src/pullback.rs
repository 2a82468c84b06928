//! A scalar root whose backward hands a given gradient to two tensors: `backward()` of
//! `pullback(a, b, g)` gives the graph under a and b the same gradients as `backward()` of
//! `sum((a + b) ⊙ g)`, bit for bit, without computing the sum, the product or their
//! backward (each a pass over a and b). herd-model's layer-by-layer backward starts every layer
//! from one: a and b are the layer output's two summands, g the gradient of the output.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

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

struct Pullback;

impl CustomOp3 for Pullback {
    fn name(&self) -> &'static str {
        "herd-pullback"
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
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
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
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = Shape::from(());
        Ok((
            s1.device().zeros_impl(&shape, candle_core::DType::F32)?,
            shape,
        ))
    }

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
}
