//! The network proper: decoder layers, the position inputs they share (RoPE angles and the
//! attention mask), and `Net`, the forward over one set of weight tensors. `Llama` (llama.rs) owns
//! the variables and builds a `Net` over them: the trainable vars, or detached copies for inference.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::attention::{causal_mask, Attention, LayerCache};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::lora::Lora;
use crate::mlp::{Linear, LoraPath, Mlp, MlpGraph};
use crate::neftune::EmbeddingNoise;
use crate::norm::{Normed, RmsNorm};
use crate::rope::Rope;

/// `LlamaDecoderLayer`: pre-norm residual blocks around attention and the MLP.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// x: [b, t, hidden] -> [b, t, hidden]; `pos` carries RoPE's cos/sin and the attention mask.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = self.attention_half(x, pos, cache)?;
        let mlp = self
            .mlp
            .forward(&Normed::new(&self.post_attention_layernorm, &h))?;
        Ok((&h + mlp)?)
    }

    /// The layer's output as its two summands, the residual after attention h and the MLP's
    /// output (without its node where that saves holding it), and where the MLP's backward
    /// starts: their sum is [`DecoderLayer::forward`]'s value. A caller that keeps the graph but
    /// not the sum (the layer-by-layer backward, starting from `MlpGraph::root`) holds neither
    /// the sum nor, on the fused path, the MLP's output.
    pub(crate) fn forward_parts(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Tensor, MlpGraph)> {
        let h = self.attention_half(x, pos, cache)?;
        let normed = Normed::new(&self.post_attention_layernorm, &h);
        let (mlp, graph) = self.mlp.forward_deferred(&normed)?;
        Ok((h, mlp, graph))
    }

    /// h = x + o_proj(attention(input_layernorm(x))): on the fused path h is one node, so the
    /// graph holds no separate o_proj output.
    fn attention_half(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        self.self_attn.forward(
            &Normed::new(&self.input_layernorm, x),
            Some(x),
            &pos.cos,
            &pos.sin,
            &pos.mask,
            cache,
        )
    }
}

/// What every decoder layer needs to know about token positions, computed once per forward.
pub(crate) struct Positions {
    cos: Tensor,  // [t, head_dim], or [b, 1, t, head_dim] with a layout
    sin: Tensor,  // same shape as cos
    mask: Tensor, // additive: [t, total] causal, or [b, 1, t, t] block-diagonal causal
}

/// The network over some set of weight tensors: the trainable vars, or detached copies for
/// inference (see `generate`).
#[derive(Debug, Clone)]
pub struct Net {
    embed_tokens: Tensor, // [vocab, hidden]
    pub(crate) layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear, // [vocab, hidden]; embed_tokens itself when tied
    rope: Rope,
    /// NEFTune's noise on the embeddings, set for training forwards only.
    pub(crate) noise: EmbeddingNoise,
}

impl Net {
    fn build(cfg: &LlamaConfig, get: &dyn Fn(&str) -> Tensor, adapter: &Adapter) -> Self {
        let opt = |name: String, present: bool| present.then(|| get(&name));
        let linear = |p: &str, bias: bool| {
            let l = Linear::new(get(&format!("{p}.weight")), opt(format!("{p}.bias"), bias));
            match adapter(p) {
                Some(path) => l.with_lora(path),
                None => l,
            }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let ab = cfg.attention_bias;
                let mb = cfg.mlp_bias;
                DecoderLayer {
                    self_attn: Attention {
                        q_proj: linear(&format!("{p}.self_attn.q_proj"), ab),
                        k_proj: linear(&format!("{p}.self_attn.k_proj"), ab),
                        v_proj: linear(&format!("{p}.self_attn.v_proj"), ab),
                        o_proj: linear(&format!("{p}.self_attn.o_proj"), ab),
                        heads: cfg.num_attention_heads,
                        kv_heads: cfg.kv_heads(),
                        head_dim: cfg.head_dim(),
                    },
                    mlp: Mlp {
                        gate_proj: linear(&format!("{p}.mlp.gate_proj"), mb),
                        up_proj: linear(&format!("{p}.mlp.up_proj"), mb),
                        down_proj: linear(&format!("{p}.mlp.down_proj"), mb),
                    },
                    input_layernorm: RmsNorm::new(
                        get(&format!("{p}.input_layernorm.weight")),
                        cfg.rms_norm_eps,
                    ),
                    post_attention_layernorm: RmsNorm::new(
                        get(&format!("{p}.post_attention_layernorm.weight")),
                        cfg.rms_norm_eps,
                    ),
                }
            })
            .collect();
        let embed_tokens = get("model.embed_tokens.weight");
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(get("model.norm.weight"), cfg.rms_norm_eps),
            lm_head: Linear::new(get(head_name), None),
            rope: Rope::new(cfg),
            noise: EmbeddingNoise::default(),
        }
    }

    /// input_ids: [b, t] (u32) at positions offset..offset+t, offset = length of `caches` (one per
    /// layer) or 0 without. Returns logits [b, t, vocab].
    pub fn forward(&self, input_ids: &Tensor, caches: Option<&mut [LayerCache]>) -> Result<Tensor> {
        self.lm_head
            .forward(&self.hidden_states(input_ids, caches)?)
    }

    /// The final-normed hidden states [b, t, hidden] that `forward` feeds the lm_head (a reward
    /// model's score head reads them instead).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        caches: Option<&mut [LayerCache]>,
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let offset = caches
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| c.len());
        let mut x = self.embed(input_ids)?;
        let pos = self.causal_positions(offset, t, input_ids.device())?;
        match caches {
            Some(caches) => {
                for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
                    x = layer.forward(&x, &pos, Some(cache))?;
                }
            }
            None => {
                for layer in &self.layers {
                    x = layer.forward(&x, &pos, None)?;
                }
            }
        }
        self.norm.forward(&x)
    }

    /// input_ids: [b, t] (u32) laid out by `layout` (packed examples: per-token positions and a
    /// block-diagonal causal mask), or plain causal rows without one. Returns logits [b, t, vocab].
    pub fn forward_with_layout(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
    ) -> Result<Tensor> {
        self.head(&self.layers_forward(input_ids, layout)?)
    }

    /// The embedding and every decoder layer: x_L [b, t, hidden], before the final norm.
    pub(crate) fn layers_forward(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
    ) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        let pos = self.positions(input_ids, layout)?;
        for layer in &self.layers {
            x = layer.forward(&x, &pos, None)?;
        }
        Ok(x)
    }

    /// input_ids: [b, t] -> [b, t, hidden]. Embedding lookup as index_select, whose backward
    /// (index_add) candle records; plus NEFTune's noise in a training forward that set it.
    pub(crate) fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, ()))?;
        self.noise.apply(&x)
    }

    /// [b, t, hidden] -> logits [b, t, vocab]
    pub(crate) fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.final_norm(x)?)
    }

    /// [b, t, hidden] -> the final RMSNorm of it, the lm_head's input.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// Batched decoding: input_ids [b, t] follow the `caches` (one per layer), each token at its
    /// own RoPE position (`position_ids`, [b * t] row-major), attending where the additive `mask`
    /// [b, 1, t, total] is 0 (total = cached + t). Left-padded prompts use it to skip their pads.
    /// Returns logits [b, t, vocab].
    pub fn forward_decode(
        &self,
        input_ids: &Tensor,
        position_ids: &[u32],
        mask: Tensor,
        caches: &mut [LayerCache],
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if position_ids.len() != b * t {
            return Err(Error::InvalidArgument(format!(
                "{} position ids for input_ids [{b}, {t}]",
                position_ids.len()
            )));
        }
        let device = input_ids.device();
        let (cos, sin) = self.rope.cos_sin_at(position_ids, device)?; // [b*t, d]
        let d = cos.dim(1)?;
        let pos = Positions {
            cos: cos.reshape((b, 1, t, d))?,
            sin: sin.reshape((b, 1, t, d))?,
            mask,
        };
        let mut x = self.embed(input_ids)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(&x, &pos, Some(cache))?;
        }
        self.head(&x)
    }

    fn causal_positions(&self, offset: usize, t: usize, device: &Device) -> Result<Positions> {
        let (cos, sin) = self.rope.cos_sin(offset, t, device)?;
        let mask = causal_mask(t, offset + t, device)?;
        Ok(Positions { cos, sin, mask })
    }

    /// The positions of a training forward over input_ids [b, t], with or without a layout.
    pub(crate) fn positions(
        &self,
        input_ids: &Tensor,
        layout: Option<&Layout>,
    ) -> Result<Positions> {
        let (b, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let Some(layout) = layout else {
            return self.causal_positions(0, t, device);
        };
        if layout.dims() != (b, t) {
            return Err(Error::InvalidArgument(format!(
                "layout {:?} does not match input_ids [{b}, {t}]",
                layout.dims()
            )));
        }
        let (cos, sin) = self.rope.cos_sin_at(layout.position_ids(), device)?; // [b*t, d]
        let d = cos.dim(1)?;
        Ok(Positions {
            cos: cos.reshape((b, 1, t, d))?,
            sin: sin.reshape((b, 1, t, d))?,
            mask: layout.attention_mask(device)?,
        })
    }

    /// The lm_head weight [vocab, hidden] when the head is a plain x Wᵀ (no LoRA on it).
    pub(crate) fn plain_head_weight(&self) -> Option<&Tensor> {
        self.lm_head.plain_weight()
    }

    /// The embedding table [vocab, hidden] (the lm_head's weight too, when tied).
    pub(crate) fn embed_weight(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.embed_tokens.device().clone()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Looks up the LoRA adapter of a module path such as `model.layers.0.self_attn.q_proj`.
type Adapter<'a> = dyn Fn(&str) -> Option<LoraPath> + 'a;

pub(crate) fn build_net(
    cfg: &LlamaConfig,
    vars: &[(String, Var)],
    lora: Option<&Lora>,
    detached: bool,
) -> Net {
    let by_name: BTreeMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let take = |v: &Var, detach: bool| {
        if detach {
            v.as_tensor().detach()
        } else {
            v.as_tensor().clone()
        }
    };
    // With LoRA the base is always detached: frozen, no gradient computed for it.
    let base_detached = detached || lora.is_some();
    // Dropout only in the training net: inference (detached) is eval mode.
    let adapter = |p: &str| {
        let l = lora?;
        let (a, b) = l.get(p)?;
        Some(LoraPath {
            a: take(a, detached),
            b: take(b, detached),
            scale: l.config.scale(),
            dropout: if detached { None } else { l.dropout_for(p) },
        })
    };
    Net::build(
        cfg,
        &|name| {
            take(
                by_name
                    .get(name)
                    .unwrap_or_else(|| panic!("parameter {name} exists")),
                base_detached,
            )
        },
        &adapter,
    )
}
