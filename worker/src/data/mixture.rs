//! Several data files mixed into one training set, as Alpaca-CoT mixes its collections.
//!
//! Each file is read in its format (declared, or detected from the first record's keys:
//! `"conversations"` → ShareGPT, `"instruction"`/`"output"` → Alpaca); a file whose first record
//! does not have the shape of its declared format is an error that names the file.
//!
//! Weights: a file with `n` usable records and weight `w` contributes `k = round(w × n)` examples
//! (half away from zero): `k div n` full copies of the file plus the first `k mod n` indices of a
//! seeded permutation of `0..n` (`epoch_permutation(seed ^ MIX_SALT, file_index, n)`), listed in
//! file order. So weight 1 is the file itself, in order (a single `data_path` behaves as before),
//! w < 1 subsamples, w > 1 repeats. The combined set is the files' selections concatenated in the
//! order of `data_path`; the trainer shuffles it per epoch as usual.

use std::path::{Path, PathBuf};

use herd_model::Tokenizer;
use herd_proto::{DataFormat, DataPath};
use serde_json::Value;

use super::chat::{conversation_from_value, encode_conversation_with_info, Conversation};
use super::encode::{encode_alpaca_with_info, EncodeInfo, Example};
use super::order::epoch_permutation;
use super::records::{convert_values, read_values, record_from_value, AlpacaRecord};
use super::{DataError, Result};

/// Salt of the mixture's selection permutations ("mixture!").
pub const MIX_SALT: u64 = 0x6d69_7874_7572_6521;

/// One training record of either format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Alpaca(AlpacaRecord),
    Chat(Conversation),
}

/// Tokenize a record of either format (both give `Example {input_ids, labels}`).
pub fn encode_record_with_info(
    tok: &Tokenizer,
    rec: &Record,
    max_len: usize,
) -> Result<(Example, EncodeInfo)> {
    match rec {
        Record::Alpaca(r) => encode_alpaca_with_info(tok, r, max_len),
        Record::Chat(c) => encode_conversation_with_info(tok, c, max_len),
    }
}

pub fn encode_record(tok: &Tokenizer, rec: &Record, max_len: usize) -> Result<Example> {
    Ok(encode_record_with_info(tok, rec, max_len)?.0)
}

/// The records of one file.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    pub path: PathBuf,
    /// Alpaca or Sharegpt (never Auto).
    pub format: DataFormat,
    pub records: Vec<Record>,
    pub skipped: usize,
    pub skip_reasons: Vec<String>,
}

fn keys_of(v: &Value) -> String {
    match v.as_object() {
        Some(o) => format!(
            "keys [{}]",
            o.keys()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => super::records::describe(Some(v)),
    }
}

/// The format a record's keys suggest, if any.
fn shape(v: &Value) -> Option<DataFormat> {
    let o = v.as_object()?;
    if o.contains_key("conversations") {
        Some(DataFormat::Sharegpt)
    } else if o.contains_key("instruction") || o.contains_key("output") {
        Some(DataFormat::Alpaca)
    } else {
        None
    }
}

/// Load one file in `format` (Auto: detected from the first record).
pub fn load_file(path: &Path, format: DataFormat, skip_bad: bool) -> Result<LoadedFile> {
    let text = super::read_text(path)?;
    let values = read_values(path, &text)?;
    // The first record that parsed decides (or checks) the format.
    let first = values.iter().find_map(|(_, v)| v.as_ref().ok());
    let found = first.and_then(shape);
    let format = match (format, first, found) {
        (_, None, _) => {
            if values.is_empty() {
                return Err(DataError::Empty {
                    path: path.to_path_buf(),
                    skipped: 0,
                });
            }
            // Nothing parsed: let the Alpaca reader report the syntax errors.
            DataFormat::Alpaca
        }
        (DataFormat::Auto, Some(v), None) => {
            return Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
                found: keys_of(v),
            })
        }
        (DataFormat::Auto, _, Some(f)) => f,
        (declared, Some(v), found) => {
            if found != Some(declared) {
                return Err(DataError::WrongFormat {
                    path: path.to_path_buf(),
                    declared: declared.as_str(),
                    found: keys_of(v),
                });
            }
            declared
        }
    };
    let (records, skipped, skip_reasons) = match format {
        DataFormat::Sharegpt => convert_values(path, values, skip_bad, |v, at| {
            conversation_from_value(v, at).map(Record::Chat)
        })?,
        _ => convert_values(path, values, skip_bad, |v, at| {
            record_from_value(v, at).map(Record::Alpaca)
        })?,
    };
    Ok(LoadedFile {
        path: path.to_path_buf(),
        format,
        records,
        skipped,
        skip_reasons,
    })
}

/// The indices of a file of `n` records that weight `weight` selects (see the module docs).
pub fn select(n: usize, weight: f64, seed: u64, file_index: usize) -> Vec<usize> {
    let k = (weight * n as f64).round().max(0.0) as usize;
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(k);
    for _ in 0..k / n {
        out.extend(0..n);
    }
    let rest = k % n;
    if rest > 0 {
        let mut part = epoch_permutation(seed ^ MIX_SALT, file_index as u64, n);
        part.truncate(rest);
        part.sort_unstable();
        out.extend(part);
    }
    out
}

/// What one file contributed.
#[derive(Debug, Clone)]
pub struct MixtureFile {
    pub path: PathBuf,
    pub format: DataFormat,
    pub weight: f64,
    /// Usable records in the file.
    pub records: usize,
    pub skipped: usize,
    /// Examples taken into the training set.
    pub taken: usize,
}

/// The combined training set.
#[derive(Debug, Clone, Default)]
pub struct Mixture {
    pub records: Vec<Record>,
    pub files: Vec<MixtureFile>,
    pub skipped: usize,
    pub skip_reasons: Vec<String>,
}

impl Mixture {
    /// The range of `records` that file `i` contributed.
    pub fn file_range(&self, i: usize) -> std::ops::Range<usize> {
        let start: usize = self.files[..i].iter().map(|f| f.taken).sum();
        start..start + self.files[i].taken
    }
}

/// Load and mix every file of `data` (see the module docs).
pub fn load_mixture(data: &DataPath, seed: u64, skip_bad: bool) -> Result<Mixture> {
    let mut mix = Mixture::default();
    for (i, f) in data.files().iter().enumerate() {
        let loaded = load_file(&f.path, f.format, skip_bad)?;
        let pick = select(loaded.records.len(), f.weight, seed, i);
        mix.files.push(MixtureFile {
            path: f.path.clone(),
            format: loaded.format,
            weight: f.weight,
            records: loaded.records.len(),
            skipped: loaded.skipped,
            taken: pick.len(),
        });
        mix.skipped += loaded.skipped;
        for r in loaded.skip_reasons {
            if mix.skip_reasons.len() < super::records::MAX_SKIP_REASONS {
                mix.skip_reasons.push(r);
            }
        }
        mix.records
            .extend(pick.into_iter().map(|j| loaded.records[j].clone()));
    }
    if mix.records.is_empty() {
        return Err(DataError::EmptyMixture {
            files: data.to_string(),
        });
    }
    Ok(mix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::{DataEntry, DataFile};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn alpaca_file(dir: &Path, name: &str, n: usize) -> PathBuf {
        let recs: Vec<Value> = (0..n)
            .map(|i| serde_json::json!({"instruction": format!("i{i}"), "output": format!("o{i}")}))
            .collect();
        write(dir, name, &serde_json::to_string(&recs).unwrap())
    }

    fn chat_file(dir: &Path, name: &str, n: usize) -> PathBuf {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                serde_json::json!({"id": i, "conversations": [{"from": "human", "value": format!("q{i}")}, {"from": "gpt", "value": format!("a{i}")}]})
                    .to_string()
            })
            .collect();
        write(dir, name, &(lines.join("\n") + "\n"))
    }

    fn entry(p: &Path, weight: f64, format: DataFormat) -> DataEntry {
        DataEntry::File(DataFile {
            path: p.to_path_buf(),
            weight,
            format,
        })
    }

    #[test]
    fn selection_counts_and_determinism() {
        assert_eq!(select(10, 1.0, 1, 0), (0..10).collect::<Vec<_>>());
        let half = select(10, 0.5, 1, 0);
        assert_eq!(half.len(), 5);
        assert!(half.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(half, select(10, 0.5, 1, 0));
        assert_ne!(select(1000, 0.5, 1, 0), select(1000, 0.5, 2, 0));
        assert_ne!(select(1000, 0.5, 1, 0), select(1000, 0.5, 1, 1));
        let more = select(10, 2.5, 1, 0);
        assert_eq!(more.len(), 25);
        for j in 0..10 {
            let c = more.iter().filter(|&&x| x == j).count();
            assert!(c == 2 || c == 3);
        }
        assert_eq!(select(3, 0.5, 1, 0).len(), 2); // round(1.5) = 2, half away from zero
        assert_eq!(select(3, 0.1, 1, 0).len(), 0);
    }

    #[test]
    fn mixes_formats_with_weights() {
        let d = tempfile::tempdir().unwrap();
        let a = alpaca_file(d.path(), "a.json", 20);
        let c = chat_file(d.path(), "c.jsonl", 8);
        let data = DataPath::List(vec![
            DataEntry::Path(a.clone()),
            entry(&c, 1.5, DataFormat::Auto),
        ]);
        let m = load_mixture(&data, 42, false).unwrap();
        assert_eq!(m.records.len(), 20 + 12);
        assert_eq!((m.files[0].taken, m.files[1].taken), (20, 12));
        assert_eq!(
            (m.files[0].format, m.files[1].format),
            (DataFormat::Alpaca, DataFormat::Sharegpt)
        );
        assert!(m.records[..20]
            .iter()
            .all(|r| matches!(r, Record::Alpaca(_))));
        assert!(m.records[20..].iter().all(|r| matches!(r, Record::Chat(_))));
        assert_eq!(m.file_range(1), 20..32);
        // Deterministic from the seed; another seed picks other repeats.
        let again = load_mixture(&data, 42, false).unwrap();
        assert_eq!(m.records, again.records);
        let data = DataPath::List(vec![
            entry(&a, 0.25, DataFormat::Alpaca),
            entry(&c, 1.0, DataFormat::Sharegpt),
        ]);
        let m = load_mixture(&data, 7, false).unwrap();
        assert_eq!(m.records.len(), 5 + 8);
        // A single path is the file itself, in order.
        let m = load_mixture(&DataPath::Single(a.clone()), 7, false).unwrap();
        let Record::Alpaca(first) = &m.records[0] else {
            panic!()
        };
        assert_eq!(first.instruction, "i0");
        assert_eq!(m.records.len(), 20);
    }

    #[test]
    fn wrong_or_unknown_format_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = alpaca_file(d.path(), "alpaca_set.json", 3);
        let c = chat_file(d.path(), "chats.jsonl", 3);
        let e = load_file(&a, DataFormat::Sharegpt, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("alpaca_set.json") && e.contains("declared sharegpt"),
            "{e}"
        );
        let e = load_file(&c, DataFormat::Alpaca, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chats.jsonl")
                && e.contains("declared alpaca")
                && e.contains("\"conversations\""),
            "{e}"
        );
        let u = write(
            d.path(),
            "odd.json",
            r#"[{"prompt": "x", "completion": "y"}]"#,
        );
        let e = load_file(&u, DataFormat::Auto, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("odd.json") && e.contains("\"prompt\""), "{e}");
    }

    #[test]
    fn bad_conversations_name_file_record_and_line_or_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let text = concat!(
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n",
            "\n",
            "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}]}\n",
            "{\"conversations\": []}\n",
        );
        let p = write(d.path(), "talk.jsonl", text);
        let e = load_file(&p, DataFormat::Auto, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("talk.jsonl: record 2 (line 3): turn 1"), "{e}");
        let l = load_file(&p, DataFormat::Auto, true).unwrap();
        assert_eq!((l.records.len(), l.skipped), (1, 2));
        let p = write(
            d.path(),
            "talk.json",
            r#"[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ["a"]}]}]"#,
        );
        let e = load_file(&p, DataFormat::Sharegpt, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("talk.json: record 1: turn 2: \"value\" must be a string"),
            "{e}"
        );
    }

    #[test]
    fn encodes_both_formats() {
        let mut words: Vec<&str> = crate::data::PROMPT_NO_INPUT.split_whitespace().collect();
        words.extend(["USER:", "ASSISTANT:"]);
        let mut t = Tokenizer::demo(&words).unwrap();
        t.add_missing_special_tokens();
        let a = Record::Alpaca(AlpacaRecord::new("x", None, "Below"));
        let c = Record::Chat(Conversation::from_pairs(&[("x", "Below")]));
        for r in [a, c] {
            let ex = encode_record(&t, &r, 512).unwrap();
            assert_eq!(ex.input_ids.len(), ex.labels.len());
            // "Below" (one token) then "</s>" are the trained tokens in both formats.
            assert_eq!(ex.target_tokens(), 2, "{r:?}");
        }
    }
}
