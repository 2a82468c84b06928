//! `task: reward`: a reward model trained on comparison pairs with the pairwise loss
//! -log σ(r(x, y_a) − r(x, y_b)), summed over pairs and divided by the global pair count, through
//! the same loop, plan and collective as causal LM training.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use herd_model::reward::pairwise_loss_sum;
use herd_model::{RewardModel, Tokenizer};
use herd_proto::{DataFormat, JobSpec};
use serde_json::{json, Map, Value};

use super::engine::Engine;
use super::objective::{Fed, Objective};
use super::Setup;
use crate::data::comparisons::{
    encode_comparison, load_comparisons, pad_rows, Comparison, PairExample,
};
use crate::data::mixture::select;
use crate::eval::reward::score_pairs;
use crate::{Error, Result};

pub struct RewardPairs {
    pub pairs: Vec<PairExample>,
    pub pad_id: u32,
    pub eval: Option<Vec<PairExample>>,
}

/// Tokenizer (special tokens added as for causal LM), the reward model (from a causal LM or a
/// reward model dir) and the encoded comparisons of every `data_path` file, weights applied.
pub fn prepare(job: &JobSpec) -> Result<Setup<RewardPairs>> {
    let tok_dir = job
        .tokenizer_name
        .as_deref()
        .unwrap_or(&job.model_name_or_path);
    let mut tokenizer = Tokenizer::from_dir(tok_dir)?;
    let added_tokens = tokenizer.add_missing_special_tokens();
    let mut model = RewardModel::load(&job.model_name_or_path, job.seed)?;
    if tokenizer.len() > model.backbone().config().vocab_size {
        model.resize_token_embeddings(tokenizer.len(), added_tokens)?;
    }
    let pad_id = tokenizer
        .pad_id()
        .expect("add_missing_special_tokens guarantees a pad token");
    model.set_pad_token_id(Some(pad_id));
    let (comparisons, skipped_records) = load_job_comparisons(job)?;
    let pairs = comparisons
        .iter()
        .map(|c| encode_comparison(&tokenizer, c, job.model_max_length))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Setup {
        tokenizer,
        model,
        objective: RewardPairs {
            pairs,
            pad_id,
            eval: None,
        },
        skipped_records,
        added_tokens,
    })
}

/// The comparisons of every `data_path` file, weights applied (`select`, as for mixtures), and how
/// many bad records were skipped. The coordinator validates a reward job with it too.
pub fn load_job_comparisons(job: &JobSpec) -> Result<(Vec<Comparison>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, f) in job.data_path.files().iter().enumerate() {
        if f.format != DataFormat::Auto {
            return Err(Error::Unsupported {
                key: "data_path",
                reason: format!(
                    "{}: `format:` names instruction formats; a reward job reads comparison records",
                    f.path.display()
                ),
            });
        }
        let loaded = load_comparisons(&f.path, job.skip_bad_records)?;
        let taken = select(loaded.pairs.len(), f.weight, job.seed, i);
        tracing::info!(path = %f.path.display(), format = "comparisons", records = loaded.pairs.len(), skipped = loaded.skipped, taken = taken.len(), "data file");
        skipped += loaded.skipped;
        out.extend(taken.into_iter().map(|j| loaded.pairs[j].clone()));
    }
    Ok((out, skipped))
}

/// Rows [chosen_1..chosen_n, rejected_1..rejected_n] right-padded: ([2n, t] ids, non-pad tokens).
pub fn pair_batch(pairs: &[&PairExample], pad: u32, device: &Device) -> Result<(Tensor, usize)> {
    let rows: Vec<&[u32]> = pairs
        .iter()
        .map(|p| p.chosen.as_slice())
        .chain(pairs.iter().map(|p| p.rejected.as_slice()))
        .collect();
    let tokens = rows.iter().map(|r| r.len()).sum();
    let (ids, t) = pad_rows(&rows, pad);
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, tokens))
}

impl Objective for RewardPairs {
    type Model = RewardModel;

    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn accumulate(&self, engine: &mut Engine<RewardModel>, idx: &[usize]) -> Result<Fed> {
        let batch: Vec<&PairExample> = idx.iter().map(|&i| &self.pairs[i]).collect();
        let n = batch.len();
        if n == 0 {
            return Ok(Fed::default());
        }
        let (ids, tokens) = pair_batch(&batch, self.pad_id, engine.device())?;
        let r = engine.model.scores(&ids)?.to_dtype(DType::F32)?; // the loss in f32
        let (sum, correct) = pairwise_loss_sum(&r.narrow(0, 0, n)?, &r.narrow(0, n, n)?)?;
        engine.add_loss(&sum, n, correct)?;
        // HF counts no flos here: TRL's reward inputs have no `input_ids` for
        // `floating_point_ops` to estimate from, so its total_flos stays 0.
        Ok(Fed {
            tokens,
            input_tokens: 0,
        })
    }

    fn load_eval(&mut self, tokenizer: &Tokenizer, path: &Path, max_len: usize) -> Result<()> {
        let loaded = load_comparisons(path, false)?;
        self.eval = Some(
            loaded
                .pairs
                .iter()
                .map(|c| encode_comparison(tokenizer, c, max_len))
                .collect::<std::result::Result<_, _>>()?,
        );
        Ok(())
    }

    fn evaluate(
        &self,
        model: &RewardModel,
        batch_size: usize,
    ) -> Result<Option<(Map<String, Value>, usize)>> {
        let Some(pairs) = &self.eval else {
            return Ok(None);
        };
        let s = score_pairs(model, pairs, batch_size, self.pad_id)?;
        let summary = crate::eval::reward::summarize(&s);
        let mut m = Map::new();
        m.insert("eval_accuracy".into(), json!(summary.accuracy));
        m.insert("eval_loss".into(), json!(summary.loss));
        Ok(Some((m, pairs.len())))
    }

    fn resume(&self, model: &mut RewardModel, dir: &Path) -> Result<()> {
        let pad = model.pad_token_id();
        *model = RewardModel::load(dir, 0)?; // a checkpoint always holds score.weight
        model.set_pad_token_id(pad);
        Ok(())
    }

    fn save(&self, _job: &JobSpec, model: &RewardModel, dir: &Path, dtype: DType) -> Result<()> {
        Ok(model.save(dir, dtype)?)
    }

    fn num_parameters(&self, model: &RewardModel) -> usize {
        model.num_parameters()
    }

    fn flos_per_input_token(&self, _model: &RewardModel) -> f64 {
        0.0 // no input tokens are counted (see accumulate)
    }
}
