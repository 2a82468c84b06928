//! Host helpers of the `cpu_fwd` paths: contiguous f32 views in, storage of the op's dtype out.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result};
use half::bf16;

/// The contiguous elements of `s` under `l`, as f32 (bf16 widened exactly).
pub(crate) fn f32s(s: &CpuStorage, l: &Layout, op: &'static str) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// The contiguous elements of an i64 tensor (labels).
pub(crate) fn i64s(s: &CpuStorage, l: &Layout, op: &'static str) -> Result<Vec<i64>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: labels must be contiguous")
    };
    match s {
        CpuStorage::I64(v) => Ok(v[a..b].to_vec()),
        other => bail!("{op}: labels must be i64, got {:?}", other.dtype()),
    }
}

/// f32 results stored as `dtype` (rounded to nearest for bf16, like the kernels' __float2bfloat16).
pub(crate) fn store(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// Round through `dtype` (what storing and reloading an intermediate does).
pub(crate) fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}
