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
//! `save` writes the three files atomically (temporary name, fsync, rename).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
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
}

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

/// Write `bytes` to `path` atomically: a temporary name in the same directory, fsync, rename,
/// then fsync the directory (best effort).
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let werr = |source| TokenizerError::Write {
        path: path.to_path_buf(),
        source,
    };
    {
        let mut f = fs::File::create(&tmp).map_err(werr)?;
        f.write_all(bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e).into());
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
        Ok(())
    }

    /// A small LLaMA-like tokenizer built in code (no download, no training): a Unigram model
    /// with byte fallback and a hand-made vocabulary —
    /// `<unk>`=0, `<s>`=1, `</s>`=2, `<0x00>`..`<0xFF>`, `▁`, single characters (printable ASCII,
    /// `\n`, `\t` and every character of `words`), then for each word (in order, deduplicated)
    /// `▁word` and `word` with a higher score so that a known word stays one token. Words with
    /// digits or whitespace are skipped: digits are always single tokens, as in LLaMA.
    /// The pipeline is LLaMA-2's tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"),
    /// decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space), post-processor
    /// `<s> $A`; so `decode(encode(x), true) == x` for any text without special tokens.
    /// There is no pad token (train.py's `[PAD]` path applies).
    pub fn demo(words: &[&str]) -> Result<Self> {
        const SPACE: char = '\u{2581}';
        let mut vocab: Vec<(String, f64)> = vec![
            ("<unk>".into(), 0.0),
            ("<s>".into(), 0.0),
            ("</s>".into(), 0.0),
        ];
        for b in 0..=255u8 {
            // Very low score: a literal "<0x41>" in the text is spelled with characters.
            vocab.push((format!("<0x{b:02X}>"), -1000.0));
        }
        let mut seen: std::collections::HashSet<String> =
            vocab.iter().map(|(t, _)| t.clone()).collect();
        let mut push = |vocab: &mut Vec<(String, f64)>, t: String, score: f64| {
            if seen.insert(t.clone()) {
                vocab.push((t, score));
            }
        };
        push(&mut vocab, SPACE.to_string(), -2.0);
        let mut chars: std::collections::BTreeSet<char> = (0x21u8..=0x7e).map(char::from).collect();
        chars.insert('\n');
        chars.insert('\t');
        for w in words {
            chars.extend(w.chars().filter(|c| !c.is_whitespace() && *c != SPACE));
        }
        for c in chars {
            push(&mut vocab, c.to_string(), -5.0);
        }
        for w in words {
            if w.is_empty()
                || w.chars()
                    .any(|c| c.is_ascii_digit() || c.is_whitespace() || c == SPACE)
            {
                continue;
            }
            push(&mut vocab, format!("{SPACE}{w}"), -1.0);
            if w.chars().count() > 1 {
                push(&mut vocab, w.to_string(), -1.5);
            }
        }
        let vocab_json: Vec<Value> = vocab.iter().map(|(t, s)| json!([t, s])).collect();
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE.to_string()},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()}
            ]},
            "pre_tokenizer": null,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE.to_string()}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab_json, "byte_fallback": true}
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec)
            .map_err(|e| TokenizerError::Invalid(format!("building the demo tokenizer: {e}")))?;
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("add_bos_token".into(), json!(true));
        config.insert("add_eos_token".into(), json!(false));
        Ok(Tokenizer {
            inner,
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            pad: None,
            unk: Some("<unk>".into()),
            model_max_length: None,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDS: &[&str] = &[
        "Below",
        "is",
        "an",
        "instruction",
        "###",
        "Response:",
        "cat",
        "sun",
    ];

    #[test]
    fn demo_layout() {
        let t = Tokenizer::demo(WORDS).unwrap();
        assert_eq!(t.unk_id(), Some(0));
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_id(), Some(2));
        assert_eq!(t.pad_id(), None);
        assert_eq!(t.token_to_id("<0x00>"), Some(3));
        assert_eq!(t.token_to_id("<0xFF>"), Some(258));
        assert_eq!(t.eos_token(), Some("</s>"));
        assert!(t.token_to_id("\u{2581}cat").is_some());
        assert!(t.token_to_id("cat").is_some());
    }

    #[test]
    fn demo_words_stay_whole_and_bos_is_added() {
        let t = Tokenizer::demo(WORDS).unwrap();
        let ids = t.encode("cat sun").unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, vec!["<s>", "\u{2581}cat", "\u{2581}sun"]);
        // Digits are single characters.
        let ids = t.encode("12 + 7").unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(
            toks,
            vec!["<s>", "\u{2581}", "1", "2", "\u{2581}", "+", "\u{2581}", "7"]
        );
        // A word after a newline and right after ':' is still one token.
        let ids = t.encode("### Response:cat\ncat").unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(
            toks,
            vec![
                "<s>",
                "\u{2581}###",
                "\u{2581}Response:",
                "cat",
                "\n",
                "cat"
            ]
        );
    }

    #[test]
    fn demo_round_trip() {
        let t = Tokenizer::demo(WORDS).unwrap();
        for text in [
            "cat sun",
            "Below is an instruction.\n\n### Response:42",
            "  leading and trailing spaces  ",
            "中文测试：你好，世界",
            "emoji 🦙🐑 and ünïcödé",
            "tabs\tand\nnewlines\n",
            "literal <0x41> stays text",
            "",
        ] {
            let ids = t.encode(text).unwrap();
            assert_eq!(ids.first(), Some(&1), "bos first for {text:?}");
            assert_eq!(
                t.decode(&ids, true).unwrap(),
                text,
                "round trip of {text:?}"
            );
        }
        // No unk: everything unknown goes through byte fallback.
        let ids = t.encode("中文🦙").unwrap();
        assert!(!ids.contains(&0));
    }

    #[test]
    fn special_tokens_in_text_are_matched() {
        let t = Tokenizer::demo(WORDS).unwrap();
        let ids = t.encode("cat</s>").unwrap();
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn truncation_counts_bos() {
        let t = Tokenizer::demo(WORDS).unwrap();
        let full = t.encode("cat sun cat sun cat").unwrap();
        assert_eq!(full.len(), 6);
        for n in 1..8 {
            let tr = t.encode_truncated("cat sun cat sun cat", n).unwrap();
            assert_eq!(tr, full[..n.min(full.len()).max(1)].to_vec(), "n={n}");
        }
    }

    #[test]
    fn add_missing_specials_adds_pad_only() {
        let mut t = Tokenizer::demo(WORDS).unwrap();
        let n = t.len();
        assert_eq!(t.add_missing_special_tokens(), 1);
        assert_eq!(t.len(), n + 1);
        assert_eq!(t.pad_token(), Some("[PAD]"));
        assert_eq!(t.pad_id(), Some(n as u32));
        assert_eq!(t.add_missing_special_tokens(), 0);
        // "[PAD]" in text is matched as one token.
        let ids = t.encode("cat[PAD]").unwrap();
        assert_eq!(ids.last(), Some(&(n as u32)));
    }

    #[test]
    fn save_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tokenizer::demo(WORDS).unwrap();
        t.set_model_max_length(Some(128));
        t.add_missing_special_tokens();
        t.save(dir.path()).unwrap();
        let u = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(u.len(), t.len());
        assert_eq!(u.pad_id(), t.pad_id());
        assert_eq!(u.bos_id(), Some(1));
        assert_eq!(u.eos_id(), Some(2));
        assert_eq!(u.unk_id(), Some(0));
        assert_eq!(u.model_max_length(), Some(128));
        for text in ["cat sun", "中文 🦙", "### Response:cat</s>"] {
            assert_eq!(u.encode(text).unwrap(), t.encode(text).unwrap());
        }
        let cfg: Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["pad_token"], "[PAD]");
        assert_eq!(
            cfg["added_tokens_decoder"][t.pad_id().unwrap().to_string()]["special"],
            true
        );
        let map: Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join("special_tokens_map.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(map["eos_token"]["content"], "</s>");
        // No temporary files left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn special_values_as_dicts_and_llama_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokenizer::demo(WORDS).unwrap();
        t.save(dir.path()).unwrap();
        // Legacy layout: no added_tokens_decoder, dict-valued special_tokens_map, Llama class.
        fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"tokenizer_class": "LlamaTokenizer", "model_max_length": 1000000000000000019884624838656}"#,
        )
        .unwrap();
        fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"eos_token": {"content": "</s>", "lstrip": false}, "unk_token": "<unk>"}"#,
        )
        .unwrap();
        let u = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(u.eos_id(), Some(2));
        assert_eq!(u.bos_id(), Some(1)); // LlamaTokenizer default
        assert_eq!(u.pad_id(), None);
        assert_eq!(u.model_max_length(), None);
        assert_eq!(u.encode("cat").unwrap(), t.encode("cat").unwrap());
        // add_eos_token rebuilds the post-processor as LlamaTokenizerFast does.
        fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"tokenizer_class": "LlamaTokenizerFast", "add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": null, "added_tokens_decoder": {}}"#,
        )
        .unwrap();
        let u = Tokenizer::from_dir(dir.path()).unwrap();
        let ids = u.encode("cat").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(u.encode_truncated("cat sun cat", 3).unwrap().len(), 3);
        assert_eq!(u.encode_truncated("cat sun cat", 3).unwrap()[2], 2);
    }

    #[test]
    fn missing_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
