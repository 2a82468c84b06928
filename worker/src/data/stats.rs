//! Token-length statistics of a data set, for `herd data preview` and the training log.

use std::fmt;

use herd_model::Tokenizer;

use super::encode::{encode_alpaca_with_info, EncodeInfo, Example};
use super::mixture::{encode_record_with_info, Record};
use super::records::AlpacaRecord;
use super::Result;

/// The distribution of a list of lengths (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LengthStats {
    pub count: usize,
    pub mean: f64,
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
}

impl LengthStats {
    pub fn from_lengths(lengths: &[usize]) -> Self {
        if lengths.is_empty() {
            return LengthStats::default();
        }
        let mut v = lengths.to_vec();
        v.sort_unstable();
        let n = v.len();
        // Nearest rank: the smallest value with at least q of the data at or below it.
        let rank = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        LengthStats {
            count: n,
            mean: v.iter().sum::<usize>() as f64 / n as f64,
            min: v[0],
            median: rank(0.5),
            p95: rank(0.95),
            max: v[n - 1],
        }
    }
}

impl fmt::Display for LengthStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mean {:.1}, min {}, median {}, p95 {}, max {}",
            self.mean, self.min, self.median, self.p95, self.max
        )
    }
}

/// Statistics of a tokenized data set at a given `max_len`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatasetStats {
    pub max_len: usize,
    /// Lengths before truncation (prompt + response + eos, with bos).
    pub full: LengthStats,
    /// Prompt lengths before truncation (with bos).
    pub source: LengthStats,
    /// Examples longer than max_len (cut at max_len).
    pub truncated: usize,
    /// Examples whose labels are all -100 (the prompt alone fills max_len): they teach nothing.
    pub no_target: usize,
    /// Total label tokens that count in the loss (labels[1:] != -100, summed over examples).
    pub label_tokens: usize,
    /// Total tokens after truncation.
    pub tokens: usize,
}

/// Encode every record (as training would) and summarize the lengths.
pub fn dataset_stats(
    tok: &Tokenizer,
    records: &[AlpacaRecord],
    max_len: usize,
) -> Result<DatasetStats> {
    stats_of(
        records
            .iter()
            .map(|r| encode_alpaca_with_info(tok, r, max_len)),
        max_len,
    )
}

/// [`dataset_stats`] for records of either format (a mixture); "prompt" counts every untrained token.
pub fn dataset_stats_records(
    tok: &Tokenizer,
    records: &[Record],
    max_len: usize,
) -> Result<DatasetStats> {
    stats_of(
        records
            .iter()
            .map(|r| encode_record_with_info(tok, r, max_len)),
        max_len,
    )
}

fn stats_of(
    encoded: impl Iterator<Item = Result<(Example, EncodeInfo)>>,
    max_len: usize,
) -> Result<DatasetStats> {
    let mut full = Vec::new();
    let mut source = Vec::new();
    let mut st = DatasetStats {
        max_len,
        ..Default::default()
    };
    for r in encoded {
        let (ex, info) = r?;
        full.push(info.full_len);
        source.push(info.source_len);
        if info.truncated(max_len) {
            st.truncated += 1;
        }
        let counted = ex
            .labels
            .iter()
            .skip(1)
            .filter(|&&l| l != super::IGNORE_INDEX)
            .count();
        if counted == 0 {
            st.no_target += 1;
        }
        st.label_tokens += counted;
        st.tokens += ex.len();
    }
    st.full = LengthStats::from_lengths(&full);
    st.source = LengthStats::from_lengths(&source);
    Ok(st)
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |k: usize| {
            if self.full.count == 0 {
                0.0
            } else {
                100.0 * k as f64 / self.full.count as f64
            }
        };
        writeln!(f, "examples:        {}", self.full.count)?;
        writeln!(f, "tokens (full):   {}", self.full)?;
        writeln!(f, "tokens (prompt): {}", self.source)?;
        writeln!(
            f,
            "truncated at {}: {} ({:.1}%)",
            self.max_len,
            self.truncated,
            pct(self.truncated)
        )?;
        writeln!(
            f,
            "no target left:  {} ({:.1}%)",
            self.no_target,
            pct(self.no_target)
        )?;
        write!(
            f,
            "tokens in batches: {}, of which counted in the loss: {}",
            self.tokens, self.label_tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = LengthStats::from_lengths(&[5, 1, 3, 2, 4]);
        assert_eq!((s.count, s.min, s.median, s.p95, s.max), (5, 1, 3, 5, 5));
        assert!((s.mean - 3.0).abs() < 1e-12);
        let v: Vec<usize> = (1..=100).collect();
        let s = LengthStats::from_lengths(&v);
        assert_eq!((s.median, s.p95, s.max), (50, 95, 100));
        assert_eq!(LengthStats::from_lengths(&[]).count, 0);
    }

    #[test]
    fn dataset_counts_truncation() {
        let mut words: Vec<&str> = crate::data::PROMPT_NO_INPUT.split_whitespace().collect();
        words.push("cat");
        let mut tok = Tokenizer::demo(&words).unwrap();
        tok.add_missing_special_tokens();
        let recs = vec![
            AlpacaRecord::new("cat", None, "cat"),
            AlpacaRecord::new("cat", None, "cat cat cat cat cat cat cat cat cat cat"),
        ];
        let short = crate::data::encode_alpaca(&tok, &recs[0], 1000)
            .unwrap()
            .len();
        let st = dataset_stats(&tok, &recs, short).unwrap();
        assert_eq!(st.full.count, 2);
        assert_eq!(st.truncated, 1);
        assert_eq!(st.no_target, 0);
        assert_eq!(st.full.min, short);
        assert_eq!(st.tokens, 2 * short);
        let st = dataset_stats(&tok, &recs, 5).unwrap();
        assert_eq!(st.no_target, 2);
        assert_eq!(st.label_tokens, 0);
        let text = st.to_string();
        assert!(text.contains("truncated at 5: 2 (100.0%)"), "{text}");
    }
}
