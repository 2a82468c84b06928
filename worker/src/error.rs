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
    #[error("checkpoint {path}: output_dir is not writable ({source}); nothing was trained")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data set has {examples} usable examples, fewer than one global batch of {global_batch}")]
    TooFewExamples {
        examples: usize,
        global_batch: usize,
    },
    #[error(
        "no example keeps an answer token after truncation to model_max_length {max_len}: every \
         label is masked, so training would learn nothing; raise model_max_length"
    )]
    NoLabelTokens { max_len: usize },
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

impl Error {
    /// Whether a restart from the newest checkpoint would meet this error again: it comes from
    /// the job, its data, its model files or its numbers (resume is bit-identical, so a diverged
    /// loss diverges again), not from a machine, a peer, a device or a file system. The
    /// coordinator fails such a job at once instead of spending its restarts on it.
    pub fn repeats_on_restart(&self) -> bool {
        use crate::data::DataError;
        use herd_model::tokenizer::TokenizerError;
        match self {
            // A data file that is not there (deleted, or never mounted on this worker, which
            // the restart gets again) is missing for the restart too; other read errors may
            // pass (a stale NFS handle).
            Error::Data(DataError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            Error::Data(_) => true,
            Error::Tokenizer(e) => {
                !matches!(e, TokenizerError::Io { .. } | TokenizerError::Write { .. })
            }
            Error::Model(e) => matches!(
                e,
                herd_model::Error::Json { .. }
                    | herd_model::Error::Safetensors { .. }
                    | herd_model::Error::NoWeights { .. }
                    | herd_model::Error::MissingTensor { .. }
                    | herd_model::Error::UnexpectedTensor { .. }
                    | herd_model::Error::ShapeMismatch { .. }
                    | herd_model::Error::UnsupportedDtype { .. }
                    | herd_model::Error::Config(_)
                    | herd_model::Error::NonFiniteWeights { .. }
            ),
            Error::Job(e) => !matches!(e, herd_proto::JobError::Read { .. }),
            Error::TooFewExamples { .. }
            | Error::NoLabelTokens { .. }
            | Error::Unsupported { .. }
            | Error::NonFiniteLoss { .. } => true,
            // Found before the first step: permissions or a read-only mount stay as they are
            // for a restart seconds later (which would spend every restart in as many
            // seconds); a full disk or a network file system's hiccup may pass.
            Error::NotWritable { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            Error::Tensor(_)
            | Error::Io { .. }
            | Error::Checkpoint { .. }
            | Error::Collective { .. }
            | Error::Device(_)
            | Error::Interrupted { .. } => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach a path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_own_errors_repeat_and_the_machines_do_not() {
        let job = Error::Job(herd_proto::JobError::Invalid {
            file: "j".into(),
            key: "deepspeed",
            reason: "r".into(),
        });
        assert!(job.repeats_on_restart());
        assert!(Error::NonFiniteLoss {
            step: 3,
            loss: f32::NAN
        }
        .repeats_on_restart());
        let io = || std::io::Error::other("stale NFS handle");
        assert!(!Error::Io {
            path: "x".into(),
            source: io()
        }
        .repeats_on_restart());
        assert!(!Error::Data(crate::data::DataError::Io {
            path: "d".into(),
            source: io()
        })
        .repeats_on_restart());
        assert!(Error::Data(crate::data::DataError::Io {
            path: "d".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound)
        })
        .repeats_on_restart());
        let peer = Error::Collective {
            backend: "tcp",
            reason: "connection closed".into(),
        };
        assert!(!peer.repeats_on_restart());
    }
}
