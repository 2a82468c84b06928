//! Cross-entropy fused with the lm_head (cuda/cross_entropy.cu): Σ −log softmax(h Wᵀ)[label]
//! over the counted rows without ever holding the full [rows, vocab] logits. Rows are processed
//! in chunks; for each chunk one GEMM makes its logits, one kernel turns them into the row losses
//! and d(loss)/d(logits) = softmax − onehot in place of the logits, and two GEMMs fold that into
//! dh and dW right away. The gradients are therefore computed in the forward (as Liger's fused
//! linear cross-entropy does) and a small carrier op hands them to candle's autograd.
//! Only rows whose label is counted enter the GEMMs (prompt tokens masked with -100 cost nothing).

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

pub const IGNORE_INDEX: i64 = -100;

/// Default memory budget of one chunk's logits and their gradient.
pub const CHUNK_BUDGET_BYTES: usize = 256 << 20;

/// Rows per chunk so that a chunk's logits (dtype) + f32 gradient + gradient cast back to dtype
/// fit in `budget_bytes`; at least 1, at most `rows`.
pub fn chunk_rows(rows: usize, vocab: usize, dtype: DType, budget_bytes: usize) -> usize {
    let per_row = vocab * (2 * dtype.size_in_bytes() + 4);
    (budget_bytes / per_row.max(1)).clamp(1, rows.max(1))
}

/// hidden: [n, D]; weight (lm_head): [V, D]; labels: [n] i64 (−100 = ignored; the caller has
/// already shifted them). Returns (Σ NLL over counted rows as an f32 scalar whose backward gives
/// d/dhidden and d/dweight, number of counted rows). The logits are computed in hidden's dtype,
/// the softmax and loss in f32.
pub fn fused_linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &[i64],
    budget_bytes: usize,
) -> crate::Result<(Tensor, usize)> {
    let (n, d) = hidden.dims2()?;
    let (vocab, dw_) = weight.dims2()?;
    if dw_ != d || labels.len() != n {
        return Err(crate::Error::Shape(format!(
            "hidden {:?}, lm_head {:?}, {} labels",
            hidden.dims(),
            weight.dims(),
            labels.len()
        )));
    }
    let mut rows = Vec::new();
    let mut kept = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == IGNORE_INDEX {
            continue;
        }
        if l < 0 || l as usize >= vocab {
            return Err(crate::Error::Label { label: l, vocab });
        }
        rows.push(i as u32);
        kept.push(l);
    }
    let dev = hidden.device();
    let count = rows.len();
    let zero = Tensor::zeros((), DType::F32, dev)?;
    if count == 0 {
        let none = GradCarrier { dh: None, dw: None };
        return Ok(((hidden.apply_op2(weight, none)? + zero)?, 0));
    }
    let idx = Tensor::from_vec(rows, count, dev)?;
    let h = hidden.detach().index_select(&idx, 0)?; // [c, D]
    let w = weight.detach();
    // Each gradient only where autograd wants it: a frozen lm_head (LoRA) costs no dW GEMM and
    // no [V, D] sum.
    let (want_dh, want_dw) = (hidden.track_op(), weight.track_op());
    let step = chunk_rows(count, vocab, hidden.dtype(), budget_bytes);
    let mut loss = zero;
    let mut dh_parts = Vec::new();
    let mut dw = want_dw
        .then(|| Tensor::zeros((vocab, d), DType::F32, dev))
        .transpose()?;
    for start in (0..count).step_by(step) {
        let len = step.min(count - start);
        let hc = h.narrow(0, start, len)?; // [len, D]
        let logits = hc.matmul(&w.t()?)?; // [len, V]
        let lab = Tensor::from_slice(&kept[start..start + len], len, dev)?;
        let out = logits.apply_op2_no_bwd(&lab, &CeChunk)?; // f32 [len·V + len]
        loss = (loss + out.narrow(0, len * vocab, len)?.sum_all()?)?;
        if want_dh || want_dw {
            let dlogits = out
                .narrow(0, 0, len * vocab)?
                .reshape((len, vocab))?
                .to_dtype(h.dtype())?;
            if want_dh {
                dh_parts.push(dlogits.matmul(&w)?); // [len, D]
            }
            if let Some(dw) = dw.as_mut() {
                *dw = (&*dw + dlogits.t()?.matmul(&hc)?.to_dtype(DType::F32)?)?;
                // [V, D]
            }
        }
    }
    let dh = match want_dh {
        false => None,
        true => {
            let dh_sel = Tensor::cat(&dh_parts, 0)?; // [c, D]
            Some(hidden.zeros_like()?.detach().index_add(&idx, &dh_sel, 0)?) // [n, D]
        }
    };
    let dw = dw.map(|dw| dw.to_dtype(weight.dtype())).transpose()?;
    let carrier = GradCarrier { dh, dw };
    // value = loss (no graph), gradient = the carrier's.
    Ok(((hidden.apply_op2(weight, carrier)? + loss)?, count))
}

/// One chunk: logits [len, V] + labels [len] -> f32 [len·V + len] = (softmax − onehot | loss).
struct CeChunk;

fn ce_rows(logits: &[f32], labels: &[i64], vocab: usize) -> Vec<f32> {
    let n = labels.len();
    let mut out = vec![0f32; n * vocab + n];
    for (row, &label) in labels.iter().enumerate() {
        if label < 0 {
            continue;
        }
        let x = &logits[row * vocab..(row + 1) * vocab];
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let z: f32 = x.iter().map(|&v| (v - m).exp()).sum();
        let g = &mut out[row * vocab..(row + 1) * vocab];
        for j in 0..vocab {
            g[j] = (x[j] - m).exp() / z;
        }
        g[label as usize] -= 1.0;
        out[n * vocab + row] = m + z.ln() - x[label as usize];
    }
    out
}

impl CustomOp2 for CeChunk {
    fn name(&self) -> &'static str {
        "herd-ce-chunk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = l1.shape().dims2()?;
        let out = ce_rows(
            &cpu::f32s(s1, l1, self.name())?,
            &cpu::i64s(s2, l2, self.name())?,
            vocab,
        );
        Ok((CpuStorage::F32(out), Shape::from(n * vocab + n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{alloc_out, herd_ce_chunk, rows_cfg, view};
        let (n, vocab) = l1.shape().dims2()?;
        let dev = s1.device().clone();
        let labels = view::<i64>(s2, l2, self.name())?;
        let mut out = alloc_out::<f32>(&dev, n * vocab + n)?;
        let (n_i, v_i) = (n as i32, vocab as i32);
        macro_rules! go {
            ($ty:ty) => {{
                let logits = view::<$ty>(s1, l1, self.name())?;
                let grid = rows_cfg(n, vocab);
                // SAFETY: logits hold n × vocab elements, labels n, out n × vocab + n.
                unsafe { herd_ce_chunk::<$ty>(&dev, grid, &logits, &labels, &mut out, n_i, v_i) }?;
            }};
        }
        match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            dt => candle_core::bail!("herd-ce-chunk: unsupported dtype {dt:?}"),
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(n * vocab + n),
        ))
    }
}

/// (hidden, weight) -> f32 scalar 0 whose backward is grad·(dh, dW), precomputed (either may
/// be absent: not wanted).
struct GradCarrier {
    dh: Option<Tensor>,
    dw: Option<Tensor>,
}

impl CustomOp2 for GradCarrier {
    fn name(&self) -> &'static str {
        "herd-fused-ce-grad"
    }

    fn cpu_fwd(
        &self,
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let z = dev.alloc_zeros::<f32>(1)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(z, dev),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.dh.is_none() && self.dw.is_none() {
            return Ok((None, None));
        }
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let scaled = |t: &Option<Tensor>| t.as_ref().map(|t| t * g).transpose();
        Ok((scaled(&self.dh)?, scaled(&self.dw)?))
    }
}

/// The unfused loss: full logits, max-subtracted log-softmax, gather (herd-model's loss).
pub fn reference(hidden: &Tensor, weight: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let logits = hidden.matmul(&weight.t()?)?.to_dtype(DType::F32)?; // [n, V]
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lsm = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    let idx: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
    let mask: Vec<f32> = labels
        .iter()
        .map(|&l| (l != IGNORE_INDEX) as u8 as f32)
        .collect();
    let n = labels.len();
    let idx = Tensor::from_vec(idx, (n, 1), hidden.device())?;
    let mask = Tensor::from_vec(mask, n, hidden.device())?;
    (lsm.gather(&idx, 1)?.reshape(n)? * mask)?.sum_all()?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use candle_core::Var;

    fn labels(n: usize, vocab: usize) -> Vec<i64> {
        (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    IGNORE_INDEX
                } else {
                    ((i * 7919) % vocab) as i64
                }
            })
            .collect()
    }

    #[test]
    fn chunk_rows_respects_the_budget() {
        // 32000 vocab in bf16: 2 + 4 + 2 = 8 bytes per logit, 256000 per row
        assert_eq!(chunk_rows(10_000, 32_000, DType::BF16, 256 << 20), 1048);
        assert_eq!(chunk_rows(10, 32_000, DType::BF16, 256 << 20), 10);
        assert_eq!(chunk_rows(10, 32_000, DType::F32, 1), 1);
        assert_eq!(chunk_rows(0, 5, DType::F32, 1000), 1);
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_unfused_loss_for_any_chunking() -> Result<()> {
        let (n, d, vocab) = (23, 16, 50);
        let h = Var::from_tensor(&randn(&[n, d], 41))?;
        let w = Var::from_tensor(&randn(&[vocab, d], 42))?;
        let lab = labels(n, vocab);
        let l0 = reference(&h, &w, &lab)?;
        let g0 = l0.backward()?;
        // budgets giving 1 row, 5 rows and all rows per chunk
        for budget in [1, 5 * vocab * 12, 1 << 30] {
            let (l, count) = fused_linear_cross_entropy(&h, &w, &lab, budget).unwrap();
            assert_eq!(count, lab.iter().filter(|&&l| l != IGNORE_INDEX).count());
            assert_close(&l, &l0, 1e-5);
            // scaled upstream gradient (as a mean over tokens would give)
            let g = (l * 0.5)?.backward()?;
            assert_close(g.get(&h).unwrap(), &(g0.get(&h).unwrap() * 0.5)?, 1e-4);
            assert_close(g.get(&w).unwrap(), &(g0.get(&w).unwrap() * 0.5)?, 1e-4);
        }
        Ok(())
    }

    /// A frozen lm_head (LoRA) or frozen hidden states: the wanted gradient still equals the
    /// unfused one's.
    #[test]
    fn only_the_wanted_gradient_is_made() -> Result<()> {
        let (n, d, vocab) = (9, 8, 30);
        let (hv, wv) = (randn(&[n, d], 45), randn(&[vocab, d], 46));
        let lab = labels(n, vocab);
        let (h, w) = (Var::from_tensor(&hv)?, Var::from_tensor(&wv)?);
        let g0 = reference(&h, &w, &lab)?.backward()?;

        let (l, _) = fused_linear_cross_entropy(&h, &wv, &lab, 1 << 20).unwrap();
        let g = l.backward()?;
        assert_close(g.get(&h).unwrap(), g0.get(&h).unwrap(), 1e-4);
        let (l, _) = fused_linear_cross_entropy(&hv, &w, &lab, 1 << 20).unwrap();
        let g = l.backward()?;
        assert_close(g.get(&w).unwrap(), g0.get(&w).unwrap(), 1e-4);

        // Neither wanted: the loss is a constant.
        let (l, _) = fused_linear_cross_entropy(&hv, &wv, &lab, 1 << 20).unwrap();
        assert!(!l.track_op());
        Ok(())
    }

    #[test]
    fn all_ignored_is_zero_with_no_gradient_and_bad_labels_are_refused() -> Result<()> {
        let h = Var::from_tensor(&randn(&[3, 4], 43))?;
        let w = Var::from_tensor(&randn(&[5, 4], 44))?;
        let (l, c) = fused_linear_cross_entropy(&h, &w, &[IGNORE_INDEX; 3], 1 << 20).unwrap();
        assert_eq!((l.to_scalar::<f32>()?, c), (0.0, 0));
        let e = fused_linear_cross_entropy(&h, &w, &[0, 5, 1], 1 << 20).unwrap_err();
        assert!(e.to_string().contains("label 5"), "{e}");
        Ok(())
    }

    /// cuda/cross_entropy.cu on the host emulator against the host reference: ignored rows
    /// (label −100), a vocabulary inside one block and one wider than it.
    fn emulated_kernel_matches_the_host<T: Emulated>() -> Result<()> {
        let k = T::KERNELS;
        for (n, vocab) in [(5, 1000), (3, 3000)] {
            let logits = randn(&[n, vocab], 51).to_dtype(T::DTYPE)?;
            let mut labels = labels(n, vocab);
            labels[1] = -100;
            let label_t = Tensor::new(labels.as_slice(), &candle_core::Device::Cpu)?;
            let want = logits.apply_op2_no_bwd(&label_t, &CeChunk)?;

            let ls = host::<T>(&logits);
            let mut out = poisoned::<f32>(n * vocab + n);
            let o = out.as_mut_ptr();
            emulate(crate::launch::rows(n, vocab), || unsafe {
                (k.ce_chunk)(ls.as_ptr(), labels.as_ptr(), o, n as i32, vocab as i32)
            });
            // Gradients and row losses apart: the losses (~ln V) would dwarf a gradient error.
            let got = tensor(out, &[n * vocab + n]);
            for (start, len) in [(0, n * vocab), (n * vocab, n)] {
                assert_close(
                    &got.narrow(0, start, len)?,
                    &want.narrow(0, start, len)?,
                    T::TOL,
                );
            }
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
        let (n, d, vocab) = (300, 256, 32000);
        let lab = labels(n, vocab);
        for (dtype, tol) in DTYPES {
            let h = randn(&[n, d], 45).to_dtype(dtype)?;
            let w = (randn(&[vocab, d], 46) * 0.05)?.to_dtype(dtype)?;
            let (gh, gw) = (
                Var::from_tensor(&h.to_device(&gpu())?)?,
                Var::from_tensor(&w.to_device(&gpu())?)?,
            );
            let (ch, cw) = (Var::from_tensor(&h)?, Var::from_tensor(&w)?);
            // a small budget: several chunks on the GPU, one on the CPU
            let (gl, _) = fused_linear_cross_entropy(&gh, &gw, &lab, 64 * vocab * 12).unwrap();
            let (cl, _) = fused_linear_cross_entropy(&ch, &cw, &lab, 1 << 40).unwrap();
            assert_close(&gl, &cl, tol);
            let gg = gl.backward()?;
            let cg = cl.backward()?;
            assert_close(gg.get(&gh).unwrap(), cg.get(&ch).unwrap(), tol);
            assert_close(gg.get(&gw).unwrap(), cg.get(&cw).unwrap(), tol);
        }
        Ok(())
    }
}
