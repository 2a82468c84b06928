//! The training loop: job → tokenizer, model, examples → steps → checkpoints → final model.
//!
//! A worker drives it with a rank, a world size, a step range and a collective; `herd train`
//! drives it with rank 0 of 1 and the whole range. Every decision that matters for reproducibility
//! (example order, batch slices, lr) is a pure function of the job and the step, so resuming from
//! `checkpoint-<s>` needs only the weights, the optimizer moments and `s`.

pub mod engine;
pub mod plan;
pub mod state;

use crate::checkpoint;
use crate::collective::Collective;
use crate::data::collate::collate;
use crate::data::encode::Example;
use crate::data::mixture::{encode_record, load_mixture};
use crate::data::order::epoch_permutation;
use crate::error::{io_err, Result};
use crate::optim::AdamWConfig;
use crate::schedule::LrSchedule;
use candle_core::DType;
use engine::{Engine, StepStats};
use herd_model::{Llama, Tokenizer};
use herd_proto::{JobSpec, SaveStrategy};
pub use plan::Plan;
use serde_json::json;
use state::TrainerState;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How this process takes part in the job.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Stop (after checkpointing) once this many steps are done: the end of an assigned range.
    pub until_step: Option<u64>,
    /// Set by a signal handler: finish the current step, checkpoint, return `Interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
    /// cpu, or cuda:N: bf16 compute on the GPU, f32 master weights and AdamW on the host.
    pub device: herd_kernels::device::DeviceSpec,
}

/// What the loop tells its observer (progress bar, logs, a worker's reports).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        start_step: u64,
        total_steps: u64,
        examples: usize,
        skipped_records: usize,
        parameters: usize,
        resumed_from: Option<PathBuf>,
        added_tokens: usize,
    },
    Step {
        step: u64,
        total_steps: u64,
        stats: StepStats,
        tokens_per_sec: f64,
    },
    Logged(serde_json::Value),
    /// An eval entry of the log history (`eval_loss`, `step`, `epoch`, ...), rank 0 only.
    Evaluated(serde_json::Value),
    Saved {
        step: u64,
        path: PathBuf,
        rotated: Vec<u64>,
    },
    Finished {
        output_dir: PathBuf,
        train_loss: f64,
        runtime_s: f64,
    },
}

pub trait Observer {
    fn event(&mut self, e: &Event);
}

impl<F: FnMut(&Event)> Observer for F {
    fn event(&mut self, e: &Event) {
        self(e)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The job's last step is done and the final model is in `output_dir`.
    Completed { steps: u64 },
    /// The assigned range ended (or a stop was requested) at `step`, with a checkpoint there.
    Paused { step: u64 },
}

/// Everything prepared from the job before the first step.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub model: Llama,
    pub examples: Vec<Example>,
    pub skipped_records: usize,
    pub added_tokens: usize,
}

/// Load tokenizer, model and data the way Alpaca's train.py does: add missing special tokens,
/// grow the embeddings (new rows = mean of old), encode every record with the prompt masked.
pub fn prepare(job: &JobSpec) -> Result<Prepared> {
    check_supported(job)?;
    let tok_dir = job
        .tokenizer_name
        .as_deref()
        .unwrap_or(&job.model_name_or_path);
    let mut tokenizer = Tokenizer::from_dir(tok_dir)?;
    let added_tokens = tokenizer.add_missing_special_tokens();
    let mut model = Llama::load(&job.model_name_or_path)?;
    if tokenizer.len() > model.config().vocab_size {
        model.resize_token_embeddings(tokenizer.len())?;
    }
    if let Some(r) = job.lora_r {
        let cfg = herd_model::lora::LoraConfig::new(
            r,
            job.lora_alpha,
            job.lora_dropout,
            job.lora_target_modules.clone(),
        );
        model.enable_lora(cfg, job.seed)?;
    }
    let loaded = load_mixture(&job.data_path, job.seed, job.skip_bad_records)?;
    for f in &loaded.files {
        tracing::info!(path = %f.path.display(), format = f.format.as_str(), records = f.records, skipped = f.skipped, taken = f.taken, "data file");
    }
    let examples = loaded
        .records
        .iter()
        .map(|r| encode_record(&tokenizer, r, job.model_max_length))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Prepared {
        tokenizer,
        model,
        examples,
        skipped_records: loaded.skipped,
        added_tokens,
    })
}

/// Job keys that parse but that this trainer does not implement yet are refused, never ignored.
pub fn check_supported(job: &JobSpec) -> Result<()> {
    let no = |key: &'static str, reason: &str| {
        Err(crate::Error::Unsupported {
            key,
            reason: reason.into(),
        })
    };
    if job.lora_r.is_some() && job.lora_dropout != 0.0 {
        return no(
            "lora_dropout",
            "LoRA dropout is not in this build; use lora_dropout: 0",
        );
    }
    if job.task != herd_proto::Task::CausalLm {
        return no("task", "only causal_lm training is in this build");
    }
    Ok(())
}

pub fn adam_config(job: &JobSpec) -> AdamWConfig {
    AdamWConfig {
        beta1: job.adam_beta1,
        beta2: job.adam_beta2,
        eps: job.adam_epsilon,
        weight_decay: job.weight_decay,
    }
}

pub fn schedule_for(job: &JobSpec, plan: &Plan) -> LrSchedule {
    LrSchedule {
        kind: job.lr_scheduler_type,
        base_lr: job.learning_rate,
        warmup_steps: job.warmup_steps_for(plan.total_steps),
        total_steps: plan.total_steps,
    }
}

/// Run (or resume) `job` on this rank.
pub fn run(
    job: &JobSpec,
    opts: &RunOptions,
    collective: &mut dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    let t0 = Instant::now();
    // CUDA issue #5: open the GPU first, so a missing driver costs no data loading.
    let gpu = match opts.device.is_cuda() {
        true => Some(herd_kernels::device::open(opts.device)?),
        false => None,
    };
    if (job.bf16 || job.fp16) && gpu.is_none() {
        tracing::warn!("bf16/fp16 compute needs a GPU worker; this CPU run trains in f32");
    }
    let prepared = prepare(job)?;
    let Prepared {
        tokenizer,
        mut model,
        examples,
        skipped_records,
        added_tokens,
    } = prepared;
    let (rank, world) = (collective.rank(), collective.world_size());
    let plan = Plan::new(job, examples.len(), world)?;
    let schedule = schedule_for(job, &plan);
    let pad_id = tokenizer
        .pad_id()
        .expect("add_missing_special_tokens guarantees a pad token");

    // Resume from the newest complete checkpoint, if any.
    let mut start_step = 0;
    let mut trainer_state = None;
    let mut resumed_from = None;
    if let Some((step, dir, _)) = checkpoint::latest_complete(&job.output_dir)? {
        if model.lora().is_some() {
            model.load_adapter(&dir)?; // the frozen base is the job's model, prepared above
        } else {
            model = Llama::load(&dir)?;
        }
        start_step = step;
        trainer_state = Some(TrainerState::load(&dir)?);
        resumed_from = Some(dir);
    }
    let parameters = model.num_parameters();
    if model.lora().is_some() {
        tracing::info!(
            trainable = model.num_trainable_parameters(),
            total = parameters,
            "LoRA: only the adapters train"
        );
    }
    let mut engine = Engine::new(model, adam_config(job), job.max_grad_norm);
    if let Some(dir) = &resumed_from {
        state::load_optimizer(dir, &mut engine.optimizer)?;
        tracing::info!(step = start_step, dir = %dir.display(), "resumed from checkpoint");
    }
    // CUDA issue #5: a GPU rank computes in bf16 (f32 master weights and AdamW on the host);
    // with several ranks the gradient sums go over NCCL instead of the TCP ring.
    #[cfg(feature = "cuda")]
    let mut nccl = None;
    if let Some(device) = &gpu {
        if job.eval_data_path.is_some() {
            return Err(crate::Error::Unsupported {
                key: "eval_data_path",
                reason: "evaluation during training runs on CPU ranks only for now".into(),
            });
        }
        // bf16 weights + bf16 gradients; activations come on top (see the OOM error's advice).
        let need = 4 * engine.model.num_parameters() as u64;
        herd_kernels::device::check_memory(device, "the bf16 weights and gradients", need)?;
        engine.place(device, candle_core::DType::BF16)?;
        #[cfg(feature = "cuda")]
        if world > 1 {
            nccl = Some(crate::collective::NcclCollective::new(device, collective)?);
        }
    }
    #[cfg(feature = "cuda")]
    let collective: &mut dyn Collective = match nccl.as_mut() {
        Some(n) => n,
        None => collective,
    };
    let mut ts = trainer_state.unwrap_or_else(|| new_trainer_state(job, &plan));
    // eval_strategy: steps — only rank 0 evaluates; the others go straight on to the next
    // collective, where they wait for it.
    let eval_every = job.eval_steps.unwrap_or(job.logging_steps);
    let eval_examples = match (&job.eval_data_path, job.eval_strategy) {
        (Some(path), herd_proto::EvalStrategy::Steps) if rank == 0 => Some(
            crate::eval::load_eval_examples(&tokenizer, path, job.model_max_length)?,
        ),
        _ => None,
    };
    observer.event(&Event::Started {
        start_step,
        total_steps: plan.total_steps,
        examples: examples.len(),
        skipped_records,
        parameters,
        resumed_from: resumed_from.clone(),
        added_tokens,
    });

    let end = opts
        .until_step
        .unwrap_or(plan.total_steps)
        .min(plan.total_steps);
    let mut perm_epoch = u64::MAX;
    let mut perm: Vec<usize> = vec![];
    let mut window_loss = 0.0;
    let mut window_steps = 0u64;
    let mut step = start_step;
    while step < end {
        let span = tracing::info_span!("step", step, rank);
        let _g = span.enter();
        let ts_step = Instant::now();
        let epoch = plan.epoch_of(step);
        if epoch != perm_epoch {
            perm = epoch_permutation(plan.seed, epoch, examples.len());
            perm_epoch = epoch;
        }
        engine.zero_grad();
        let mut seen_tokens = 0usize;
        for micro in 0..plan.accumulation {
            let positions = plan.micro_batch_positions(step, rank, micro);
            if positions.is_empty() {
                continue;
            }
            let batch_examples: Vec<&Example> = positions.map(|p| &examples[perm[p]]).collect();
            let batch = collate(&batch_examples, pad_id);
            seen_tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
            engine.accumulate(&batch)?;
        }
        let stats = engine.apply(collective, schedule.lr_at(step))?;
        if !stats.loss.is_finite() {
            return Err(crate::Error::NonFiniteLoss {
                step: step + 1,
                loss: stats.loss as f32,
            });
        }
        step += 1;
        ts.global_step = step;
        ts.epoch = plan.epoch_progress(step);
        ts.num_input_tokens_seen += seen_tokens as u64;
        let dt = ts_step.elapsed().as_secs_f64().max(1e-9);
        observer.event(&Event::Step {
            step,
            total_steps: plan.total_steps,
            stats,
            tokens_per_sec: seen_tokens as f64 / dt,
        });
        window_loss += stats.loss;
        window_steps += 1;
        if step % job.logging_steps == 0 || step == plan.total_steps {
            let entry = json!({
                "epoch": round4(ts.epoch),
                "grad_norm": stats.grad_norm,
                "learning_rate": stats.learning_rate,
                "loss": round4(window_loss / window_steps as f64),
                "step": step,
            });
            window_loss = 0.0;
            window_steps = 0;
            tracing::info!(target: "herd::log", "{entry}");
            ts.log_history.push(entry.clone());
            observer.event(&Event::Logged(entry));
        }
        if let Some(eval_examples) = &eval_examples {
            if step % eval_every == 0 || step == plan.total_steps {
                let entry = evaluate(job, &engine.model, eval_examples, pad_id, ts.epoch, step)?;
                tracing::info!(target: "herd::log", "{entry}");
                ts.log_history.push(entry.clone());
                observer.event(&Event::Evaluated(entry));
            }
        }
        let stop_requested = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let cadence = job.save_strategy == SaveStrategy::Steps && step % job.save_steps == 0;
        let range_end = step == end && step < plan.total_steps;
        if rank == 0 && (cadence || ((range_end || stop_requested) && step < plan.total_steps)) {
            let (path, rotated) =
                save_checkpoint(job, &engine, &tokenizer, &schedule, &ts, step, world)?;
            observer.event(&Event::Saved {
                step,
                path,
                rotated,
            });
        }
        if stop_requested && step < plan.total_steps {
            return Ok(Outcome::Paused { step });
        }
    }
    if step < plan.total_steps {
        return Ok(Outcome::Paused { step });
    }
    let train_loss = ts
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|l| l.as_f64()))
        .collect::<Vec<_>>();
    let train_loss = if train_loss.is_empty() {
        0.0
    } else {
        train_loss.iter().sum::<f64>() / train_loss.len() as f64
    };
    let runtime = t0.elapsed().as_secs_f64();
    if rank == 0 {
        ts.log_history.push(json!({
            "epoch": round4(ts.epoch),
            "step": step,
            "total_flos": ts.total_flos,
            "train_loss": train_loss,
            "train_runtime": round4(runtime),
            "train_samples_per_second": round4((step - start_step) as f64 * plan.global_batch() as f64 / runtime),
            "train_steps_per_second": round4((step - start_step) as f64 / runtime),
        }));
        save_final(job, &engine, &tokenizer, &ts)?;
    }
    observer.event(&Event::Finished {
        output_dir: job.output_dir.clone(),
        train_loss,
        runtime_s: runtime,
    });
    Ok(Outcome::Completed { steps: step })
}

/// One HF-style eval entry of the log history.
fn evaluate(
    job: &JobSpec,
    model: &Llama,
    examples: &[Example],
    pad_id: u32,
    epoch: f64,
    step: u64,
) -> Result<serde_json::Value> {
    let t = Instant::now();
    let batch = job.per_device_eval_batch_size;
    let l = crate::eval::eval_loss(model, examples, batch, pad_id)?;
    let dt = t.elapsed().as_secs_f64().max(1e-9);
    Ok(json!({
        "epoch": round4(epoch),
        "eval_loss": l.loss,
        "eval_runtime": round4(dt),
        "eval_samples_per_second": round4(examples.len() as f64 / dt),
        "eval_steps_per_second": round4(examples.len().div_ceil(batch.max(1)) as f64 / dt),
        "step": step,
    }))
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn new_trainer_state(job: &JobSpec, plan: &Plan) -> TrainerState {
    TrainerState {
        best_metric: None,
        best_model_checkpoint: None,
        epoch: 0.0,
        eval_steps: job.eval_steps.unwrap_or(job.logging_steps),
        global_step: 0,
        is_hyper_param_search: false,
        is_local_process_zero: true,
        is_world_process_zero: true,
        log_history: vec![],
        logging_steps: job.logging_steps,
        max_steps: plan.total_steps,
        num_input_tokens_seen: 0,
        num_train_epochs: (plan.total_steps.div_ceil(plan.steps_per_epoch)).max(1),
        save_steps: job.save_steps,
        total_flos: 0.0,
        train_batch_size: job.per_device_train_batch_size,
        trial_name: None,
        trial_params: None,
    }
}

/// Everything `checkpoint-<step>` holds, written by rank 0 into a staging dir and sealed.
fn save_checkpoint(
    job: &JobSpec,
    engine: &Engine,
    tokenizer: &Tokenizer,
    schedule: &LrSchedule,
    ts: &TrainerState,
    step: u64,
    world: usize,
) -> Result<(PathBuf, Vec<u64>)> {
    let staging = checkpoint::begin(&job.output_dir, step)?;
    save_weights(job, &engine.model, &staging, DType::F32)?;
    tokenizer.save(&staging)?;
    state::save_optimizer(&staging, &engine.optimizer)?;
    state::save_scheduler(&staging, schedule, step)?;
    ts.save(&staging)?;
    checkpoint::write_atomic(
        &staging.join("training_args.yaml"),
        job.to_yaml().as_bytes(),
    )?;
    let path = checkpoint::commit(&job.output_dir, &staging, step, world)?;
    let rotated = checkpoint::rotate(&job.output_dir, job.save_total_limit)?;
    tracing::info!(step, path = %path.display(), ?rotated, "checkpoint saved");
    Ok((path, rotated))
}

/// The final model in HF layout (bf16 when the job trains in bf16, as HF would save it).
fn save_final(
    job: &JobSpec,
    engine: &Engine,
    tokenizer: &Tokenizer,
    ts: &TrainerState,
) -> Result<()> {
    let out = &job.output_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let dtype = if job.bf16 { DType::BF16 } else { DType::F32 };
    save_weights(job, &engine.model, out, dtype)?;
    tokenizer.save(out)?;
    ts.save(out)?;
    checkpoint::write_atomic(&out.join("training_args.yaml"), job.to_yaml().as_bytes())?;
    Ok(())
}

/// The full model in HF layout, or with LoRA the PEFT adapter (always f32, as PEFT saves it) whose
/// `base_model_name_or_path` is the job's model as an absolute path.
fn save_weights(job: &JobSpec, model: &Llama, dir: &Path, dtype: DType) -> Result<()> {
    if model.lora().is_none() {
        return Ok(model.save(dir, dtype)?);
    }
    let base = std::path::absolute(&job.model_name_or_path)
        .unwrap_or_else(|_| job.model_name_or_path.clone());
    Ok(model.save_adapter(dir, &base.to_string_lossy())?)
}
