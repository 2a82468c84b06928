//! LoRA adapters as PEFT (`peft.tuners.lora`, `LoraConfig`) computes and stores them.
//!
//! Each targeted `nn.Linear` W [out, in] gets A [r, in] and B [out, r]; the layer computes
//! `W x + B (A dropout(x)) * scale` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with
//! rsLoRA). Init as PEFT's `reset_lora_parameters`: A ~ kaiming_uniform(a = sqrt(5)), i.e.
//! uniform(-1/sqrt(in), 1/sqrt(in)), B = 0 — drawn here with [`SplitMix64`] from a seed.
//! The on-disk format is PEFT's: `adapter_config.json` + `adapter_model.safetensors` with names
//! `base_model.model.<HF module>.lora_{A,B}.weight`, and, when the vocabulary was resized (train.py
//! adds `[PAD]`), the resized `base_model.model.model.embed_tokens.weight` /
//! `base_model.model.lm_head.weight` as `save_pretrained(save_embedding_layers=True)` writes them
//! (PEFT loads them back into the base model, which must first be resized to that vocabulary).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::init::SplitMix64;

/// The projection names LoRA may target, in HF module order within a decoder layer.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// What PEFT's `PeftModelForCausalLM` puts in front of the HF parameter names.
pub const PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Subset of [`TARGETS`].
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, dropout: f64, target_modules: Vec<String>) -> Self {
        Self {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: false,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument("LoRA r must be > 0".into()));
        }
        if self.target_modules.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA target_modules is empty".into(),
            ));
        }
        if let Some(m) = self
            .target_modules
            .iter()
            .find(|m| !TARGETS.contains(&m.as_str()))
        {
            return Err(Error::InvalidArgument(format!(
                "LoRA target module `{m}` is not one of {TARGETS:?}"
            )));
        }
        Ok(())
    }

    /// The targeted projections in HF module order.
    pub fn targets(&self) -> Vec<&'static str> {
        TARGETS
            .into_iter()
            .filter(|t| self.target_modules.iter().any(|m| m == t))
            .collect()
    }

    /// `adapter_config.json` as PEFT 0.21 writes it for a LoRA on a causal LM.
    pub fn to_json(&self, base_model_name_or_path: &str) -> Value {
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.targets(),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads a PEFT `adapter_config.json`; returns the config and `base_model_name_or_path`.
    /// Features this crate does not compute (DoRA, per-module ranks, regex targets, fan_in_fan_out,
    /// trained biases, modules_to_save) are errors, never ignored.
    pub fn from_file(path: &Path) -> Result<(Self, Option<String>)> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |what: String| Error::Config(format!("{}: {what}", path.display()));
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad("peft_type is not LORA".into()));
        }
        let is_set = |k: &str| match v.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::String(s)) => !(k == "bias" && s == "none"),
            Some(_) => true,
        };
        for k in [
            "use_dora",
            "fan_in_fan_out",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "modules_to_save",
            "bias",
            "lora_bias",
            "layer_replication",
            "trainable_token_indices",
            "target_parameters",
            "exclude_modules",
        ] {
            if is_set(k) {
                return Err(bad(format!("`{k}` is not supported")));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no integer `r`".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("target_modules entry is not a string".into()))
                })
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(bad("target_modules must be a list of module names".into())),
        };
        let use_rslora = v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let cfg = Self {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora,
        };
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        let base = v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((cfg, base))
    }
}

/// `model.layers.{layer}.{self_attn|mlp}.{module}`
pub fn module_path(layer: usize, module: &str) -> String {
    let block = if matches!(module, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{block}.{module}")
}

/// (out, in) of a projection.
pub fn module_dims(cfg: &LlamaConfig, module: &str) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    match module {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (i, h),
        _ => (h, i),
    }
}

/// The adapter parameters: (saved PEFT name, var), per layer, per target in HF order, A then B —
/// PEFT's `named_parameters()` order of the trainable parameters.
#[derive(Debug, Clone)]
pub struct Lora {
    pub config: LoraConfig,
    pub vars: Vec<(String, Var)>,
    /// Shared with every adapted `Linear` of the training net (see [`LoraDropout`]).
    pub dropout_keys: DropoutKeys,
}

impl Lora {
    /// Names and shapes of every adapter tensor, in order.
    pub fn shapes(cfg: &LlamaConfig, config: &LoraConfig) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![];
        for l in 0..cfg.num_hidden_layers {
            for m in config.targets() {
                let p = module_path(l, m);
                let (o, i) = module_dims(cfg, m);
                out.push((format!("{PREFIX}{p}.lora_A.weight"), vec![config.r, i]));
                out.push((format!("{PREFIX}{p}.lora_B.weight"), vec![o, config.r]));
            }
        }
        out
    }

    /// PEFT's init: A uniform(-1/sqrt(in), 1/sqrt(in)) drawn in order from SplitMix64(seed), B 0.
    pub fn init(cfg: &LlamaConfig, config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = SplitMix64::new(seed);
        let mut vars = vec![];
        for (name, shape) in Self::shapes(cfg, &config) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("lora_A.weight") {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            } else {
                vec![0.0; n]
            };
            vars.push((
                name,
                Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)?,
            ));
        }
        Ok(Self {
            config,
            vars,
            dropout_keys: DropoutKeys::default(),
        })
    }

    /// The dropout of module `module_path` in the training net; None when lora_dropout is 0.
    pub fn dropout_for(&self, module_path: &str) -> Option<LoraDropout> {
        (self.config.dropout > 0.0).then(|| LoraDropout {
            p: self.config.dropout,
            module: fnv1a(module_path.as_bytes()),
            keys: self.dropout_keys.clone(),
        })
    }

    /// (A, B) of the module at `module_path`, if targeted.
    pub fn get(&self, module_path: &str) -> Option<(&Var, &Var)> {
        let a = format!("{PREFIX}{module_path}.lora_A.weight");
        let i = self.vars.iter().position(|(n, _)| *n == a)?;
        Some((&self.vars[i].1, &self.vars[i + 1].1))
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Where the base model of an adapter directory is: `base_model_name_or_path` as given (absolute
/// or relative to the working directory), else relative to the adapter directory.
pub fn resolve_base(adapter_dir: &Path, base: &str) -> PathBuf {
    let p = PathBuf::from(base);
    if p.is_absolute() || p.join("config.json").exists() {
        return p;
    }
    let rel = adapter_dir.join(&p);
    if rel.join("config.json").exists() {
        rel
    } else {
        p
    }
}

pub(crate) fn embed_names(tied: bool) -> Vec<(&'static str, String)> {
    let mut v = vec![(
        "model.embed_tokens.weight",
        format!("{PREFIX}model.embed_tokens.weight"),
    )];
    if !tied {
        v.push(("lm_head.weight", format!("{PREFIX}lm_head.weight")));
    }
    v
}

pub(crate) fn read_adapter_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    crate::weights::load_file(&dir.join(ADAPTER_WEIGHTS))
}

/// One key per batch row for the dropout masks of the next training forward; unset (None)
/// means dropout is the identity, as in eval mode. Shared by all adapted modules of a net.
#[derive(Debug, Clone, Default)]
pub struct DropoutKeys(Arc<RwLock<Option<Vec<u64>>>>);

impl DropoutKeys {
    pub fn set(&self, keys: Option<Vec<u64>>) {
        // A poisoned lock only means another thread panicked mid-write of a Vec; take it over.
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    fn get(&self) -> Option<Vec<u64>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The key of a training row: (seed, optimizer step, the row's real tokens). Keying masks by what
/// a row *is*, not where it sits, makes them independent of batch layout, padding, rank count and
/// resume, so herd's determinism guarantees survive dropout (torch's RNG stream cannot be
/// reproduced anyway; PEFT parity for lora_dropout > 0 is in distribution, not in values).
pub fn dropout_row_key(seed: u64, step: u64, tokens: &[u32]) -> u64 {
    let mut h = mix(seed, step);
    for &t in tokens {
        h = mix(h, t as u64);
    }
    mix(h, tokens.len() as u64)
}

/// PEFT's `lora_dropout` on the adapter input only: y = x W^T + (drop(x) A^T) B^T · scale, with
/// inverted dropout (kept values scaled by 1 / (1 - p)) like `nn.Dropout` in train mode.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    p: f64,
    /// Hash of the module path, so each module draws its own mask.
    module: u64,
    keys: DropoutKeys,
}

impl LoraDropout {
    /// x [b · t, d] (the adapter's input of a [b, t, d] batch) with dropout applied, or x itself
    /// when no training keys are set. Element (row, pos, i) is dropped or kept by the i-th draw
    /// of SplitMix64 seeded with mix(mix(key of row, module), pos), so it depends only on (key,
    /// module, pos, i). `herd_kernels::dropout_mul` regenerates that mask from the seeds (on the
    /// GPU by a kernel) instead of storing it: nothing is uploaded per layer or held for the
    /// backward.
    pub fn apply(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let Some(seeds) = self.seeds(b, t)? else {
            return Ok(x.clone());
        };
        let seeds: Vec<i64> = seeds.into_iter().map(|s| s as i64).collect();
        let seeds = Tensor::from_vec(seeds, b * t, x.device())?;
        Ok(herd_kernels::dropout_mul(x, &seeds, self.p)?)
    }

    /// The SplitMix64 seed of each (row, position), rows first; None without training keys.
    fn seeds(&self, b: usize, t: usize) -> Result<Option<Vec<u64>>> {
        let Some(keys) = self.keys.get() else {
            return Ok(None);
        };
        if keys.len() != b {
            return Err(Error::InvalidArgument(format!(
                "lora dropout: {} row keys set for a batch of {b} rows",
                keys.len()
            )));
        }
        let seeds = keys.iter().flat_map(|&key| {
            let row = mix(key, self.module);
            (0..t).map(move |pos| mix(row, pos as u64))
        });
        Ok(Some(seeds.collect()))
    }

    /// The multiplicative mask [b * t, d] (0 or 1 / (1 - p)) that [`LoraDropout::apply`]
    /// applies, drawn on the host: the definition it is tested against.
    #[cfg(test)]
    fn mask(&self, b: usize, t: usize, d: usize, device: &Device) -> Result<Option<Tensor>> {
        let Some(seeds) = self.seeds(b, t)? else {
            return Ok(None);
        };
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mut values = Vec::with_capacity(b * t * d);
        for seed in seeds {
            let mut rng = SplitMix64::new(seed);
            values.extend((0..d).map(|_| if rng.next_f64() < self.p { 0.0 } else { keep }));
        }
        Ok(Some(Tensor::from_vec(values, (b * t, d), device)?))
    }
}

/// Two words into one well-mixed word (a SplitMix64 step of their combination).
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    SplitMix64::new(a ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// FNV-1a, 64-bit: a stable hash of a module path (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    fn dropout(p: f64, module: &str, keys: &DropoutKeys) -> LoraDropout {
        LoraDropout {
            p,
            module: fnv1a(module.as_bytes()),
            keys: keys.clone(),
        }
    }

    fn values(m: Option<Tensor>) -> Vec<f32> {
        m.expect("keys are set")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn identity_without_keys() {
        let keys = DropoutKeys::default();
        let d = dropout(0.5, "m", &keys);
        assert!(d.mask(2, 3, 4, &Device::Cpu).unwrap().is_none());
        keys.set(Some(vec![1, 2]));
        assert!(d.mask(2, 3, 4, &Device::Cpu).unwrap().is_some());
        keys.set(None);
        assert!(d.mask(2, 3, 4, &Device::Cpu).unwrap().is_none());
    }

    #[test]
    fn inverted_dropout_rate_and_scale() {
        let keys = DropoutKeys::default();
        keys.set(Some(vec![11, 12, 13, 14]));
        let v = values(
            dropout(0.1, "m", &keys)
                .mask(4, 50, 100, &Device::Cpu)
                .unwrap(),
        );
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped fraction {dropped}");
        let keep = (1.0 / 0.9) as f32;
        assert!(v.iter().all(|&x| x == 0.0 || x == keep));
    }

    #[test]
    fn apply_is_x_times_the_mask_without_storing_it() {
        let keys = DropoutKeys::default();
        let d = dropout(0.3, "model.layers.1.mlp.down_proj", &keys);
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 2.0 * 5.0 * 24.0, &Device::Cpu)
                .unwrap()
                .reshape((10, 24))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            d.apply(&x, 2, 5).unwrap().to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap(),
            "no keys: no dropout"
        );
        keys.set(Some(vec![3, 11]));
        let mask = d.mask(2, 5, 24, &Device::Cpu).unwrap().unwrap();
        let y = d.apply(&x, 2, 5).unwrap();
        let want = (x.as_tensor() * &mask).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec2::<f32>().unwrap(),
            mask.to_vec2::<f32>().unwrap(),
            "d(Σ y)/dx is the mask"
        );
        assert_eq!(
            g.get_ids().count(),
            1,
            "no gradient kept for anything but x"
        );
    }

    #[test]
    fn masks_follow_row_keys_not_row_positions() {
        let keys = DropoutKeys::default();
        let d = dropout(0.5, "model.layers.0.self_attn.q_proj", &keys);
        keys.set(Some(vec![7, 9]));
        let a = values(d.mask(2, 3, 8, &Device::Cpu).unwrap());
        keys.set(Some(vec![9, 7]));
        let b = values(d.mask(2, 3, 8, &Device::Cpu).unwrap());
        assert_eq!(a[..24], b[24..]);
        assert_eq!(a[24..], b[..24]);
        // A shorter (less padded) row keeps the masks of its first positions.
        keys.set(Some(vec![7]));
        let c = values(d.mask(1, 2, 8, &Device::Cpu).unwrap());
        assert_eq!(c[..], a[..16]);
        // Another module draws another mask; wrong key count is an error.
        let other = dropout(0.5, "model.layers.0.self_attn.v_proj", &keys);
        assert_ne!(values(other.mask(1, 2, 8, &Device::Cpu).unwrap()), c);
        assert!(d.mask(3, 2, 8, &Device::Cpu).is_err());
    }

    #[test]
    fn row_keys_depend_on_seed_step_and_tokens() {
        let k = dropout_row_key(1, 5, &[3, 4]);
        assert_eq!(k, dropout_row_key(1, 5, &[3, 4]));
        for other in [
            dropout_row_key(2, 5, &[3, 4]),
            dropout_row_key(1, 6, &[3, 4]),
            dropout_row_key(1, 5, &[4, 3]),
            dropout_row_key(1, 5, &[3, 4, 0]),
        ] {
            assert_ne!(k, other);
        }
    }
}
