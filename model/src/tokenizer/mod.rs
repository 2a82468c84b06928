//! The tokenizer as `transformers`' fast tokenizers see it: a `tokenizers::Tokenizer` read from
//! `tokenizer.json`, plus the special tokens (bos/eos/pad/unk) and `model_max_length` that live in
//! `tokenizer_config.json` / `special_tokens_map.json`.
//!
//! What matches HF (`AutoTokenizer.from_pretrained(dir)` with a fast tokenizer):
//! - `encode` = `tokenizer(text)["input_ids"]`: the tokenizer.json pipeline with
//!   `add_special_tokens=True` (the post-processor adds bos); special tokens inside the text
//!   (e.g. `"</s>"`) are matched as added tokens. Truncation/padding stored in tokenizer.json are
//!   ignored, as HF's per-call settings override them.
//! - `encode_truncated(text, n)` = `tokenizer(text, max_length=n, truncation=True)`: the special
//!   tokens added by the post-processor count towards `n`.
//! - `len()` = `len(tokenizer)` (vocab including added tokens).
//! - `add_missing_special_tokens` = the tokenizer side of train.py's
//!   `smart_tokenizer_and_embedding_resize` (`[PAD]`, `</s>`, `<s>`, `<unk>` in that order).
//! - For `LlamaTokenizer(Fast)` configs the post-processor is rebuilt from `add_bos_token` /
//!   `add_eos_token` as `LlamaTokenizerFast.update_post_processor` does.
//!
//! `save` writes the three files atomically (temporary name, fsync, rename), and copies the
//! sentencepiece `tokenizer.model` the tokenizer was loaded beside.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Errors of loading, using and saving a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer: {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "tokenizer: {path} is not a tokenizer file the `tokenizers` library can load: {message}"
    )]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: {path}: field `{field}` {problem}")]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("tokenizer: {what} failed: {message}")]
    Tokenizers { what: &'static str, message: String },
    #[error("tokenizer: special token {role} is `{token}`, which is not in the vocabulary")]
    UnknownSpecial { role: &'static str, token: String },
    #[error("tokenizer: {0}")]
    Invalid(String),
}

/// Tokenizer operations return the crate's error (`herd_model::Error::Tokenizer(TokenizerError)`),
/// so `?` works in the model and worker crates alike.
pub type Result<T> = std::result::Result<T, crate::Error>;

fn tk_err(what: &'static str) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Tokenizers {
        what,
        message: e.to_string(),
    }
}

/// The four special-token roles, in the order train.py adds them.
const ROLES: [&str; 4] = ["pad_token", "eos_token", "bos_token", "unk_token"];

/// A tokenizer with HF fast-tokenizer semantics. See the module docs.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    model_max_length: Option<usize>,
    /// tokenizer_config.json as loaded (or built), kept so `save` round-trips unknown keys.
    config: Map<String, Value>,
    /// The sentencepiece model (`tokenizer.model`) beside the tokenizer loaded, if any, read
    /// at load (a save after hours of training does not depend on the model dir still being
    /// there): `save` writes it, as `LlamaTokenizerFast.save_pretrained` does, so the slow
    /// `LlamaTokenizer` (Alpaca's train.py loads with `use_fast=False`) can load what we write.
    vocab_file: Option<(PathBuf, std::sync::Arc<Vec<u8>>)>,
}

/// The sentencepiece model file of LLaMA tokenizers.
pub const VOCAB_FILE: &str = "tokenizer.model";

/// A special token value in HF files: `"</s>"` or `{"content": "</s>", ...}` (maybe with
/// `"__type": "AddedToken"`), or null.
fn special_value(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        Value::Object(m) => m
            .get("content")
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string())),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(
        serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })?,
    )
}

/// Atomic writes are the crate's one implementation.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::weights::write_atomic(path, bytes)
}

/// `dir/tokenizer.model`, when there is one.
#[allow(clippy::type_complexity)]
fn read_vocab_file(dir: &Path) -> Result<Option<(PathBuf, std::sync::Arc<Vec<u8>>)>> {
    let path = dir.join(VOCAB_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = fs::read(&path).map_err(|source| TokenizerError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(Some((path, std::sync::Arc::new(bytes))))
}

fn is_llama_class(config: &Map<String, Value>) -> bool {
    matches!(
        config.get("tokenizer_class").and_then(Value::as_str),
        Some("LlamaTokenizer") | Some("LlamaTokenizerFast")
    )
}

/// `model_max_length` as HF writes it: an int, or a huge float (1e30) meaning "unset".
fn parse_max_len(v: &Value) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok().filter(|&n| n < (1usize << 50));
    }
    None
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` plus `dir/tokenizer_config.json` and
    /// `dir/special_tokens_map.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let text = fs::read_to_string(&tok_path).map_err(|source| TokenizerError::Io {
            path: tok_path.clone(),
            source,
        })?;
        let inner: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::Load {
                    path: tok_path.clone(),
                    message: e.to_string(),
                })?;

        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.exists() {
            match read_json(&cfg_path)? {
                Value::Object(m) => m,
                _ => {
                    return Err(TokenizerError::Field {
                        path: cfg_path,
                        field: "(top level)".into(),
                        problem: "must be a JSON object".into(),
                    }
                    .into())
                }
            }
        } else {
            Map::new()
        };
        let map_path = dir.join("special_tokens_map.json");
        let special_map = if map_path.exists() {
            match read_json(&map_path)? {
                Value::Object(m) => m,
                _ => Map::new(),
            }
        } else {
            Map::new()
        };

        // transformers (v4): tokenizer_config.json values; the legacy special_tokens_map.json
        // overrides them only when the config has no `added_tokens_decoder`. A key absent from
        // both falls back to the class defaults (LlamaTokenizerFast: <s>, </s>, <unk>; no pad).
        let legacy = !config.contains_key("added_tokens_decoder");
        let llama = is_llama_class(&config);
        let mut roles: BTreeMap<&str, Option<String>> = BTreeMap::new();
        for role in ROLES {
            let mut val: Option<Option<String>> = None;
            if let Some(v) = config.get(role) {
                val = Some(special_value(v).ok_or_else(|| TokenizerError::Field {
                    path: cfg_path.clone(),
                    field: role.into(),
                    problem: "must be a string, null or an object with \"content\"".into(),
                })?);
            }
            if legacy || val.is_none() {
                if let Some(v) = special_map.get(role) {
                    if let Some(s) = special_value(v) {
                        val = Some(s);
                    }
                }
            }
            let val = val.unwrap_or_else(|| {
                if llama {
                    match role {
                        "bos_token" => Some("<s>".to_string()),
                        "eos_token" => Some("</s>".to_string()),
                        "unk_token" => Some("<unk>".to_string()),
                        _ => None,
                    }
                } else {
                    None
                }
            });
            roles.insert(role, val);
        }
        let model_max_length = config.get("model_max_length").and_then(parse_max_len);

        let mut tok = Tokenizer {
            inner,
            bos: roles["bos_token"].clone(),
            eos: roles["eos_token"].clone(),
            pad: roles["pad_token"].clone(),
            unk: roles["unk_token"].clone(),
            model_max_length,
            config,
            vocab_file: read_vocab_file(dir)?,
        };
        // HF's per-call settings (no truncation, no padding) override those stored in the file.
        tok.inner
            .with_truncation(None)
            .map_err(tk_err("clearing truncation"))?;
        tok.inner.with_padding(None);
        // HF: special tokens named in the config are registered as special added tokens.
        let specials: Vec<tokenizers::AddedToken> = [&tok.bos, &tok.eos, &tok.unk, &tok.pad]
            .into_iter()
            .flatten()
            .filter(|t| tok.inner.get_vocab(true).contains_key(t.as_str()))
            .filter(|t| !tok.is_special_added(t))
            .map(|t| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        if !specials.is_empty() {
            tok.inner.add_special_tokens(&specials);
        }
        if llama {
            tok.update_llama_post_processor()?;
        }
        Ok(tok)
    }

    fn is_special_added(&self, token: &str) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .values()
            .any(|t| t.content == token && t.special)
    }

    /// `LlamaTokenizerFast.update_post_processor`: `<s>:0 $A:0` (+ `</s>:0` when add_eos_token).
    fn update_llama_post_processor(&mut self) -> Result<()> {
        let add_bos = self
            .config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let add_eos = self
            .config
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Map::new();
        let special = |role: &'static str, tok: &Option<String>| -> Result<(String, u32)> {
            let t = tok.clone().ok_or_else(|| {
                TokenizerError::Invalid(format!("add_{role} is set but there is no {role}"))
            })?;
            let id = self
                .inner
                .token_to_id(&t)
                .ok_or(TokenizerError::UnknownSpecial {
                    role,
                    token: t.clone(),
                })?;
            Ok((t, id))
        };
        let bos = if add_bos {
            Some(special("bos_token", &self.bos)?)
        } else {
            None
        };
        let eos = if add_eos {
            Some(special("eos_token", &self.eos)?)
        } else {
            None
        };
        for (type_id, seq, out) in [(0u32, "A", &mut single), (1u32, "B", &mut pair)] {
            if let Some((b, _)) = &bos {
                out.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((e, _)) = &eos {
                out.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        for (t, id) in bos.iter().chain(eos.iter()) {
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        let pp = json!({"type": "TemplateProcessing", "single": single, "pair": pair,
                        "special_tokens": specials});
        let pp: tokenizers::PostProcessorWrapper = serde_json::from_value(pp)
            .map_err(|e| TokenizerError::Invalid(format!("building the post-processor: {e}")))?;
        self.inner.with_post_processor(Some(pp));
        Ok(())
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// `tokenizer(text)["input_ids"]`: with the post-processor (bos for LLaMA), no truncation.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tk_err("encode"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids without the special tokens of the post-processor (`add_special_tokens=False`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk_err("encode"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer(text, max_length=max_len, truncation=True)["input_ids"]`: right truncation,
    /// the post-processor's special tokens count towards `max_len`.
    pub fn encode_truncated(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let mut enc = self.inner.encode(text, false).map_err(tk_err("encode"))?;
        let n_added = self
            .inner
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        let keep = max_len.saturating_sub(n_added);
        if enc.len() > keep {
            enc.truncate(keep, 0, tokenizers::TruncationDirection::Right);
        }
        let enc = self
            .inner
            .post_process(enc, None, true)
            .map_err(tk_err("post-process"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer.decode(ids, skip_special_tokens=skip_special)` (no clean-up of spaces).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        Ok(self
            .inner
            .decode(ids, skip_special)
            .map_err(tk_err("decode"))?)
    }

    /// A byte-fallback token (`<0xAB>`): its text depends on the byte tokens next to it (a run
    /// that is not valid UTF-8 decodes to one U+FFFD per byte), so the text of a sequence
    /// ending in one may still change as more tokens come.
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad.as_deref()
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.unk.as_deref()
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// `len(tokenizer)`: the vocabulary including added tokens.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `model_max_length` from tokenizer_config.json (None when absent or HF's "unset" 1e30).
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn set_model_max_length(&mut self, n: Option<usize>) {
        self.model_max_length = n;
    }

    /// train.py's `smart_tokenizer_and_embedding_resize`, tokenizer side: when missing, pad
    /// becomes "[PAD]", eos "</s>", bos "<s>", unk "<unk>" (added as special tokens, in that
    /// order). Returns how much the vocabulary grew (`len()` after minus before): a token that
    /// already was in the vocabulary only gets its role.
    pub fn add_missing_special_tokens(&mut self) -> usize {
        let before = self.len();
        let mut new = Vec::new();
        for (slot, default) in [
            (&mut self.pad, "[PAD]"),
            (&mut self.eos, "</s>"),
            (&mut self.bos, "<s>"),
            (&mut self.unk, "<unk>"),
        ] {
            if slot.is_none() {
                *slot = Some(default.to_string());
                new.push(tokenizers::AddedToken::from(default, true));
            }
        }
        if !new.is_empty() {
            self.inner.add_special_tokens(&new);
        }
        self.len() - before
    }

    /// Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `dir`
    /// (created if needed), each atomically. `AutoTokenizer.from_pretrained(dir)` loads them.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|source| TokenizerError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let json = self.inner.to_string(true).map_err(tk_err("serialize"))?;
        atomic_write(&dir.join("tokenizer.json"), json.as_bytes())?;

        let decoder = self.inner.get_added_tokens_decoder();
        let added_dict = |t: &str| -> Value {
            let at = decoder.values().find(|a| a.content == t);
            match at {
                Some(a) => json!({"content": a.content, "lstrip": a.lstrip,
                    "normalized": a.normalized, "rstrip": a.rstrip, "single_word": a.single_word}),
                None => json!({"content": t, "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false}),
            }
        };

        let mut cfg = self.config.clone();
        let mut ids: Vec<_> = decoder.keys().copied().collect();
        ids.sort_unstable();
        let mut atd = Map::new();
        for id in ids {
            let a = &decoder[&id];
            atd.insert(
                id.to_string(),
                json!({"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized,
                       "rstrip": a.rstrip, "single_word": a.single_word, "special": a.special}),
            );
        }
        cfg.insert("added_tokens_decoder".into(), Value::Object(atd));
        let mut smap = Map::new();
        for (role, val) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
        ] {
            match val {
                Some(t) => {
                    cfg.insert(role.into(), Value::String(t.clone()));
                    smap.insert(role.into(), added_dict(t));
                }
                None => {
                    cfg.insert(role.into(), Value::Null);
                }
            }
        }
        match self.model_max_length {
            Some(n) => {
                cfg.insert("model_max_length".into(), json!(n));
            }
            None => {
                cfg.remove("model_max_length");
            }
        }
        cfg.entry("tokenizer_class")
            .or_insert_with(|| json!("PreTrainedTokenizerFast"));
        cfg.entry("clean_up_tokenization_spaces")
            .or_insert(json!(false));
        let cfg_text = serde_json::to_string_pretty(&Value::Object(cfg))
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        atomic_write(&dir.join("tokenizer_config.json"), cfg_text.as_bytes())?;
        let map_text = serde_json::to_string_pretty(&Value::Object(smap))
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        atomic_write(&dir.join("special_tokens_map.json"), map_text.as_bytes())?;
        if let Some((src, bytes)) = &self.vocab_file {
            let dst = dir.join(VOCAB_FILE);
            if !crate::weights::same_file(src, &dst) {
                atomic_write(&dst, bytes)?;
            }
        }
        Ok(())
    }
}

mod demo;
#[cfg(test)]
mod tests;
