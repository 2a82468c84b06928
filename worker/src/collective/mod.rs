//! The gradient collective: how ranks combine what they computed. It works over flat f32 buffers
//! so backends stay simple (single process now; a TCP ring for CPU workers and NCCL for GPUs plug
//! in behind the same trait). The trainer sums token-NLL gradients and token counts across ranks,
//! then divides by the global count: N ranks with batch b equal one rank with batch N·b.

use candle_core::{DType, Tensor};
use half::bf16;

use crate::Result;

#[cfg(feature = "cuda")]
mod nccl;
mod tcp;
#[cfg(feature = "cuda")]
pub use nccl::NcclCollective;
pub use tcp::{RingAborter, TcpRing};

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` across all ranks, in a fixed reduction order; every rank ends
    /// with the same result.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// The same sum over a flat f32 tensor, returned on the tensor's device. By default it is
    /// staged through host memory; a device backend (NCCL) sums in place where the tensor lives.
    fn all_reduce_sum_tensor(&mut self, t: Tensor) -> Result<Tensor> {
        through_host(t, |host| self.all_reduce_sum(host))
    }
    /// Every rank ends with rank `root`'s `buf`, bit for bit (a NaN stays a NaN). By default an
    /// all-reduce to which the other ranks contribute -0.0 (x + -0.0 is x for every x, +0.0
    /// included), so any backend has it; ZeRO-1 uses it to share the parameters each rank
    /// updated. The TCP ring passes the buffer along instead (half the traffic).
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if self.rank() != root {
            buf.fill(-0.0);
        }
        self.all_reduce_sum(buf)
    }
    /// `broadcast` of a flat f32 or bf16 tensor, returned on its device; staged through host
    /// memory by default (bf16 two to a word, [`bf16_through_host`]: half the bytes of f32),
    /// in place on the GPU with NCCL.
    fn broadcast_tensor(&mut self, t: Tensor, root: usize) -> Result<Tensor> {
        broadcast_through_host(self, t, root)
    }
    /// Rank `root` ends with the element-wise sum of every rank's `buf`; the other ranks'
    /// buffers hold partial sums afterwards (used up). By default an all-reduce, so any backend
    /// has it; ZeRO-2 sends each gradient part to the rank that owns it this way. The TCP ring
    /// sums along the ring into the root instead (half the traffic).
    fn reduce(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let _ = root;
        self.all_reduce_sum(buf)
    }
    /// `reduce` of a flat f32 tensor: the root's answer on the tensor's device (the other
    /// ranks' answer is used up); staged through host memory by default, in place on the GPU
    /// with NCCL.
    fn reduce_tensor(&mut self, t: Tensor, root: usize) -> Result<Tensor> {
        through_host(t, |host| self.reduce(host, root))
    }
    /// Runs `hook` with the reason when this collective is aborted from outside (the daemon's
    /// stop order), at once if it already was, so a collective bootstrapped over it (NCCL over
    /// the TCP ring) ends with it. A collective that cannot be aborted drops the hook.
    fn on_abort(&mut self, hook: AbortHook) {
        drop(hook);
    }
    fn name(&self) -> &'static str;
}

/// What [`Collective::on_abort`] runs: it gets the abort's reason, on the aborting thread, so it
/// must not block.
pub type AbortHook = Box<dyn Fn(&str) + Send>;

/// Whether a job's gradients go over NCCL, from the count of its GPU ranks (every rank
/// all-reduces a 1 if it is on a GPU, first thing): all ranks or none must be GPU ranks, or the
/// two kinds would run different collectives and fail with a puzzling error later.
pub fn all_on_gpus(gpu_ranks: f32, world: usize, rank: usize, on_gpu: bool) -> Result<bool> {
    let n = gpu_ranks.round() as usize;
    if n == 0 || n == world {
        return Ok(n == world);
    }
    Err(crate::Error::Collective {
        backend: "placement",
        reason: format!(
            "{n} of the job's {world} ranks are on GPUs and the others on CPUs (rank {rank} is \
             on {}); a job's ranks must all be GPU ranks or all CPU ranks: start its workers \
             all with --device cuda:N or all with --device cpu",
            if on_gpu { "a GPU" } else { "the CPU" }
        ),
    })
}

/// A tensor collective for host collectives: copy out, run `op` on the host values, copy back.
pub fn through_host(t: Tensor, op: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Tensor> {
    let mut host = t.flatten_all()?.to_vec1::<f32>()?;
    op(&mut host)?;
    Ok(Tensor::from_vec(host, t.shape(), t.device())?)
}

/// `broadcast_tensor` for host collectives: f32 as it is, bf16 two values to a word.
pub fn broadcast_through_host<C: Collective + ?Sized>(
    c: &mut C,
    t: Tensor,
    root: usize,
) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 => bf16_through_host(t, |words| c.broadcast(words, root)),
        _ => through_host(t, |host| c.broadcast(host, root)),
    }
}

/// A bit-copying tensor collective (a broadcast) on bf16 values: their bits travel two to an
/// f32 word (an odd tail padded with zero), so the bytes are the bf16 tensor's own. Only for
/// ops that copy words: a sum of such words means nothing.
pub fn bf16_through_host(t: Tensor, op: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Tensor> {
    let values = t.flatten_all()?.to_vec1::<bf16>()?;
    let mut words: Vec<f32> = values
        .chunks(2)
        .map(|pair| {
            let low = pair[0].to_bits() as u32;
            let high = pair.get(1).map_or(0, |x| x.to_bits() as u32);
            f32::from_bits(high << 16 | low)
        })
        .collect();
    op(&mut words)?;
    let back: Vec<bf16> = words
        .iter()
        .flat_map(|w| {
            let bits = w.to_bits();
            [
                bf16::from_bits(bits as u16),
                bf16::from_bits((bits >> 16) as u16),
            ]
        })
        .take(values.len())
        .collect();
    Ok(Tensor::from_vec(back, t.shape(), t.device())?)
}

/// World size 1: the sum over one rank is the buffer itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "single-process"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_all_on_gpus_or_all_on_cpus() {
        assert!(!all_on_gpus(0.0, 3, 1, false).unwrap());
        assert!(all_on_gpus(3.0, 3, 1, true).unwrap());
        let e = all_on_gpus(1.0, 2, 1, false).unwrap_err().to_string();
        assert!(
            e.contains("1 of the job's 2 ranks are on GPUs") && e.contains("rank 1 is on the CPU"),
            "{e}"
        );
        assert!(all_on_gpus(2.0, 3, 0, true).is_err());
    }

    /// Rank 1 of two, whose all-reduce adds rank 0's buffer to its own.
    struct SecondOfTwo(Vec<f32>);

    impl Collective for SecondOfTwo {
        fn rank(&self) -> usize {
            1
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
            for (b, x) in buf.iter_mut().zip(&self.0) {
                *b += x;
            }
            Ok(())
        }
        fn name(&self) -> &'static str {
            "second-of-two"
        }
    }

    #[test]
    fn the_default_broadcast_keeps_the_roots_bits_signed_zeros_included() {
        let root = vec![
            0.0,
            -0.0,
            1.5,
            -3.25e-30,
            f32::INFINITY,
            f32::MIN_POSITIVE / 4.0,
        ];
        let mut c = SecondOfTwo(root.clone());
        let mut buf = vec![7.0; root.len()];
        c.broadcast(&mut buf, 0).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&buf), bits(&root));
        let mut nan = SecondOfTwo(vec![f32::NAN]);
        let mut buf = vec![0.0];
        nan.broadcast(&mut buf, 0).unwrap();
        assert!(buf[0].is_nan());
    }

    #[test]
    fn a_bf16_tensor_broadcast_travels_two_values_to_a_word_and_keeps_their_bits() {
        let values: Vec<bf16> = [0.0f32, -0.0, 1.5, -3.0e-39, 65504.0, -2.5e38, 7.0]
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        let device = candle_core::Device::Cpu;
        // Rank 0's words as the root sends them: an odd count, so the last word is padded.
        let sent = bf16_through_host(Tensor::new(values.as_slice(), &device).unwrap(), |w| {
            assert_eq!(w.len(), 4, "two bf16 per word, the tail padded");
            assert_eq!(
                w[0].to_bits(),
                (values[1].to_bits() as u32) << 16 | values[0].to_bits() as u32
            );
            Ok(())
        })
        .unwrap();
        assert_eq!(sent.to_vec1::<bf16>().unwrap(), values, "round trip");
        let mut words = vec![];
        bf16_through_host(Tensor::new(values.as_slice(), &device).unwrap(), |w| {
            words = w.to_vec();
            Ok(())
        })
        .unwrap();
        let mut c = SecondOfTwo(words);
        let mine = Tensor::zeros(values.len(), DType::BF16, &device).unwrap();
        let got = c.broadcast_tensor(mine, 0).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.to_vec1::<bf16>().unwrap()), bits(&values));
    }
}
