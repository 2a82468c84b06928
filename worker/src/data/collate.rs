//! Batching as train.py's `DataCollatorForSupervisedDataset`: right padding with the pad id to the
//! longest example, labels padded with -100, attention_mask = (input_ids != pad_id).
//! Packed batches (several examples per row) come from [`super::pack::collate_packed`].

use candle_core::{Device, Tensor};
use herd_model::Layout;

use super::encode::{Example, IGNORE_INDEX};

/// A padded batch, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// 1 where `input_ids != pad_id` (as train.py computes it: a pad id inside the text is masked too).
    pub attention_mask: Vec<u8>,
    pub batch: usize,
    pub seq_len: usize,
    /// Packed rows: per-token positions and segments (None: one example per row, plain causal).
    pub layout: Option<Layout>,
}

impl Batch {
    /// Tokens that count in the loss after the shift by one: labels[:, 1:] != -100.
    pub fn label_tokens(&self) -> usize {
        if self.seq_len == 0 {
            return 0;
        }
        self.labels
            .chunks(self.seq_len)
            .map(|row| row[1..].iter().filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    /// Row `i` of the input ids.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// `[batch, seq_len]` u32 tensor of the input ids.
    pub fn input_ids_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.input_ids, (self.batch, self.seq_len), device)
    }

    /// `[batch, seq_len]` i64 tensor of the labels.
    pub fn labels_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.labels, (self.batch, self.seq_len), device)
    }

    /// `[batch, seq_len]` u8 tensor of the attention mask.
    pub fn attention_mask_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.attention_mask, (self.batch, self.seq_len), device)
    }
}

/// Right-pad `examples` to the longest one.
pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
    let batch = examples.len();
    let seq_len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut input_ids = Vec::with_capacity(batch * seq_len);
    let mut labels = Vec::with_capacity(batch * seq_len);
    for e in examples {
        let n = e.input_ids.len();
        input_ids.extend_from_slice(&e.input_ids);
        input_ids.extend(std::iter::repeat_n(pad_id, seq_len - n));
        labels.extend_from_slice(&e.labels[..n.min(e.labels.len())]);
        labels.extend(std::iter::repeat_n(
            IGNORE_INDEX,
            seq_len - n.min(e.labels.len()),
        ));
    }
    let attention_mask = input_ids.iter().map(|&i| u8::from(i != pad_id)).collect();
    Batch {
        input_ids,
        labels,
        attention_mask,
        batch,
        seq_len,
        layout: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], masked: usize) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < masked { IGNORE_INDEX } else { t as i64 })
                .collect(),
        }
    }

    #[test]
    fn right_padding() {
        let a = ex(&[1, 5, 6, 7], 2);
        let b = ex(&[1, 8], 1);
        let c = ex(&[1, 9, 9], 3);
        let batch = collate(&[&a, &b, &c], 0);
        assert_eq!((batch.batch, batch.seq_len), (3, 4));
        assert_eq!(batch.input_ids, vec![1, 5, 6, 7, 1, 8, 0, 0, 1, 9, 9, 0]);
        assert_eq!(
            batch.labels,
            vec![-100, -100, 6, 7, -100, 8, -100, -100, -100, -100, -100, -100]
        );
        assert_eq!(
            batch.attention_mask,
            vec![1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0]
        );
        assert_eq!(batch.label_tokens(), 3);
        assert_eq!(batch.row(1), &[1, 8, 0, 0]);
        let t = batch.input_ids_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 4]);
        let l = batch.labels_tensor(&Device::Cpu).unwrap();
        assert_eq!(l.to_vec2::<i64>().unwrap()[0], vec![-100, -100, 6, 7]);
    }

    #[test]
    fn pad_inside_text_is_masked_like_train_py() {
        let a = ex(&[1, 3, 4], 1);
        let batch = collate(&[&a], 3);
        assert_eq!(batch.attention_mask, vec![1, 0, 1]);
    }

    #[test]
    fn label_at_position_zero_does_not_count() {
        let a = ex(&[1, 2], 0);
        assert_eq!(collate(&[&a], 0).label_tokens(), 1);
        assert_eq!(collate(&[], 0).label_tokens(), 0);
    }
}
