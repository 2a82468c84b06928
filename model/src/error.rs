//! The one error type of `herd-model`. Variants carry the file and tensor they are about, so a
//! message like "model-00002-of-00003.safetensors: tensor `lm_head.weight` has shape [..]" is
//! enough to act on without a debugger.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: no model.safetensors or model.safetensors.index.json{hint}")]
    NoWeights { path: PathBuf, hint: &'static str },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unexpected tensor `{name}`")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, BF16 and F16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// config.json parsed but describes something this crate cannot compute (e.g. an unknown
    /// rope_type or hidden_act), or is inconsistent (heads not dividing hidden_size).
    #[error("config: {0}")]
    Config(String),
    /// A save found NaN or infinite weights (a diverged run) and wrote nothing.
    #[error(
        "{path}: tensor `{name}` holds {bad} NaN or infinite values of {of}: the weights \
         diverged (a learning rate or schedule too large?); refusing to save them"
    )]
    NonFiniteWeights {
        path: PathBuf,
        name: String,
        bad: usize,
        of: usize,
    },
    /// A caller passed an argument that makes no sense (empty prompt, shrinking the vocabulary).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A fused kernel refused its input or the CUDA device failed (CUDA issue #5).
    #[error(transparent)]
    Kernels(#[from] herd_kernels::Error),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
