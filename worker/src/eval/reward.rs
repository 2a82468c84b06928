//! Reward-model inference: scores of token sequences, of comparison pairs, and their summary
//! (pairwise accuracy, mean margin, mean pairwise loss). Used by the trainer's eval hook,
//! `herd score` and best-of-N reranking in `herd eval`.

use candle_core::Tensor;
use herd_model::RewardModel;

use crate::data::comparisons::{pad_rows, PairExample};
use crate::Result;

/// Rewards of `seqs`, `batch_size` at a time, right-padded with `pad` (no graph kept).
pub fn score_sequences(
    model: &RewardModel,
    seqs: &[Vec<u32>],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|s| s.as_slice()).collect();
        let (ids, t) = pad_rows(&rows, pad);
        let ids = Tensor::from_vec(ids, (rows.len(), t), &model.backbone().device())?;
        out.extend(model.scores_inference(&ids)?);
    }
    Ok(out)
}

/// (r_a, r_b) of every pair.
pub fn score_pairs(
    model: &RewardModel,
    pairs: &[PairExample],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<(f32, f32)>> {
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
        .collect();
    let r = score_sequences(model, &seqs, batch_size * 2, pad)?;
    Ok(r.chunks(2).map(|c| (c[0], c[1])).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairSummary {
    pub pairs: usize,
    /// Fraction of pairs with r_a > r_b (ties count as wrong).
    pub accuracy: f64,
    /// Mean of r_a − r_b.
    pub mean_margin: f64,
    /// Mean of -log σ(r_a − r_b).
    pub loss: f64,
}

pub fn summarize(scores: &[(f32, f32)]) -> PairSummary {
    let n = scores.len();
    if n == 0 {
        return PairSummary::default();
    }
    let (mut right, mut margin, mut loss) = (0usize, 0.0f64, 0.0f64);
    for &(a, b) in scores {
        let d = a as f64 - b as f64;
        right += usize::from(d > 0.0);
        margin += d;
        loss += (-d).max(0.0) + (-d.abs()).exp().ln_1p(); // softplus(-d), stable
    }
    PairSummary {
        pairs: n,
        accuracy: right as f64 / n as f64,
        mean_margin: margin / n as f64,
        loss: loss / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_pairs() {
        let s = summarize(&[(1.0, 0.0), (0.0, 2.0), (3.0, 3.0), (500.0, -500.0)]);
        assert_eq!(s.pairs, 4);
        assert_eq!(s.accuracy, 0.5);
        assert!((s.mean_margin - (1.0 - 2.0 + 0.0 + 1000.0) / 4.0).abs() < 1e-9);
        let expected =
            ((1.0f64 + (-1.0f64).exp()).ln() + (1.0f64 + 2.0f64.exp()).ln() + 2.0f64.ln() + 0.0)
                / 4.0;
        assert!((s.loss - expected).abs() < 1e-9, "{} {expected}", s.loss);
        assert_eq!(summarize(&[]), PairSummary::default());
    }
}
