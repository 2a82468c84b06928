//! What a job trains, as the run loop sees it: a model type, examples addressed by index, how one
//! micro-batch of them is forwarded and backpropagated, the eval metrics, and how the model is
//! saved and resumed. The loop itself (plan, schedule, logging, checkpoints) is shared, so causal
//! LM and reward training have the same determinism, resume and collective behaviour.

use std::path::Path;

use candle_core::DType;
use herd_model::{Llama, Tokenizer};
use herd_proto::JobSpec;
use serde_json::{json, Map, Value};

use super::engine::{Engine, Trainable};
use crate::data::collate::{collate, Batch};
use crate::data::encode::Example;
use crate::data::pack::{collate_packed, pack};
use crate::Result;

pub trait Objective {
    type Model: Trainable;

    /// Training examples (pairs for a reward model); the plan permutes their indices.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forward and backward the examples `idx` as one micro-batch into `engine`; returns the
    /// tokens fed.
    fn accumulate(&self, engine: &mut Engine<Self::Model>, idx: &[usize]) -> Result<Fed>;

    /// Read the held-out set of `eval_data_path` (rank 0 only).
    fn load_eval(&mut self, tokenizer: &Tokenizer, path: &Path, max_len: usize) -> Result<()>;

    /// Eval metrics (`eval_loss`, ...) and the number of held-out examples, or None without a set.
    fn evaluate(
        &self,
        model: &Self::Model,
        batch_size: usize,
    ) -> Result<Option<(Map<String, Value>, usize)>>;

    /// Replace the model's weights by those of checkpoint `dir`.
    fn resume(&self, model: &mut Self::Model, dir: &Path) -> Result<()>;

    /// Write the model (what `checkpoint-<s>/` and the final output dir hold besides state).
    fn save(&self, job: &JobSpec, model: &Self::Model, dir: &Path, dtype: DType) -> Result<()>;

    fn num_parameters(&self, model: &Self::Model) -> usize;

    /// HF's `floating_point_ops` per input token: 6 × the parameters outside the embedding
    /// (`num_parameters(exclude_embeddings=True)`, adapters included), the estimate HF Trainer
    /// adds up into `total_flos`.
    fn flos_per_input_token(&self, model: &Self::Model) -> f64;
}

/// What one micro-batch fed the model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fed {
    /// Non-padding tokens (throughput, `num_input_tokens_seen`).
    pub tokens: usize,
    /// `input_ids.numel()`, padding included: what HF's `total_flos` counts.
    pub input_tokens: usize,
}

impl std::ops::AddAssign for Fed {
    fn add_assign(&mut self, o: Fed) {
        self.tokens += o.tokens;
        self.input_tokens += o.input_tokens;
    }
}

/// Instruction tuning: token NLL of the response (Alpaca's train.py).
pub struct CausalLm {
    pub examples: Vec<Example>,
    /// What the plan orders and slices: with `packing`, rows of examples packed up to
    /// model_max_length tokens (a pure function of the example lengths); else one example each.
    pub units: Vec<Vec<usize>>,
    pub packing: bool,
    pub pad_id: u32,
    pub eval: Option<Vec<Example>>,
}

impl CausalLm {
    pub fn new(examples: Vec<Example>, pad_id: u32, job: &JobSpec) -> Self {
        let units = if job.packing {
            let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
            let rows = pack(&lengths, job.model_max_length);
            tracing::info!(
                "packing: {} examples into {} rows of up to {} tokens; per_device_train_batch_size counts rows",
                examples.len(),
                rows.len(),
                job.model_max_length
            );
            rows
        } else {
            (0..examples.len()).map(|i| vec![i]).collect()
        };
        CausalLm {
            examples,
            units,
            packing: job.packing,
            pad_id,
            eval: None,
        }
    }

    /// The micro-batch of units `idx`: packed rows with their layout, or right-padded examples.
    fn micro_batch(&self, idx: &[usize]) -> Batch {
        let rows = idx.iter().map(|&u| {
            self.units[u]
                .iter()
                .map(|&i| &self.examples[i])
                .collect::<Vec<_>>()
        });
        if self.packing {
            collate_packed(&rows.collect::<Vec<_>>(), self.pad_id)
        } else {
            collate(&rows.map(|r| r[0]).collect::<Vec<_>>(), self.pad_id)
        }
    }
}

impl Objective for CausalLm {
    type Model = Llama;

    fn len(&self) -> usize {
        self.units.len()
    }

    fn accumulate(&self, engine: &mut Engine<Llama>, idx: &[usize]) -> Result<Fed> {
        let batch = self.micro_batch(idx);
        engine.accumulate(&batch)?;
        Ok(Fed {
            tokens: batch.attention_mask.iter().filter(|&&m| m != 0).count(),
            input_tokens: batch.input_ids.len(),
        })
    }

    fn load_eval(&mut self, tokenizer: &Tokenizer, path: &Path, max_len: usize) -> Result<()> {
        self.eval = Some(crate::eval::load_eval_examples(tokenizer, path, max_len)?);
        Ok(())
    }

    fn evaluate(
        &self,
        model: &Llama,
        batch_size: usize,
    ) -> Result<Option<(Map<String, Value>, usize)>> {
        let Some(examples) = &self.eval else {
            return Ok(None);
        };
        let l = crate::eval::eval_loss(model, examples, batch_size, self.pad_id)?;
        let mut m = Map::new();
        m.insert("eval_loss".into(), json!(l.loss));
        Ok(Some((m, examples.len())))
    }

    fn resume(&self, model: &mut Llama, dir: &Path) -> Result<()> {
        if model.lora().is_some() {
            model.load_adapter(dir)?; // the frozen base is the job's model, prepared before
        } else {
            *model = Llama::load(dir)?;
        }
        Ok(())
    }

    fn save(&self, job: &JobSpec, model: &Llama, dir: &Path, dtype: DType) -> Result<()> {
        save_weights(job, model, dir, dtype)
    }

    fn num_parameters(&self, model: &Llama) -> usize {
        model.num_parameters()
    }

    fn flos_per_input_token(&self, model: &Llama) -> f64 {
        let c = model.config();
        let adapters = model.lora().map_or(0, |l| l.num_parameters());
        let outside =
            (model.num_parameters() + adapters).saturating_sub(c.vocab_size * c.hidden_size);
        6.0 * outside as f64
    }
}

/// The full model in HF layout with its generation config (as `save_pretrained` writes them), or
/// with LoRA the PEFT adapter (always f32, as PEFT saves it) whose `base_model_name_or_path` is
/// the job's model as an absolute path.
fn save_weights(job: &JobSpec, model: &Llama, dir: &Path, dtype: DType) -> Result<()> {
    if model.lora().is_none() {
        model.save(dir, dtype)?;
        herd_model::generation_config::save(&job.model_name_or_path, model.config(), dir)?;
        return Ok(());
    }
    let base = std::path::absolute(&job.model_name_or_path)
        .unwrap_or_else(|_| job.model_name_or_path.clone());
    Ok(model.save_adapter(dir, &base.to_string_lossy())?)
}
