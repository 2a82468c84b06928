//! herd-kernels' CUDA C, run on the host. build.rs compiles every `kernels/cuda/*.cu` as C++
//! against a small emulator of the CUDA builtins the kernels use (include/herd_emu.h): blocks
//! run one after another, a block's threads are OS threads, `__syncthreads` is a barrier, warp
//! shuffles go through shared slots, bf16 is the toolkit's round-to-nearest-even. So CI executes
//! the kernels' indexing, masking, reductions and rounding under the launch shapes the GPU gets
//! (`herd_kernels::launch`), and compares them with the host reference. What it cannot show:
//! the GPU's fast-math intrinsics (`__expf` is `expf` here), timing, and memory-model effects
//! beyond what real threads and barriers exercise.
//!
//! A test-only crate: herd-kernels uses it as a dev-dependency.

use std::ffi::c_void;

pub use half::bf16;

extern "C" {
    fn herd_emu_launch(
        blocks: u32,
        threads: u32,
        body: extern "C" fn(*const c_void),
        ctx: *const c_void,
    );
}

/// Runs `body` as every thread of `blocks` blocks of `threads` threads (1..=1024), returning
/// when all have finished. `body` calls one kernel entry point with the same arguments in every
/// thread; the emulator sets threadIdx/blockIdx around it.
///
/// # Safety
/// `body` runs on many threads at once: every pointer it passes must be valid for the whole
/// extent the kernel reads and writes, and the kernel must write disjoint elements.
pub unsafe fn launch<F: Fn()>(blocks: u32, threads: u32, body: F) {
    extern "C" fn entry<F: Fn()>(ctx: *const c_void) {
        // SAFETY: ctx is the `&F` passed below, alive until herd_emu_launch returns.
        let f = unsafe { &*(ctx as *const F) };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            std::process::abort(); // never unwind into C++
        }
    }
    // SAFETY: the caller guarantees the kernel's arguments; ctx outlives the call.
    unsafe {
        herd_emu_launch(
            blocks,
            threads,
            entry::<F>,
            &body as *const _ as *const c_void,
        )
    }
}

/// The kernels instantiated per storage type (`NAME_f32`, `NAME_bf16` in the .cu files): a table
/// of entry points, so a test is written once, generic over `T`.
macro_rules! per_dtype {
    ($($field:ident: $f32:ident / $bf16:ident ($($arg:ident: $ty:ty),* $(,)?);)*) => {
        /// The entry points of one storage type `T`, with the .cu signatures.
        #[derive(Clone, Copy)]
        pub struct Kernels<T> {
            $(pub $field: unsafe extern "C" fn($($ty),*),)*
        }
        mod ffi_f32 {
            #[allow(unused)]
            type T = f32;
            extern "C" { $(pub fn $f32($($arg: $ty),*);)* }
        }
        mod ffi_bf16 {
            #[allow(unused)]
            type T = half::bf16;
            extern "C" { $(pub fn $bf16($($arg: $ty),*);)* }
        }
        impl Storage for f32 {
            const KERNELS: Kernels<f32> = Kernels { $($field: ffi_f32::$f32,)* };
        }
        impl Storage for half::bf16 {
            const KERNELS: Kernels<half::bf16> = Kernels { $($field: ffi_bf16::$bf16,)* };
        }
    };
}

/// A storage type the kernels are instantiated for (f32, bf16).
pub trait Storage: Copy + Sized + 'static {
    const KERNELS: Kernels<Self>;
}

per_dtype! {
    add_rms_norm_fwd: herd_add_rms_norm_fwd_f32 / herd_add_rms_norm_fwd_bf16 (
        x: *const T, r: *const T, has_r: i32, w: *const T, out: *mut T, rows: i32, d: i32,
        eps: f32);
    add_rms_norm_bwd: herd_add_rms_norm_bwd_f32 / herd_add_rms_norm_bwd_bf16 (
        res: *const T, w: *const T, g: *const T, out: *mut T, rows: i32, d: i32, eps: f32);
    causal_softmax_fwd: herd_causal_softmax_fwd_f32 / herd_causal_softmax_fwd_bf16 (
        s: *const T, p: *mut T, t: i32, keys: i32, scale: f32);
    causal_softmax_bwd: herd_causal_softmax_bwd_f32 / herd_causal_softmax_bwd_bf16 (
        p: *const T, dp: *const T, ds: *mut T, keys: i32, scale: f32);
    ce_chunk: herd_ce_chunk_f32 / herd_ce_chunk_bf16 (
        logits: *const T, labels: *const i64, out: *mut f32, n: i32, vocab: i32);
    rope: herd_rope_f32 / herd_rope_bf16 (
        x: *const T, cos: *const f32, sin: *const f32, y: *mut T, n: usize, t: i32, dh: i32,
        sign: f32);
    swiglu_fwd: herd_swiglu_fwd_f32 / herd_swiglu_fwd_bf16 (
        g: *const T, u: *const T, y: *mut T, n: usize);
    swiglu_bwd: herd_swiglu_bwd_f32 / herd_swiglu_bwd_bf16 (
        g: *const T, u: *const T, dy: *const T, out: *mut T, n: usize);
    accumulate: herd_accumulate_f32 / herd_accumulate_bf16 (
        acc: *mut f32, g: *const T, n: usize);
}

extern "C" {
    /// cuda/sum_squares.cu (f32 only).
    pub fn herd_sum_squares(x: *const f32, n: usize, partial: *mut f32);

    /// cuda/adamw.cu (f32 only).
    pub fn herd_adamw(
        state: *mut f32,
        grad: *const f32,
        starts: *const u64,
        decay_mul: *const f32,
        params: i32,
        n: usize,
        lerp_w: f32,
        b2: f32,
        one_minus_b2: f32,
        step_size: f32,
        bc2_sqrt: f32,
        eps: f32,
        grad_scale: f32,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn every_thread_of_every_block_runs_once() {
        let count = AtomicU32::new(0);
        // SAFETY: the body touches no kernel memory.
        unsafe {
            launch(3, 96, || {
                count.fetch_add(1, Ordering::Relaxed);
            })
        };
        assert_eq!(count.load(Ordering::Relaxed), 3 * 96);
    }

    #[test]
    fn bf16_conversion_matches_the_half_crate() {
        // The kernels' __float2bfloat16 (include/cuda_bf16.h) must round as the host reference
        // does (half::bf16::from_f32): swiglu_fwd with u = 1 returns silu(g) rounded once.
        let g: Vec<bf16> = [0.3f32, -1.7, 2.5e-3, 7.0, -0.0]
            .map(bf16::from_f32)
            .to_vec();
        let u = vec![bf16::ONE; g.len()];
        let mut y = vec![bf16::NAN; g.len()];
        let k = <bf16 as Storage>::KERNELS;
        let (gp, up, yp, n) = (g.as_ptr(), u.as_ptr(), y.as_mut_ptr() as usize, g.len());
        // SAFETY: n elements in each buffer; one thread per element.
        unsafe { launch(1, 32, || (k.swiglu_fwd)(gp, up, yp as *mut bf16, n)) };
        for (gi, yi) in g.iter().zip(&y) {
            let a = gi.to_f32();
            assert_eq!(*yi, bf16::from_f32(a / (1.0 + (-a).exp())), "silu({a})");
        }
    }
}
