//! HF `config.json` for LLaMA-family models. Known fields are typed; everything else lands in
//! `extra` and is written back unchanged, so a config we save still loads in `transformers`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_init_range() -> f64 {
    0.02
}
fn default_eps() -> f64 {
    1e-6
}

/// `rope_scaling` as transformers writes it. Older configs say `type`, newer `rope_type`, and
/// transformers itself saves both, so both are kept as separate fields (a serde alias would reject
/// a config that has both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl RopeScaling {
    /// `rope_type`, falling back to the legacy `type`; "default" when neither is set.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.type_.as_deref())
            .unwrap_or("default")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// bos/pad may be given as a list too (the first id is kept); `eos_token_id` keeps its list
    /// (Llama 3 instruct: end of text and end of turn), which generation stops at and a save
    /// writes back.
    #[serde(
        default,
        deserialize_with = "first_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(
        default,
        deserialize_with = "first_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Every key not named above (architectures, model_type, hidden_act, torch_dtype, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A special token given as one id or as a list of ids (serialized in the form it came in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id (the one a single-id field means).
    pub fn first(&self) -> Option<u32> {
        self.all().first().copied()
    }

    pub fn all(&self) -> &[u32] {
        match self {
            TokenIds::One(id) => std::slice::from_ref(id),
            TokenIds::Many(ids) => ids,
        }
    }
}

fn first_id<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(id)) => Some(id),
        Some(OneOrMany::Many(ids)) => ids.first().copied(),
    })
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = cfg.normalized();
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(cfg)
    }

    /// transformers v5 moved `rope_theta`/`rope_scaling` into one `rope_parameters` object; read it
    /// when the v4 fields are absent (the object itself stays in `extra` and round-trips).
    pub fn normalized(mut self) -> Self {
        let Some(params) = self.extra.get("rope_parameters").and_then(Value::as_object) else {
            return self;
        };
        if let Some(theta) = params.get("rope_theta").and_then(Value::as_f64) {
            self.rope_theta = theta;
        }
        if self.rope_scaling.is_none() {
            if let Ok(rs) = serde_json::from_value::<RopeScaling>(Value::Object(params.clone())) {
                if rs.kind() != "default" {
                    self.rope_scaling = Some(rs);
                }
            }
        }
        self
    }

    /// Records the dtype the weights are saved in (`torch.float32` as "float32"), as
    /// `save_pretrained` does: under transformers 5's `dtype` and 4.x's `torch_dtype` alike, since
    /// transformers 5 reads `dtype` first and a base's bf16 there would load f32 weights in bf16.
    pub fn set_saved_dtype(&mut self, dtype: candle_core::DType) {
        let name = match dtype {
            candle_core::DType::BF16 => "bfloat16",
            candle_core::DType::F16 => "float16",
            _ => "float32",
        };
        for key in ["dtype", "torch_dtype"] {
            self.extra.insert(key.into(), name.into());
        }
    }

    /// Writes `dir/config.json` atomically (pretty-printed, like transformers).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("config.json");
        let mut text = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        text.push('\n');
        crate::weights::write_atomic(&path, text.as_bytes())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads; without the field every query head has its own (plain multi-head attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Rejects configs whose math this crate does not implement, instead of computing something else.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{key} must be at least 1"));
            }
        }
        for (key, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{key} must be a finite number > 0, got {v}"));
            }
        }
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim()
            ));
        }
        match self.extra.get("model_type").and_then(Value::as_str) {
            None | Some("llama") => {}
            // Mistral's math is LLaMA's but for the sliding window, which limits attention to
            // the last `sliding_window` tokens: computing full attention instead would silently
            // give other logits than transformers.
            Some("mistral") => {
                let window = self.extra.get("sliding_window").and_then(Value::as_u64);
                if let Some(w) = window.filter(|&w| (w as usize) < self.max_position_embeddings) {
                    return bad(format!(
                        "model_type \"mistral\" with sliding_window {w} is not supported: herd \
                         attends to every earlier token (a Mistral config with sliding_window \
                         null, as from v0.2 on, is)"
                    ));
                }
            }
            Some(other) => {
                return bad(format!(
                    "model_type {other:?} is not supported: herd runs LLaMA-family models \
                     (model_type \"llama\", or \"mistral\" without a sliding window)"
                ))
            }
        }
        if let Some(act) = self.extra.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return bad(format!("hidden_act {act:?} is not supported (only silu)"));
            }
        }
        if let Some(f) = self
            .extra
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
        {
            if f != 1.0 {
                return bad(format!("partial_rotary_factor {f} is not supported"));
            }
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.kind() {
                "default" => {}
                "linear" if rs.factor.is_some() => {}
                "llama3"
                    if rs.factor.is_some()
                        && rs.low_freq_factor.is_some()
                        && rs.high_freq_factor.is_some()
                        && rs.original_max_position_embeddings.is_some() => {}
                "linear" | "llama3" => {
                    return bad(format!(
                        "rope_scaling {:?} lacks required fields",
                        rs.kind()
                    ))
                }
                other => return bad(format!("rope_scaling type {other:?} is not supported")),
            }
        }
        Ok(())
    }
}
