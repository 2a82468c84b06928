//! The device's default CUDA memory pool, which candle's `cuMemAllocAsync` allocations come
//! from: keeping freed memory in it, giving it back, and its high-water mark.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;

/// The default pool of `d`'s device, its context made current on this thread. None when the
/// device has no memory pools (cudarc then allocates synchronously, outside any pool).
fn default_pool(d: &CudaDevice) -> Option<sys::CUmemoryPool> {
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if ctx.bind_to_thread().is_err() || !ctx.has_async_alloc() {
        return None;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes the pool handle only; the context is current.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .ok()?;
    Some(pool)
}

/// The pool's release threshold is 0 by default: at every synchronization (each step reads its
/// loss back) it hands all freed memory back to the driver, and the next step maps its
/// activations anew. "Never" keeps freed memory for reuse, as PyTorch's caching allocator does;
/// the allocated peak ([`used_high`]) does not change. A failure leaves the default: a slower
/// run, not a wrong one.
pub(super) fn keep_freed(d: &CudaDevice) {
    let Some(pool) = default_pool(d) else { return };
    let mut never = u64::MAX;
    // SAFETY: CU_MEMPOOL_ATTR_RELEASE_THRESHOLD reads a u64 from the pointer handed to it.
    let _ = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut never as *mut u64 as *mut std::ffi::c_void,
        )
    };
}

/// Gives the memory the pool keeps but nobody uses back to the driver (after the stream's
/// pending frees are done), so the driver's free figure counts it: a daemon's next job must
/// not be refused for memory its previous one left in the pool.
pub(super) fn trim(d: &CudaDevice) {
    if d.cuda_stream().synchronize().is_err() {
        return;
    }
    let Some(pool) = default_pool(d) else { return };
    // SAFETY: a plain request on a live pool; it frees only memory no allocation holds.
    let _ = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
}

/// `CU_MEMPOOL_ATTR_USED_MEM_HIGH`: the most bytes allocated from the pool at once.
pub(super) fn used_high(d: &CudaDevice) -> Option<u64> {
    let pool = default_pool(d)?;
    let mut high: u64 = 0;
    // SAFETY: writes the u64 this attribute is.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut high as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .ok()?;
    Some(high)
}
