//! Comparison records for reward models, GPT-4-LLM's keys: `{"user_input": str, "completion_a":
//! str, "completion_b": str}` with a ranked above b, in a JSON array or JSON Lines file (extra keys
//! such as the demo's `"task"` are ignored). Errors and `skip_bad` work as for Alpaca records.
//!
//! A completion is scored in the Alpaca no-input prompt with the user input as the instruction,
//! followed by the completion and eos (as GPT-4-LLM renders its comparison data), truncated to
//! `max_len` tokens like every other example.

use std::path::Path;

use herd_model::Tokenizer;
use serde_json::Value;

use super::records::{convert_values, describe, read_values};
use super::template::{source_text, target_text};
use super::{AlpacaRecord, DataError, Location, Result};

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub user_input: String,
    /// The preferred completion.
    pub completion_a: String,
    pub completion_b: String,
}

/// The comparisons of a file and how many bad records were skipped (only with `skip_bad`).
#[derive(Debug, Clone, Default)]
pub struct LoadedComparisons {
    pub pairs: Vec<Comparison>,
    pub skipped: usize,
}

/// One parsed JSON value as a comparison, or what is wrong with it.
pub fn comparison_from_value(v: &Value, at: &Location) -> Result<Comparison> {
    let obj = v.as_object().ok_or_else(|| DataError::NotAComparison {
        at: at.clone(),
        found: describe(Some(v)),
    })?;
    let field = |field: &'static str| match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(DataError::BadField {
            at: at.clone(),
            field,
            expected: "a string",
            found: describe(other),
        }),
    };
    Ok(Comparison {
        user_input: field("user_input")?,
        completion_a: field("completion_a")?,
        completion_b: field("completion_b")?,
    })
}

pub fn load_comparisons(path: &Path, skip_bad: bool) -> Result<LoadedComparisons> {
    let text = super::read_text(path)?;
    parse_comparisons(path, &text, skip_bad)
}

/// [`load_comparisons`] on text already read; `path` is used in messages only.
pub fn parse_comparisons(path: &Path, text: &str, skip_bad: bool) -> Result<LoadedComparisons> {
    let values = read_values(path, text)?;
    let (pairs, skipped, _) = convert_values(path, values, skip_bad, comparison_from_value)?;
    Ok(LoadedComparisons { pairs, skipped })
}

/// The user input of an Alpaca record: the instruction, then the input on its own line (as the
/// demo writes comparison prompts), for scoring its output or a generated answer.
pub fn user_input_of(rec: &AlpacaRecord) -> String {
    match rec.input.as_deref() {
        Some(i) if !i.is_empty() => format!("{}\n{i}", rec.instruction),
        _ => rec.instruction.clone(),
    }
}

/// The text a reward model scores for (instruction, completion): prompt + completion + eos.
pub fn reward_text(tok: &Tokenizer, instruction: &str, completion: &str) -> Result<String> {
    let eos = tok.eos_token().ok_or(DataError::NoEosToken)?;
    let rec = AlpacaRecord::new(instruction, None, completion);
    Ok(format!("{}{}", source_text(&rec), target_text(&rec, eos)))
}

/// Token ids (bos added by the tokenizer) of [`reward_text`], truncated to `max_len`.
pub fn encode_reward_text(
    tok: &Tokenizer,
    instruction: &str,
    completion: &str,
    max_len: usize,
) -> Result<Vec<u32>> {
    if max_len == 0 {
        return Err(DataError::ZeroMaxLen);
    }
    let text = reward_text(tok, instruction, completion)?;
    Ok(tok.encode_truncated(&text, max_len)?)
}

/// A comparison as token ids: (preferred, other).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PairExample {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

pub fn encode_comparison(tok: &Tokenizer, c: &Comparison, max_len: usize) -> Result<PairExample> {
    Ok(PairExample {
        chosen: encode_reward_text(tok, &c.user_input, &c.completion_a, max_len)?,
        rejected: encode_reward_text(tok, &c.user_input, &c.completion_b, max_len)?,
    })
}

/// Right-pads `rows` with `pad` to the longest: ([rows · seq_len] row-major ids, seq_len).
pub fn pad_rows(rows: &[&[u32]], pad: u32) -> (Vec<u32>, usize) {
    let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len() * seq_len);
    for r in rows {
        out.extend_from_slice(r);
        out.extend(std::iter::repeat_n(pad, seq_len - r.len()));
    }
    (out, seq_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_array_and_jsonl_with_located_errors() {
        let p = Path::new("c.json");
        let ok = r#"[{"user_input":"q","completion_a":"good","completion_b":"bad","task":"x"}]"#;
        let l = parse_comparisons(p, ok, false).unwrap();
        assert_eq!(l.pairs[0].completion_b, "bad");
        let bad = "{\"user_input\":\"q\",\"completion_a\":\"a\",\"completion_b\":\"b\"}\n\n{\"user_input\":\"q\",\"completion_a\":1}\n";
        let e = parse_comparisons(Path::new("c.jsonl"), bad, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.jsonl: record 2 (line 3)")
                && e.contains("\"completion_a\" must be a string, found a number"),
            "{e}"
        );
        let l = parse_comparisons(Path::new("c.jsonl"), bad, true).unwrap();
        assert_eq!((l.pairs.len(), l.skipped), (1, 1));
        let e = parse_comparisons(p, "[3]", false).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("user_input"), "{e}");
    }

    #[test]
    fn pads_to_the_longest_row() {
        let (ids, t) = pad_rows(&[&[1, 2, 3], &[4]], 9);
        assert_eq!((ids, t), (vec![1, 2, 3, 4, 9, 9], 3));
    }
}
