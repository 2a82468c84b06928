//! Rotary position embeddings as transformers' `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`:
//! inv_freq from rope_theta (optionally rescaled by `rope_scaling`: "linear" or "llama3"),
//! cos/sin of position * inv_freq duplicated over both halves, and the rotate_half convention
//! (pairs are (i, i + d/2), not interleaved (2i, 2i+1) as in Meta's original checkpoints).
//!
//! cos/sin are computed per call for the positions in use (cheap: t x d/2 values), so there is no
//! table to size and a KV-cache step just passes its offset.

use candle_core::{Device, Tensor, D};

use crate::config::LlamaConfig;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>, // [head_dim / 2]
}

impl Rope {
    pub fn new(cfg: &LlamaConfig) -> Self {
        let dim = cfg.head_dim();
        // f32 throughout, like HF: base ** (arange(0, dim, 2) / dim) in float32.
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        if let Some(rs) = &cfg.rope_scaling {
            match rs.kind() {
                "linear" => {
                    let factor = rs.factor.unwrap_or(1.0) as f32;
                    inv_freq.iter_mut().for_each(|f| *f /= factor);
                }
                "llama3" => llama3_scale(
                    &mut inv_freq,
                    rs.factor.unwrap_or(1.0) as f32,
                    rs.low_freq_factor.unwrap_or(1.0) as f32,
                    rs.high_freq_factor.unwrap_or(4.0) as f32,
                    rs.original_max_position_embeddings.unwrap_or(8192) as f32,
                ),
                _ => {} // "default"; others are rejected by LlamaConfig::validate
            }
        }
        Self { inv_freq }
    }

    /// cos and sin for positions offset..offset+t, each [t, head_dim].
    pub fn cos_sin(&self, offset: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let positions: Vec<u32> = (offset..offset + t).map(|p| p as u32).collect();
        self.cos_sin_at(&positions, device)
    }

    /// cos and sin for arbitrary positions (one per token, e.g. restarting at 0 for each packed
    /// example), each [n, head_dim] for n = positions.len().
    pub fn cos_sin_at(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * 2 * half);
        let mut sin = Vec::with_capacity(n * 2 * half);
        for &p in positions {
            // emb = cat(freqs, freqs): the same angle for column i and i + d/2.
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (n, 2 * half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// x: [b, heads, t, head_dim]; cos/sin: [t, head_dim] (or [b, 1, t, head_dim] for per-row
    /// positions). x * cos + rotate_half(x) * sin.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // The kernel takes one [t, head_dim] table; per-row positions go the unfused way.
        if herd_kernels::fused(x.device()) && cos.rank() == 2 {
            return Ok(herd_kernels::rope(x, cos, sin)?); // fused, CUDA issue #5
        }
        // The tables are f32; like transformers, cast them to x's dtype (bf16 on bf16 ranks).
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        Ok((x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?)?)
    }
}

/// rotate_half([x1, x2]) = [-x2, x1] with x1, x2 the two halves of the last dim.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// transformers' `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short
/// ones kept, and the band between interpolated smoothly.
fn llama3_scale(inv_freq: &mut [f32], factor: f32, low: f32, high: f32, old_ctx: f32) {
    let low_freq_wavelen = old_ctx / low;
    let high_freq_wavelen = old_ctx / high;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_freq_wavelen {
            *f / factor
        } else {
            *f
        };
        // HF: ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen) (wavelen is finite).
        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
        *f = if is_medium {
            let smooth = (old_ctx / wavelen - low) / (high - low);
            (1.0 - smooth) * scaled / factor + smooth * scaled
        } else {
            scaled
        };
    }
}
