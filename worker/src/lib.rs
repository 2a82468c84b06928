//! `herd-worker`: everything that turns a job into trained weights on one rank: the data pipeline
//! (records → templates → tokens → masked batches), the AdamW optimizer, learning-rate schedules,
//! the training loop, checkpoints, and the gradient collective it averages through.
//!
//! Invariants: the order of examples is a pure function of (seed, epoch); the global batch of step
//! s is a fixed slice of that order. The only listening socket is the collective's (`TcpRing`),
//! which accepts only peers that prove the job secret; the daemon only dials the coordinator.

pub mod checkpoint;
pub mod collective;
pub mod daemon;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use error::{Error, Result};
