//! The gradient buffer's two kernels: adding a micro-batch's parameter gradient into the flat f32
//! step sum in place (cuda/accumulate.cu), and the sum of squares for the gradient norm in a fixed
//! order (cuda/sum_squares.cu). Together with the gradient scale folded into [`crate::FusedAdamW`],
//! an optimizer step makes no temporary the size of the model.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor};

use crate::cpu;
use crate::table::GradTable;

/// acc[offset .. offset + g.elem_count()] += g, in f32, in place. `acc`: a contiguous f32 tensor
/// (the step's flat gradient sum); `g`: f32 or bf16, any shape (made contiguous).
pub fn accumulate(acc: &Tensor, offset: usize, g: &Tensor) -> Result<()> {
    acc.inplace_op2(&g.contiguous()?, &Accumulate { offset })
}

/// Elements per fill in [`zero`]: candle's CUDA fill launches `el_count as u32` threads and
/// counts them in a 32-bit index, so one fill over more than 2³² elements (a 7B model's flat
/// f32 sum has 6.7e9) would never end.
pub const ZERO_CHUNK: usize = 1 << 30;

/// Sets a 1-D tensor to zero in place, [`ZERO_CHUNK`] elements per fill.
pub fn zero(t: &Tensor) -> Result<()> {
    zero_in_chunks(t, ZERO_CHUNK)
}

fn zero_in_chunks(t: &Tensor, chunk: usize) -> Result<()> {
    let n = t.dims1()?;
    for start in (0..n).step_by(chunk.max(1)) {
        t.narrow(0, start, chunk.min(n - start))?.zero_set()?;
    }
    Ok(())
}

/// Σ x² of an f32 tensor: per-block partial sums in the launch's fixed order, added on the host
/// in f64. The same value every run on a given device.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    let partials = x.contiguous()?.apply_op1_no_bwd(&SumSquares)?;
    Ok(partials.to_vec1::<f32>()?.iter().map(|&p| p as f64).sum())
}

/// [`sum_squares`] of the flat sum a [`GradTable`] stands for, read from the gradients
/// themselves: the same partials, so the same value.
pub fn sum_squares_of(grads: &GradTable) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let op = TableSumSquares { grads };
    let partials = first.apply_op1_no_bwd(&op)?;
    Ok(partials.to_vec1::<f32>()?.iter().map(|&p| p as f64).sum())
}

struct Accumulate {
    offset: usize,
}

/// The span of `acc` (contiguous f32 elements a..b) that `len` gradient elements land in.
fn span(l: &Layout, offset: usize, len: usize) -> Result<std::ops::Range<usize>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("herd-accumulate: the gradient sum must be contiguous")
    };
    if offset + len > b - a {
        candle_core::bail!(
            "herd-accumulate: {len} elements at offset {offset} overrun a sum of {}",
            b - a
        )
    }
    Ok(a + offset..a + offset + len)
}

impl InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "herd-accumulate"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = cpu::f32s(s2, l2, self.name())?;
        let range = span(l1, self.offset, g.len())?;
        let CpuStorage::F32(acc) = s1 else {
            candle_core::bail!("herd-accumulate: the gradient sum must be f32")
        };
        acc[range].iter_mut().zip(&g).for_each(|(a, g)| *a += g);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        use crate::cuda::{elems_cfg, herd_accumulate, view};
        let n = l2.shape().elem_count();
        let range = span(l1, self.offset, n)?;
        let dev = s1.device().clone();
        let mut acc = s1.as_cuda_slice_mut::<f32>()?.slice_mut(range);
        macro_rules! go {
            ($ty:ty) => {{
                let g = view::<$ty>(s2, l2, self.name())?;
                // SAFETY: acc is the n-element span of the sum, g holds n elements.
                unsafe { herd_accumulate::<$ty>(&dev, elems_cfg(n), &mut acc, &g, n) }?;
            }};
        }
        match s2.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-accumulate: unsupported dtype {dt:?}"),
        }
        Ok(())
    }
}

struct SumSquares;

/// The kernel's partition on the host: element i belongs to block (i / threads) mod blocks.
/// Each partial summed in f64, so the host reference is the more exact one.
fn partial_sums(x: &[f32]) -> Vec<f32> {
    let grid = crate::launch::partials(x.len());
    let (blocks, threads) = (grid.blocks as usize, grid.threads as usize);
    let mut p = vec![0f64; blocks];
    for (i, &v) in x.iter().enumerate() {
        p[(i / threads) % blocks] += v as f64 * v as f64;
    }
    p.into_iter().map(|s| s as f32).collect()
}

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "herd-sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if s.dtype() != DType::F32 {
            candle_core::bail!("herd-sum-squares: f32 only, got {:?}", s.dtype())
        }
        let p = partial_sums(&cpu::f32s(s, l, self.name())?);
        let n = p.len();
        Ok((CpuStorage::F32(p), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, herd_sum_squares, view};
        if s.dtype() != DType::F32 {
            candle_core::bail!("herd-sum-squares: f32 only, got {:?}", s.dtype())
        }
        let n = l.shape().elem_count();
        let grid = crate::launch::partials(n);
        let dev = s.device().clone();
        let x = view::<f32>(s, l, self.name())?;
        let mut out = alloc_out::<f32>(&dev, grid.blocks as usize)?;
        let cfg = crate::cuda::config(grid);
        // SAFETY: x holds n elements, out one partial per block.
        unsafe { herd_sum_squares(&dev, cfg, &x, n, &mut out) }?;
        let blocks = grid.blocks as usize;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(blocks),
        ))
    }
}

/// The sum of squares of a [`GradTable`]; the op's argument is only its first gradient (the
/// device), the table itself travels in the op.
struct TableSumSquares<'a> {
    grads: &'a GradTable,
}

impl CustomOp1 for TableSumSquares<'_> {
    fn name(&self) -> &'static str {
        "herd-sum-squares-table"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = partial_sums(&self.grads.flat_host()?);
        let n = p.len();
        Ok((CpuStorage::F32(p), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, herd_sum_squares_table};
        let starts = self.grads.starts();
        let n = starts[starts.len() - 1] as usize;
        let p = (starts.len() - 1) as i32;
        let grid = crate::launch::partials(n);
        let dev = s.device().clone();
        let starts = dev.clone_htod(starts)?;
        let ptrs = self.grads.device_ptrs(&dev)?;
        let mut out = alloc_out::<f32>(&dev, grid.blocks as usize)?;
        let cfg = crate::cuda::config(grid);
        // SAFETY: ptrs and starts describe n elements of live gradients (self.grads), out holds
        // one partial per block.
        unsafe {
            match self.grads.dtype() {
                DType::BF16 => {
                    herd_sum_squares_table::<half::bf16>(&dev, cfg, &ptrs, &starts, p, n, &mut out)
                }
                _ => herd_sum_squares_table::<f32>(&dev, cfg, &ptrs, &starts, p, n, &mut out),
            }
        }?;
        let blocks = grid.blocks as usize;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(blocks),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Device;

    #[test]
    fn accumulate_adds_in_place_at_the_offset_and_refuses_overruns() -> Result<()> {
        let acc = Tensor::ones(10, DType::F32, &Device::Cpu)?;
        let g = Tensor::new(&[[0.5f32, -2.0], [4.0, 0.25]], &Device::Cpu)?;
        accumulate(&acc, 3, &g.to_dtype(DType::BF16)?)?;
        accumulate(&acc, 3, &g)?;
        let want = [1., 1., 1., 2., -3., 9., 1.5, 1., 1., 1.];
        assert_eq!(acc.to_vec1::<f32>()?, want);
        let err = accumulate(&acc, 7, &g).unwrap_err().to_string();
        assert!(
            err.contains("4 elements at offset 7 overrun a sum of 10"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn sum_squares_is_the_exact_sum_to_f32_rounding() -> Result<()> {
        for n in [0, 5, 3000, 600_000] {
            let x = randn(&[n.max(1)], 53).narrow(0, 0, n)?;
            let exact: f64 = x
                .to_vec1::<f32>()?
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum();
            let got = sum_squares(&x)?;
            assert!(
                (got - exact).abs() <= 1e-6 * exact.max(1e-30),
                "{n}: {got} vs {exact}"
            );
        }
        Ok(())
    }

    /// The kernels on the host emulator against the host paths: accumulate at an offset from
    /// f32 and bf16 over several blocks; the sum of squares over more elements than one pass of
    /// the grid covers, so the grid-stride loop runs.
    fn emulated_accumulate_matches_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        let (n, offset) = (2500, 700);
        let acc = randn(&[4000], 54);
        let g = randn(&[n], 55).to_dtype(T::DTYPE)?;
        let (mut emu_acc, gs) = (host::<f32>(&acc), host::<T>(&g));
        let dst = emu_acc[offset..].as_mut_ptr();
        emulate(crate::launch::elems(n), || unsafe {
            (k.accumulate)(dst, gs.as_ptr(), n)
        });
        let want = acc.copy()?;
        accumulate(&want, offset, &g)?;
        assert_close(&tensor(emu_acc, &[4000]), &want, 1e-7);
        Ok(())
    }

    #[test]
    fn emulated_cuda_c_matches_the_host() -> Result<()> {
        emulated_accumulate_matches_the_host::<f32>()?;
        emulated_accumulate_matches_the_host::<half::bf16>()?;
        let sum_squares = |grid: crate::launch::Grid, xs: &[f32]| -> Vec<f32> {
            let mut partial = poisoned::<f32>(grid.blocks as usize);
            let (p, n) = (partial.as_mut_ptr(), xs.len());
            emulate(grid, || unsafe {
                herd_kernels_emu::herd_sum_squares(xs.as_ptr(), n, p)
            });
            partial
        };
        // The production shape: the partials are the host's, block for block.
        let x = randn(&[5000], 56);
        let grid = crate::launch::partials(5000);
        let got = sum_squares(grid, &host::<f32>(&x));
        let want = x.apply_op1_no_bwd(&SumSquares)?;
        assert_close(&tensor(got, &[grid.blocks as usize]), &want, 1e-5);
        // A grid smaller than the data, so each thread strides (as 7B parameters do over 512
        // blocks); the partials then add up to the sum.
        let xs = host::<f32>(&randn(&[10_000], 57));
        let small = crate::launch::Grid {
            blocks: 3,
            threads: 1024,
        };
        let got: f64 = sum_squares(small, &xs).iter().map(|&p| p as f64).sum();
        let exact: f64 = xs.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((got - exact).abs() <= 1e-6 * exact, "{got} vs {exact}");
        Ok(())
    }

    /// Chunked zeroing covers the view's every element, the short last chunk included, and
    /// nothing outside it (the fills run on narrowed views with a start offset).
    fn zeroes_exactly_the_view(dev: &Device) -> Result<()> {
        let all = Tensor::arange(1f32, 15., dev)?; // 1..=14
        let view = all.narrow(0, 2, 10)?;
        zero_in_chunks(&view, 3)?;
        let mut want: Vec<f32> = (1..=14).map(|v| v as f32).collect();
        want[2..12].fill(0.0);
        assert_eq!(all.to_vec1::<f32>()?, want);
        zero(&all)?;
        assert_eq!(all.to_vec1::<f32>()?, vec![0f32; 14]);
        Ok(())
    }

    #[test]
    fn zero_fills_in_chunks_within_the_view() -> Result<()> {
        zeroes_exactly_the_view(&Device::Cpu)
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_zero_fills_in_chunks_within_the_view() -> Result<()> {
        zeroes_exactly_the_view(&gpu())
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_matches_cpu() -> Result<()> {
        for (dtype, tol) in DTYPES {
            let acc = randn(&[70_000], 58);
            let g = randn(&[300, 200], 59).to_dtype(dtype)?;
            let gpu_acc = acc.to_device(&gpu())?;
            accumulate(&acc, 1234, &g)?;
            accumulate(&gpu_acc, 1234, &g.to_device(&gpu())?)?;
            assert_close(&gpu_acc, &acc, tol);
        }
        // More than 512 blocks × 1024 threads: every thread strides.
        let x = randn(&[3_000_001], 60);
        let exact = sum_squares(&x)?;
        let got = sum_squares(&x.to_device(&gpu())?)?;
        assert!((got - exact).abs() <= 1e-5 * exact, "{got} vs {exact}");
        assert_eq!(got, sum_squares(&x.to_device(&gpu())?)?, "not repeatable");
        Ok(())
    }
}
