//! The training loop: job → tokenizer, model, examples → steps → checkpoints → final model.
//!
//! A worker drives it with a rank, a world size, a step range and a collective; `herd train`
//! drives it with rank 0 of 1 and the whole range. Every decision that matters for reproducibility
//! (example order, batch slices, lr) is a pure function of the job and the step, so resuming from
//! `checkpoint-<s>` needs only the weights, the optimizer moments and `s`.

pub mod best;
pub mod cadence;
pub mod engine;
mod events;
pub mod mixed;
pub mod objective;
mod outputs;
pub mod plan;
pub mod resume;
pub mod reward;
pub mod state;
pub mod zero;

use crate::checkpoint;
use crate::collective::Collective;
use crate::data::encode::Example;
use crate::data::mixture::{encode_record, load_mixture};
use crate::data::order::epoch_permutation;
use crate::error::Result;
use crate::optim::AdamWConfig;
use crate::schedule::{DeepSpeedSchedule, LrSchedule, Schedule};
use candle_core::DType;
use engine::{Engine, Trainable};
pub use events::{finished_line, saved_line, Event, Observer};
use herd_model::{Llama, Tokenizer};
use herd_proto::{JobSpec, Task, TokensSeen};
use objective::{CausalLm, Objective};
use outputs::{
    checkpoint_path, evaluate, new_trainer_state, round3, round4, save_checkpoint, save_final,
    track_best,
};
pub use plan::Plan;
use serde_json::json;
use state::TrainerState;
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

/// What a run starts from: the tokenizer, the model and the objective with its examples.
pub struct Setup<O: Objective> {
    pub tokenizer: Tokenizer,
    pub model: O::Model,
    pub objective: O,
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
    // train.py resizes to len(tokenizer) whatever the model's size; a LoRA job keeps a larger
    // (padded) vocabulary, as PEFT scripts do not resize, so the adapter fits the base as it is.
    if job.lora_r.is_none() || tokenizer.len() > model.config().vocab_size {
        model.resize_token_embeddings(tokenizer.len(), added_tokens)?;
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
    let counted = |e: &Example| {
        e.labels
            .iter()
            .any(|&l| l != herd_model::loss::IGNORE_INDEX)
    };
    if !examples.is_empty() && !examples.iter().any(counted) {
        return Err(crate::Error::NoLabelTokens {
            max_len: job.model_max_length,
        });
    }
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
    if job.task == Task::Reward && job.lora_r.is_some() {
        return no(
            "lora_r",
            "reward models train all parameters in this build; drop the lora_* keys",
        );
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

/// The job's lr schedule once its number of optimizer steps is known; a DeepSpeed scheduler's
/// step counts are checked against the job's here, where HF Trainer checks them.
pub fn schedule_for(job: &JobSpec, plan: &Plan) -> Result<Schedule> {
    let warmup_steps = job.warmup_steps_for(plan.total_steps);
    if let Some(ds) = herd_proto::job::deepspeed::scheduler_of(job)? {
        let resolved = ds
            .resolve(warmup_steps, plan.total_steps)
            .map_err(|reason| herd_proto::JobError::Invalid {
                file: job.source.to_string(),
                key: "deepspeed",
                reason,
            })?;
        return Ok(Schedule::DeepSpeed(DeepSpeedSchedule::new(resolved)));
    }
    Ok(Schedule::Hf(LrSchedule {
        kind: job.lr_scheduler_type,
        kwargs: job.lr_scheduler_kwargs,
        base_lr: job.learning_rate,
        warmup_steps,
        total_steps: plan.total_steps,
    }))
}

/// Run (or resume) `job` on this rank.
pub fn run(
    job: &JobSpec,
    opts: &RunOptions,
    collective: &mut dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    // CUDA issue #5: open the GPU first, so a missing driver costs no data loading.
    let device = herd_kernels::device::open(opts.device)?;
    let placement = placement(job, &device);
    if job.fp16 {
        tracing::warn!("fp16 is not supported: GPU ranks compute in bf16, CPU ranks in f32 (or bf16 with `bf16: true`)");
    }
    match job.task {
        Task::CausalLm => {
            let p = prepare(job)?;
            let pad_id = p
                .tokenizer
                .pad_id()
                .expect("add_missing_special_tokens guarantees a pad token");
            if p.model.lora().is_some() {
                tracing::info!(
                    trainable = p.model.num_trainable_parameters(),
                    total = p.model.num_parameters(),
                    "LoRA: only the adapters train"
                );
            }
            let setup = Setup {
                tokenizer: p.tokenizer,
                model: p.model,
                objective: CausalLm::new(p.examples, pad_id, job),
                skipped_records: p.skipped_records,
                added_tokens: p.added_tokens,
            };
            run_setup(job, opts, collective, observer, setup, &placement)
        }
        Task::Reward => {
            check_supported(job)?;
            let setup = reward::prepare(job)?;
            run_setup(job, opts, collective, observer, setup, &placement)
        }
    }
}

/// Where a rank computes and in which dtype.
pub struct Placement {
    pub device: candle_core::Device,
    /// The compute dtype when it is not f32 (bf16 with f32 master weights); None: plain f32.
    pub mixed: Option<DType>,
}

/// GPU ranks always compute in bf16 (CUDA issue #5); CPU ranks when the job says `bf16: true`.
pub fn placement(job: &JobSpec, device: &candle_core::Device) -> Placement {
    Placement::new(device, job.bf16)
}

impl Placement {
    /// bf16 with f32 master weights on a GPU always, on the CPU when `bf16`; else plain f32.
    pub fn new(device: &candle_core::Device, bf16: bool) -> Self {
        Placement {
            device: device.clone(),
            mixed: (device.is_cuda() || bf16).then_some(DType::BF16),
        }
    }

    /// On a CPU in bf16, the guard that sends this thread through the fused ops' host code
    /// (the GPU rank's numerics); hold it for the whole run. None elsewhere.
    pub fn fused_on_cpu(&self) -> Option<herd_kernels::FusedOnCpu> {
        self.mixed
            .filter(|_| !self.device.is_cuda())
            .map(|_| herd_kernels::FusedOnCpu::enable())
    }
}

/// The loop proper, the same for every objective.
fn run_setup<O: Objective>(
    job: &JobSpec,
    opts: &RunOptions,
    collective: &mut dyn Collective,
    observer: &mut dyn Observer,
    setup: Setup<O>,
    placement: &Placement,
) -> Result<Outcome> {
    let Setup {
        tokenizer,
        mut model,
        mut objective,
        skipped_records,
        added_tokens,
    } = setup;
    let (rank, world) = (collective.rank(), collective.world_size());
    let plan = Plan::new(job, objective.len(), world)?;
    let schedule = schedule_for(job, &plan)?;

    // Resume from the newest complete checkpoint, if any.
    let mut start_step = 0;
    let mut trainer_state = None;
    let mut resumed_from = None;
    if let Some((step, dir, _)) = checkpoint::latest_complete(&job.output_dir)? {
        resume::same_recipe(job, &dir)?;
        // Resumed at the last step there is nothing to train, and no optimizer to restore.
        if step < plan.total_steps {
            resume::has_optimizer_state(job, &dir)?;
        }
        objective.resume(&mut model, &dir)?;
        start_step = step;
        let mut ts = TrainerState::load(&dir)?;
        if let Some(gone) = best::forget_missing(&mut ts, &job.output_dir) {
            if rank == 0 {
                tracing::warn!("the best checkpoint {gone} recorded in the resumed state does not exist anymore; ignoring it for this run (a better evaluation names a new one)");
            }
        }
        trainer_state = Some(ts);
        resumed_from = Some(dir);
    }
    if rank == 0 {
        checkpoint::probe_writable(&job.output_dir)?;
        let removed = checkpoint::remove_unfinished_saves(&job.output_dir)?;
        if !removed.is_empty() {
            tracing::warn!(steps = ?removed, "removed the staging folders of saves that never finished");
        }
    }
    let parameters = objective.num_parameters(&model);
    let flos_per_input_token = objective.flos_per_input_token(&model);
    let mut engine = Engine::new(model, adam_config(job), job.max_grad_norm)
        .with_gradient_checkpointing(job.gradient_checkpointing);
    if herd_proto::job::deepspeed::has_optimizer(job) {
        engine.optimizer.decay_every_parameter();
    }
    engine.dropout_seed = job.seed;
    engine.neftune_alpha = job.neftune_noise_alpha.unwrap_or(0.0);
    let bucket_mb = job
        .ddp_bucket_cap_mb
        .unwrap_or(engine::DEFAULT_BUCKET_CAP_MB);
    engine.ddp_bucket_elems = engine::bucket_elems(bucket_mb);
    if let Some(dir) = resumed_from
        .as_ref()
        .filter(|_| start_step < plan.total_steps)
    {
        state::load_optimizer(dir, &mut engine.optimizer)?;
        tracing::info!(step = start_step, dir = %dir.display(), "resumed from checkpoint");
    }
    if job.zero_stage >= 1 {
        engine.shard_optimizer(rank, world)?;
    }
    if job.zero_stage >= 2 {
        engine.shard_gradients()?;
    }
    // CUDA issue #5: mixed precision computes in bf16 with f32 master weights and a fused AdamW
    // on the device; on a CPU rank through the fused ops' host code (the GPU rank's numerics, in
    // CI).
    let _fused_on_cpu = placement.fused_on_cpu();
    if let Some(dtype) = placement.mixed {
        if placement.device.is_cuda() {
            // bf16 weights (the master weights' high halves) and gradients; the low halves,
            // f32 moments and gradient sum; activations come on top (the OOM error's advice).
            let need = match engine.shard() {
                // ZeRO-2: bf16 weights and gradients, one bucket's f32 in flight (a bucket holds
                // up to BUCKET_ELEMS, or one larger parameter); the f32 sum and the state of
                // this rank's part
                Some(shard) if job.zero_stage >= 2 => {
                    let params = engine.model.trainable();
                    let largest = params.iter().map(|(_, v)| v.elem_count()).max();
                    let bucket = zero::BUCKET_ELEMS.max(largest.unwrap_or(0)) as u64;
                    4 * parameters as u64 + 4 * bucket + 14 * shard.elems[rank] as u64
                }
                // bf16 weights and gradients and the f32 sum; the state of this rank's part
                Some(shard) => 8 * parameters as u64 + 10 * shard.elems[rank] as u64,
                None => (4 + mixed::MixedState::BYTES_PER_PARAMETER) * parameters as u64,
            };
            herd_kernels::device::check_memory(
                &placement.device,
                "the bf16 weights and gradients, the f32 master weights and AdamW state",
                need,
            )?;
        }
        engine.place(&placement.device, dtype)?;
        tracing::info!(device = ?placement.device.location(), ?dtype, "mixed precision: f32 master weights");
    }
    // With several GPU ranks the gradient sums go over NCCL instead of the TCP ring; the ranks
    // first agree that they all are GPU ranks (or none is).
    let on_gpu = placement.device.is_cuda();
    let gpu_job = if world > 1 {
        let mut gpu_ranks = [if on_gpu { 1.0 } else { 0.0 }];
        collective.all_reduce_sum(&mut gpu_ranks)?;
        crate::collective::all_on_gpus(gpu_ranks[0], world, rank, on_gpu)?
    } else {
        on_gpu
    };
    #[cfg(not(feature = "cuda"))]
    let _ = gpu_job;
    #[cfg(feature = "cuda")]
    let mut nccl = None;
    #[cfg(feature = "cuda")]
    if gpu_job && world > 1 {
        nccl = Some(crate::collective::NcclCollective::new(
            &placement.device,
            collective,
        )?);
    }
    #[cfg(feature = "cuda")]
    let collective: &mut dyn Collective = match nccl.as_mut() {
        Some(n) => n,
        None => collective,
    };
    let mut ts = trainer_state.unwrap_or_else(|| new_trainer_state(job, &plan));
    // When to log, evaluate and save, as HF Trainer decides it. Only rank 0 evaluates; the
    // others go straight on to the next collective, where they wait for it.
    let cadence = cadence::Cadence::of(job, plan.total_steps);
    let best_rule = best::BestRule::of(job);
    if let (Some(path), true) = (&job.eval_data_path, cadence.evaluate != cadence::Every::No) {
        if rank == 0 {
            objective.load_eval(&tokenizer, path, job.model_max_length)?;
        }
    }
    observer.event(&Event::Started {
        start_step,
        total_steps: plan.total_steps,
        examples: objective.len(),
        skipped_records,
        // What trains (with LoRA the adapters, as PEFT's print_trainable_parameters counts).
        parameters: engine
            .model
            .trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum(),
        changed_since_checkpoint: resumed_from
            .as_deref()
            .map(|d| resume::changed_since(job, d))
            .unwrap_or_default(),
        resumed_from: resumed_from.clone(),
        added_tokens,
    });

    // eval_on_start: one evaluation before the first step (of every run, a resumed one too, as
    // HF's train() does); it does not take part in picking the best checkpoint.
    if rank == 0 && job.eval_on_start {
        if let Some(entry) = evaluate(job, &objective, &engine.model, ts.epoch, start_step)? {
            record_eval(job, &mut ts, observer, entry);
        }
    }
    let end = opts
        .until_step
        .unwrap_or(plan.total_steps)
        .min(plan.total_steps);
    let mut perm_epoch = u64::MAX;
    let mut perm: Vec<usize> = vec![];
    let mut window_loss = 0.0;
    let mut window_accuracy = 0.0;
    let mut window_steps = 0u64;
    // HF's train_loss: the mean loss of the steps this run trained.
    let mut run_loss = 0.0;
    let mut step = start_step;
    let tokens_at_start = ts.num_input_tokens_seen;
    // HF's start_time: taken once the model, data and checkpoint are ready, so train_runtime
    // and the rates count the training loop only.
    let t_loop = Instant::now();
    while step < end {
        // Numbered as its log entry and checkpoint will be (the optimizer steps done after it).
        let span = tracing::info_span!("step", step = step + 1, rank);
        let _g = span.enter();
        let ts_step = Instant::now();
        let epoch = plan.epoch_of(step);
        if epoch != perm_epoch {
            perm = epoch_permutation(plan.seed, epoch, objective.len());
            perm_epoch = epoch;
        }
        engine.zero_grad()?;
        let mut fed = objective::Fed::default();
        for micro in 0..plan.accumulation {
            // ZeRO-2: the previous micro-batch's gradients go to their owners first, on every
            // rank alike (a collective), whether or not this rank has examples in this one.
            if micro > 0 {
                engine.reduce_micro_batch(collective)?;
            }
            let positions = plan.micro_batch_positions(step, rank, micro);
            let idx: Vec<usize> = positions.map(|p| perm[p]).collect();
            let run = |engine: &mut Engine<O::Model>| match idx.is_empty() {
                true => Ok(objective::Fed::default()),
                false => objective.accumulate(engine, &idx),
            };
            // The last micro-batch's backward overlaps the gradient sum across ranks (every
            // rank takes part, with or without examples of its own).
            fed += match micro + 1 == plan.accumulation {
                true => engine.overlapped(collective, run)?,
                false => run(&mut engine)?,
            };
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
        let seen_tokens = fed.tokens;
        // The ranks stop together, at the same step, with one checkpoint: a stop told to one
        // rank only (its worker preempted by SIGTERM) would otherwise leave the others waiting
        // on it in the next collective, and rank 0, which writes the checkpoint, would never
        // save it. A sharded save needs every rank anyway. The same all-reduce sums what the
        // ranks fed.
        let stop_flag = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let (stop_requested, all_fed) = zero::agree_step(collective, stop_flag, fed)?;
        // HF's total_flos: every rank's input tokens (padding included) × 6 × the
        // non-embedding parameters, before this step's checkpoint saves the trainer state.
        ts.total_flos += flos_per_input_token * all_fed.input_tokens as f64;
        // A reward model's batches (TRL's input_ids_chosen/_rejected) give HF no input_ids to
        // count, as for total_flos.
        ts.num_input_tokens_seen += match job.include_num_input_tokens_seen {
            _ if job.task == Task::Reward => 0,
            TokensSeen::No => 0,
            TokensSeen::All => all_fed.input_tokens as u64,
            TokensSeen::NonPadding => all_fed.tokens as u64,
        };
        let dt = ts_step.elapsed().as_secs_f64().max(1e-9);
        observer.event(&Event::Step {
            step,
            total_steps: plan.total_steps,
            stats,
            tokens_per_sec: seen_tokens as f64 / dt,
        });
        run_loss += stats.loss;
        window_loss += stats.loss;
        window_accuracy += stats.accuracy.unwrap_or(0.0);
        window_steps += 1;
        let due = cadence.after(&plan, step);
        if due.log {
            let mut entry = json!({
                "epoch": ts.epoch,
                "grad_norm": stats.grad_norm,
                "learning_rate": schedule.logged_lr(step),
                "loss": window_loss / window_steps as f64,
                "step": step,
            });
            if stats.accuracy.is_some() {
                entry["accuracy"] = json!(window_accuracy / window_steps as f64);
            }
            if job.include_num_input_tokens_seen != TokensSeen::No {
                // HF adds the count and this run's token throughput to every training log.
                let runtime = t_loop.elapsed().as_secs_f64().max(1e-9);
                let tokens = ts.num_input_tokens_seen - tokens_at_start;
                entry["num_input_tokens_seen"] = json!(ts.num_input_tokens_seen);
                entry["train_runtime"] = json!(round4(runtime));
                entry["train_tokens_per_second"] = json!(round3(tokens as f64 / runtime));
            }
            window_loss = 0.0;
            window_accuracy = 0.0;
            window_steps = 0;
            tracing::info!(target: "herd::log", "{entry}");
            ts.log_history.push(entry.clone());
            observer.event(&Event::Logged(entry));
        }
        let mut new_best = false;
        if rank == 0 && due.evaluate {
            if let Some(entry) = evaluate(job, &objective, &engine.model, ts.epoch, step)? {
                if let Some(rule) = &best_rule {
                    new_best = track_best(rule, &entry, &mut ts, job, step)?;
                }
                record_eval(job, &mut ts, observer, entry);
            }
        }
        // save_strategy: best saves after an evaluation that improved the metric; sharded, every
        // rank must learn it from rank 0, who evaluated.
        let saves_best = job.save_strategy == herd_proto::SaveStrategy::Best;
        if saves_best && due.evaluate && engine.shard().is_some() {
            new_best = zero::any_rank(collective, new_best)?;
        }
        let range_end = step == end && step < plan.total_steps;
        let save = due.save
            || (saves_best && new_best)
            || ((range_end || stop_requested) && step < plan.total_steps);
        if save && rank == 0 {
            let existing = checkpoint::complete_steps(&job.output_dir)?;
            let named = best::named_after_save(
                ts.best_global_step,
                step,
                &existing,
                ts.best_checkpoint_step(),
            );
            ts.best_model_checkpoint = named.map(|b| checkpoint_path(job, b));
        }
        if save && (rank == 0 || engine.shard().is_some()) {
            // save_only_model leaves the optimizer out, except from a checkpoint this run
            // pauses at (a stop, the end of its step range): that one is resumed. The same on
            // every rank (stop_requested is agreed), as the sharded gather needs.
            let with_optimizer = !job.save_only_model || range_end || stop_requested;
            let saved = save_checkpoint(
                job,
                &objective,
                &engine,
                collective,
                (&tokenizer, &schedule, &ts),
                step,
                world,
                with_optimizer,
            )?;
            if let Some((path, rotated)) = saved {
                let best = best_rule
                    .as_ref()
                    .and_then(|rule| best::named_with_value(rule, &ts));
                observer.event(&Event::Saved {
                    step,
                    path,
                    rotated,
                    best,
                });
            }
        }
        if stop_requested && step < plan.total_steps {
            return Ok(Outcome::Paused { step });
        }
    }
    if step < plan.total_steps {
        return Ok(Outcome::Paused { step });
    }
    let train_loss = run_loss / (step - start_step).max(1) as f64;
    let runtime = t_loop.elapsed().as_secs_f64().max(1e-9);
    // Sharded, every rank sends its part of the master weights; rank 0 writes them.
    let mut master = if rank == 0 || engine.shard().is_some() {
        engine.master_model(collective)?
    } else {
        None
    };
    let best_checkpoint = ts.best_checkpoint_step();
    if let (0, true, Some(b)) = (rank, job.load_best_model_at_end, best_checkpoint) {
        // load_best_model_at_end: the final model is the best checkpoint's weights.
        let dir = job.output_dir.join(format!("checkpoint-{b}"));
        tracing::info!(dir = %dir.display(), best_metric = ?ts.best_metric, "loading the best model");
        match master.as_mut() {
            Some(m) => objective.resume(m, &dir)?,
            None => objective.resume(&mut engine.model, &dir)?,
        }
    }
    let mut summary = serde_json::Value::Null;
    if rank == 0 {
        summary = json!({
            "epoch": ts.epoch,
            "step": step,
            "total_flos": ts.total_flos,
            "train_loss": train_loss,
            "train_runtime": round4(runtime),
            "train_samples_per_second": round3(plan.examples_in_steps(start_step, step) as f64 / runtime),
            "train_steps_per_second": round3((step - start_step) as f64 / runtime),
        });
        if job.include_num_input_tokens_seen != TokensSeen::No {
            summary["num_input_tokens_seen"] = json!(ts.num_input_tokens_seen);
        }
        ts.log_history.push(summary.clone());
        save_final(job, &objective, &engine, master, &tokenizer, &ts)?;
        let complete = checkpoint::complete_steps(&job.output_dir)?;
        let victims = checkpoint::final_victims(&complete, job.save_total_limit, best_checkpoint);
        let removed = checkpoint::remove(&job.output_dir, &victims)?;
        if !removed.is_empty() {
            tracing::info!(
                ?removed,
                "save_total_limit 1: only the best checkpoint is kept"
            );
        }
    }
    observer.event(&Event::Finished {
        output_dir: job.output_dir.clone(),
        train_loss,
        runtime_s: runtime,
        steps_trained: step - start_step,
        total_steps: plan.total_steps,
        step,
        summary,
    });
    Ok(Outcome::Completed { steps: step })
}

/// An evaluation entry into the log history, the log and the observer.
fn record_eval(
    job: &JobSpec,
    ts: &mut TrainerState,
    observer: &mut dyn Observer,
    mut entry: serde_json::Value,
) {
    if job.include_num_input_tokens_seen != TokensSeen::No {
        entry["num_input_tokens_seen"] = json!(ts.num_input_tokens_seen);
    }
    tracing::info!(target: "herd::log", "{entry}");
    ts.log_history.push(entry.clone());
    observer.event(&Event::Evaluated(entry));
}
