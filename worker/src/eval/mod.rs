//! Evaluation: eval loss (as HF `Trainer.evaluate`), ROUGE-L (as Google's `rouge-score`), exact
//! match, and GPT-4-LLM's breakdown by reference length in words. `herd eval` / `herd predict` and
//! the trainer's `eval_strategy: steps` hook are built from these pieces.

pub mod loss;
pub mod reward;
pub mod rouge;

use crate::data::encode::{encode_alpaca, Example};
use crate::data::records::AlpacaRecord;
use crate::data::{DataError, Location};
use crate::Result;
use herd_model::Tokenizer;
use serde_json::Value;
use std::path::Path;

pub use loss::{eval_loss, EvalLoss};
pub use rouge::{rouge_l, RougeScore};

/// One record of an instruction file, with every field it had (for `herd predict`'s output) and
/// the Alpaca view of it.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub fields: serde_json::Map<String, Value>,
    pub alpaca: AlpacaRecord,
    /// Whether the record had an `output` (a reference answer).
    pub has_output: bool,
}

/// Reads an Alpaca file (a JSON array of objects, or JSON Lines) keeping all fields. `instruction`
/// must be a string; `input` may be absent or null; `output` may be absent (then `has_output` is
/// false and the reference is empty).
pub fn read_records(path: &Path) -> Result<Vec<RawRecord>> {
    let text = crate::data::read_text(path)?;
    let values: Vec<(Value, Option<usize>)> = if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text).map_err(|e| DataError::Syntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        v.into_iter().map(|v| (v, None)).collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = Location {
                path: path.to_path_buf(),
                record: out.len() + 1,
                line: Some(i + 1),
            };
            let v: Value = serde_json::from_str(line).map_err(|e| DataError::RecordSyntax {
                at,
                column: e.column(),
                message: e.to_string(),
            })?;
            out.push((v, Some(i + 1)));
        }
        out
    };
    let mut records = Vec::with_capacity(values.len());
    for (i, (v, line)) in values.into_iter().enumerate() {
        let at = Location {
            path: path.to_path_buf(),
            record: i + 1,
            line,
        };
        let Value::Object(fields) = v else {
            return Err(DataError::NotAnObject {
                at,
                found: kind(&v).into(),
            }
            .into());
        };
        let string = |field: &'static str, optional: bool| -> Result<Option<String>> {
            match fields.get(field) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) if optional => Ok(None),
                other => Err(DataError::BadField {
                    at: at.clone(),
                    field,
                    expected: "a string",
                    found: other.map_or("nothing", kind).into(),
                }
                .into()),
            }
        };
        let instruction = string("instruction", false)?.unwrap_or_default();
        let input = string("input", true)?;
        let output = string("output", true)?;
        let has_output = output.is_some();
        let alpaca = AlpacaRecord {
            instruction,
            input,
            output: output.unwrap_or_default(),
        };
        records.push(RawRecord {
            fields,
            alpaca,
            has_output,
        });
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            skipped: 0,
        }
        .into());
    }
    Ok(records)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Examples for the eval loss: every record with the prompt masked, as training encodes them.
pub fn encode_records(
    tok: &Tokenizer,
    records: &[AlpacaRecord],
    max_len: usize,
) -> Result<Vec<Example>> {
    Ok(records
        .iter()
        .map(|r| encode_alpaca(tok, r, max_len))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// The eval set of a job (`eval_data_path`), encoded with the training tokenizer.
pub fn load_eval_examples(tok: &Tokenizer, path: &Path, max_len: usize) -> Result<Vec<Example>> {
    let records: Vec<AlpacaRecord> = read_records(path)?.into_iter().map(|r| r.alpaca).collect();
    encode_records(tok, &records, max_len)
}

/// GPT-4-LLM's buckets of reference length in words (whitespace-separated).
pub const LENGTH_BUCKETS: [&str; 4] = ["0-2", "3-5", "6-10", ">10"];

pub fn length_bucket(reference: &str) -> &'static str {
    match reference.split_whitespace().count() {
        0..=2 => LENGTH_BUCKETS[0],
        3..=5 => LENGTH_BUCKETS[1],
        6..=10 => LENGTH_BUCKETS[2],
        _ => LENGTH_BUCKETS[3],
    }
}

/// Exact match after trimming surrounding whitespace (the demo's scoring).
pub fn exact_match(reference: &str, prediction: &str) -> bool {
    reference.trim() == prediction.trim()
}

/// Mean ROUGE-L F and exact match of a group of (reference, prediction) pairs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Group {
    pub count: usize,
    pub rouge_l: f64,
    pub exact_match: f64,
}

/// Overall and per-length-bucket scores (every bucket listed, empty ones with count 0).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GenerationScores {
    pub overall: Group,
    pub by_reference_length: Vec<(String, Group)>,
}

pub fn score_generations(pairs: &[(String, String)]) -> GenerationScores {
    let mut sums = vec![(0usize, 0.0f64, 0usize); LENGTH_BUCKETS.len()];
    let (mut total_r, mut total_em) = (0.0, 0usize);
    for (reference, prediction) in pairs {
        let r = rouge_l(reference, prediction).fmeasure;
        let em = exact_match(reference, prediction) as usize;
        let b = LENGTH_BUCKETS
            .iter()
            .position(|x| *x == length_bucket(reference))
            .unwrap();
        sums[b].0 += 1;
        sums[b].1 += r;
        sums[b].2 += em;
        total_r += r;
        total_em += em;
    }
    let group = |n: usize, r: f64, em: usize| Group {
        count: n,
        rouge_l: if n > 0 { r / n as f64 } else { 0.0 },
        exact_match: if n > 0 { em as f64 / n as f64 } else { 0.0 },
    };
    GenerationScores {
        overall: group(pairs.len(), total_r, total_em),
        by_reference_length: LENGTH_BUCKETS
            .iter()
            .zip(&sums)
            .map(|(name, &(n, r, em))| (name.to_string(), group(n, r, em)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(length_bucket(""), "0-2");
        assert_eq!(length_bucket("a b"), "0-2");
        assert_eq!(length_bucket("a b c"), "3-5");
        assert_eq!(length_bucket("1 2 3 4 5 6"), "6-10");
        assert_eq!(length_bucket("1 2 3 4 5 6 7 8 9 10"), "6-10");
        assert_eq!(length_bucket("1 2 3 4 5 6 7 8 9 10 11"), ">10");
        let s = score_generations(&[("a b".into(), "a b".into()), ("a b c d".into(), "x".into())]);
        assert_eq!(s.overall.count, 2);
        assert_eq!(s.overall.rouge_l, 0.5);
        assert_eq!(s.overall.exact_match, 0.5);
        assert_eq!(s.by_reference_length[0].1.count, 1);
        assert_eq!(s.by_reference_length[3].1.count, 0);
    }
}
