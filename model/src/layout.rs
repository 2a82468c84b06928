//! `Layout`: how the tokens of a `[b, t]` batch are laid out when several examples share a row
//! (sequence packing). Each token carries a segment id (which example of its row it belongs to)
//! and a position id (its index inside that example, restarting at 0 for every example).
//!
//! The forward uses them in two places only:
//! - RoPE rotates each token by its own position id, so a packed example sees the same angles
//!   as it would alone in a row;
//! - attention adds a block-diagonal causal mask: query i sees key j only when
//!   segment[i] == segment[j] and j <= i, so attention never crosses an example boundary.
//!
//! With both, every real token's logits equal those of the example run unpacked (up to float
//! summation order). Without a layout the model runs its plain causal path, unchanged.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    batch: usize,
    seq_len: usize,
    position_ids: Vec<u32>, // [b * t], row-major
    segment_ids: Vec<u32>,  // [b * t], row-major
}

impl Layout {
    /// Position and segment ids, each `[batch, seq_len]` row-major. Within a row, a segment must
    /// be contiguous and its positions must count 0, 1, 2, ... from its first token.
    pub fn new(
        batch: usize,
        seq_len: usize,
        position_ids: Vec<u32>,
        segment_ids: Vec<u32>,
    ) -> Result<Self> {
        let n = batch * seq_len;
        if position_ids.len() != n || segment_ids.len() != n {
            return Err(Error::InvalidArgument(format!(
                "layout of [{batch}, {seq_len}] needs {n} position and segment ids, got {} and {}",
                position_ids.len(),
                segment_ids.len()
            )));
        }
        for row in 0..batch {
            let r = row * seq_len..(row + 1) * seq_len;
            let (pos, seg) = (&position_ids[r.clone()], &segment_ids[r]);
            for i in 0..seq_len {
                let starts = i == 0 || seg[i] != seg[i - 1];
                let expected = if starts { 0 } else { pos[i - 1] + 1 };
                if pos[i] != expected || (starts && seg[..i].contains(&seg[i])) {
                    return Err(Error::InvalidArgument(format!(
                        "layout row {row}, token {i}: segments must be contiguous with positions \
                         counting from 0"
                    )));
                }
            }
        }
        Ok(Layout {
            batch,
            seq_len,
            position_ids,
            segment_ids,
        })
    }

    /// Rows of `seq_len` tokens holding examples of the given lengths back to back; the rest of
    /// each row (padding) is one more segment, so pad queries attend only to pads.
    pub fn from_lengths(seq_len: usize, rows: &[Vec<usize>]) -> Result<Self> {
        let mut position_ids = Vec::with_capacity(rows.len() * seq_len);
        let mut segment_ids = Vec::with_capacity(rows.len() * seq_len);
        for (r, lengths) in rows.iter().enumerate() {
            let used: usize = lengths.iter().sum();
            if used > seq_len {
                return Err(Error::InvalidArgument(format!(
                    "layout row {r}: examples of {used} tokens exceed the row length {seq_len}"
                )));
            }
            let pad = seq_len - used;
            let segments = lengths.iter().copied().chain((pad > 0).then_some(pad));
            for (s, len) in segments.enumerate() {
                position_ids.extend(0..len as u32);
                segment_ids.extend(std::iter::repeat_n(s as u32, len));
            }
        }
        Self::new(rows.len(), seq_len, position_ids, segment_ids)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.seq_len)
    }

    /// `[b * t]` position ids, row-major.
    pub fn position_ids(&self) -> &[u32] {
        &self.position_ids
    }

    /// `[b * t]` segment ids, row-major.
    pub fn segment_ids(&self) -> &[u32] {
        &self.segment_ids
    }

    /// `[b, 1, t, t]` additive mask: 0 where key j is in query i's segment and j <= i, else -inf.
    /// Every query sees at least itself, so no softmax row is all -inf.
    pub fn attention_mask(&self, device: &Device) -> Result<Tensor> {
        let t = self.seq_len;
        let mut mask = Vec::with_capacity(self.batch * t * t);
        for seg in self.segment_ids.chunks(t.max(1)) {
            for i in 0..t {
                mask.extend((0..t).map(|j| {
                    if j <= i && seg[j] == seg[i] {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        Ok(Tensor::from_vec(mask, (self.batch, 1, t, t), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_per_example_and_pad_is_its_own_segment() {
        let l = Layout::from_lengths(6, &[vec![2, 3], vec![6]]).unwrap();
        assert_eq!(l.position_ids(), &[0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(l.segment_ids(), &[0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0]);
        let m = l.attention_mask(&Device::Cpu).unwrap();
        let row0 = m.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        let seen = |i: usize| -> Vec<usize> { (0..6).filter(|&j| row0[i][j] == 0.0).collect() };
        assert_eq!(seen(1), vec![0, 1]);
        assert_eq!(seen(3), vec![2, 3]); // not the first example
        assert_eq!(seen(5), vec![5]); // the pad sees only itself
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        assert!(Layout::from_lengths(4, &[vec![3, 2]]).is_err());
        assert!(Layout::new(1, 3, vec![0, 1], vec![0, 0, 0]).is_err());
        assert!(Layout::new(1, 3, vec![0, 2, 3], vec![0, 0, 0]).is_err());
        assert!(Layout::new(1, 3, vec![0, 0, 0], vec![0, 1, 0]).is_err());
    }
}
