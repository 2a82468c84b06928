//! `herd worker`: the daemon of one device. Runs until SIGINT/SIGTERM; a running rank then
//! checkpoints, reports PAUSED, and the worker exits 0.

use super::client::{client_token, runtime};
use anyhow::Result;
use herd_worker::daemon::{self, ClientTls, DaemonOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address (host:port or URL).
    #[arg(long, env = "HERD_COORDINATOR", default_value = super::client::DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// cpu, or cuda:N (needs a herd build with CUDA).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where this worker accepts its peers' collective connections (port 0: any free port).
    /// Default: 127.0.0.1:0 when the coordinator is on loopback, else 0.0.0.0:0 (peers are
    /// told the IP of this machine's route to the coordinator; see --collective-advertise).
    #[arg(long)]
    pub collective_listen: Option<SocketAddr>,
    /// The address peers dial (default: the listen address).
    #[arg(long)]
    pub collective_advertise: Option<SocketAddr>,
    /// Deadline for the ring to form and socket timeout of the collective, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub collective_timeout_s: f64,
    /// File holding the bearer token (default: env HERD_TOKEN, else <state-dir>/token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The coordinator's state directory, to read its token when on the same machine.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// PEM CA certificate of a TLS coordinator.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires them (--tls-client-ca).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Host name to report (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
}

pub fn run(a: &WorkerArgs) -> Result<()> {
    daemon::check_device(&a.device)?;
    anyhow::ensure!(
        a.collective_timeout_s > 0.0,
        "--collective-timeout-s must be positive"
    );
    let token = client_token(a.token_file.as_deref(), a.state_dir.as_deref())?;
    if token.is_none() {
        tracing::warn!("no token given (--token-file, HERD_TOKEN or --state-dir): the coordinator will refuse this worker");
    }
    let mut opts = DaemonOptions::new(a.coordinator.clone());
    opts.token = token;
    opts.device = a.device.clone();
    opts.collective_listen = a.collective_listen;
    opts.collective_advertise = a.collective_advertise;
    opts.collective_timeout = Duration::from_secs_f64(a.collective_timeout_s);
    if let Some(h) = &a.host {
        opts.host = h.clone();
    }
    opts.tls = ClientTls::from_files(
        a.tls_ca.as_deref(),
        a.tls_cert.as_deref().zip(a.tls_key.as_deref()),
    )?;
    runtime()?.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(0i32);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let sig = tokio::select! {
                _ = term.recv() => 15,
                _ = int.recv() => 2,
            };
            let _ = tx.send(sig);
            // A second signal (a person pressing Ctrl-C again) leaves now. Signals within a
            // second of the first are ignored: the kernel sends PR_SET_PDEATHSIG once per
            // re-parenting, so a dying `herd run` may deliver it twice.
            let first = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if first.elapsed() > std::time::Duration::from_secs(1) {
                    break;
                }
            }
            eprintln!("herd worker: second signal, exiting without waiting for the checkpoint");
            std::process::exit(130);
        });
        daemon::run(opts, rx).await?;
        Ok(())
    })
}
