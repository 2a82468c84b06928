//! What a run writes besides its steps: evaluation entries and the best-checkpoint record of
//! the trainer state, `checkpoint-<step>/` and the final output directory.

use super::best;
use super::engine::Engine;
use super::objective::Objective;
use super::plan::Plan;
use super::state::{self, TrainerState};
use crate::checkpoint;
use crate::collective::Collective;
use crate::error::{io_err, Result};
use crate::schedule::Schedule;
use candle_core::DType;
use herd_model::Tokenizer;
use herd_proto::JobSpec;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// An evaluation's `metric_for_best_model` against the best so far; true when it is a new best
/// (recorded in the trainer state, its step only when checkpoints are saved, as HF).
pub(super) fn track_best(
    rule: &best::BestRule,
    entry: &serde_json::Value,
    ts: &mut TrainerState,
    job: &JobSpec,
    step: u64,
) -> Result<bool> {
    let Some(value) = entry.get(&rule.metric).and_then(serde_json::Value::as_f64) else {
        let given: Vec<&str> = entry
            .as_object()
            .map(|m| {
                m.keys()
                    .filter(|k| k.starts_with("eval_"))
                    .map(String::as_str)
                    .collect()
            })
            .unwrap_or_default();
        return Err(herd_proto::JobError::Invalid {
            file: job.source.to_string(),
            key: "metric_for_best_model",
            reason: format!(
                "is `{}`, which the evaluation does not give; it gives {}",
                rule.metric,
                given.join(", ")
            ),
        }
        .into());
    };
    if !rule.improves(value, ts.best_metric) {
        return Ok(false);
    }
    ts.best_metric = Some(value);
    if job.save_strategy != herd_proto::SaveStrategy::No {
        ts.best_global_step = Some(step);
    }
    Ok(true)
}

pub(super) fn checkpoint_path(job: &JobSpec, step: u64) -> String {
    job.output_dir
        .join(format!("checkpoint-{step}"))
        .display()
        .to_string()
}

/// One HF-style eval entry of the log history (None without an eval set on this rank).
pub(super) fn evaluate<O: Objective>(
    job: &JobSpec,
    objective: &O,
    model: &O::Model,
    epoch: f64,
    step: u64,
) -> Result<Option<serde_json::Value>> {
    let t = Instant::now();
    let batch = job.per_device_eval_batch_size;
    let Some((metrics, n)) = objective.evaluate(model, batch)? else {
        return Ok(None);
    };
    let dt = t.elapsed().as_secs_f64().max(1e-9);
    let mut entry = json!({
        "epoch": epoch,
        "eval_runtime": round4(dt),
        "eval_samples_per_second": round3(n as f64 / dt),
        "eval_steps_per_second": round3(n.div_ceil(batch.max(1)) as f64 / dt),
        "step": step,
    });
    for (k, v) in metrics {
        entry[k] = v;
    }
    Ok(Some(entry))
}

/// HF's `speed_metrics` rounds runtimes to 4 decimals, rates to 3.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

pub(super) fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

pub(super) fn new_trainer_state(job: &JobSpec, plan: &Plan) -> TrainerState {
    TrainerState {
        best_metric: None,
        best_global_step: None,
        best_model_checkpoint: None,
        epoch: 0.0,
        eval_steps: job
            .eval_steps
            .unwrap_or(job.logging_steps)
            .resolve(plan.total_steps),
        global_step: 0,
        is_hyper_param_search: false,
        is_local_process_zero: true,
        is_world_process_zero: true,
        log_history: vec![],
        logging_steps: job.logging_steps.resolve(plan.total_steps),
        max_steps: plan.total_steps,
        num_input_tokens_seen: 0,
        num_train_epochs: (plan.total_steps.div_ceil(plan.steps_per_epoch)).max(1),
        save_steps: job.save_steps.resolve(plan.total_steps),
        total_flos: 0.0,
        train_batch_size: job.per_device_train_batch_size,
        trial_name: None,
        trial_params: None,
    }
}

/// Everything `checkpoint-<step>` holds, written by rank 0 into a staging dir and sealed
/// (None on the other ranks, which take part only to send their ZeRO-1 shards).
#[allow(clippy::too_many_arguments)]
pub(super) fn save_checkpoint<O: Objective>(
    job: &JobSpec,
    objective: &O,
    engine: &Engine<O::Model>,
    collective: &mut dyn Collective,
    (tokenizer, schedule, ts): (&Tokenizer, &Schedule, &TrainerState),
    step: u64,
    world: usize,
    with_optimizer: bool,
) -> Result<Option<(PathBuf, Vec<u64>)>> {
    // the f32 master weights under mixed precision, so a resumed run continues exactly
    let master = engine.master_model(collective)?;
    // Every rank takes the same branch: gathering ZeRO shards is a collective.
    let optimizer = match with_optimizer {
        true => Some(engine.optimizer_to_save(collective)?),
        false => None,
    };
    if collective.rank() != 0 {
        return Ok(None);
    }
    let staging = checkpoint::begin(&job.output_dir, step)?;
    objective.save(
        job,
        master.as_ref().unwrap_or(&engine.model),
        &staging,
        DType::F32,
    )?;
    tokenizer.save(&staging)?;
    if let Some(optimizer) = &optimizer {
        state::save_optimizer(&staging, optimizer)?;
        state::save_scheduler(&staging, schedule, step)?;
    }
    ts.save(&staging)?;
    checkpoint::write_atomic(
        &staging.join("training_args.yaml"),
        job.to_yaml().as_bytes(),
    )?;
    let path = checkpoint::commit(&job.output_dir, &staging, step, world)?;
    let rotated = checkpoint::rotate(
        &job.output_dir,
        job.save_total_limit,
        ts.best_checkpoint_step(),
    )?;
    tracing::info!(step, path = %path.display(), ?rotated, "checkpoint saved");
    Ok(Some((path, rotated)))
}

/// The final model in HF layout (bf16 when the job trains in bf16, as HF would save it).
pub(super) fn save_final<O: Objective>(
    job: &JobSpec,
    objective: &O,
    engine: &Engine<O::Model>,
    master: Option<O::Model>,
    tokenizer: &Tokenizer,
    ts: &TrainerState,
) -> Result<()> {
    let out = &job.output_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let dtype = if job.bf16 { DType::BF16 } else { DType::F32 };
    objective.save(job, master.as_ref().unwrap_or(&engine.model), out, dtype)?;
    tokenizer.save(out)?;
    ts.save(out)?;
    checkpoint::write_atomic(&out.join("training_args.yaml"), job.to_yaml().as_bytes())?;
    Ok(())
}
