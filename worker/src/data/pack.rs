//! Sequence packing (`packing: true`, TRL's name): several tokenized examples share one row of
//! at most `model_max_length` tokens, so short Alpaca examples stop paying for padding.
//!
//! Packing is a pure function of the example lengths and `max_len` (best-fit decreasing: longest
//! example first, each into the fullest row it still fits, ties by index), computed once before
//! training. The packed rows then play the part of examples everywhere else: the epoch order is a
//! permutation of rows, the global batch of step s is a fixed slice of it, rank r takes a fixed
//! part. So determinism, resume and world-size changes behave exactly as without packing.
//!
//! Inside a row the model sees a [`Layout`]: positions restart at 0 for each example and
//! attention is block-diagonal causal, so each example's token losses equal its unpacked ones.
//! The first label of every example is ignored: unpacked, nothing predicts token 0; packed, the
//! previous example's last token would. The loss stays sum of token NLL / global label tokens.

use std::collections::BTreeSet;

use herd_model::Layout;

use super::collate::Batch;
use super::encode::{Example, IGNORE_INDEX};

/// Rows of example indices; each row's lengths sum to at most `max_len` (an example longer than
/// `max_len` gets a row of its own). Rows are ordered by their first-placed example.
pub fn pack(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = vec![];
    // (free tokens, row) of rows with space left: the best fit is the first with enough free.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut free_of: Vec<usize> = vec![];
    for i in order {
        let len = lengths[i];
        let fit = free.range((len, 0)..).next().copied();
        let row = match fit {
            Some(key) => {
                free.remove(&key);
                key.1
            }
            None => {
                rows.push(vec![]);
                free_of.push(max_len.max(len));
                rows.len() - 1
            }
        };
        rows[row].push(i);
        free_of[row] -= len;
        if free_of[row] > 0 {
            free.insert((free_of[row], row));
        }
    }
    for row in &mut rows {
        row.sort_unstable();
    }
    rows
}

/// Packed rows back to back, right-padded with `pad_id` to the longest row, with the [`Layout`]
/// that keeps the examples apart. attention_mask marks real tokens.
pub fn collate_packed(rows: &[Vec<&Example>], pad_id: u32) -> Batch {
    let seq_len = rows
        .iter()
        .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
    let mut labels = Vec::with_capacity(rows.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
    let mut lengths = Vec::with_capacity(rows.len());
    for row in rows {
        let mut used = 0;
        for e in row {
            let n = e.len();
            input_ids.extend_from_slice(&e.input_ids);
            labels.extend((0..n).map(|i| match e.labels.get(i) {
                Some(&l) if i > 0 => l,
                _ => IGNORE_INDEX,
            }));
            used += n;
        }
        attention_mask.extend(std::iter::repeat_n(1u8, used));
        input_ids.extend(std::iter::repeat_n(pad_id, seq_len - used));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq_len - used));
        attention_mask.extend(std::iter::repeat_n(0u8, seq_len - used));
        lengths.push(row.iter().map(|e| e.len()).collect());
    }
    let layout = Layout::from_lengths(seq_len, &lengths).expect("rows fit seq_len by construction");
    Batch {
        input_ids,
        labels,
        attention_mask,
        batch: rows.len(),
        seq_len,
        layout: Some(layout),
    }
}

/// Pad tokens / all tokens over batches whose rows hold the given token counts (each batch
/// padded to its longest row).
pub fn padding_fraction(batches: &[Vec<usize>]) -> f64 {
    let (mut real, mut total) = (0usize, 0usize);
    for rows in batches {
        real += rows.iter().sum::<usize>();
        total += rows.len() * rows.iter().copied().max().unwrap_or(0);
    }
    if total == 0 {
        0.0
    } else {
        1.0 - real as f64 / total as f64
    }
}

/// The padding fraction of one epoch over `lengths` (visited in `order`) with `batch` rows per
/// micro-batch: plain (one example per row) or packed into rows of at most `max_len`.
pub fn epoch_padding(lengths: &[usize], batch: usize, max_len: usize, packed: bool) -> f64 {
    let rows: Vec<usize> = if packed {
        pack(lengths, max_len)
            .iter()
            .map(|r| r.iter().map(|&i| lengths[i]).sum())
            .collect()
    } else {
        lengths.to_vec()
    };
    let order = super::order::epoch_permutation(0, 0, rows.len());
    let batches: Vec<Vec<usize>> = order
        .chunks(batch.max(1))
        .map(|c| c.iter().map(|&i| rows[i]).collect())
        .collect();
    padding_fraction(&batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_model::init::SplitMix64;

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
    fn rows_fit_hold_every_example_once_and_are_deterministic() {
        let lengths = [5, 9, 3, 7, 1, 10, 4, 6, 12];
        let rows = pack(&lengths, 10);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for r in &rows {
            let used: usize = r.iter().map(|&i| lengths[i]).sum();
            assert!(used <= 10 || r.len() == 1, "{r:?}");
        }
        assert_eq!(rows, pack(&lengths, 10));
        // 12 gets a row of its own; the other 45 tokens need at least 5 rows of 10, and best fit
        // reaches that bound: 10 | 9+1 | 7+3 | 6+4 | 5.
        assert_eq!(rows.len(), 6);
    }

    #[test]
    fn packed_batch_masks_first_labels_and_lays_out_examples() {
        let a = ex(&[1, 5, 6], 1);
        let b = ex(&[1, 8], 0);
        let c = ex(&[1, 9, 9, 4], 2);
        let batch = collate_packed(&[vec![&a, &b], vec![&c]], 0);
        assert_eq!((batch.batch, batch.seq_len), (2, 5));
        assert_eq!(batch.input_ids, vec![1, 5, 6, 1, 8, 1, 9, 9, 4, 0]);
        assert_eq!(
            batch.labels,
            vec![-100, 5, 6, -100, 8, -100, -100, 9, 4, -100]
        );
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
        let layout = batch.layout.as_ref().unwrap();
        assert_eq!(layout.position_ids(), &[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]);
        assert_eq!(layout.segment_ids(), &[0, 0, 0, 1, 1, 0, 0, 0, 0, 1]);
        // Same label tokens as the three examples padded one per row.
        let plain = crate::data::collate(&[&a, &b, &c], 0);
        assert_eq!(batch.label_tokens(), plain.label_tokens());
    }

    #[test]
    fn packing_removes_padding_of_the_demo_data() {
        use crate::demo::{demo_tokenizer, generate_records, DEMO_TRAIN_RECORDS};
        let tok = demo_tokenizer().unwrap();
        let (train, _) = generate_records(42, DEMO_TRAIN_RECORDS, 0);
        let lengths: Vec<usize> = train
            .iter()
            .map(|r| {
                crate::data::encode_alpaca(&tok, &r.alpaca(), 128)
                    .unwrap()
                    .len()
            })
            .collect();
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        // configs/demo.yaml: batch 16, model_max_length 128.
        let plain = epoch_padding(&lengths, 16, 128, false);
        let packed = epoch_padding(&lengths, 16, 128, true);
        println!(
            "demo data ({} examples, mean {mean:.1} tokens), batch 16, max 128: \
             padding {:.1}% plain, {:.1}% packed ({} rows)",
            lengths.len(),
            plain * 100.0,
            packed * 100.0,
            pack(&lengths, 128).len()
        );
        // Demo lengths cluster around 48, so rows of 128 hold two (rarely three) examples: the
        // padding moves into the rows instead of vanishing. Longer rows pack tighter.
        let packed_512 = epoch_padding(&lengths, 16, 512, true);
        println!(
            "demo data, batch 16, packed into rows of 512: padding {:.1}%",
            packed_512 * 100.0
        );
        assert!(pack(&lengths, 128).len() < lengths.len() / 2);
        assert!(packed_512 < plain);
    }

    /// Alpaca-like lengths: log-normal around ~150 tokens, tail cut at 512.
    fn alpaca_like_lengths(n: usize) -> Vec<usize> {
        let mut rng = SplitMix64::new(42);
        (0..n)
            .map(|_| {
                let z = rng.next_normal();
                ((4.8 + 0.6 * z).exp().round() as usize).clamp(20, 512)
            })
            .collect()
    }

    #[test]
    fn packing_removes_padding_of_alpaca_like_lengths() {
        let lengths = alpaca_like_lengths(5000);
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        assert!((120.0..180.0).contains(&mean), "mean {mean}");
        for batch in [1, 4, 8] {
            let plain = epoch_padding(&lengths, batch, 512, false);
            let packed = epoch_padding(&lengths, batch, 512, true);
            println!(
                "alpaca-like lengths (mean {mean:.1}, max 512), batch {batch}: \
                 padding {:.1}% plain, {:.1}% packed",
                plain * 100.0,
                packed * 100.0
            );
            assert!(packed < 0.02, "packed padding {packed}");
            if batch > 1 {
                assert!(plain > 0.3, "plain padding {plain}");
            }
        }
    }
}
