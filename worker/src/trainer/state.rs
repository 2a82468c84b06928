//! What a checkpoint holds besides the weights: optimizer moments (`optimizer.safetensors`), the
//! scheduler (`scheduler.json`) and HF's `trainer_state.json` with its `log_history`.

use crate::checkpoint::write_atomic;
use crate::error::{io_err, Error, Result};
use crate::optim::AdamW;
use crate::schedule::Schedule;
use safetensors::tensor::{Dtype, View};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const SCHEDULER_FILE: &str = "scheduler.json";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

struct Flat<'a> {
    data: &'a [f32],
    shape: [usize; 1],
}

impl View for Flat<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Save AdamW's moments as `exp_avg.<param>` / `exp_avg_sq.<param>` (flat f32) plus the step.
pub fn save_optimizer(dir: &Path, opt: &AdamW) -> Result<()> {
    let mut views = Vec::with_capacity(opt.states.len() * 2);
    for s in &opt.states {
        views.push((
            format!("exp_avg.{}", s.name),
            Flat {
                data: &s.exp_avg,
                shape: [s.exp_avg.len()],
            },
        ));
        views.push((
            format!("exp_avg_sq.{}", s.name),
            Flat {
                data: &s.exp_avg_sq,
                shape: [s.exp_avg_sq.len()],
            },
        ));
    }
    let meta = HashMap::from([("step".to_string(), opt.steps.to_string())]);
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        reason: format!("cannot serialize optimizer state: {e}"),
    })?;
    write_atomic(&path, &bytes)
}

/// Restore moments into an optimizer built for the same parameters (names and sizes must match).
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let bad = |reason: String| Error::Checkpoint {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("metadata has no step".into()))?;
    for s in &mut opt.states {
        for (prefix, buf) in [
            ("exp_avg", &mut s.exp_avg),
            ("exp_avg_sq", &mut s.exp_avg_sq),
        ] {
            let name = format!("{prefix}.{}", s.name);
            let t = st
                .tensor(&name)
                .map_err(|_| bad(format!("missing tensor {name}")))?;
            if t.dtype() != Dtype::F32 || t.data().len() != buf.len() * 4 {
                return Err(bad(format!(
                    "{name} has {} bytes, expected {} f32 values",
                    t.data().len(),
                    buf.len()
                )));
            }
            for (d, c) in buf.iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    opt.steps = step;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    pub lr_scheduler_type: String,
    pub base_lr: f64,
    pub num_warmup_steps: u64,
    pub num_training_steps: u64,
    pub last_step: u64,
}

pub fn save_scheduler(dir: &Path, s: &Schedule, last_step: u64) -> Result<()> {
    let st = match s {
        Schedule::Hf(s) => SchedulerState {
            lr_scheduler_type: s.kind.as_str().into(),
            base_lr: s.base_lr,
            num_warmup_steps: s.warmup_steps,
            num_training_steps: s.total_steps,
            last_step,
        },
        Schedule::DeepSpeed(s) => {
            let c = s.config();
            SchedulerState {
                lr_scheduler_type: format!("deepspeed {}", c.kind.as_str()),
                base_lr: c.base_lr,
                num_warmup_steps: c.warmup_num_steps.unwrap_or(0),
                num_training_steps: c.total_num_steps.unwrap_or(0),
                last_step,
            }
        }
    };
    write_atomic(
        &dir.join(SCHEDULER_FILE),
        &serde_json::to_vec_pretty(&st).expect("serializes"),
    )
}

/// HF's `trainer_state.json`, with the fields HF writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The evaluations' best `metric_for_best_model` so far.
    pub best_metric: Option<f64>,
    /// The step of that evaluation (transformers 5); absent from older states.
    #[serde(default)]
    pub best_global_step: Option<u64>,
    /// `output_dir/checkpoint-<step>` of the best evaluation once that checkpoint exists.
    pub best_model_checkpoint: Option<String>,
    pub epoch: f64,
    pub eval_steps: u64,
    pub global_step: u64,
    pub is_hyper_param_search: bool,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub log_history: Vec<Value>,
    pub logging_steps: u64,
    pub max_steps: u64,
    pub num_input_tokens_seen: u64,
    pub num_train_epochs: u64,
    pub save_steps: u64,
    pub total_flos: f64,
    pub train_batch_size: usize,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
}

impl TrainerState {
    /// The step of the checkpoint named best (`…/checkpoint-<step>`).
    pub fn best_checkpoint_step(&self) -> Option<u64> {
        let name = self.best_model_checkpoint.as_deref()?;
        let name = Path::new(name).file_name()?.to_str()?;
        name.strip_prefix("checkpoint-")?.parse().ok()
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
            path,
            reason: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &dir.join(TRAINER_STATE_FILE),
            &serde_json::to_vec_pretty(self).expect("serializes"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run's log_history is the one written: every float read back is the f64 that
    /// was saved (serde_json's default parser is one ulp off for some, e.g. this learning rate).
    #[test]
    fn a_trainer_state_read_back_is_the_one_written() {
        let dir = tempfile::tempdir().unwrap();
        let lr: f64 = "0.0009468163201617061".parse().unwrap();
        let st = TrainerState {
            best_metric: Some(0.1 + 0.2),
            best_global_step: None,
            best_model_checkpoint: None,
            epoch: 2.0 / 3.0,
            eval_steps: 4,
            global_step: 13,
            is_hyper_param_search: false,
            is_local_process_zero: true,
            is_world_process_zero: true,
            log_history: vec![serde_json::json!({"learning_rate": lr, "step": 13})],
            logging_steps: 1,
            max_steps: 30,
            num_input_tokens_seen: 0,
            num_train_epochs: 3,
            save_steps: 4,
            total_flos: 1.234_567_890_123_456_7e15,
            train_batch_size: 4,
            trial_name: None,
            trial_params: None,
        };
        st.save(dir.path()).unwrap();
        let back = TrainerState::load(dir.path()).unwrap();
        assert_eq!(back.log_history[0]["learning_rate"].as_f64(), Some(lr));
        assert_eq!(back, st);
    }
}
