//! Save -> load round trips (single file, sharded, bf16) and bad checkpoints giving named errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use herd_model::weights::{self, INDEX_FILE, SINGLE_FILE};
use herd_model::{Error, Llama, LlamaConfig};

fn assert_same_weights(a: &Llama, b: &Llama) {
    assert_eq!(a.vars().len(), b.vars().len());
    for ((na, va), (nb, vb)) in a.vars().iter().zip(b.vars()) {
        assert_eq!(na, nb);
        assert_eq!(common::max_abs_diff(va, vb), 0.0, "{na}");
    }
}

fn shard_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-"))
        .collect();
    names.sort();
    names
}

#[test]
fn single_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config(false);
    cfg.extra
        .insert("some_future_key".into(), serde_json::json!({"a": [1, 2]}));
    // A bf16 base as transformers 5 writes it: its `dtype` must not outlive an f32 save, since
    // transformers 5 reads it before `torch_dtype` and would load the f32 weights in bf16.
    cfg.extra.insert("dtype".into(), "bfloat16".into());
    let model = Llama::random(cfg, 11).unwrap();
    model.save(dir.path(), DType::F32).unwrap();
    assert!(dir.path().join(SINGLE_FILE).is_file());
    assert!(!dir.path().join(INDEX_FILE).exists());
    let loaded = Llama::load(dir.path()).unwrap();
    assert_same_weights(&model, &loaded);
    assert_eq!(
        loaded.config().extra["some_future_key"],
        serde_json::json!({"a": [1, 2]})
    );
    assert_eq!(loaded.config().extra["torch_dtype"], "float32");
    assert_eq!(loaded.config().extra["dtype"], "float32");
    assert_eq!(loaded.config().rope_scaling, model.config().rope_scaling);
    assert_no_leftovers(dir.path());
    // Metadata {"format": "pt"} is what transformers requires.
    let bytes = std::fs::read(dir.path().join(SINGLE_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
}

#[test]
fn tied_save_omits_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::random(common::tiny_config(true), 12).unwrap();
    model.save(dir.path(), DType::F32).unwrap();
    let tensors = weights::load_dir(dir.path()).unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    assert_same_weights(&model, &Llama::load(dir.path()).unwrap());
}

#[test]
fn sharded_round_trip_and_relayout() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::random(common::tiny_config(false), 13).unwrap();
    model
        .save_sharded(dir.path(), DType::F32, Some(10_000))
        .unwrap();
    let shards = shard_files(dir.path());
    assert!(shards.len() > 2, "{shards:?}");
    assert!(!dir.path().join(SINGLE_FILE).exists());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], model.num_parameters() * 4);
    assert_same_weights(&model, &Llama::load(dir.path()).unwrap());

    // Re-saving with fewer shards, then as one file, leaves no stale shard or index behind.
    model
        .save_sharded(dir.path(), DType::F32, Some(40_000))
        .unwrap();
    assert!(shard_files(dir.path()).len() < shards.len());
    assert_same_weights(&model, &Llama::load(dir.path()).unwrap());
    model.save(dir.path(), DType::F32).unwrap();
    assert!(shard_files(dir.path()).is_empty());
    assert!(!dir.path().join(INDEX_FILE).exists());
    assert_same_weights(&model, &Llama::load(dir.path()).unwrap());
}

#[test]
fn bf16_round_trip_rounds_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::random(common::tiny_config(false), 14).unwrap();
    model
        .save_sharded(dir.path(), DType::BF16, Some(5_000))
        .unwrap();
    let loaded = Llama::load(dir.path()).unwrap();
    assert_eq!(loaded.config().extra["torch_dtype"], "bfloat16");
    for ((name, a), (_, b)) in model.vars().iter().zip(loaded.vars()) {
        let rounded = a
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(common::max_abs_diff(&rounded, b), 0.0, "{name}");
    }
}

fn saved(dir: &Path) -> Llama {
    let model = Llama::random(common::tiny_config(false), 15).unwrap();
    model.save(dir, DType::F32).unwrap();
    model
}

#[test]
fn truncated_file_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let path = dir.path().join(SINGLE_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match Llama::load(dir.path()) {
        Err(Error::Safetensors { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected a safetensors error, got {:?}", other.err()),
    }
    let msg = Llama::load(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved(dir.path());
    let all: Vec<(String, Tensor)> = model
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();

    // Missing.
    let without: Vec<_> = all
        .iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .cloned()
        .collect();
    weights::save_dir(dir.path(), &without, DType::F32, None).unwrap();
    match Llama::load(dir.path()) {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "model.norm.weight"),
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }

    // Extra.
    let mut with = all.clone();
    with.push((
        "model.bogus".into(),
        Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu).unwrap(),
    ));
    weights::save_dir(dir.path(), &with, DType::F32, None).unwrap();
    match Llama::load(dir.path()) {
        Err(Error::UnexpectedTensor { name, path }) => {
            assert_eq!(name, "model.bogus");
            assert_eq!(path, dir.path().join(SINGLE_FILE));
        }
        other => panic!("expected UnexpectedTensor, got {:?}", other.err()),
    }

    // Misshapen: the config says one more token than the file has.
    weights::save_dir(dir.path(), &all, DType::F32, None).unwrap();
    let mut cfg = LlamaConfig::from_file(&dir.path().join("config.json")).unwrap();
    cfg.vocab_size += 1;
    cfg.save(dir.path()).unwrap();
    match Llama::load(dir.path()) {
        Err(Error::ShapeMismatch {
            name,
            path,
            expected,
            found,
        }) => {
            assert_eq!(name, "model.embed_tokens.weight");
            assert_eq!(path, dir.path().join(SINGLE_FILE));
            assert_eq!((expected, found), (vec![51, 32], vec![50, 32]));
        }
        other => panic!("expected ShapeMismatch, got {:?}", other.err()),
    }
}

#[test]
fn missing_shard_and_missing_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::random(common::tiny_config(false), 16).unwrap();
    model
        .save_sharded(dir.path(), DType::F32, Some(10_000))
        .unwrap();
    let shard = dir.path().join(&shard_files(dir.path())[1]);
    std::fs::remove_file(&shard).unwrap();
    match Llama::load(dir.path()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, shard),
        other => panic!("expected Io naming the shard, got {:?}", other.err()),
    }

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        weights::load_dir(empty.path()),
        Err(Error::NoWeights { .. })
    ));
    assert!(matches!(Llama::load(empty.path()), Err(Error::Io { .. })));
    // A PyTorch-only directory is told how to convert.
    std::fs::write(empty.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let err = weights::load_dir(empty.path()).unwrap_err().to_string();
    assert!(
        err.contains("pytorch_model.bin is not read: convert it"),
        "{err}"
    );
}

#[test]
fn index_listing_a_tensor_its_shard_lacks_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::random(common::tiny_config(false), 17).unwrap();
    model
        .save_sharded(dir.path(), DType::F32, Some(10_000))
        .unwrap();
    let index_path = dir.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    // Point model.norm.weight at the first shard, which does not hold it.
    let first = shard_files(dir.path())[0].clone();
    index["weight_map"]["model.norm.weight"] = first.clone().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    match weights::load_dir(dir.path()) {
        Err(Error::MissingTensor { path, name }) => {
            assert_eq!(
                (path, name.as_str()),
                (dir.path().join(first), "model.norm.weight")
            );
        }
        other => panic!("expected MissingTensor, got {:?}", other.map(|m| m.len())),
    }
}

#[test]
fn from_tensors_accepts_f16_and_bf16() {
    let model = Llama::random(common::tiny_config(true), 18).unwrap();
    let tensors: BTreeMap<String, Tensor> = model
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    let loaded = Llama::from_tensors(model.config().clone(), tensors).unwrap();
    assert!(loaded.vars().iter().all(|(_, v)| v.dtype() == DType::F32));
}

#[test]
fn non_finite_weights_are_refused_and_the_saved_model_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved(dir.path());
    let before = std::fs::read(dir.path().join(SINGLE_FILE)).unwrap();
    let (name, var) = &model.vars()[3];
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[1] = f32::NAN;
    values[2] = f32::INFINITY;
    var.set(&Tensor::from_vec(values, var.shape(), var.device()).unwrap())
        .unwrap();
    let err = model.save(dir.path(), DType::F32).unwrap_err().to_string();
    assert!(
        err.contains(&format!("tensor `{name}` holds 2 NaN or infinite values"))
            && err.contains("refusing to save"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join(SINGLE_FILE)).unwrap(), before);
    assert_no_leftovers(dir.path());
}

/// No temporary (dot) files left behind in `dir`.
fn assert_no_leftovers(dir: &Path) {
    let leftovers = std::fs::read_dir(dir).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')
    });
    assert_eq!(leftovers.count(), 0);
}
