//! `herd-proto`: what crosses a process boundary in herd. Today that is the job file: one YAML
//! document per job whose keys are named as Hugging Face `TrainingArguments` (plus Alpaca
//! `train.py`'s `model_max_length`). With the orchestrator it also holds the gRPC messages, so the
//! coordinator, the workers and the CLI validate a job the same way.
//!
//! Invariant: parsing and validation here are pure (no file system access beyond reading the job
//! text the caller hands in, and the DeepSpeed config file a job names when the caller asks);
//! checks that need the disk (does `data_path` exist?) belong to callers.

pub mod auth;
pub mod job;

pub use job::{
    DataEntry, DataFile, DataFormat, DataPath, EvalStrategy, JobError, JobSpec, LoggingStrategy,
    SaveStrategy, SchedulerKwargs, SchedulerType, StepCount, Task, TokensSeen, WsdCurve,
};

/// The gRPC messages and services of `proto/herd.proto` (package `herd.v1`).
pub mod pb {
    tonic::include_proto!("herd.v1");
}
