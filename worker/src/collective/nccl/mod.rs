//! The NCCL backend (feature `cuda`): GPU ranks sum their gradients with ncclAllReduce.
//!
//! Rendezvous: rank 0 creates the NCCL unique id (128 bytes naming its bootstrap listener) and
//! it reaches the other ranks over the job's own TCP collective, which is already authenticated
//! with the per-attempt secret: one all-reduce of 128 floats to which only rank 0 contributes
//! (bytes 0..=255 sum exactly in f32). So the coordinator never sees or orders NCCL ids, no rank
//! waits on another's report, and a restarted attempt gets a fresh id with its fresh ring. The
//! Assignment's `nccl_id` field stays unused (reserved).
//!
//! Aborts: the communicator ([`comm`]) is non-blocking and its handle can be aborted from
//! another thread. The daemon's stop order aborts the TCP ring, whose abort hook aborts the
//! communicator; a watchdog thread aborts it on NCCL's asynchronous error. Either way a rank
//! blocked in a collective on a dead or hung peer ends at once with "aborted: why", as a CPU
//! rank's TCP ring does, and its GPU is free for the restarted attempt.
//!
//! ZeRO-1 shares each rank's updated weights with ncclBroadcast, and ZeRO-2 sends each gradient
//! part to its owner with ncclReduce, both in place on the device.
//!
//! The mixed-precision gradient lives on the GPU as one flat f32 tensor, and
//! `all_reduce_sum_tensor` sums it in place there, bucket by bucket, on candle's stream (so it is
//! ordered after the backward and before the optimizer with no host sync). Host buffers (the
//! step's loss and token counts, a few floats) are staged through one device buffer: copy in,
//! all-reduce in place, copy out. At two ranks a sum has one order; beyond, NCCL picks its
//! algorithm and protocol by size and topology and does not promise the same reduction order
//! run to run (NCCL_ALGO and NCCL_PROTO pin them).

mod comm;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::result::get_uniqueid;
use candle_core::cuda_backend::cudarc::nccl::safe::NcclType;
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use half::bf16;

use super::Collective;
use crate::Result;
use comm::{Communicator, Op};

/// f32 elements per bucket (64 MiB; also the host path's staging memory).
pub const BUCKET_ELEMS: usize = 16 << 20;

pub struct NcclCollective {
    comm: Communicator,
    stream: Arc<CudaStream>,
    staging: CudaSlice<f32>,
    device: Device,
    rank: usize,
    world: usize,
}

// SAFETY: the stream and the staging buffer are used by one thread at a time (the rank's
// trainer thread owns this value); the communicator guards its own handle.
unsafe impl Send for NcclCollective {}

fn nccl_error(rank: usize, world: usize, what: &str, e: impl std::fmt::Display) -> crate::Error {
    herd_kernels::Error::Nccl {
        rank,
        world,
        message: format!("{what}: {e}"),
    }
    .into()
}

impl NcclCollective {
    /// Join the NCCL job of `bootstrap`'s ranks on `device`, the id carried by `bootstrap`.
    pub fn new(device: &Device, bootstrap: &mut dyn Collective) -> Result<Self> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        let Device::Cuda(dev) = device else {
            return Err(nccl_error(
                rank,
                world,
                "NCCL needs a CUDA device",
                format!("{:?}", device.location()),
            ));
        };
        let mut bytes = [0f32; 128];
        if rank == 0 {
            let id = get_uniqueid()
                .map_err(|e| nccl_error(rank, world, "ncclGetUniqueId", comm::describe(e.0)))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal.iter()) {
                *b = c as u8 as f32;
            }
        }
        bootstrap.all_reduce_sum(&mut bytes)?;
        let id = sys::ncclUniqueId {
            internal: id_from_sums(&bytes),
        };
        let stream = dev.cuda_stream();
        let comm = Communicator::start(stream.clone(), rank, world, id)
            .map_err(|e| nccl_error(rank, world, "joining the NCCL job", e))?;
        // A stop order that aborts the TCP ring (the daemon's handle on this rank) aborts the
        // communicator too, from a thread of its own: NCCL's abort may take a moment.
        let aborter = comm.aborter();
        bootstrap.on_abort(Box::new(move |why: &str| {
            let (aborter, why) = (aborter.clone(), why.to_string());
            let _ = std::thread::Builder::new()
                .name("nccl-abort".into())
                .spawn(move || aborter.abort(&why));
        }));
        comm.ready()
            .map_err(|e| nccl_error(rank, world, "joining the NCCL job", e))?;
        let staging = stream
            .alloc_zeros::<f32>(BUCKET_ELEMS)
            .map_err(|e| nccl_error(rank, world, "staging buffer", e))?;
        tracing::info!(rank, world, "NCCL communicator ready");
        Ok(NcclCollective {
            comm,
            stream,
            staging,
            device: device.clone(),
            rank,
            world,
        })
    }

    /// `op` in place on `t` where it lives when that is this GPU and `t` is f32 (or bf16, for a
    /// broadcast), in buckets on candle's stream; None otherwise, for the caller to stage
    /// through host memory.
    fn on_device(&self, t: &Tensor, op: Op, what: &str) -> Result<Option<Tensor>> {
        // A broadcast copies bf16 as it is; the sums are f32.
        let dtype_ok = match op {
            Op::Broadcast(_) => matches!(t.dtype(), DType::F32 | DType::BF16),
            Op::Sum | Op::Reduce(_) => t.dtype() == DType::F32,
        };
        if !t.device().same_device(&self.device) || !dtype_ok {
            return Ok(None);
        }
        let t = t.contiguous()?;
        t.inplace_op1(&InPlace {
            comm: &self.comm,
            op,
        })
        .map_err(|e| nccl_error(self.rank, self.world, what, e))?;
        Ok(Some(t))
    }
}

/// The id bytes back from the f32 sums (only rank 0 contributed, each 0..=255).
fn id_from_sums(sums: &[f32; 128]) -> [std::ffi::c_char; 128] {
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, &s) in internal.iter_mut().zip(sums) {
        *c = s.round().clamp(0.0, 255.0) as u8 as std::ffi::c_char;
    }
    internal
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        for chunk in buf.chunks_mut(BUCKET_ELEMS) {
            let mut dst = self.staging.slice_mut(0..chunk.len());
            self.stream
                .memcpy_htod(&*chunk, &mut dst)
                .map_err(|e| nccl_error(rank, world, "copy to device", e))?;
            self.comm
                .run(Op::Sum, &mut dst)
                .map_err(|e| nccl_error(rank, world, "host buffer", e))?;
            self.stream
                .memcpy_dtoh(&dst, chunk)
                .map_err(|e| nccl_error(rank, world, "copy to host", e))?;
        }
        self.stream
            .synchronize()
            .map_err(|e| nccl_error(rank, world, "synchronize", e))?;
        Ok(())
    }
    fn all_reduce_sum_tensor(&mut self, t: Tensor) -> Result<Tensor> {
        match self.on_device(&t, Op::Sum, "ncclAllReduce")? {
            Some(t) => Ok(t),
            None => super::through_host(t, |host| self.all_reduce_sum(host)),
        }
    }
    fn broadcast_tensor(&mut self, t: Tensor, root: usize) -> Result<Tensor> {
        match self.on_device(&t, Op::Broadcast(root as i32), "ncclBroadcast")? {
            Some(t) => Ok(t),
            None => super::broadcast_through_host(self, t, root),
        }
    }
    fn reduce_tensor(&mut self, t: Tensor, root: usize) -> Result<Tensor> {
        match self.on_device(&t, Op::Reduce(root as i32), "ncclReduce")? {
            Some(t) => Ok(t),
            None => super::through_host(t, |host| self.reduce(host, root)),
        }
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

/// An NCCL collective in place on a flat tensor's device memory (f32; bf16 for a broadcast),
/// in buckets.
struct InPlace<'a> {
    comm: &'a Communicator,
    op: Op,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        match self.op {
            Op::Sum => "herd-nccl-all-reduce",
            Op::Broadcast(_) => "herd-nccl-broadcast",
            Op::Reduce(_) => "herd-nccl-reduce",
        }
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL works on GPU memory; a CPU tensor goes through the host path")
    }

    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the buffer must be contiguous", self.name())
        };
        match storage.dtype() {
            DType::F32 => self.run(storage.as_cuda_slice_mut::<f32>()?, a..b),
            DType::BF16 => match self.op {
                Op::Broadcast(_) => self.run(storage.as_cuda_slice_mut::<bf16>()?, a..b),
                _ => candle_core::bail!("{}: sums are f32, this is bf16", self.name()),
            },
            other => candle_core::bail!("{}: no NCCL op on {other:?}", self.name()),
        }
    }
}

impl InPlace<'_> {
    /// The op on `slice[range]`, bucket by bucket.
    fn run<T: NcclType + DeviceRepr>(
        &self,
        slice: &mut CudaSlice<T>,
        range: std::ops::Range<usize>,
    ) -> candle_core::Result<()> {
        let mut start = range.start;
        while start < range.end {
            let end = (start + BUCKET_ELEMS).min(range.end);
            let mut bucket = slice.slice_mut(start..end);
            self.comm
                .run(self.op, &mut bucket)
                .map_err(candle_core::Error::Msg)?;
            start = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bytes_survive_the_f32_sum() {
        let mut sums = [0f32; 128];
        for (i, s) in sums.iter_mut().enumerate() {
            *s = ((i * 37) % 256) as u8 as f32;
        }
        let id = id_from_sums(&sums);
        for (i, &c) in id.iter().enumerate() {
            assert_eq!(c as u8 as usize, (i * 37) % 256);
        }
    }
}
