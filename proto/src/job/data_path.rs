//! `data_path`: one file, or a list of files with a weight and a format each (a mixture).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a data file's records are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Decided by the first record's keys: `conversations` → ShareGPT, `instruction` → Alpaca.
    #[default]
    Auto,
    /// `{instruction, input?, output}` (Alpaca's train.py).
    Alpaca,
    /// `{id?, conversations: [{from, value}, ...]}` (ShareGPT / Vicuna).
    Sharegpt,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Sharegpt => "sharegpt",
        }
    }
}

fn d_weight() -> f64 {
    1.0
}

/// One file of a data mixture with its weight and format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub path: PathBuf,
    /// Take round(weight × usable records) examples: < 1 subsamples, > 1 repeats.
    #[serde(default = "d_weight")]
    pub weight: f64,
    #[serde(default)]
    pub format: DataFormat,
}

impl DataFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataFile {
            path: path.into(),
            weight: 1.0,
            format: DataFormat::Auto,
        }
    }
}

/// An entry of a `data_path` list: a bare path (weight 1, format auto) or a map.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DataEntry {
    Path(PathBuf),
    File(DataFile),
}

/// `data_path`: one path (as train.py's `--data_path`) or a list of entries mixed into one
/// training set. Kept as written so that [`JobSpec::to_yaml`] round-trips.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DataPath {
    Single(PathBuf),
    List(Vec<DataEntry>),
}

impl DataPath {
    /// The files with defaults filled in, in order.
    pub fn files(&self) -> Vec<DataFile> {
        match self {
            DataPath::Single(p) => vec![DataFile::new(p.clone())],
            DataPath::List(v) => v
                .iter()
                .map(|e| match e {
                    DataEntry::Path(p) => DataFile::new(p.clone()),
                    DataEntry::File(f) => f.clone(),
                })
                .collect(),
        }
    }

    pub fn paths(&self) -> Vec<&Path> {
        match self {
            DataPath::Single(p) => vec![p.as_path()],
            DataPath::List(v) => v
                .iter()
                .map(|e| match e {
                    DataEntry::Path(p) => p.as_path(),
                    DataEntry::File(f) => f.path.as_path(),
                })
                .collect(),
        }
    }

    pub fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            DataPath::Single(p) => vec![p],
            DataPath::List(v) => v
                .iter_mut()
                .map(|e| match e {
                    DataEntry::Path(p) => p,
                    DataEntry::File(f) => &mut f.path,
                })
                .collect(),
        }
    }

    /// The largest weight: a weight repeats its file's records that many times, so a typo
    /// (1e9) would ask for billions of examples before the first step.
    pub const MAX_WEIGHT: f64 = 1000.0;

    /// Value checks: at least one file, paths not empty, weights finite, > 0 and at most
    /// [`Self::MAX_WEIGHT`].
    pub fn check(&self) -> Result<(), String> {
        let files = self.files();
        if files.is_empty() {
            return Err("the list names no file".into());
        }
        for (i, f) in files.iter().enumerate() {
            if f.path.as_os_str().is_empty() {
                return Err(format!("entry {}: the path is empty", i + 1));
            }
            if !(f.weight.is_finite() && f.weight > 0.0 && f.weight <= Self::MAX_WEIGHT) {
                return Err(format!(
                    "entry {} ({}): weight must be a number > 0 and at most {}, got {:e}",
                    i + 1,
                    f.path.display(),
                    Self::MAX_WEIGHT,
                    f.weight
                ));
            }
        }
        Ok(())
    }
}

impl From<PathBuf> for DataPath {
    fn from(p: PathBuf) -> Self {
        DataPath::Single(p)
    }
}

impl From<&str> for DataPath {
    fn from(p: &str) -> Self {
        DataPath::Single(p.into())
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        write!(f, "{}", paths.join(", "))
    }
}

// Hand-written so that errors inside a map entry (unknown key, wrong type) keep serde_yaml's
// message and position instead of "did not match any variant".
impl<'de> Deserialize<'de> for DataEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DataEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path or a map {path, weight, format}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DataEntry, E> {
                Ok(DataEntry::Path(v.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<DataEntry, A::Error> {
                DataFile::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(DataEntry::File)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DataPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DataPath;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path or a list of paths / {path, weight, format} maps")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DataPath, E> {
                Ok(DataPath::Single(v.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<DataPath, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = s.next_element::<DataEntry>()? {
                    out.push(e);
                }
                Ok(DataPath::List(out))
            }
        }
        d.deserialize_any(V)
    }
}
