//! NEFTune (Jain et al. 2023; HF Trainer's `neftune_noise_alpha`): during training the input
//! embeddings get uniform noise in [-m, m], m = alpha / sqrt(t · hidden) for a [b, t, hidden]
//! batch, as transformers' `neftune_post_forward_hook` adds it; evaluation and generation see
//! none.
//!
//! torch's RNG stream cannot be reproduced, so the noise is herd's own: element (row, pos, i) is
//! the i-th uniform draw of SplitMix64 seeded with mix(mix(row key, NEFTUNE), pos), the row key
//! being the dropout key of the row (seed, optimizer step, the row's tokens). It depends on what
//! a row is, not where it sits, so resume and any rank count give the same noise.

use std::sync::{Arc, RwLock};

use candle_core::Tensor;

use crate::init::SplitMix64;
use crate::lora::mix;
use crate::Result;

/// Tells the noise apart from the LoRA dropout masks drawn from the same row keys.
const NEFTUNE: u64 = 0x4E45_4654_554E_4531;

/// The noise of the next training forwards: alpha and one key per batch row; unset (None) is
/// no noise, as in eval mode. Shared by the clones of a training net.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingNoise(Arc<RwLock<Option<Noise>>>);

/// alpha and one key per batch row.
type Noise = (f64, Vec<u64>);

impl EmbeddingNoise {
    pub fn set(&self, noise: Option<Noise>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = noise;
    }

    fn get(&self) -> Option<Noise> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// x [b, t, hidden] (the embeddings) plus the noise, or x itself when none is set.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let Some((alpha, keys)) = self.get() else {
            return Ok(x.clone());
        };
        let (b, t, h) = x.dims3()?;
        if keys.len() != b {
            return Err(crate::Error::InvalidArgument(format!(
                "neftune: {} row keys set for a batch of {b} rows",
                keys.len()
            )));
        }
        let noise = Tensor::from_vec(values(alpha, &keys, t, h), (b, t, h), x.device())?;
        Ok((x + noise.to_dtype(x.dtype())?)?)
    }
}

/// The noise values, rows first: uniform in [-m, m), m = alpha / sqrt(t · h).
fn values(alpha: f64, keys: &[u64], t: usize, h: usize) -> Vec<f32> {
    let magnitude = alpha / ((t * h) as f64).sqrt();
    let mut out = Vec::with_capacity(keys.len() * t * h);
    for &key in keys {
        let row = mix(key, NEFTUNE);
        for pos in 0..t {
            let mut rng = SplitMix64::new(mix(row, pos as u64));
            out.extend((0..h).map(|_| ((rng.next_f64() * 2.0 - 1.0) * magnitude) as f32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn values_of(noise: &EmbeddingNoise, x: &Tensor) -> Vec<f32> {
        noise
            .apply(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn noise_is_bounded_centred_keyed_and_off_by_default() {
        let x = Tensor::zeros((2, 8, 16), DType::F32, &Device::Cpu).unwrap();
        let noise = EmbeddingNoise::default();
        let plain = values_of(&noise, &x);
        assert!(plain.iter().all(|&v| v == 0.0));
        noise.set(Some((5.0, vec![11, 12])));
        let a = values_of(&noise, &x);
        let m = (5.0 / (8.0f64 * 16.0).sqrt()) as f32;
        assert!(
            a.iter().all(|v| v.abs() <= m),
            "bounded by alpha / sqrt(t·h)"
        );
        let max = a.iter().fold(0f32, |s, v| s.max(v.abs()));
        assert!(max > 0.95 * m, "fills [-m, m]: max {max} of {m}");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05 * m, "centred: mean {mean}");
        // The same keys give the same noise; a row's noise depends only on its own key.
        let again = values_of(&noise, &x);
        assert_eq!(a, again);
        noise.set(Some((5.0, vec![12])));
        let one = Tensor::zeros((1, 8, 16), DType::F32, &Device::Cpu).unwrap();
        let row = values_of(&noise, &one);
        assert_eq!(row, a[128..]);
        noise.set(None);
        assert_eq!(values_of(&noise, &x), plain);
        noise.set(Some((5.0, vec![1])));
        assert!(noise.apply(&x).is_err(), "one key per row");
    }
}
