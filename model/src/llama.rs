//! `LlamaForCausalLM`: embed_tokens -> N x decoder layer -> norm -> lm_head, in f32.
//!
//! Parameters are `candle_core::Var`s named exactly as in the HF checkpoint and listed in HF
//! `named_parameters()` order; the modules hold clones of the vars' tensors (same tensor ids), so
//! `loss.backward()` yields a `GradStore` keyed by those vars, and optimizer updates through
//! `Var::set` are seen by the next forward.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::init::SplitMix64;
use crate::layout::Layout;
use crate::lora::{self, Lora, LoraConfig};
use crate::weights;

use crate::net::build_net;
pub use crate::net::{DecoderLayer, Net};

/// transformers' default `max_shard_size` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Names and shapes of every parameter in HF `named_parameters()` order (lm_head omitted when
/// tied: transformers lists a shared parameter once).
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    let linear = |out: &mut Vec<_>, name: String, o: usize, inp: usize, bias: bool| {
        out.push((format!("{name}.weight"), vec![o, inp]));
        if bias {
            out.push((format!("{name}.bias"), vec![o]));
        }
    };
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        linear(&mut out, format!("{p}.self_attn.q_proj"), q, h, ab);
        linear(&mut out, format!("{p}.self_attn.k_proj"), kv, h, ab);
        linear(&mut out, format!("{p}.self_attn.v_proj"), kv, h, ab);
        linear(&mut out, format!("{p}.self_attn.o_proj"), h, q, ab);
        linear(&mut out, format!("{p}.mlp.gate_proj"), i, h, mb);
        linear(&mut out, format!("{p}.mlp.up_proj"), i, h, mb);
        linear(&mut out, format!("{p}.mlp.down_proj"), h, i, mb);
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

pub struct Llama {
    cfg: LlamaConfig,
    vars: Vec<(String, Var)>,
    pub(crate) net: Net,
    /// With LoRA the base weights are frozen (the net sees detached copies, so backward computes
    /// no gradient for them) and only the adapter vars are trainable.
    lora: Option<Lora>,
    /// vocab_size as loaded, before any resize (an adapter saves the embeddings when it differs).
    base_vocab: usize,
}

impl Llama {
    /// Fresh weights from `seed`: normal(0, initializer_range) for every linear and embedding
    /// weight, 1 for norm weights, 0 for biases (transformers' `_init_weights`). Parameters are
    /// drawn in `named_parameters()` order, so the result depends only on (config, seed).
    pub fn random(cfg: LlamaConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut rng = SplitMix64::new(seed);
        let std = cfg.initializer_range;
        let mut tensors = BTreeMap::new();
        for (name, shape) in parameter_shapes(&cfg) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.next_normal() * std) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, tensors)
    }

    /// `dir/config.json` plus the safetensors checkpoint in `dir`.
    /// A PEFT adapter directory (`adapter_config.json`, no `config.json`) loads its base model from
    /// `base_model_name_or_path` and applies the adapter.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.join("config.json").exists() && dir.join(lora::ADAPTER_CONFIG).exists() {
            let (_, base) = LoraConfig::from_file(&dir.join(lora::ADAPTER_CONFIG))?;
            let base = base.ok_or_else(|| {
                Error::Config(format!(
                    "{}: no base_model_name_or_path",
                    dir.join(lora::ADAPTER_CONFIG).display()
                ))
            })?;
            let mut model = Self::load(&lora::resolve_base(dir, &base))?;
            model.load_adapter(dir)?;
            return Ok(model);
        }
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let (tensors, sources) = weights::load_dir_sourced(dir)?;
        Self::from_tensors_at(cfg, tensors, dir, &sources)
    }

    /// Builds the model from named tensors (any float dtype; stored as f32 vars). Every expected
    /// parameter must be present with its shape; unknown names are errors, except a tied
    /// `lm_head.weight` and legacy `rotary_emb.inv_freq` buffers, which transformers also ignores.
    pub fn from_tensors(cfg: LlamaConfig, tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        Self::from_tensors_at(cfg, tensors, Path::new("<tensors>"), &BTreeMap::new())
    }

    pub(crate) fn from_tensors_at(
        cfg: LlamaConfig,
        mut tensors: BTreeMap<String, Tensor>,
        origin: &Path,
        sources: &BTreeMap<String, PathBuf>,
    ) -> Result<Self> {
        cfg.validate()?;
        let file_of = |name: &str| sources.get(name).cloned().unwrap_or_else(|| origin.into());
        let mut vars = Vec::new();
        for (name, shape) in parameter_shapes(&cfg) {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: origin.to_path_buf(),
                name: name.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: file_of(&name),
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            let t = t
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?;
            // detach: a fresh leaf, never sharing storage with the caller's tensor.
            vars.push((name, Var::from_tensor(&t.detach())?));
        }
        if cfg.tie_word_embeddings {
            tensors.remove("lm_head.weight");
        }
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if let Some(name) = tensors.into_keys().next() {
            return Err(Error::UnexpectedTensor {
                path: file_of(&name),
                name,
            });
        }
        let net = build_net(&cfg, &vars, None, false);
        let base_vocab = cfg.vocab_size;
        Ok(Self {
            cfg,
            vars,
            net,
            lora: None,
            base_vocab,
        })
    }

    /// Writes `config.json` and the weights in `dtype`, sharded at transformers' default 5 GB.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        self.save_sharded(dir, dtype, Some(DEFAULT_MAX_SHARD_BYTES))
    }

    pub fn save_sharded(
        &self,
        dir: &Path,
        dtype: DType,
        max_shard_bytes: Option<usize>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        weights::save_dir(dir, &tensors, dtype, max_shard_bytes)?;
        // Like transformers, record the dtype the weights were saved in.
        let mut cfg = self.cfg.clone();
        cfg.set_saved_dtype(dtype);
        cfg.save(dir)
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.net.device()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// (HF name, var) in `named_parameters()` order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// input_ids: [b, t] (u32, right-padded) -> logits [b, t, vocab] f32, recording the graph for
    /// `backward`. Causal mask only; see `attention` for why that is exact for right padding.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.net.forward(input_ids, None)
    }

    /// input_ids: [b, t] -> final-normed hidden states [b, t, hidden], recording the graph.
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.net.hidden_states(input_ids, None)
    }

    /// As `forward`, over a batch laid out by `layout` (packed examples); see [`Layout`].
    pub fn forward_with_layout(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
    ) -> Result<Tensor> {
        self.net.forward_with_layout(input_ids, layout)
    }

    /// Every parameter and adapter moved to `device` as `dtype`, in fresh vars; the net is
    /// rebuilt over them (GPU workers: bf16 on cuda:N; the f32 master copy is the trainer's).
    pub fn to_device(&mut self, device: &Device, dtype: DType) -> Result<()> {
        let moved = |v: &Var| -> Result<Var> {
            let t = v.as_tensor().to_dtype(dtype)?.to_device(device)?;
            Ok(Var::from_tensor(&t.detach())?)
        };
        for (_, v) in self.vars.iter_mut() {
            *v = moved(v)?;
        }
        if let Some(l) = self.lora.as_mut() {
            for (_, v) in l.vars.iter_mut() {
                *v = moved(v)?;
            }
        }
        self.rebuild();
        Ok(())
    }

    /// A copy on `device` as `dtype` with its own vars (a host f32 copy of a GPU model to save).
    pub fn copy_to(&self, device: &Device, dtype: DType) -> Result<Llama> {
        let mut copy = Llama {
            cfg: self.cfg.clone(),
            vars: self.vars.clone(),
            net: self.net.clone(),
            lora: self.lora.clone(),
            base_vocab: self.base_vocab,
        };
        copy.to_device(device, dtype)?; // fresh vars: nothing is shared with `self` after this
        Ok(copy)
    }

    /// The network over detached copies of the weights (shared storage, no graph): inference
    /// builds no backward graph and keeps no activations alive.
    pub fn inference_net(&self) -> Net {
        build_net(&self.cfg, &self.vars, self.lora.as_ref(), true)
    }

    /// Freezes the base and adds fresh LoRA adapters (PEFT init from `seed`).
    pub fn enable_lora(&mut self, config: LoraConfig, seed: u64) -> Result<()> {
        self.lora = Some(Lora::init(&self.cfg, config, seed)?);
        self.rebuild();
        Ok(())
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Whether training forwards drop adapter inputs (LoRA with lora_dropout > 0).
    pub fn has_lora_dropout(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.config.dropout > 0.0)
    }

    /// NEFTune noise on the embeddings of the next training forwards (alpha, one key per batch
    /// row; see [`crate::neftune`]), or none with None.
    pub fn set_embedding_noise(&self, noise: Option<(f64, Vec<u64>)>) {
        self.net.noise.set(noise);
    }

    /// Turns LoRA dropout on for the next training forwards, one key per batch row (see
    /// [`lora::dropout_row_key`]), or off with None. No effect without LoRA dropout.
    pub fn set_lora_dropout_keys(&self, keys: Option<Vec<u64>>) {
        if let Some(l) = &self.lora {
            l.dropout_keys.set(keys);
        }
    }

    /// The parameters that get gradients and optimizer state: the adapters with LoRA, else all.
    pub fn trainable(&self) -> &[(String, Var)] {
        match &self.lora {
            Some(l) => &l.vars,
            None => &self.vars,
        }
    }

    pub fn num_trainable_parameters(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn rebuild(&mut self) {
        self.net = build_net(&self.cfg, &self.vars, self.lora.as_ref(), false);
    }

    /// Writes the adapter in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`
    /// (f32), plus the resized embedding rows when the vocabulary differs from the base model's.
    pub fn save_adapter(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        let l = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the model has no LoRA adapter".into()))?;
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut tensors: Vec<(String, Tensor)> = l
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        if self.cfg.vocab_size != self.base_vocab {
            for (hf, peft) in lora::embed_names(self.cfg.tie_word_embeddings) {
                let v = self
                    .vars
                    .iter()
                    .find(|(n, _)| n == hf)
                    .expect("embedding var exists");
                tensors.push((peft, v.1.as_tensor().detach()));
            }
        }
        let refs: Vec<&(String, Tensor)> = tensors.iter().collect();
        weights::write_safetensors(&dir.join(lora::ADAPTER_WEIGHTS), &refs, DType::F32)?;
        let text = serde_json::to_string_pretty(&l.config.to_json(base_model_name_or_path))
            .expect("json values serialize");
        weights::write_atomic(&dir.join(lora::ADAPTER_CONFIG), text.as_bytes())
    }

    /// Applies the PEFT adapter in `dir` (replacing any adapter this model has). Saved embedding
    /// layers (a resized vocabulary) replace the base's embed_tokens / lm_head.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let (config, _) = LoraConfig::from_file(&dir.join(lora::ADAPTER_CONFIG))?;
        let path = dir.join(lora::ADAPTER_WEIGHTS);
        let mut tensors = lora::read_adapter_tensors(dir)?;
        let embeds = lora::embed_names(self.cfg.tie_word_embeddings);
        if let Some(e) = tensors.get(&embeds[0].1) {
            let rows = e.dim(0)?;
            if rows != self.cfg.vocab_size {
                self.resize_token_embeddings(rows, 0)?;
            }
            for (hf, peft) in &embeds {
                let t = tensors.remove(peft).ok_or_else(|| Error::MissingTensor {
                    path: path.clone(),
                    name: peft.clone(),
                })?;
                let var = &mut self
                    .vars
                    .iter_mut()
                    .find(|(n, _)| n == hf)
                    .expect("embedding var exists")
                    .1;
                if t.dims() != var.dims() {
                    return Err(Error::ShapeMismatch {
                        path,
                        name: peft.clone(),
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                *var = Var::from_tensor(&t.contiguous()?.detach())?;
            }
        }
        let mut vars = vec![];
        for (name, shape) in Lora::shapes(&self.cfg, &config) {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: name.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path,
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            vars.push((name, Var::from_tensor(&t.contiguous()?.detach())?));
        }
        if let Some(name) = tensors.into_keys().next() {
            return Err(Error::UnexpectedTensor { path, name });
        }
        self.lora = Some(Lora {
            config,
            vars,
            dropout_keys: Default::default(),
        });
        self.rebuild();
        Ok(())
    }

    /// A plain model with every adapter folded in: W + B A * scale.
    pub fn merged(&self) -> Result<Llama> {
        let Some(l) = &self.lora else {
            return Self::from_tensors(
                self.cfg.clone(),
                self.vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                    .collect(),
            );
        };
        let mut tensors = BTreeMap::new();
        for (name, v) in &self.vars {
            let mut t = v.as_tensor().detach();
            if let Some((a, b)) = name.strip_suffix(".weight").and_then(|p| l.get(p)) {
                t = (t + (b.as_tensor().matmul(a.as_tensor())? * l.config.scale())?)?;
            }
            tensors.insert(name.clone(), t);
        }
        Self::from_tensors(self.cfg.clone(), tensors)
    }

    /// Grows (or truncates) the vocabulary as train.py's `smart_tokenizer_and_embedding_resize`:
    /// the matrix gets `new_vocab` rows, and the last `added` rows (the tokens just added to the
    /// tokenizer), like any row beyond the old ones, become the mean of the rows before them;
    /// likewise, separately, for lm_head (tied: only embed_tokens, which is also the head). A
    /// padded vocabulary larger than the tokenizer is cut to it, as train.py's resize to
    /// `len(tokenizer)` does.
    pub fn resize_token_embeddings(&mut self, new_vocab: usize, added: usize) -> Result<()> {
        let old_vocab = self.cfg.vocab_size;
        if new_vocab == 0 || added > new_vocab {
            return Err(Error::InvalidArgument(format!(
                "vocabulary size {new_vocab} with {added} added tokens"
            )));
        }
        // Rows kept as they are; the mean is taken over them.
        let kept = old_vocab.min(new_vocab - added);
        if new_vocab == old_vocab && kept == old_vocab {
            return Ok(());
        }
        for (name, var) in self.vars.iter_mut() {
            if name != "model.embed_tokens.weight" && name != "lm_head.weight" {
                continue;
            }
            let old = var.as_tensor().detach().narrow(0, 0, kept)?;
            let hidden = old.dim(1)?;
            let mean = old.mean_keepdim(0)?; // [1, hidden]
            let extra = mean.broadcast_as((new_vocab - kept, hidden))?;
            let resized = Tensor::cat(&[&old, &extra], 0)?.contiguous()?;
            *var = Var::from_tensor(&resized)?;
        }
        self.cfg.vocab_size = new_vocab;
        self.rebuild();
        Ok(())
    }
}
