//! The step's gradient as the parameters' own gradient tensors (cuda/grad_source.cuh): when a
//! step has one micro-batch on one rank there is nothing to sum, so the norm
//! ([`crate::grad::sum_squares_of`]) and AdamW ([`crate::FusedAdamW::step_table`]) read the
//! tensors backward produced, through a device table of their addresses, instead of a flat f32
//! [N] copy of them: 4 bytes per parameter that need not exist.

use candle_core::{DType, Result, Tensor};

/// One gradient per parameter (None: backward did not reach it, read as zeros), each contiguous,
/// all of one dtype (f32 or bf16), on one device.
pub struct GradTable {
    grads: Vec<Option<Tensor>>,
    /// [P + 1] element offsets of the parameters in the flat sum the table stands for.
    starts: Vec<u64>,
    dtype: DType,
}

/// [P + 1] offsets of parameters of `sizes` elements laid end to end (the kernels' `starts`).
pub(crate) fn starts_of(sizes: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut starts = vec![0u64];
    for n in sizes {
        starts.push(starts[starts.len() - 1] + n as u64);
    }
    starts
}

impl GradTable {
    /// `grads[k]` must hold `sizes[k]` elements (any shape; made contiguous here).
    pub fn new(grads: Vec<Option<Tensor>>, sizes: &[usize]) -> crate::Result<Self> {
        if grads.len() != sizes.len() {
            return Err(crate::Error::Shape(format!(
                "{} gradients for {} parameters",
                grads.len(),
                sizes.len()
            )));
        }
        let mut dtype = None;
        let mut out = Vec::with_capacity(grads.len());
        for (k, (g, &n)) in grads.into_iter().zip(sizes).enumerate() {
            let Some(g) = g else {
                out.push(None);
                continue;
            };
            if g.elem_count() != n {
                return Err(crate::Error::Shape(format!(
                    "gradient {k} has {} elements, its parameter {n}",
                    g.elem_count()
                )));
            }
            match dtype {
                None if matches!(g.dtype(), DType::F32 | DType::BF16) => dtype = Some(g.dtype()),
                Some(d) if d == g.dtype() => {}
                _ => {
                    return Err(crate::Error::Shape(format!(
                        "gradient {k} is {:?}: expected every gradient f32, or every one bf16",
                        g.dtype()
                    )))
                }
            }
            out.push(Some(g.contiguous()?));
        }
        Ok(GradTable {
            grads: out,
            starts: starts_of(sizes.iter().copied()),
            dtype: dtype.unwrap_or(DType::F32),
        })
    }

    pub(crate) fn starts(&self) -> &[u64] {
        &self.starts
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Any gradient present (its device and storage carry the table's ops).
    pub(crate) fn first(&self) -> Option<&Tensor> {
        self.grads.iter().flatten().next()
    }

    /// All gradients end to end as f32 on the host, zeros for the missing ones: the flat sum
    /// the table stands for (the host paths and the tests).
    pub(crate) fn flat_host(&self) -> Result<Vec<f32>> {
        let mut flat = Vec::new();
        for (g, w) in self.grads.iter().zip(self.starts.windows(2)) {
            let n = (w[1] - w[0]) as usize;
            match g {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, n)),
            }
        }
        Ok(flat)
    }

    /// The device addresses of the gradients' first elements (0 for a missing one), uploaded as
    /// the kernels' `ptrs`.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_ptrs(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<i64>> {
        device_addresses(self.grads.iter().map(Option::as_ref), dev)
    }
}

/// The device addresses of tensors' first elements (0 for None), uploaded as a kernel's table
/// of pointers. Each tensor f32 or bf16, on the GPU; the caller keeps them alive (and
/// contiguous, where the kernel reads them so) while the kernel runs.
#[cfg(feature = "cuda")]
pub(crate) fn device_addresses<'a>(
    tensors: impl Iterator<Item = Option<&'a Tensor>>,
    dev: &candle_core::cuda_backend::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<i64>> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::Storage;
    let stream = dev.cuda_stream();
    let mut ptrs = Vec::new();
    for t in tensors {
        let Some(t) = t else {
            ptrs.push(0i64);
            continue;
        };
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("herd-kernels: a tensor of a pointer table is not on the GPU")
        };
        let offset = layout.start_offset() as u64;
        let base = match t.dtype() {
            DType::BF16 => {
                let (p, _sync) = s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
                p + 2 * offset
            }
            DType::F32 => {
                let (p, _sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
                p + 4 * offset
            }
            other => candle_core::bail!("herd-kernels: a {other:?} tensor in a pointer table"),
        };
        ptrs.push(base as i64);
    }
    dev.clone_htod(&ptrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adamw::tests::bits;
    use crate::adamw::{AdamWHyper, FusedAdamW, Grad};
    use crate::grad::{sum_squares, sum_squares_of};
    use crate::testutil::*;
    use candle_core::Device;

    const HYPER: AdamWHyper = AdamWHyper {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 2,
    };

    /// Parameters that straddle the kernels' blocks, a one-element one, and one backward did not
    /// reach (None), as `dtype` gradients; with their flat f32 sum.
    fn grads(dtype: DType, device: &Device) -> (Vec<(usize, bool)>, Vec<Option<Tensor>>, Tensor) {
        let params = vec![
            (1500, true),
            (1, false),
            (700, true),
            (40, false),
            (33, true),
        ];
        let mut grads = Vec::new();
        for (k, &(n, _)) in params.iter().enumerate() {
            grads.push((k != 3).then(|| {
                randn(&[n], 70 + k as u64)
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(device)
                    .unwrap()
            }));
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.0).collect();
        let flat = GradTable::new(grads.clone(), &sizes)
            .unwrap()
            .flat_host()
            .unwrap();
        let flat = Tensor::from_vec(flat, sizes.iter().sum::<usize>(), device).unwrap();
        (params, grads, flat)
    }

    /// A mid-run AdamW state (random master weights and moments) on `device`: the state words
    /// and the weights, one bf16 tensor per parameter.
    fn fresh_state(opt: &FusedAdamW, device: &Device) -> (Tensor, Vec<Tensor>) {
        let n = opt.len();
        let v = |t: Tensor| t.to_vec1::<f32>().unwrap();
        let (words, hi) = opt
            .pack(
                &v(randn(&[n], 80)),
                &v(randn(&[n], 81).affine(0.01, 0.0).unwrap()),
                &v(randn(&[n], 82).sqr().unwrap().affine(1e-4, 0.0).unwrap()),
            )
            .unwrap();
        let weights = opt
            .spans()
            .map(|r| Tensor::from_slice(&hi[r.clone()], r.len(), device).unwrap())
            .collect();
        (
            Tensor::from_vec(words, n * 2 + n.div_ceil(2), device).unwrap(),
            weights,
        )
    }

    fn host_weights(weights: &[Tensor]) -> Vec<Vec<half::bf16>> {
        weights.iter().map(host::<half::bf16>).collect()
    }

    /// Norm and AdamW through the table equal them on the flat f32 sum, bit for bit.
    fn table_equals_flat(device: &Device) {
        for dtype in [DType::F32, DType::BF16] {
            let (params, g, flat) = grads(dtype, device);
            let sizes: Vec<usize> = params.iter().map(|p| p.0).collect();
            let table = GradTable::new(g, &sizes).unwrap();
            assert_eq!(
                sum_squares_of(&table).unwrap(),
                sum_squares(&flat).unwrap(),
                "{dtype:?}"
            );
            let opt = FusedAdamW::new(&params);
            let ((a, wa), (b, wb)) = (fresh_state(&opt, device), fresh_state(&opt, device));
            opt.step(&a, &wa, Grad::Flat(&flat), HYPER, 0.37).unwrap();
            opt.step(&b, &wb, Grad::Table(&table), HYPER, 0.37).unwrap();
            assert!(
                bits(&host::<f32>(&a)) == bits(&host::<f32>(&b)),
                "{dtype:?}: table step differs from the flat one"
            );
            assert!(host_weights(&wa) == host_weights(&wb), "{dtype:?}: weights");
        }
    }

    #[test]
    fn cpu_table_equals_the_flat_sum() {
        table_equals_flat(&Device::Cpu);
    }

    #[test]
    fn mismatched_tables_are_errors() {
        let g = vec![
            Some(randn(&[4], 1)),
            Some(randn(&[3], 2).to_dtype(DType::BF16).unwrap()),
        ];
        let err = GradTable::new(g, &[4, 3]).err().unwrap().to_string();
        assert!(
            err.contains("every gradient f32, or every one bf16"),
            "{err}"
        );
        let err = GradTable::new(vec![Some(randn(&[4], 1))], &[5])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("gradient 0 has 4 elements, its parameter 5"),
            "{err}"
        );
        let table = GradTable::new(vec![Some(randn(&[4], 1))], &[4]).unwrap();
        let opt = FusedAdamW::new(&[(3, true), (1, true)]);
        let (state, weights) = fresh_state(&opt, &Device::Cpu);
        let err = opt.step(&state, &weights, Grad::Table(&table), HYPER, 1.0);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("gradients at offsets [0, 4]"));
    }

    /// cuda/adamw.cu and cuda/sum_squares.cu's table entry points on the host emulator (the
    /// table holds host addresses there) against their flat ones on the same values.
    fn emulated_table_matches_flat<T: Emulated>() {
        let k = T::KERNELS;
        let (params, g, flat) = grads(T::DTYPE, &Device::Cpu);
        let hosts: Vec<Option<Vec<T>>> = g.iter().map(|g| g.as_ref().map(host::<T>)).collect();
        let ptrs: Vec<i64> = hosts
            .iter()
            .map(|h| h.as_ref().map_or(0, |h| h.as_ptr() as i64))
            .collect();
        let starts = starts_of(params.iter().map(|p| p.0));
        let n = *starts.last().unwrap() as usize;
        let p = params.len() as i32;
        let flat = host::<f32>(&flat);

        // Sum of squares: a 2-block grid smaller than the data, so threads stride across
        // parameter boundaries, then the production shape.
        for grid in [
            crate::launch::Grid {
                blocks: 2,
                threads: 256,
            },
            crate::launch::partials(n),
        ] {
            let (mut a, mut b) = (
                poisoned::<f32>(grid.blocks as usize),
                poisoned::<f32>(grid.blocks as usize),
            );
            let (pa, pb) = (a.as_mut_ptr(), b.as_mut_ptr());
            emulate(grid, || unsafe {
                herd_kernels_emu::herd_sum_squares(flat.as_ptr(), n, pa)
            });
            emulate(grid, || unsafe {
                (k.sum_squares_table)(ptrs.as_ptr(), starts.as_ptr(), p, n, pb)
            });
            assert_eq!(a, b, "sum of squares partials, {} blocks", grid.blocks);
        }

        let decay: Vec<f32> = params
            .iter()
            .map(|&(_, d)| if d { 0.9997 } else { 1.0 })
            .collect();
        let opt = FusedAdamW::new(&params);
        let (state, weights) = fresh_state(&opt, &Device::Cpu);
        let init = host::<f32>(&state);
        let (mut a, mut b) = (init.clone(), init);
        let (mut wa, mut wb) = (host_weights(&weights), host_weights(&weights));
        let addresses = |w: &mut [Vec<half::bf16>]| -> Vec<i64> {
            w.iter_mut().map(|w| w.as_mut_ptr() as i64).collect()
        };
        let (pwa, pwb) = (addresses(&mut wa), addresses(&mut wb));
        let (sa, sb) = (a.as_mut_ptr(), b.as_mut_ptr());
        let (lerp_w, b2, omb2, step, bc2, eps, scale) =
            (0.1, 0.999, 1e-3, 0.02, 0.0447, 1e-8, 0.37);
        emulate(crate::launch::elems(n), || unsafe {
            herd_kernels_emu::herd_adamw(
                sa,
                pwa.as_ptr(),
                flat.as_ptr(),
                starts.as_ptr(),
                decay.as_ptr(),
                p,
                n,
                lerp_w,
                b2,
                omb2,
                step,
                bc2,
                eps,
                scale,
            )
        });
        emulate(crate::launch::elems(n), || unsafe {
            (k.adamw_table)(
                sb,
                pwb.as_ptr(),
                ptrs.as_ptr(),
                starts.as_ptr(),
                decay.as_ptr(),
                p,
                n,
                lerp_w,
                b2,
                omb2,
                step,
                bc2,
                eps,
                scale,
            )
        });
        assert!(
            bits(&a) == bits(&b) && wa == wb,
            "AdamW through the table differs from the flat gradient"
        );
        assert!(wa != host_weights(&weights), "the step wrote the weights");
    }

    #[test]
    fn emulated_cuda_c_reads_the_table_as_the_flat_sum() {
        emulated_table_matches_flat::<f32>();
        emulated_table_matches_flat::<half::bf16>();
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU (run scripts/gpu-test.sh)"]
    fn gpu_table_equals_the_flat_sum() {
        table_equals_flat(&gpu());
    }
}
