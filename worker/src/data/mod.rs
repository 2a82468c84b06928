//! The data pipeline of train.py, step by step: records (Alpaca or ShareGPT JSON / JSONL, one file
//! or a weighted mixture, see [`mixture`]) → prompt templates (Alpaca's, or Vicuna v1.1 in [`chat`]) →
//! token ids with the prompt masked out of the labels → right-padded batches; plus the epoch order
//! (a pure function of seed and epoch), length statistics and a human-readable preview.
//!
//! Everything here is deterministic and free of I/O except the loaders ([`records::load_records`],
//! [`mixture::load_file`], [`mixture::load_mixture`]).

pub mod chat;
pub mod collate;
pub mod comparisons;
pub mod encode;
pub mod mixture;
pub mod order;
pub mod pack;
pub mod preview;
pub mod records;
pub mod stats;
pub mod template;

use std::path::{Path, PathBuf};

pub use chat::{
    encode_conversation, render as render_conversation, Conversation, Message, Role, VICUNA_SYSTEM,
};
pub use collate::{collate, Batch};
pub use encode::{encode_alpaca, encode_alpaca_with_info, EncodeInfo, Example, IGNORE_INDEX};
pub use mixture::{
    encode_record, encode_record_with_info, load_file, load_mixture, Mixture, MixtureFile, Record,
};
pub use order::epoch_permutation;
pub use pack::{collate_packed, pack};
pub use preview::{preview, preview_mixture, render_example, PreviewOptions};
pub use records::{load_records, AlpacaRecord, Loaded};
pub use stats::{dataset_stats, dataset_stats_records, DatasetStats, LengthStats};
pub use template::{source_text, target_text, PROMPT_INPUT, PROMPT_NO_INPUT};

/// Where in a data file something went wrong: the file, the 1-based record number and, for
/// JSONL, the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub record: usize,
    pub line: Option<usize>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: record {}", self.path.display(), self.record)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

/// A data file's text; a byte that is not UTF-8 is named by its line.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let byte = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..byte].iter().filter(|&&b| b == b'\n').count();
        DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            byte: byte + 1,
        }
    })
}

/// Everything that can go wrong in the data pipeline, with enough context to fix the data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not UTF-8 text (JSON is); where the first bad byte is.
    #[error(
        "{path}: line {line}: not UTF-8 text (byte {byte} of the file); JSON data must be UTF-8"
    )]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        byte: usize,
    },
    /// The file as a whole is not valid JSON (a JSON array file; JSONL errors are per record).
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// One JSONL line is not valid JSON.
    #[error("{at}: invalid JSON at column {column}: {message}")]
    RecordSyntax {
        at: Location,
        column: usize,
        message: String,
    },
    #[error("{path}: expected a JSON array of records or JSON Lines (one object per line), found {found}")]
    NotRecords { path: PathBuf, found: String },
    #[error("{at}: expected a JSON object with \"instruction\", \"output\" and optional \"input\", found {found}")]
    NotAnObject { at: Location, found: String },
    /// A field is missing or has the wrong type.
    #[error("{at}: field \"{field}\" must be {expected}, found {found}")]
    BadField {
        at: Location,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{at}: expected a JSON object with \"user_input\", \"completion_a\" (preferred) and \"completion_b\", found {found}")]
    NotAComparison { at: Location, found: String },
    #[error("{at}: expected a JSON object with \"conversations\" (ShareGPT), found {found}")]
    NotAChat { at: Location, found: String },
    /// A conversation turn is malformed or out of order (`turn` is 1-based, system turn included).
    #[error("{at}: turn {turn}: {reason}")]
    BadTurn {
        at: Location,
        turn: usize,
        reason: String,
    },
    #[error("{path}: cannot tell the format from the first record ({found}): an Alpaca record has \"instruction\" and \"output\", a ShareGPT record has \"conversations\"; or declare `format:` in data_path")]
    UnknownFormat { path: PathBuf, found: String },
    #[error("{path}: declared {declared} but the first record does not have that shape ({found})")]
    WrongFormat {
        path: PathBuf,
        declared: &'static str,
        found: String,
    },
    #[error("data_path ({files}): the weights select no examples")]
    EmptyMixture { files: String },
    #[error("{path}: no usable records ({skipped} skipped)")]
    Empty { path: PathBuf, skipped: usize },
    #[error("the tokenizer has no eos token; the target text is output + eos (add the missing special tokens first)")]
    NoEosToken,
    #[error("max_len must be at least 1")]
    ZeroMaxLen,
    /// Tokenizing failed (the model crate's error, normally `Error::Tokenizer`).
    #[error(transparent)]
    Model(#[from] herd_model::Error),
}

impl DataError {
    /// The location of a per-record error, if this is one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            DataError::RecordSyntax { at, .. }
            | DataError::NotAnObject { at, .. }
            | DataError::BadField { at, .. }
            | DataError::NotAChat { at, .. }
            | DataError::NotAComparison { at, .. }
            | DataError::BadTurn { at, .. } => Some(at),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
