//! Dropout whose mask is regenerated instead of stored (cuda/dropout.cu), for LoRA's
//! lora_dropout: y = x·keep where an element survives, 0 where it is dropped, with survival a pure
//! function of a per-position seed and the element's index in the row. The backward applies the
//! same function to dy. Against `x * mask`: no mask tensor is built on the host and uploaded per
//! layer and step, none is held for the backward, and candle's mul backward does not compute
//! and keep an x-sized gradient for the mask.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use crate::cpu;

/// The SplitMix64 output number `nth` (1-based) of a generator seeded with `seed`: what
/// herd-model's `SplitMix64::new(seed)` returns at its nth `next_u64` call.
pub fn splitmix64(seed: u64, nth: u64) -> u64 {
    let mut z = seed.wrapping_add(nth.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// x: [positions, d] (any leading dims whose product is the number of seeds); seeds: one i64
/// (the u64 bit pattern) per position. Element j of position s survives iff the 53-bit uniform
/// of `splitmix64(seeds[s], j + 1)` is >= p, and then becomes x·1/(1 − p). 0 <= p < 1.
pub fn dropout_mul(x: &Tensor, seeds: &Tensor, p: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("herd-dropout: p = {p}, expected 0 <= p < 1")
    }
    let d = x.dims().last().copied().unwrap_or(1);
    if seeds.dtype() != DType::I64 || seeds.elem_count() * d != x.elem_count() {
        candle_core::bail!(
            "herd-dropout: {} seeds ({:?}) for x {:?}: expected one i64 per row of {d}",
            seeds.elem_count(),
            seeds.dtype(),
            x.dims()
        )
    }
    x.contiguous()?
        .apply_op1(DropoutMul::new(seeds.contiguous()?, p, d))
}

#[derive(Clone)]
struct DropoutMul {
    seeds: Tensor,
    /// ceil(p · 2^53): u < p  <=>  (z >> 11) < threshold for u = (z >> 11) · 2^-53.
    threshold: u64,
    keep: f32,
    d: usize,
}

impl DropoutMul {
    fn new(seeds: Tensor, p: f64, d: usize) -> Self {
        DropoutMul {
            seeds,
            threshold: (p * (1u64 << 53) as f64).ceil() as u64,
            keep: (1.0 / (1.0 - p)) as f32,
            d,
        }
    }

    fn host(&self, x: &[f32], seeds: &[i64]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let z = splitmix64(seeds[i / self.d] as u64, (i % self.d) as u64 + 1);
                if z >> 11 >= self.threshold {
                    v * self.keep
                } else {
                    0.0
                }
            })
            .collect()
    }
}

impl CustomOp1 for DropoutMul {
    fn name(&self) -> &'static str {
        "herd-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::f32s(s, l, self.name())?;
        let (seeds, sl) = self.seeds.storage_and_layout();
        let Storage::Cpu(seeds) = &*seeds else {
            candle_core::bail!("herd-dropout: x on the CPU, seeds elsewhere")
        };
        let y = self.host(&x, &cpu::i64s(seeds, sl, self.name())?);
        Ok((cpu::store(y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, elems_cfg, herd_dropout_mul, view};
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let (seeds, sl) = self.seeds.storage_and_layout();
        let Storage::Cuda(seeds) = &*seeds else {
            candle_core::bail!("herd-dropout: x on the GPU, seeds elsewhere")
        };
        let seeds = view::<i64>(seeds, sl, self.name())?;
        let (d, threshold, keep) = (self.d as i32, self.threshold, self.keep);
        macro_rules! go {
            ($ty:ty) => {{
                let x = view::<$ty>(s, l, self.name())?;
                let mut y = alloc_out::<$ty>(&dev, n)?;
                // SAFETY: x and y hold n elements, seeds n / d.
                unsafe {
                    herd_dropout_mul::<$ty>(
                        &dev,
                        elems_cfg(n),
                        &x,
                        &seeds,
                        &mut y,
                        n,
                        d,
                        threshold,
                        keep,
                    )
                }?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-dropout: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    /// dx = dy ⊙ mask: the same function applied to the gradient.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::{Device, Var};

    fn seeds(n: usize, device: &Device) -> Tensor {
        let v: Vec<i64> = (0..n as u64)
            .map(|s| splitmix64(s ^ 0xABCD, 1) as i64)
            .collect();
        Tensor::from_vec(v, n, device).unwrap()
    }

    #[test]
    fn keeps_about_1_minus_p_scaled_and_the_gradient_uses_the_same_mask() -> Result<()> {
        let x = Var::from_tensor(&randn(&[4, 16, 64], 5))?;
        let s = seeds(64, &Device::Cpu);
        let y = dropout_mul(&x, &s, 0.25)?;
        let (xs, ys): (Vec<f32>, Vec<f32>) =
            (x.flatten_all()?.to_vec1()?, y.flatten_all()?.to_vec1()?);
        let kept = ys.iter().filter(|&&v| v != 0.0).count() as f64 / ys.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        for (a, b) in xs.iter().zip(&ys) {
            assert!(*b == 0.0 || *b == a * (1.0 / 0.75f64) as f32, "{a} -> {b}");
        }
        // d(Σ y ⊙ r)/dx = r ⊙ mask: zero exactly where y is, r·keep elsewhere.
        let r = randn(&[4, 16, 64], 6);
        let g = (&y * &r)?.sum_all()?.backward()?;
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all()?.to_vec1()?;
        let rs: Vec<f32> = r.flatten_all()?.to_vec1()?;
        for i in 0..ys.len() {
            let want = if ys[i] == 0.0 {
                0.0
            } else {
                rs[i] * (1.0 / 0.75f64) as f32
            };
            assert_eq!(gx[i], want, "element {i}");
        }
        // p = 0 keeps everything unchanged.
        let same: Vec<f32> = dropout_mul(&x, &s, 0.0)?.flatten_all()?.to_vec1()?;
        assert_eq!(same, xs);
        Ok(())
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = randn(&[3, 8], 1);
        let e = dropout_mul(&x, &seeds(2, &Device::Cpu), 0.1).unwrap_err();
        assert!(e.to_string().contains("one i64 per row of 8"), "{e}");
        assert!(dropout_mul(&x, &seeds(3, &Device::Cpu), 1.0).is_err());
    }

    fn emulated_kernel_matches_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        let (rows, d) = (37, 130);
        let n = rows * d;
        let x = randn(&[rows, d], 7).to_dtype(T::DTYPE)?;
        let s = seeds(rows, &Device::Cpu);
        let op = DropoutMul::new(s.clone(), 0.3, d);
        let want = x.apply_op1_no_bwd(&op)?;
        let (xs, ss) = (host::<T>(&x), host::<i64>(&s));
        let mut out = poisoned::<T>(n);
        let o = out.as_mut_ptr();
        emulate(crate::launch::elems(n), || unsafe {
            (k.dropout_mul)(
                xs.as_ptr(),
                ss.as_ptr(),
                o,
                n,
                d as i32,
                op.threshold,
                op.keep,
            )
        });
        assert_close(&tensor(out, &[rows, d]), &want, T::TOL);
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
        for (dtype, tol) in DTYPES {
            let x = randn(&[8, 512, 2048], 8).to_dtype(dtype)?;
            let s = seeds(8 * 512, &Device::Cpu);
            let want = dropout_mul(&x, &s, 0.05)?;
            let got = dropout_mul(&x.to_device(&gpu())?, &s.to_device(&gpu())?, 0.05)?;
            assert_close(&got, &want, tol);
            // Same mask: the zeros sit in the same places.
            let zeros = |t: &Tensor| -> Vec<bool> {
                let v: Vec<f32> = t
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                v.into_iter().map(|v| v == 0.0).collect()
            };
            assert_eq!(zeros(&got), zeros(&want));
        }
        Ok(())
    }
}
