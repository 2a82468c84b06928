//! Hugging Face safetensors checkpoints: `model.safetensors`, or `model.safetensors.index.json`
//! (`weight_map`: tensor name -> shard file) with shards `model-0000i-of-0000N.safetensors`.
//! Reading accepts F32/BF16/F16 and upcasts to f32; writing uses one dtype and metadata
//! {"format": "pt"} (transformers refuses safetensors files without it). Every file is written
//! atomically (temporary name in the same directory, fsync, rename, fsync of the directory), so a
//! crash never leaves a half-written file under the final name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensors by name, and for each the file it came from (for error messages).
pub type Sourced = (BTreeMap<String, Tensor>, BTreeMap<String, PathBuf>);

/// Loads every tensor of the checkpoint in `dir` as f32 on the CPU.
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(load_dir_sourced(dir)?.0)
}

/// As [`load_dir`], also returning which file held each tensor. `model.safetensors` wins over an
/// index when both exist (transformers' order).
pub fn load_dir_sourced(dir: &Path) -> Result<Sourced> {
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    let mut tensors = BTreeMap::new();
    let mut sources = BTreeMap::new();
    if single.is_file() {
        for (name, t) in load_file(&single)? {
            sources.insert(name.clone(), single.clone());
            tensors.insert(name, t);
        }
        return Ok((tensors, sources));
    }
    if !index.is_file() {
        // A PyTorch pickle is not read (loading one runs code); say how to convert it.
        let pickled = ["pytorch_model.bin", "pytorch_model.bin.index.json"];
        let hint = match pickled.iter().any(|f| dir.join(f).is_file()) {
            true => {
                " (pytorch_model.bin is not read: convert it once with transformers, \
                 `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)`, which writes \
                 safetensors)"
            }
            false => "",
        };
        return Err(Error::NoWeights {
            path: dir.to_path_buf(),
            hint,
        });
    }
    // Group the weight_map by shard so each shard is read once.
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in read_weight_map(&index)? {
        by_file.entry(file).or_default().push(name);
    }
    for (file, names) in by_file {
        let path = dir.join(&file);
        let mut loaded = load_file(&path)?;
        for name in names {
            let t = loaded.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: name.clone(),
            })?;
            sources.insert(name.clone(), path.clone());
            tensors.insert(name, t);
        }
        // A tensor in a shard but not in the index means the two disagree; refuse to guess.
        if let Some(name) = loaded.into_keys().next() {
            return Err(Error::UnexpectedTensor { path, name });
        }
    }
    Ok((tensors, sources))
}

fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(index).map_err(Error::io(index))?;
    let json_err = |source| Error::Json {
        path: index.to_path_buf(),
        source,
    };
    let value: Value = serde_json::from_str(&text).map_err(json_err)?;
    let map = value.get("weight_map").cloned().unwrap_or(Value::Null);
    serde_json::from_value(map).map_err(json_err)
}

/// Reads one safetensors file; every tensor converted to f32.
pub fn load_file(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| Error::Safetensors {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        out.insert(
            name.to_string(),
            Tensor::from_vec(values, view.shape(), &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Writes `tensors` into `dir` in `dtype` (F32, BF16 or F16) as HF lays them out: one
/// `model.safetensors`, or, when the data exceeds `max_shard_bytes`, shards plus an index whose
/// `metadata.total_size` is the tensor byte count (and `total_parameters`, as transformers 5). Shards are filled greedily in the given order.
/// Files of the other layout left by an earlier save in `dir` are removed; the index is written
/// last so an index always points at complete shards.
pub fn save_dir(
    dir: &Path,
    tensors: &[(String, Tensor)],
    dtype: DType,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    let elem_bytes = match dtype {
        DType::F32 => 4,
        DType::BF16 | DType::F16 => 2,
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot save weights as {other:?}"
            )));
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    if let Some((name, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "tensor `{name}` given twice"
        )));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;

    let limit = max_shard_bytes.unwrap_or(usize::MAX);
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![vec![]];
    let mut current = 0usize;
    for entry in tensors {
        let size = entry.1.elem_count() * elem_bytes;
        if current > 0 && current + size > limit {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("non-empty").push(entry);
        current += size;
    }

    if shards.len() == 1 {
        write_safetensors(&dir.join(SINGLE_FILE), &shards[0], dtype)?;
        remove_if_exists(&dir.join(INDEX_FILE))?;
        remove_stale_shards(dir, &[])?;
        return sync_dir(dir);
    }
    let n = shards.len();
    let names: Vec<String> = (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect();
    let mut weight_map = Map::new();
    let mut total = 0usize;
    for (shard, file) in shards.iter().zip(&names) {
        write_safetensors(&dir.join(file), shard, dtype)?;
        for (name, t) in shard.iter().map(|e| (&e.0, &e.1)) {
            weight_map.insert(name.clone(), Value::String(file.clone()));
            total += t.elem_count() * elem_bytes;
        }
    }
    remove_if_exists(&dir.join(SINGLE_FILE))?;
    remove_stale_shards(dir, &names)?;
    let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let metadata = json!({ "total_size": total, "total_parameters": params });
    let index = json!({ "metadata": metadata, "weight_map": weight_map });
    let mut text = serde_json::to_string_pretty(&index).expect("json values serialize");
    text.push('\n');
    write_atomic(&dir.join(INDEX_FILE), text.as_bytes())
}

/// One safetensors file, streamed: 8-byte little-endian header length, JSON header padded with
/// spaces to a multiple of 8, then the tensors' bytes back to back in header order.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[&(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    let (st_dtype, elem_bytes) = match dtype {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        _ => ("F16", 2),
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in tensors.iter().map(|e| (&e.0, &e.1)) {
        let n = t.elem_count() * elem_bytes;
        header.insert(
            name.clone(),
            json!({ "dtype": st_dtype, "shape": t.dims(), "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("json values serialize");
    header.resize(header.len().next_multiple_of(8), b' ');

    let written = write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (name, t) in tensors.iter().map(|e| (&e.0, &e.1)) {
            write_tensor_bytes(w, name, t, dtype)?;
        }
        Ok(())
    });
    // A refusal travels through the writer as an io::Error; give it back its own variant.
    match written {
        Err(Error::Io { path, source }) => {
            match source.get_ref().and_then(|e| e.downcast_ref::<NonFinite>()) {
                Some(n) => Err(Error::NonFiniteWeights {
                    path,
                    name: n.name.clone(),
                    bad: n.bad,
                    of: n.of,
                }),
                None => Err(Error::Io { path, source }),
            }
        }
        other => other,
    }
}

/// NaN or infinite values found while writing tensor `name`.
#[derive(Debug)]
struct NonFinite {
    name: String,
    bad: usize,
    of: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor `{}`: {} non-finite values", self.name, self.bad)
    }
}

impl std::error::Error for NonFinite {}

/// Writes `t`'s values in `dtype`; refuses NaN or infinite ones (the file, written under a
/// temporary name, is then dropped): weights like that come from a diverged run, and a
/// checkpoint of them would be resumed from as if it were good.
fn write_tensor_bytes(
    w: &mut dyn Write,
    name: &str,
    t: &Tensor,
    dtype: DType,
) -> std::io::Result<()> {
    let flat = t.flatten_all().map_err(std::io::Error::other)?;
    let values = flat.to_dtype(DType::F32).and_then(|f| f.to_vec1::<f32>());
    let values = values.map_err(std::io::Error::other)?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(std::io::Error::other(NonFinite {
            name: name.to_string(),
            bad,
            of: values.len(),
        }));
    }
    let mut buf = Vec::with_capacity(values.len() * 4);
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
        // Round-to-nearest-even conversion, as torch's .to(bfloat16).
        DType::BF16 => values
            .iter()
            .for_each(|v| buf.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
        _ => values
            .iter()
            .for_each(|v| buf.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
    }
    w.write_all(&buf)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path)(e)),
        _ => Ok(()),
    }
}

/// Removes `model-*-of-*.safetensors` files not in `keep` (left by an earlier, differently
/// sharded save) so the directory holds exactly one checkpoint.
fn remove_stale_shards(dir: &Path, keep: &[String]) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let name = entry.map_err(Error::io(dir))?.file_name();
        let name = name.to_string_lossy();
        let is_shard =
            name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if is_shard && !keep.iter().any(|k| k == name.as_ref()) {
            remove_if_exists(&dir.join(name.as_ref()))?;
        }
    }
    Ok(())
}

/// Whether two paths name one existing file (symlinks and `..` resolved): a write to one
/// would replace the other.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Atomically replaces `path` with `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes through `fill` to a temporary file beside `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory so the rename itself is durable.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path)(e));
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}
