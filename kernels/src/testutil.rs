//! Test helpers: seeded inputs, a normwise comparison, the GPU.

use candle_core::{DType, Device, Tensor};

/// Standard-normal-ish f32 values from a seeded SplitMix64 (no rand dependency; fresh per seed).
pub fn randn(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32
    };
    // Sum of 4 uniforms, centred and scaled: close enough to normal for kernel tests.
    let v: Vec<f32> = (0..n)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.7)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// max |a - b| <= tol * max |b| (normwise relative), and no NaN anywhere in `a` (outputs are
/// NaN-poisoned in tests, so an unwritten element fails here).
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    assert!(
        a.iter().all(|x| !x.is_nan()),
        "result has NaN (unwritten element?)"
    );
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        (diff / scale) as f64 <= tol,
        "max diff {diff} vs max |ref| {scale}: relative {} > {tol}",
        diff / scale
    );
}

#[cfg(feature = "cuda")]
pub const DTYPES: [(DType, f64); 2] = [(DType::F32, 1e-4), (DType::BF16, 1e-2)];

#[cfg(feature = "cuda")]
pub fn gpu() -> Device {
    Device::new_cuda(0).expect("cuda:0")
}

/// The storage types the CUDA C is instantiated for, with the tolerances: f32 differs
/// from the host reference by summation order and expf only; bf16 by a rounding of the result.
pub trait Emulated: herd_kernels_emu::Storage + candle_core::WithDType {
    const TOL: f64;
}
impl Emulated for f32 {
    const TOL: f64 = 1e-5;
}
impl Emulated for half::bf16 {
    const TOL: f64 = 1e-2;
}

/// Runs one kernel entry point on the host emulator under the launch shape the GPU gets.
pub fn emulate(grid: crate::launch::Grid, body: impl Fn()) {
    // SAFETY: every caller passes buffers sized for the kernel's extent under `grid` (the same
    // sizes its cuda_fwd allocates), and the kernels write disjoint elements.
    unsafe { herd_kernels_emu::launch(grid.blocks, grid.threads, body) }
}

/// A tensor's elements on the host, as `T` (the kernels' input buffers).
pub fn host<T: candle_core::WithDType>(t: &Tensor) -> Vec<T> {
    t.to_dtype(T::DTYPE)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// An output buffer of NaNs, as `alloc_out` makes under test on the GPU: an element the kernel
/// leaves unwritten fails `assert_close`.
pub fn poisoned<T: candle_core::WithDType>(n: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); n]
}

/// A kernel's output buffer as a tensor, to compare with the host reference.
pub fn tensor<T: candle_core::WithDType>(v: Vec<T>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}
