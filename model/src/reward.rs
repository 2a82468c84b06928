//! A reward model as transformers' `LlamaForSequenceClassification` with `num_labels = 1`: the
//! LLaMA backbone, then `score.weight` [1, hidden] (no bias) applied to the final-normed hidden
//! state of each row's last non-padding token, and the pairwise loss -log σ(r_a − r_b) that
//! GPT-4-LLM trains it with.
//!
//! The backbone is a [`Llama`] built with `tie_word_embeddings = true`, so it holds no `lm_head`
//! var (a sequence classifier has none; a tied head is never read here). The config's own value is
//! remembered and written back on save.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;

use crate::error::{Error, Result};
use crate::init::SplitMix64;
use crate::llama::{Llama, DEFAULT_MAX_SHARD_BYTES};
use crate::weights;

/// The head's parameter name in a transformers checkpoint.
pub const SCORE: &str = "score.weight";
/// `architectures` of the saved config.
pub const ARCHITECTURE: &str = "LlamaForSequenceClassification";
/// Mixed into the job seed for the head, so the head is not a copy of the first normals that
/// `Llama::random` drew for `embed_tokens` with the same seed.
const HEAD_STREAM: u64 = 0x6865_7264_7363_6f72; // "herdscor"

pub struct RewardModel {
    llama: Llama,
    /// `tie_word_embeddings` as the source config said (the backbone is built tied).
    tie_word_embeddings: bool,
    /// Padding id that marks the end of each row (HF reads `config.pad_token_id`).
    pad_token_id: Option<u32>,
    score: Var,
    /// Backbone vars then the head: the trainable parameters in `named_parameters()` order.
    trainable: Vec<(String, Var)>,
}

impl RewardModel {
    /// A reward model dir (with `score.weight`), or a causal LM dir whose `lm_head` is dropped and
    /// whose head is drawn normal(0, initializer_range) from `seed`.
    pub fn load(dir: &Path, seed: u64) -> Result<Self> {
        let cfg = crate::LlamaConfig::from_file(&dir.join("config.json"))?;
        let (tensors, sources) = weights::load_dir_sourced(dir)?;
        Self::build(cfg, tensors, dir, &sources, seed)
    }

    /// As [`RewardModel::load`] from named tensors.
    pub fn from_tensors(
        cfg: crate::LlamaConfig,
        tensors: BTreeMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self> {
        Self::build(cfg, tensors, Path::new("<tensors>"), &BTreeMap::new(), seed)
    }

    fn build(
        mut cfg: crate::LlamaConfig,
        mut tensors: BTreeMap<String, Tensor>,
        origin: &Path,
        sources: &BTreeMap<String, std::path::PathBuf>,
        seed: u64,
    ) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let score = match tensors.remove(SCORE) {
            Some(t) if t.dims() == [1, hidden] => t.to_dtype(DType::F32)?.contiguous()?,
            Some(t) => {
                return Err(Error::ShapeMismatch {
                    path: sources.get(SCORE).cloned().unwrap_or(origin.into()),
                    name: SCORE.into(),
                    expected: vec![1, hidden],
                    found: t.dims().to_vec(),
                })
            }
            None => {
                let mut rng = SplitMix64::new(seed ^ HEAD_STREAM);
                let std = cfg.initializer_range;
                let v: Vec<f32> = (0..hidden)
                    .map(|_| (rng.next_normal() * std) as f32)
                    .collect();
                Tensor::from_vec(v, (1, hidden), &Device::Cpu)?
            }
        };
        tensors.remove("lm_head.weight");
        let tie_word_embeddings = cfg.tie_word_embeddings;
        let pad_token_id = cfg.pad_token_id;
        cfg.tie_word_embeddings = true;
        let llama = Llama::from_tensors_at(cfg, tensors, origin, sources)?;
        let mut m = Self {
            llama,
            tie_word_embeddings,
            pad_token_id,
            score: Var::from_tensor(&score.detach())?,
            trainable: vec![],
        };
        m.relist();
        Ok(m)
    }

    fn relist(&mut self) {
        self.trainable = self.llama.vars().to_vec();
        self.trainable.push((SCORE.into(), self.score.clone()));
    }

    /// Every parameter moved to `device` as `dtype`, in fresh vars (GPU and bf16 ranks).
    pub fn to_device(&mut self, device: &Device, dtype: DType) -> Result<()> {
        self.llama.to_device(device, dtype)?;
        let score = self.score.as_tensor().to_dtype(dtype)?.to_device(device)?;
        self.score = Var::from_tensor(&score.detach())?;
        self.relist();
        Ok(())
    }

    /// A copy on `device` as `dtype` sharing no vars with `self`.
    pub fn copy_to(&self, device: &Device, dtype: DType) -> Result<RewardModel> {
        let mut copy = RewardModel {
            llama: self.llama.copy_to(device, dtype)?,
            tie_word_embeddings: self.tie_word_embeddings,
            pad_token_id: self.pad_token_id,
            score: Var::from_tensor(
                &self
                    .score
                    .as_tensor()
                    .to_dtype(dtype)?
                    .to_device(device)?
                    .detach(),
            )?,
            trainable: vec![],
        };
        copy.relist();
        Ok(copy)
    }

    pub fn backbone(&self) -> &Llama {
        &self.llama
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The id whose rightmost absence ends a row (the tokenizer's pad token).
    pub fn set_pad_token_id(&mut self, id: Option<u32>) {
        self.pad_token_id = id;
    }

    /// Grows the vocabulary as `Llama::resize_token_embeddings` (embed_tokens only: no lm_head).
    pub fn resize_token_embeddings(&mut self, new_vocab: usize, added: usize) -> Result<()> {
        self.llama.resize_token_embeddings(new_vocab, added)?;
        self.relist();
        Ok(())
    }

    /// Every parameter, the head last; all of them train.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    pub fn num_parameters(&self) -> usize {
        self.trainable.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// input_ids [b, t] (right- or left-padded with the pad id) -> rewards [b], recording the graph.
    pub fn scores(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.llama.hidden_states(input_ids)?;
        self.pool_and_score(&hidden, input_ids, self.score.as_tensor())
    }

    /// As [`RewardModel::scores`] over detached weights (no graph, no kept activations).
    pub fn scores_inference(&self, input_ids: &Tensor) -> Result<Vec<f32>> {
        let hidden = self.llama.inference_net().hidden_states(input_ids, None)?;
        let r = self.pool_and_score(&hidden, input_ids, &self.score.as_tensor().detach())?;
        Ok(r.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    fn pool_and_score(
        &self,
        hidden: &Tensor,
        input_ids: &Tensor,
        score: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        if self.pad_token_id.is_none() && b != 1 {
            return Err(Error::InvalidArgument(
                "a reward model without pad_token_id can only score one sequence at a time".into(),
            ));
        }
        let ids = input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let rows: Vec<u32> = last_non_pad(&ids, t, self.pad_token_id)
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let idx = Tensor::from_vec(rows, b, hidden.device())?;
        // index_select records its backward (index_add), so the gradient reaches only the rows read.
        let pooled = hidden.reshape((b * t, h))?.index_select(&idx, 0)?; // [b, hidden]
        Ok(pooled.matmul(&score.t()?)?.squeeze(1)?)
    }

    /// `config.json` (as transformers writes a 1-label sequence classifier) and the weights:
    /// `model.*` then `score.weight`, no `lm_head`.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let tensors: Vec<(String, Tensor)> = self
            .trainable
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        weights::save_dir(dir, &tensors, dtype, Some(DEFAULT_MAX_SHARD_BYTES))?;
        let mut cfg = self.llama.config().clone();
        cfg.tie_word_embeddings = self.tie_word_embeddings;
        cfg.pad_token_id = self.pad_token_id;
        cfg.set_saved_dtype(dtype);
        for (k, v) in [
            ("architectures", json!([ARCHITECTURE])),
            ("id2label", json!({"0": "LABEL_0"})),
            ("label2id", json!({"LABEL_0": 0})),
        ] {
            cfg.extra.insert(k.into(), v);
        }
        cfg.save(dir)
    }
}

/// For each row of `ids` ([rows, seq_len] row-major), the position transformers pools: the
/// rightmost token that is not `pad` (0 when the row is all padding, as `argmax` of zeros gives),
/// or the last position when there is no pad id.
pub fn last_non_pad(ids: &[u32], seq_len: usize, pad: Option<u32>) -> Vec<usize> {
    if seq_len == 0 {
        return vec![];
    }
    ids.chunks(seq_len)
        .map(|row| match pad {
            None => seq_len - 1,
            Some(p) => row.iter().rposition(|&id| id != p).unwrap_or(0),
        })
        .collect()
}

/// Sum over pairs of -log σ(r_a − r_b), written softplus(r_b − r_a) = max(x, 0) + log(1 + e^−|x|)
/// so that no exp overflows, and how many pairs rank a strictly above b.
pub fn pairwise_loss_sum(r_a: &Tensor, r_b: &Tensor) -> Result<(Tensor, usize)> {
    let x = (r_b - r_a)?;
    let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let correct = x.to_vec1::<f32>()?.iter().filter(|&&d| d < 0.0).count();
    Ok((softplus.sum_all()?, correct))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_non_pad_is_the_rightmost_non_pad_token() {
        let ids = [
            5, 6, 0, 0, /**/ 5, 6, 7, 8, /**/ 0, 0, 0, 0, /**/ 0, 3, 0, 4,
        ];
        assert_eq!(last_non_pad(&ids, 4, Some(0)), vec![1, 3, 0, 3]);
        assert_eq!(last_non_pad(&ids, 4, None), vec![3, 3, 3, 3]);
        assert!(last_non_pad(&[], 0, Some(0)).is_empty());
    }

    #[test]
    fn pairwise_loss_and_accuracy() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[2.0f32, 0.0, -1.0, 100.0, -100.0], &dev).unwrap();
        let b = Tensor::new(&[1.0f32, 0.0, 1.0, -100.0, 100.0], &dev).unwrap();
        let (sum, correct) = pairwise_loss_sum(&a, &b).unwrap();
        let expected: f64 = [1.0f64, 0.0, -2.0, 200.0, -200.0]
            .iter()
            .map(|d| (1.0 + (-d).exp()).ln())
            .sum();
        let got = sum.to_scalar::<f32>().unwrap() as f64;
        // The -200 margin must give 200 exactly, not inf: the stable form.
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
        assert_eq!(correct, 2); // ties do not count
    }

    #[test]
    fn loss_gradient_is_minus_sigmoid_of_minus_margin() {
        let dev = Device::Cpu;
        let a = Var::new(&[0.5f32, -3.0], &dev).unwrap();
        let b = Var::new(&[0.0f32, 1.0], &dev).unwrap();
        let (sum, _) = pairwise_loss_sum(a.as_tensor(), b.as_tensor()).unwrap();
        let g = sum.backward().unwrap();
        let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((ga[0] + sig(-0.5)).abs() < 1e-6);
        assert!((ga[1] + sig(4.0)).abs() < 1e-6);
    }
}
