//! `generation_config.json`, which `save_pretrained` writes beside every causal LM: the sampling
//! defaults and stop ids (`eos_token_id` may be a list, as in Llama 3) that `generate` uses. A
//! fine-tuned model keeps its base's file; a base without one gets the file transformers derives
//! from `config.json` (`GenerationConfig.from_model_config`: the token ids, marked
//! `_from_model_config`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::TokenIds;
use crate::{Error, LlamaConfig, Result};

pub const FILE: &str = "generation_config.json";

/// Writes `dst/generation_config.json`: the one in `src` (the model trained from) when there is
/// one, else the one derived from `cfg`. A `src` file that is not a JSON object is an error
/// naming it, rather than a file `transformers` would refuse to load later.
pub fn save(src: &Path, cfg: &LlamaConfig, dst: &Path) -> Result<()> {
    let from = src.join(FILE);
    let to = dst.join(FILE);
    if from.is_file() {
        let bytes = std::fs::read(&from).map_err(Error::io(&from))?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(_)) => {}
            Ok(_) => {
                return Err(Error::Config(format!(
                    "{}: not a JSON object",
                    from.display()
                )))
            }
            Err(source) => return Err(Error::Json { path: from, source }),
        }
        if crate::weights::same_file(&from, &to) {
            return Ok(());
        }
        return crate::weights::write_atomic(&to, &bytes);
    }
    let mut text =
        serde_json::to_string_pretty(&Value::Object(derived(cfg))).map_err(|source| {
            Error::Json {
                path: to.clone(),
                source,
            }
        })?;
    text.push('\n');
    crate::weights::write_atomic(&to, text.as_bytes())
}

/// The ids generation stops at, as transformers' `generate` takes them from the generation
/// config (`eos_token_id`, one id or a list: Llama 3 instruct stops at `<|eot_id|>` too) in
/// `dir`, else from `cfg`; with `also` (the tokenizer's eos) added when it is not among them.
pub fn stop_ids(dir: &Path, cfg: &LlamaConfig, also: Option<u32>) -> Result<Vec<u32>> {
    // A PEFT adapter directory has none of its own: its base's counts, as PEFT generates
    // with the base model's generation config.
    let adapter = dir.join(crate::lora::ADAPTER_CONFIG);
    let base = match !dir.join(FILE).exists() && !dir.join("config.json").exists() {
        true if adapter.is_file() => crate::lora::LoraConfig::from_file(&adapter)?
            .1
            .map(|b| crate::lora::resolve_base(dir, &b)),
        _ => None,
    };
    let path = base.as_deref().unwrap_or(dir).join(FILE);
    let from_file = match std::fs::read(&path) {
        Ok(bytes) => {
            let v: Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
            match v.get("eos_token_id") {
                None | Some(Value::Null) => None,
                Some(ids) => Some(serde_json::from_value::<TokenIds>(ids.clone()).map_err(
                    |_| {
                        Error::Config(format!(
                            "{}: eos_token_id is {ids}, expected an id or a list of ids",
                            path.display()
                        ))
                    },
                )?),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&path)(e)),
    };
    let mut ids: Vec<u32> = from_file
        .or_else(|| cfg.eos_token_id.clone())
        .map(|t| t.all().to_vec())
        .unwrap_or_default();
    if let Some(id) = also.filter(|id| !ids.contains(id)) {
        ids.push(id);
    }
    Ok(ids)
}

/// What `GenerationConfig.from_model_config` keeps of a LLaMA config: the special token ids
/// that are set.
fn derived(cfg: &LlamaConfig) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("_from_model_config".into(), Value::Bool(true));
    for (key, id) in [
        ("bos_token_id", cfg.bos_token_id.map(TokenIds::One)),
        ("eos_token_id", cfg.eos_token_id.clone()),
        ("pad_token_id", cfg.pad_token_id.map(TokenIds::One)),
    ] {
        if let Some(id) = id {
            m.insert(key.into(), serde_json::to_value(id).expect("ids serialize"));
        }
    }
    if let Some(v) = cfg.extra.get("transformers_version") {
        m.insert("transformers_version".into(), v.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Value) -> LlamaConfig {
        let mut v = serde_json::json!({
            "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-6
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_base_file_is_kept_byte_for_byte() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let text = "{\n  \"eos_token_id\": [128001, 128009],\n  \"temperature\": 0.6\n}\n";
        std::fs::write(src.path().join(FILE), text).unwrap();
        save(src.path(), &cfg(serde_json::json!({})), dst.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.path().join(FILE)).unwrap(),
            text
        );
        // Saving into the directory it came from leaves it as it is.
        save(src.path(), &cfg(serde_json::json!({})), src.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(src.path().join(FILE)).unwrap(),
            text
        );
    }

    #[test]
    fn without_one_it_is_derived_from_the_config() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let c = cfg(serde_json::json!({"bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": null, "transformers_version": "4.46.0"}));
        save(src.path(), &c, dst.path()).unwrap();
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dst.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"_from_model_config": true, "bos_token_id": 1,
                "eos_token_id": 2, "transformers_version": "4.46.0"})
        );
    }

    #[test]
    fn generation_stops_at_every_eos_id_of_the_generation_config_or_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let listed = cfg(serde_json::json!({"eos_token_id": [5, 7]}));
        // No generation config: config.json's list, and the tokenizer's eos if it is another.
        assert_eq!(stop_ids(dir.path(), &listed, Some(7)).unwrap(), vec![5, 7]);
        assert_eq!(
            stop_ids(dir.path(), &listed, Some(2)).unwrap(),
            vec![5, 7, 2]
        );
        // The generation config wins, in either form; a list survives a derived save.
        std::fs::write(dir.path().join(FILE), r#"{"eos_token_id": [3, 6]}"#).unwrap();
        assert_eq!(stop_ids(dir.path(), &listed, None).unwrap(), vec![3, 6]);
        std::fs::write(dir.path().join(FILE), r#"{"eos_token_id": 4}"#).unwrap();
        assert_eq!(stop_ids(dir.path(), &listed, Some(4)).unwrap(), vec![4]);
        let out = tempfile::tempdir().unwrap();
        save(out.path(), &listed, out.path()).unwrap();
        let v: Value =
            serde_json::from_slice(&std::fs::read(out.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(v["eos_token_id"], serde_json::json!([5, 7]));
        // A PEFT adapter directory stops where its base's generation config says.
        let adapter = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), r#"{"eos_token_id": [3, 6]}"#).unwrap();
        std::fs::write(
            adapter.path().join(crate::lora::ADAPTER_CONFIG),
            serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                "base_model_name_or_path": dir.path()})
            .to_string(),
        )
        .unwrap();
        assert_eq!(stop_ids(adapter.path(), &listed, None).unwrap(), vec![3, 6]);
        std::fs::write(dir.path().join(FILE), r#"{"eos_token_id": "x"}"#).unwrap();
        let e = stop_ids(dir.path(), &listed, None).unwrap_err().to_string();
        assert!(e.contains("expected an id or a list of ids"), "{e}");
    }

    #[test]
    fn a_broken_base_file_is_named() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join(FILE), "[1, 2]").unwrap();
        let e = save(src.path(), &cfg(serde_json::json!({})), dst.path()).unwrap_err();
        assert!(e.to_string().contains(FILE), "{e}");
        assert!(!dst.path().join(FILE).exists());
        std::fs::write(src.path().join(FILE), "{").unwrap();
        let e = save(src.path(), &cfg(serde_json::json!({})), dst.path()).unwrap_err();
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
