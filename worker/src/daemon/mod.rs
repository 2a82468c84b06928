//! `herd worker`: the daemon that runs ranks for the coordinator, one at a time.
//!
//! It binds its collective listener, registers, and heartbeats every interval. A heartbeat reply
//! may carry an [`Assignment`](pb::Assignment) (run a rank: the trainer on its own thread, with a
//! [`TcpRing`](crate::collective::TcpRing) over the assignment's peers or a single process) or a
//! [`StopOrder`](pb::StopOrder) (set the trainer's stop flag). The rank's events become reports
//! (progress every logging step with the new log lines, checkpoints, then done), delivered in
//! order by a reporter task that keeps retrying while the coordinator is unreachable; training
//! never waits for the coordinator. A coordinator that restarted and no longer knows this worker
//! answers `unknown_worker`; the daemon registers again under its old id and keeps training.
//!
//! Shutdown (SIGTERM/SIGINT in the binary): the running rank gets its stop flag, checkpoints at
//! the end of its current step, reports `PAUSED`, and the daemon exits. Its heartbeats say
//! `leaving` meanwhile (no new work for it) and its last call is `Leave`, so the coordinator
//! counts it out at once instead of finding it dead after the heartbeat timeout.

mod address;
mod rank;
mod reporter;

use address::advertised;
use herd_proto::pb;
use herd_proto::pb::workers_client::WorkersClient;
use rank::{RankCtx, RankHandle};
use reporter::{Report, Reporter};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub use rank::peers_from;

/// How a worker daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The coordinator's URL (`http://host:port`; a bare `host:port` gets `http://`).
    pub coordinator: String,
    /// Bearer token for every RPC (None: calls go out without one and are refused).
    pub token: Option<String>,
    /// `cpu` (this build); `cuda:N` is refused with a clear message.
    pub device: String,
    /// Where the collective listener binds (port 0 picks a free port); None: loopback when the
    /// coordinator is on loopback, else every interface ([`address::default_listen`]).
    pub collective_listen: Option<SocketAddr>,
    /// The address peers connect to; default: the listener's address (the local IP towards the
    /// coordinator when it binds an unspecified IP).
    pub collective_advertise: Option<SocketAddr>,
    /// Host name reported to the coordinator and in failures.
    pub host: String,
    /// Ring setup deadline and socket timeout of the collective.
    pub collective_timeout: Duration,
    /// Trust and identity towards a TLS coordinator (`https://`).
    pub tls: ClientTls,
}

/// TLS settings of a coordinator client: the CA that signed the coordinator's certificate (else
/// the system roots), and a client certificate + key (PEM) for a coordinator that requires them
/// (`herd coordinator --tls-client-ca`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Reads the PEM files given on the command line.
    pub fn from_files(
        ca: Option<&Path>,
        cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<Self, DaemonError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| DaemonError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(ClientTls {
            ca_pem: ca.map(read).transpose()?,
            identity_pem: match cert_and_key {
                Some((c, k)) => Some((read(c)?, read(k)?)),
                None => None,
            },
        })
    }
}

impl DaemonOptions {
    pub fn new(coordinator: impl Into<String>) -> Self {
        DaemonOptions {
            coordinator: coordinator.into(),
            token: None,
            device: "cpu".into(),
            collective_listen: None,
            collective_advertise: None,
            host: hostname(),
            collective_timeout: Duration::from_secs(120),
            tls: ClientTls::default(),
        }
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("device `{device}`: {reason}")]
    Device { device: String, reason: String },
    #[error("coordinator address `{addr}`: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot listen for collective connections on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the coordinator at {addr} refused to register this worker: {code:?}: {message}")]
    Refused {
        addr: String,
        code: Code,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Accept `cpu`; explain that `cuda:N` needs the CUDA build; refuse anything else.
pub fn check_device(device: &str) -> Result<(), DaemonError> {
    let bad = |reason: String| {
        Err(DaemonError::Device {
            device: device.to_string(),
            reason,
        })
    };
    if device == "cpu" {
        return Ok(());
    }
    if let Some(n) = device.strip_prefix("cuda:") {
        if n.parse::<u32>().is_err() {
            return bad("expected cuda:N with N a GPU index, e.g. cuda:0".into());
        }
        if herd_kernels::device::CUDA_COMPILED {
            return Ok(()); // opened (with its own clear errors) when a rank starts
        }
        return bad(
            "this herd binary was built without CUDA support, so it cannot train on a GPU; \
             use a herd build with the cuda feature, or --device cpu"
                .into(),
        );
    }
    if device == "cuda" {
        return bad("name the GPU: cuda:N (e.g. cuda:0)".into());
    }
    bad("unknown device; expected cpu or cuda:N".into())
}

/// `host:port` → `http://host:port`; URLs pass through.
pub fn coordinator_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A lazily connecting channel to the coordinator (calls fail with UNAVAILABLE while it is down).
pub fn channel(addr: &str, tls: &ClientTls) -> Result<Channel, DaemonError> {
    let url = coordinator_url(addr);
    let bad = |reason: String| DaemonError::Address {
        addr: addr.to_string(),
        reason,
    };
    if addr.trim().is_empty() {
        // `HERD_COORDINATOR=` set but empty overrides the default, so say where it came from.
        return Err(bad(
            "empty (is HERD_COORDINATOR set to nothing?): give HOST:PORT or http(s)://HOST:PORT"
                .into(),
        ));
    }
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let ep = configure_tls(ep, &url, tls).map_err(bad)?;
    Ok(ep.connect_lazy())
}

fn configure_tls(ep: Endpoint, url: &str, tls: &ClientTls) -> Result<Endpoint, String> {
    if !url.starts_with("https://") {
        if tls.ca_pem.is_some() || tls.identity_pem.is_some() {
            return Err("TLS files were given but the address is not https://".into());
        }
        return Ok(ep);
    }
    let mut cfg = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
    if let Some(ca) = &tls.ca_pem {
        cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &tls.identity_pem {
        cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    ep.tls_config(cfg).map_err(|e| e.to_string())
}

/// Attach `authorization: Bearer <token>` to a request.
pub fn authed<T>(token: Option<&str>, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

/// The machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
    )
}

/// The daemon. Returns when `shutdown` turns true (after the running rank paused and reported,
/// or after a grace period when the coordinator cannot be reached).
pub async fn run(
    opts: DaemonOptions,
    mut shutdown: watch::Receiver<i32>,
) -> Result<(), DaemonError> {
    check_device(&opts.device)?;
    let channel = channel(&opts.coordinator, &opts.tls)?;
    let mut client = WorkersClient::new(channel.clone());
    let token = opts.token.clone();

    let listen = opts
        .collective_listen
        .unwrap_or_else(|| address::default_listen(&opts.coordinator));
    let listener = TcpListener::bind(listen).map_err(|source| DaemonError::Listen {
        addr: listen,
        source,
    })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        })?;
    let collective_addr = opts
        .collective_advertise
        .unwrap_or_else(|| advertised(bound, &opts.coordinator));
    let listener = Some(listener);

    let mut register = pb::RegisterRequest {
        host: opts.host.clone(),
        device: opts.device.clone(),
        collective_addr: collective_addr.to_string(),
        pid: std::process::id(),
        worker_id: String::new(),
    };
    let Some(reg) = register_until_ok(
        &mut client,
        token.as_deref(),
        &register,
        &opts.coordinator,
        &mut shutdown,
    )
    .await?
    else {
        return Ok(());
    };
    register.worker_id = reg.worker_id.clone();
    let worker_id = reg.worker_id;
    let mut interval = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(50)));
    tracing::info!(worker_id = %worker_id, coordinator = %opts.coordinator, collective = %collective_addr, "registered as {worker_id}");
    eprintln!(
        "herd worker {worker_id} registered with {} (collective {collective_addr}, pid {})",
        opts.coordinator,
        std::process::id()
    );

    let (report_tx, report_rx) = mpsc::unbounded_channel::<Report>();
    let (delivered_tx, mut delivered_rx) = mpsc::unbounded_channel::<(String, u32)>();
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<(String, u32)>();
    let reporter = Reporter {
        client: client.clone(),
        token: token.clone(),
        rx: report_rx,
        delivered: delivered_tx,
    };
    tokio::spawn(reporter.run());

    let mut current: Option<RankHandle> = None;
    let mut pending: Option<pb::Assignment> = None;
    let mut exiting_since: Option<Instant> = None;
    let mut exit_signal = 15;
    let mut failures = 0u32;
    let mut offline_since: Option<Instant> = None;
    let mut next_beat = tokio::time::Instant::now();

    loop {
        // Start a pending assignment once the previous rank has reported done.
        if current.is_none() && exiting_since.is_none() {
            if let Some(a) = pending.take() {
                let l = listener_for_ring(&listener);
                let ctx = RankCtx {
                    worker_id: worker_id.clone(),
                    host: opts.host.clone(),
                    listener: l,
                    timeout: opts.collective_timeout,
                    reports: report_tx.clone(),
                    finished: finished_tx.clone(),
                    device: opts.device.clone(),
                };
                eprintln!(
                    "herd worker {worker_id}: job {} attempt {} rank {}/{}",
                    a.job_id, a.attempt, a.rank, a.world_size
                );
                current = Some(rank::start(a, ctx));
            }
        }
        if let Some(since) = exiting_since {
            match &current {
                None => break,
                Some(c) if c.finished && since.elapsed() > Duration::from_secs(15) => {
                    tracing::warn!(
                        "could not report the paused rank to the coordinator; exiting anyway"
                    );
                    break;
                }
                _ => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_beat) => {
                let (job_id, attempt, step) = match &current {
                    Some(c) => (c.job_id.clone(), c.attempt, c.step.load(Ordering::Relaxed)),
                    None => (String::new(), 0, 0),
                };
                let req = pb::HeartbeatRequest { worker_id: worker_id.clone(), job_id, attempt, step, leaving: exiting_since.is_some() };
                let res = tokio::time::timeout(Duration::from_secs(5), client.heartbeat(authed(token.as_deref(), req))).await;
                let res = match res {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded("heartbeat timed out")),
                };
                match res {
                    Ok(resp) => {
                        if let Some(t) = offline_since.take() {
                            tracing::info!("coordinator reachable again after {:.1}s", t.elapsed().as_secs_f64());
                        }
                        failures = 0;
                        let resp = resp.into_inner();
                        if resp.unknown_worker {
                            tracing::info!(worker_id = %worker_id, "the coordinator does not know this worker; registering again");
                            match client.register(authed(token.as_deref(), register.clone())).await {
                                Ok(r) => {
                                    let r = r.into_inner();
                                    if r.worker_id != worker_id {
                                        tracing::warn!(old = %worker_id, new = %r.worker_id, "the coordinator gave a new worker id; keeping the old one");
                                    }
                                    interval = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                                    // Tell it what we are running right away.
                                    next_beat = tokio::time::Instant::now();
                                    continue;
                                }
                                Err(e) => tracing::warn!("registering again failed: {}: {}", e.code(), e.message()),
                            }
                        }
                        if let Some(stop) = resp.stop {
                            if let Some(c) = &current {
                                if c.job_id == stop.job_id && (stop.attempt == 0 || stop.attempt == c.attempt)
                                    && !c.stop.swap(true, Ordering::SeqCst) {
                                        tracing::info!(job = %c.job_id, attempt = c.attempt, reason = %stop.reason, "stop order");
                                        eprintln!("herd worker {worker_id}: stop order for job {} ({})", c.job_id, stop.reason);
                                        // The coordinator has given this attempt up, so nothing
                                        // is gained by waiting on a peer that may be hung: end
                                        // the collective now, not at its socket timeout.
                                        if !stop.checkpoint {
                                            c.abort.abort(&format!("stop order from the coordinator: {}", stop.reason));
                                        }
                                    }
                            }
                            if pending.as_ref().is_some_and(|p| p.job_id == stop.job_id && (stop.attempt == 0 || p.attempt == stop.attempt)) {
                                pending = None;
                            }
                        }
                        if let Some(a) = resp.assignment {
                            if exiting_since.is_some() {
                                tracing::warn!(job = %a.job_id, "assignment while shutting down; ignored");
                            } else {
                                let same = |job: &str, attempt: u32| job == a.job_id && attempt == a.attempt;
                                match &current {
                                    Some(c) if same(&c.job_id, c.attempt) => {}
                                    Some(c) => {
                                        // A new rank while the old one still runs: stop the old one first.
                                        tracing::warn!(running = %c.job_id, attempt = c.attempt, new = %a.job_id, new_attempt = a.attempt, "new assignment while a rank runs; stopping the old rank first");
                                        c.stop.store(true, Ordering::SeqCst);
                                        c.abort.abort(&format!("the coordinator assigned attempt {} of job {}", a.attempt, a.job_id));
                                        pending = Some(a);
                                    }
                                    None => {
                                        if !pending.as_ref().is_some_and(|p| same(&p.job_id, p.attempt)) {
                                            pending = Some(a);
                                        }
                                    }
                                }
                            }
                        }
                        next_beat = tokio::time::Instant::now() + interval;
                    }
                    Err(e) => {
                        failures += 1;
                        if offline_since.is_none() {
                            offline_since = Some(Instant::now());
                            tracing::warn!("heartbeat failed ({}: {}); retrying with backoff", e.code(), e.message());
                        } else {
                            tracing::debug!("heartbeat failed again: {}", e.message());
                        }
                        if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied) {
                            tracing::error!("the coordinator refuses this worker's token: {}", e.message());
                        }
                        let backoff = interval.saturating_mul(1 << failures.min(3)).min(Duration::from_secs(5));
                        next_beat = tokio::time::Instant::now() + backoff;
                    }
                }
            }
            Some((job, attempt)) = finished_rx.recv() => {
                if let Some(c) = current.as_mut() {
                    if c.job_id == job && c.attempt == attempt {
                        c.finished = true;
                    }
                }
            }
            Some((job, attempt)) = delivered_rx.recv() => {
                if current.as_ref().is_some_and(|c| c.job_id == job && c.attempt == attempt) {
                    let c = current.take().unwrap();
                    c.join();
                    tracing::info!(job = %job, attempt, "rank done; idle");
                    // Tell the coordinator at once that this worker is idle.
                    next_beat = tokio::time::Instant::now();
                }
            }
            r = shutdown.changed(), if exiting_since.is_none() => {
                let sig = if r.is_ok() { *shutdown.borrow() } else { 15 };
                exit_signal = sig;
                exiting_since = Some(Instant::now());
                pending = None;
                match &current {
                    Some(c) => {
                        eprintln!("herd worker {worker_id}: stopping job {} at the end of this step (checkpoint, then exit)", c.job_id);
                        c.signal.store(sig, Ordering::SeqCst);
                        c.stop.store(true, Ordering::SeqCst);
                    }
                    None => break,
                }
            }
        }
    }
    // Counted out at once, rather than found dead after the heartbeat timeout.
    if exiting_since.is_some() {
        let bye = pb::LeaveRequest {
            worker_id: worker_id.clone(),
            reason: match exit_signal {
                2 => "stopped by SIGINT".to_string(),
                15 => "stopped by SIGTERM".to_string(),
                n => format!("stopped by signal {n}"),
            },
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            client.leave(authed(token.as_deref(), bye)),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            tracing::warn!("could not tell the coordinator this worker leaves");
        }
    }
    drop(listener);
    Ok(())
}

/// A handle on the collective listener for a new ring. The listener stays bound for the
/// daemon's whole life (peers of the next attempt may dial before this worker even has its
/// assignment; their connection waits in the backlog); a stale connection from an old attempt
/// fails the handshake, which authenticates with the per-attempt secret.
fn listener_for_ring(listener: &Option<TcpListener>) -> Option<TcpListener> {
    listener.as_ref().and_then(|l| match l.try_clone() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!("cannot hand the collective listener to the ring: {e}");
            None
        }
    })
}

async fn register_until_ok(
    client: &mut WorkersClient<Channel>,
    token: Option<&str>,
    req: &pb::RegisterRequest,
    addr: &str,
    shutdown: &mut watch::Receiver<i32>,
) -> Result<Option<pb::RegisterResponse>, DaemonError> {
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.register(authed(token, req.clone())),
        )
        .await;
        let res = res.unwrap_or_else(|_| Err(Status::deadline_exceeded("register timed out")));
        match res {
            Ok(r) => return Ok(Some(r.into_inner())),
            Err(e) if retryable(e.code()) => {
                if !warned {
                    tracing::warn!(
                        "cannot register with the coordinator at {addr} yet ({}: {}); retrying",
                        e.code(),
                        e.message()
                    );
                    warned = true;
                }
            }
            Err(e) => {
                return Err(DaemonError::Refused {
                    addr: addr.to_string(),
                    code: e.code(),
                    message: e.message().to_string(),
                })
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert!(check_device("cpu").is_ok());
        if herd_kernels::device::CUDA_COMPILED {
            assert!(check_device("cuda:0").is_ok());
        } else {
            let e = check_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("without CUDA support"), "{e}");
        }
        assert!(check_device("cuda:x")
            .unwrap_err()
            .to_string()
            .contains("cuda:N"));
        assert!(check_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("unknown device"));
    }

    #[test]
    fn urls() {
        assert_eq!(coordinator_url("127.0.0.1:7733"), "http://127.0.0.1:7733");
        assert_eq!(coordinator_url("https://c:1"), "https://c:1");
    }
}
