//! `herd coordinator`: serve the job and worker services until SIGINT/SIGTERM.

use anyhow::{Context, Result};
use herd_coordinator::CoordinatorOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7733")]
    pub listen: SocketAddr,
    /// Where the job database (herd.db) and the token live.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Read the bearer token from this file (default: env HERD_TOKEN, else <state-dir>/token,
    /// created on first start).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A worker silent for longer than this is dead and its job restarts.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_timeout_s: f64,
    /// What workers are told to heartbeat at.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With TLS: require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also write the bound address to this file (atomically), for scripts.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

pub fn run(a: &CoordinatorArgs) -> Result<()> {
    anyhow::ensure!(
        a.heartbeat_timeout_s.is_finite() && a.heartbeat_timeout_s > 0.0,
        "--heartbeat-timeout-s must be a positive number of seconds"
    );
    let token = herd_proto::auth::try_token_from_env_or_file(a.token_file.as_deref())
        .context("reading the token")?;
    if let Some(t) = &token {
        herd_proto::auth::check_strength(t, "--token-file / HERD_TOKEN")?;
    }
    if !a.listen.ip().is_loopback() && a.tls_cert.is_none() {
        eprintln!(
            "herd: warning: listening on {} without TLS: the bearer token and the jobs' \
             collective secrets cross the network in the clear (give --tls-cert and --tls-key)",
            a.listen
        );
    }
    let mut opts = CoordinatorOptions::new(a.listen, &a.state_dir);
    opts.token = token;
    opts.heartbeat_timeout = Duration::from_secs_f64(a.heartbeat_timeout_s);
    opts.heartbeat_interval = Duration::from_millis(a.heartbeat_interval_ms.max(10));
    opts.tls = a.tls_cert.clone().zip(a.tls_key.clone());
    opts.tls_client_ca = a.tls_client_ca.clone();
    herd_coordinator::db::create_private_dir(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let token_note = if opts.token.is_some() {
        "the given token".to_string()
    } else {
        format!(
            "the token in {}",
            herd_proto::auth::token_path(&a.state_dir).display()
        )
    };
    // Resolve (and on first start create) the token before announcing the address, so a
    // client that reads <state-dir>/token after the announcement finds it.
    opts.token = Some(herd_coordinator::resolve_token(&opts)?);
    let rt = super::client::runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        if let Some(f) = &a.addr_file {
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, format!("{scheme}://{addr}\n"))
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, f).with_context(|| format!("writing {}", f.display()))?;
        }
        println!("herd coordinator listening on {scheme}://{addr}");
        let _ = std::io::stdout().flush();
        eprintln!(
            "herd coordinator: state in {}, clients authenticate with {token_note}",
            a.state_dir.display()
        );
        let shutdown = super::client::shutdown_signal("coordinator");
        herd_coordinator::serve_on(listener, opts, shutdown).await?;
        Ok(())
    })
}
