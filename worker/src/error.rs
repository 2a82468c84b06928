//! The worker crate's one error type. Data errors live in [`crate::data::DataError`] and model
//! errors in [`herd_model::Error`]; both pass through unchanged so their messages (file, record,
//! tensor) reach the user intact.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] herd_model::Error),
    #[error(transparent)]
    Tokenizer(#[from] herd_model::tokenizer::TokenizerError),
    #[error(transparent)]
    Job(#[from] herd_proto::JobError),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the data set has {examples} usable examples, fewer than one global batch of {global_batch}")]
    TooFewExamples {
        examples: usize,
        global_batch: usize,
    },
    #[error("collective ({backend}) failed: {reason}")]
    Collective {
        backend: &'static str,
        reason: String,
    },
    #[error("training diverged at step {step}: loss is {loss}")]
    NonFiniteLoss { step: u64, loss: f32 },
    #[error("`{key}` is not supported yet: {reason}")]
    Unsupported { key: &'static str, reason: String },
    /// The device could not be opened or used; NCCL failed (CUDA issue #5).
    #[error(transparent)]
    Device(#[from] herd_kernels::Error),
    #[error("stopped by request at step {step}")]
    Interrupted { step: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
