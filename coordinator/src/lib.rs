//! `herd-coordinator`: the gRPC coordinator. It validates and stores jobs (SQLite in the state
//! directory), gang-schedules them on idle workers, hands each rank its assignment in a heartbeat
//! reply, notices dead ranks and restarts jobs from their last complete checkpoint.
//!
//! - [`sched`]: the decisions, as pure functions (scheduling, ranks, restart or fail, dead workers).
//! - [`state`]: the state machine that applies them and writes every change through to [`db`].
//! - [`service`]: the `Jobs` and `Workers` gRPC services (thin).
//! - [`validate`]: the submit-time checks.
//!
//! Invariant: only the coordinator writes the job database.

pub mod db;
pub mod error;
pub mod sched;
pub mod service;
pub mod state;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use herd_proto::auth;
use herd_proto::pb::jobs_server::JobsServer;
use herd_proto::pb::workers_server::WorkersServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use error::{Error, Result};
pub use service::Coordinator;

/// How often the background tick looks for dead workers and schedules.
pub const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// The bearer token; `None` = `<state_dir>/token`, created on first start.
    pub token: Option<String>,
    /// A worker silent for longer than this is dead (default 10 s).
    pub heartbeat_timeout: Duration,
    /// What workers are told to heartbeat at (default 1 s).
    pub heartbeat_interval: Duration,
    /// Serve TLS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: require client certificates signed by this CA (PEM).
    pub tls_client_ca: Option<PathBuf>,
}

impl CoordinatorOptions {
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>) -> Self {
        CoordinatorOptions {
            listen,
            state_dir: state_dir.into(),
            token: None,
            heartbeat_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            tls: None,
            tls_client_ca: None,
        }
    }
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions::new(SocketAddr::from(([127, 0, 0, 1], 50051)), "herd-state")
    }
}

/// The token the coordinator enforces: `opts.token`, else `<state_dir>/token` (created if absent).
pub fn resolve_token(opts: &CoordinatorOptions) -> Result<String> {
    match &opts.token {
        Some(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => auth::load_or_create_token(&opts.state_dir).map_err(Error::Token),
    }
}

/// Bind `opts.listen` and serve until `shutdown` completes.
pub async fn serve(
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: opts.listen,
            source,
        })?;
    serve_on(listener, opts, shutdown).await
}

/// Serve on an already bound listener (port 0 in tests and `herd run`; `opts.listen` is ignored).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: opts.listen,
        source,
    })?;
    let token = resolve_token(&opts)?;
    let db = db::Db::open_in(&opts.state_dir)?;
    let core = state::Core::load(
        db,
        state::CoreConfig {
            heartbeat_timeout: opts.heartbeat_timeout,
            heartbeat_interval: opts.heartbeat_interval,
        },
    )?;
    let coord = Coordinator::new(core);
    // A restarted coordinator decides nothing about its workers until they had a chance to come back.
    coord.lock().schedule()?;

    let mut builder = Server::builder();
    let scheme = if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })
        };
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &opts.tls_client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(cfg)
            .map_err(|e| Error::Tls(e.to_string()))?;
        "https"
    } else {
        "http"
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobsServer<Coordinator>>().await;
    health.set_serving::<WorkersServer<Coordinator>>().await;

    let check = auth::check_bearer(token);
    let jobs = JobsServer::with_interceptor(coord.clone(), check.clone());
    let workers = WorkersServer::with_interceptor(coord.clone(), check);

    let ticker = {
        let coord = coord.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                interval.tick().await;
                n += 1;
                let mut core = coord.lock();
                if let Err(e) = core.tick(Instant::now()) {
                    tracing::error!("coordinator tick: {e}");
                }
                if n.is_multiple_of(4) {
                    core.publish_active();
                }
            }
        })
    };

    tracing::info!(
        "herd coordinator listening on {scheme}://{addr} (state {}, heartbeat timeout {:.1} s)",
        opts.state_dir.display(),
        opts.heartbeat_timeout.as_secs_f64()
    );
    let closing = coord.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("herd coordinator shutting down");
        // End the WatchJob streams so the graceful shutdown does not wait for them.
        closing.lock().close_watchers();
    };
    let result = builder
        .add_service(health_service)
        .add_service(jobs)
        .add_service(workers)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            signal,
        )
        .await;
    ticker.abort();
    let _ = ticker.await;
    result.map_err(Error::from)
}
