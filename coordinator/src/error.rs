//! The coordinator's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the job database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the job database {path}: {message}")]
    Schema { path: PathBuf, message: String },
    #[error("the token: {0}")]
    Token(#[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("OS randomness: {0}")]
    Random(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tracing::error!("{e}");
        tonic::Status::internal(e.to_string())
    }
}
