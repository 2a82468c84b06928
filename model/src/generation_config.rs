//! `generation_config.json`, which `save_pretrained` writes beside every causal LM: the sampling
//! defaults and stop ids (`eos_token_id` may be a list, as in Llama 3) that `generate` uses. A
//! fine-tuned model keeps its base's file; a base without one gets the file transformers derives
//! from `config.json` (`GenerationConfig.from_model_config`: the token ids, marked
//! `_from_model_config`).

use std::path::Path;

use serde_json::{Map, Value};

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

/// What `GenerationConfig.from_model_config` keeps of a LLaMA config: the special token ids
/// that are set.
fn derived(cfg: &LlamaConfig) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("_from_model_config".into(), Value::Bool(true));
    for (key, id) in [
        ("bos_token_id", cfg.bos_token_id),
        ("eos_token_id", cfg.eos_token_id),
        ("pad_token_id", cfg.pad_token_id),
    ] {
        if let Some(id) = id {
            m.insert(key.into(), id.into());
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
