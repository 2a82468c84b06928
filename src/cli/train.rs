//! `herd train JOB.yaml`: one process, rank 0 of 1. Ctrl-C or SIGTERM finishes the current step,
//! writes a checkpoint and exits; running the same command again resumes there.

use super::progress::Progress;
use anyhow::{Context, Result};
use herd_kernels::device::DeviceSpec;
use herd_proto::JobSpec;
use herd_worker::collective::SingleProcess;
use herd_worker::trainer::{self, Outcome, RunOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub fn load_job(path: &Path) -> Result<JobSpec> {
    let mut job = JobSpec::from_file(path)?;
    read_deepspeed(&mut job, path)?;
    check_paths(&job)?;
    Ok(job)
}

/// Folds the job's `deepspeed` config in (a file relative to the current directory, as
/// `torchrun train.py --deepspeed ds_config.json` finds it) and says what herd does
/// differently from DeepSpeed, on stderr.
pub fn read_deepspeed(job: &mut JobSpec, path: &Path) -> Result<()> {
    let cwd = std::env::current_dir().context("the current directory")?;
    let file = path.display().to_string();
    for w in job.load_deepspeed(&cwd, &file)? {
        eprintln!("herd: warning: {file}: deepspeed: {w}");
    }
    Ok(())
}

/// `key`'s file `p` exists and is a file.
fn check_file(key: &str, p: &Path, expected: &str) -> Result<()> {
    let what = if p.is_dir() {
        "a directory"
    } else {
        "no such file"
    };
    anyhow::ensure!(
        p.is_file(),
        "{key} {}: {what} (expected {expected})",
        p.display()
    );
    Ok(())
}

/// The checks that need the disk, done before any work so bad input costs nothing.
pub fn check_paths(job: &JobSpec) -> Result<()> {
    let cfg = job.model_name_or_path.join("config.json");
    anyhow::ensure!(
        cfg.is_file(),
        "model_name_or_path {}: no config.json there (expected a model directory in Hugging Face layout)",
        job.model_name_or_path.display()
    );
    for p in job.data_path.paths() {
        check_file("data_path", p, "an Alpaca or ShareGPT JSON or JSONL file")?;
    }
    if let Some(p) = &job.eval_data_path {
        check_file(
            "eval_data_path",
            p,
            "held-out data in the training data's format",
        )?;
    }
    let out = &job.output_dir;
    if let Some(problem) = herd_worker::checkpoint::output_dir_problem(out) {
        anyhow::bail!(
            "output_dir {}: {problem} (expected a directory for the checkpoints and the final model, or a path that can be created)",
            out.display()
        );
    }
    Ok(())
}

pub fn run(
    job_path: &Path,
    until_step: Option<u64>,
    progress: bool,
    device: &str,
) -> Result<Outcome> {
    let device = DeviceSpec::parse(device)?;
    let job = load_job(job_path)?;
    if let Some(w) = one_rank_warning(&job) {
        eprintln!("warning: {}: {w}", job_path.display());
    }
    run_job_on(&job, until_step, progress, device)
}

/// `herd train` is one rank, whatever the job's `world_size` (like `python train.py` without
/// torchrun); say what that changes, since the global batch then shrinks silently.
fn one_rank_warning(job: &JobSpec) -> Option<String> {
    let world = job.world_size;
    (world > 1).then(|| {
        let (b, k) = (
            job.per_device_train_batch_size,
            job.gradient_accumulation_steps,
        );
        format!(
            "world_size is {world} but `herd train` runs one rank: each step takes {} examples, \
             not the {world}-rank job's {}, so its steps and schedule differ; run \
             `herd run JOB --workers {world}` (or submit it to a coordinator) for that job, or \
             set gradient_accumulation_steps: {} for the same updates in one process",
            b * k,
            b * k * world,
            k * world
        )
    })
}

pub fn run_job(job: &JobSpec, until_step: Option<u64>, progress: bool) -> Result<Outcome> {
    run_job_on(job, until_step, progress, DeviceSpec::Cpu)
}

pub fn run_job_on(
    job: &JobSpec,
    until_step: Option<u64>,
    progress: bool,
    device: DeviceSpec,
) -> Result<Outcome> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut got = vec![];
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal stops at the next step with a checkpoint; a second one exits at
        // once (before the first step, while the data is prepared, there is nothing to save,
        // and a checkpoint cannot be half-written: it is renamed into place when complete).
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
        let this = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(sig, this.clone()).context("installing the signal handler")?;
        got.push((sig, this));
    }
    let opts = RunOptions {
        until_step,
        stop: Some(stop),
        device,
    };
    let mut observer = Progress::new(progress);
    let span = tracing::info_span!("job", output_dir = %job.output_dir.display(), rank = 0);
    let _g = span.enter();
    let outcome = trainer::run(job, &opts, &mut SingleProcess, &mut observer)?;
    if let Outcome::Paused { step } = outcome {
        observer.leave();
        let signal = got.iter().find(|(_, f)| f.load(Ordering::SeqCst));
        let Some((sig, _)) = signal else {
            eprintln!(
                "stopped at step {step} with a checkpoint (--until-step); run without \
                 --until-step, or with a later one, to go on"
            );
            return Ok(outcome);
        };
        // Stopped by a signal: the shell's code for it (128 + its number), so a script or a
        // service manager tells a paused run from a finished one (exit 0).
        let name = if *sig == signal_hook::consts::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        eprintln!(
            "stopped at step {step} with a checkpoint ({name}); run the same command to resume"
        );
        std::process::exit(128 + sig);
    }
    Ok(outcome)
}
