//! Alpaca-format records: `{"instruction": str, "input": str (optional), "output": str}` from a JSON
//! array file or a JSON Lines file. Extra keys are allowed and ignored (the Alpaca-GPT4, Alpaca-CoT
//! and demo files carry some). A record whose instruction or output is missing or not a string is
//! an error naming the file, the 1-based record number and, for JSONL, the line — or, with
//! `skip_bad`, it is skipped and counted.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{DataError, Location, Result};

/// One instruction-tuning example as train.py reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct AlpacaRecord {
    pub instruction: String,
    /// None when the key is absent or null; `Some("")` selects the no-input template too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub output: String,
}

impl AlpacaRecord {
    pub fn new(
        instruction: impl Into<String>,
        input: Option<&str>,
        output: impl Into<String>,
    ) -> Self {
        AlpacaRecord {
            instruction: instruction.into(),
            input: input.map(str::to_string),
            output: output.into(),
        }
    }
}

/// The records of a file, and how many bad ones were skipped (only with `skip_bad`).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub records: Vec<AlpacaRecord>,
    pub skipped: usize,
    /// The messages of the first few skipped records (at most [`MAX_SKIP_REASONS`]).
    pub skip_reasons: Vec<String>,
}

pub const MAX_SKIP_REASONS: usize = 10;

pub(crate) fn describe(v: Option<&Value>) -> String {
    match v {
        None => "nothing (the key is missing)".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(b)) => format!("a boolean ({b})"),
        Some(Value::Number(n)) => format!("a number ({n})"),
        Some(Value::String(_)) => "a string".into(),
        Some(Value::Array(a)) => format!("an array of {} elements", a.len()),
        Some(Value::Object(_)) => "an object".into(),
    }
}

/// Turn one parsed JSON value into a record, or say precisely what is wrong with it.
pub fn record_from_value(v: &Value, at: &Location) -> Result<AlpacaRecord> {
    let obj = v.as_object().ok_or_else(|| DataError::NotAnObject {
        at: at.clone(),
        found: describe(Some(v)),
    })?;
    let string = |field: &'static str| -> Result<String> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            other => Err(DataError::BadField {
                at: at.clone(),
                field,
                expected: "a string",
                found: describe(other),
            }),
        }
    };
    let instruction = string("instruction")?;
    let input = match obj.get("input") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        other => {
            return Err(DataError::BadField {
                at: at.clone(),
                field: "input",
                expected: "a string, null or absent",
                found: describe(other),
            })
        }
    };
    let output = string("output")?;
    Ok(AlpacaRecord {
        instruction,
        input,
        output,
    })
}

pub(crate) fn is_jsonl(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("ndjson") => true,
        _ => !text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('['),
    }
}

/// Load records from `path`: a JSON array (`[...]`) or JSON Lines (`.jsonl`/`.ndjson`, or any
/// file not starting with `[`; blank lines are ignored but still counted as lines).
pub fn load_records(path: &Path, skip_bad: bool) -> Result<Loaded> {
    let text = super::read_text(path)?;
    parse_records(path, &text, skip_bad)
}

/// [`load_records`] on text already read; `path` is used in messages only.
pub fn parse_records(path: &Path, text: &str, skip_bad: bool) -> Result<Loaded> {
    let values = read_values(path, text)?;
    let (records, skipped, skip_reasons) =
        convert_values(path, values, skip_bad, record_from_value)?;
    Ok(Loaded {
        records,
        skipped,
        skip_reasons,
    })
}

/// The records of a file as JSON values, each with its location; a JSONL line that is not valid
/// JSON is an `Err` in its place (a JSON array file that does not parse fails as a whole).
pub fn read_values(path: &Path, text: &str) -> Result<Vec<(Location, Result<Value>)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let pathbuf: PathBuf = path.to_path_buf();
    let mut out = Vec::new();
    if is_jsonl(path, text) {
        let mut record = 0;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            record += 1;
            let at = Location {
                path: pathbuf.clone(),
                record,
                line: Some(i + 1),
            };
            let r = match serde_json::from_str::<Value>(line) {
                Ok(v) => Ok(v),
                Err(e) => Err(DataError::RecordSyntax {
                    at: at.clone(),
                    column: e.column(),
                    message: strip_position(&e),
                }),
            };
            out.push((at, r));
        }
    } else {
        let v: Value = serde_json::from_str(text).map_err(|e| DataError::Syntax {
            path: pathbuf.clone(),
            line: e.line(),
            column: e.column(),
            message: strip_position(&e),
        })?;
        let Value::Array(items) = v else {
            return Err(DataError::NotRecords {
                path: pathbuf,
                found: describe(Some(&v)),
            });
        };
        for (i, item) in items.into_iter().enumerate() {
            let at = Location {
                path: pathbuf.clone(),
                record: i + 1,
                line: None,
            };
            out.push((at, Ok(item)));
        }
    }
    Ok(out)
}

/// Convert every value with `f`; bad records fail the file or, with `skip_bad`, are skipped and
/// counted. A file with no usable record is an error. Returns (records, skipped, skip reasons).
pub fn convert_values<T>(
    path: &Path,
    values: Vec<(Location, Result<Value>)>,
    skip_bad: bool,
    f: impl Fn(&Value, &Location) -> Result<T>,
) -> Result<(Vec<T>, usize, Vec<String>)> {
    let mut records = Vec::with_capacity(values.len());
    let mut skipped = 0;
    let mut reasons = Vec::new();
    for (at, v) in values {
        match v.and_then(|v| f(&v, &at)) {
            Ok(rec) => records.push(rec),
            Err(e) if skip_bad && e.location().is_some() => {
                tracing::warn!("skipping bad record: {e}");
                skipped += 1;
                if reasons.len() < MAX_SKIP_REASONS {
                    reasons.push(e.to_string());
                }
            }
            Err(e) => return Err(e),
        }
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            skipped,
        });
    }
    Ok((records, skipped, reasons))
}

/// serde_json's message without its " at line L column C" suffix (we print our own).
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_byte_that_is_not_utf8_is_named_by_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latin1.jsonl");
        let mut bytes = b"{\"instruction\": \"a\", \"output\": \"b\"}\n".to_vec();
        bytes.extend(b"{\"instruction\": \"caf\xe9\", \"output\": \"b\"}\n");
        std::fs::write(&p, &bytes).unwrap();
        let e = load_records(&p, false).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::NotUtf8 {
                    line: 2,
                    byte: 57,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("latin1.jsonl: line 2: not UTF-8"),
            "{e}"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p
    }

    #[test]
    fn json_array_with_extra_keys_and_optional_input() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.json",
            r#"[{"instruction": "Say hi.", "output": "hi", "task": "x"},
                {"instruction": "Add.", "input": "1 2", "output": "3"},
                {"instruction": "Null input.", "input": null, "output": "ok"},
                {"instruction": "翻译成英文。", "input": "你好", "output": "Hello"}]"#,
        );
        let l = load_records(&p, false).unwrap();
        assert_eq!(l.skipped, 0);
        assert_eq!(l.records.len(), 4);
        assert_eq!(l.records[0], AlpacaRecord::new("Say hi.", None, "hi"));
        assert_eq!(l.records[1].input.as_deref(), Some("1 2"));
        assert_eq!(l.records[2].input, None);
        assert_eq!(l.records[3].input.as_deref(), Some("你好"));
    }

    #[test]
    fn jsonl_with_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"input\": \"\", \"output\": \"d\"}\n",
        );
        let l = load_records(&p, false).unwrap();
        assert_eq!(l.records.len(), 2);
        assert_eq!(l.records[1].input.as_deref(), Some(""));
    }

    #[test]
    fn bad_json_record_names_file_and_record() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "alpaca_bad.json",
            r#"[{"instruction": "a", "output": "b"},
                {"instruction": "c", "output": 7}]"#,
        );
        let e = load_records(&p, false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("alpaca_bad.json"), "{msg}");
        assert!(msg.contains("record 2"), "{msg}");
        assert!(msg.contains("\"output\""), "{msg}");
        assert!(msg.contains("a number (7)"), "{msg}");
        match e {
            DataError::BadField { at, field, .. } => {
                assert_eq!(at.record, 2);
                assert_eq!(at.line, None);
                assert_eq!(field, "output");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_jsonl_record_names_file_record_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "data.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"output\": \"b\"}\n",
        );
        let msg = load_records(&p, false).unwrap_err().to_string();
        assert!(msg.contains("data.jsonl: record 2 (line 3)"), "{msg}");
        assert!(
            msg.contains("\"instruction\" must be a string, found nothing"),
            "{msg}"
        );

        let p = write(
            d.path(),
            "syntax.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \n",
        );
        let msg = load_records(&p, false).unwrap_err().to_string();
        assert!(
            msg.contains("syntax.jsonl: record 2 (line 2): invalid JSON"),
            "{msg}"
        );
    }

    #[test]
    fn json_syntax_error_has_line_and_column() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "broken.json",
            "[\n{\"instruction\": \"a\",\n \"output\": }\n]",
        );
        let msg = load_records(&p, true).unwrap_err().to_string();
        assert!(msg.contains("broken.json: invalid JSON at line 3"), "{msg}");
    }

    #[test]
    fn skip_bad_counts() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "mixed.jsonl",
            concat!(
                "{\"instruction\": \"a\", \"output\": \"b\"}\n",
                "{\"instruction\": 1, \"output\": \"b\"}\n",
                "not json\n",
                "[1, 2]\n",
                "{\"instruction\": \"a\", \"input\": 5, \"output\": \"b\"}\n",
                "{\"instruction\": \"c\", \"output\": \"d\"}\n",
            ),
        );
        assert!(load_records(&p, false).is_err());
        let l = load_records(&p, true).unwrap();
        assert_eq!(l.records.len(), 2);
        assert_eq!(l.skipped, 4);
        assert_eq!(l.skip_reasons.len(), 4);
        assert!(l.skip_reasons[0].contains("record 2 (line 2)"));

        let p = write(d.path(), "allbad.json", r#"[{"instruction": "a"}]"#);
        let e = load_records(&p, true).unwrap_err();
        assert!(matches!(e, DataError::Empty { skipped: 1, .. }), "{e}");
    }

    #[test]
    fn top_level_object_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "obj.json", r#"[]"#);
        assert!(matches!(
            load_records(&p, false),
            Err(DataError::Empty { .. })
        ));
        let p = write(d.path(), "n.json", "[1]");
        let msg = load_records(&p, false).unwrap_err().to_string();
        assert!(
            msg.contains("n.json: record 1: expected a JSON object"),
            "{msg}"
        );
    }
}
