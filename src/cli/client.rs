//! What every client command shares: where the coordinator is, the token, a connected `Jobs`
//! client, gRPC errors turned into plain messages, and the job status rendered for people.

use anyhow::{anyhow, Context, Result};
use herd_proto::auth;
use herd_proto::pb::{self, jobs_client::JobsClient, JobState};
use herd_worker::daemon::{authed, channel, ClientTls};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7733";

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The coordinator's address (host:port or URL).
    #[arg(long, env = "HERD_COORDINATOR", default_value = DEFAULT_COORDINATOR, global = true)]
    pub coordinator: String,
    /// File holding the bearer token (default: env HERD_TOKEN, else <state-dir>/token).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// A coordinator state directory to read the token from (`<dir>/token`).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// PEM CA certificate that signed a TLS coordinator's certificate (for https:// addresses).
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires them (--tls-client-ca).
    #[arg(long, global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The client token: `--token-file`, else `HERD_TOKEN`, else `<state-dir>/token`, else none
/// (the call then goes out without one and the coordinator refuses it).
pub fn client_token(
    token_file: Option<&std::path::Path>,
    state_dir: Option<&std::path::Path>,
) -> Result<Option<String>> {
    if let Some(t) = auth::try_token_from_env_or_file(token_file).context("reading the token")? {
        return Ok(Some(t));
    }
    if let Some(dir) = state_dir {
        let p = auth::token_path(dir);
        return auth::read_token_file(&p)
            .map(Some)
            .context("reading the token");
    }
    Ok(None)
}

pub struct Client {
    pub jobs: JobsClient<Channel>,
    pub token: Option<String>,
    pub addr: String,
}

impl Client {
    pub fn connect(args: &ClientArgs) -> Result<Client> {
        let token = client_token(args.token_file.as_deref(), args.state_dir.as_deref())?;
        let tls = ClientTls::from_files(
            args.tls_ca.as_deref(),
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
        )?;
        let ch = channel(&args.coordinator, &tls)?;
        Ok(Client {
            jobs: JobsClient::new(ch),
            token,
            addr: args.coordinator.clone(),
        })
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        authed(self.token.as_deref(), msg)
    }

    /// Turn a gRPC error into a message that says what went wrong and what to do.
    pub fn explain(&self, what: &str, s: Status) -> anyhow::Error {
        explain(&self.addr, what, s)
    }
}

pub fn explain(addr: &str, what: &str, s: Status) -> anyhow::Error {
    let msg = s.message();
    match s.code() {
        Code::InvalidArgument => anyhow!("{what}: the coordinator refused it: {msg}"),
        Code::Unauthenticated => anyhow!(
            "{what}: unauthenticated: {msg} (pass --token-file, set HERD_TOKEN, or --state-dir of the coordinator)"
        ),
        Code::PermissionDenied => anyhow!("{what}: permission denied: {msg}"),
        Code::NotFound => anyhow!("{what}: not found: {msg}"),
        Code::Unavailable => anyhow!("{what}: cannot reach the coordinator at {addr}: {msg}"),
        Code::DeadlineExceeded => anyhow!("{what}: the coordinator at {addr} did not answer in time"),
        // What a closed connection looks like to tonic, typically a TLS mismatch.
        Code::Cancelled if addr.starts_with("https://") => anyhow!(
            "{what}: the coordinator at {addr} closed the connection during the TLS handshake \
             ({msg}); if it was started with --tls-client-ca, pass --tls-cert and --tls-key"
        ),
        Code::Cancelled => anyhow!(
            "{what}: the coordinator at {addr} closed the connection ({msg}); if it serves TLS \
             (--tls-cert), use an https:// address and --tls-ca"
        ),
        c => anyhow!("{what}: {c:?}: {msg}"),
    }
}

pub fn state_name(s: i32) -> &'static str {
    match JobState::try_from(s).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "UNKNOWN",
        JobState::Queued => "QUEUED",
        JobState::Running => "RUNNING",
        JobState::Restarting => "RESTARTING",
        JobState::Succeeded => "SUCCEEDED",
        JobState::Failed => "FAILED",
        JobState::Cancelled => "CANCELLED",
    }
}

pub fn is_terminal(s: i32) -> bool {
    matches!(
        JobState::try_from(s).unwrap_or(JobState::Unspecified),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Seconds to the end at the rate of the current attempt (None before two points are known).
pub fn eta_s(st: &pb::JobStatus, now: f64) -> Option<f64> {
    if st.total_steps == 0 || st.started_unix <= 0.0 || st.step >= st.total_steps {
        return None;
    }
    // Where the attempt began, as its rank 0 said; without that (its report not in yet, a
    // coordinator from before or restarted since), the last checkpoint, which a restart or a
    // preemption (not counted in `restarts`) resumes from; 0 for a job that never saved.
    let base = match st.attempt_start_step {
        Some(s) => s.min(st.step),
        None => st.last_checkpoint_step.min(st.step),
    };
    let done = st.step.saturating_sub(base);
    if done == 0 {
        return None;
    }
    let rate = (now - st.started_unix) / done as f64;
    Some(rate * (st.total_steps - st.step) as f64)
}

/// The one-line progress: bar, step/total, loss, lr, tokens/s, ETA.
pub fn progress_line(st: &pb::JobStatus, now: f64) -> String {
    const W: usize = 30;
    let frac = if st.total_steps > 0 {
        (st.step as f64 / st.total_steps as f64).min(1.0)
    } else {
        0.0
    };
    let fill = (frac * W as f64).round() as usize;
    let mut s = format!(
        "[{}{}] {}/{}",
        "#".repeat(fill),
        "-".repeat(W - fill),
        st.step,
        if st.total_steps > 0 {
            st.total_steps.to_string()
        } else {
            "?".into()
        }
    );
    if let Some(m) = &st.last_metric {
        s.push_str(&format!(
            "  loss {:.4}  lr {:.3e}  {:.0} tok/s",
            m.loss, m.learning_rate, m.tokens_per_sec
        ));
    }
    // Only a running job has an end to estimate (a queued, restarting or ended one does not).
    if st.state == JobState::Running as i32 {
        if let Some(eta) = eta_s(st, now) {
            s.push_str(&format!("  ETA {}", fmt_duration(eta)));
        }
    }
    s
}

/// The full status of a job for `herd status`.
pub fn render_status(st: &pb::JobStatus, now: f64) -> String {
    let mut out = format!(
        "job {}  {}  world_size {}  restarts {}/{}\n",
        st.job_id,
        state_name(st.state),
        st.world_size,
        st.restarts,
        st.max_restarts
    );
    out.push_str(&format!("  {}\n", progress_line(st, now)));
    if !st.reason.is_empty() {
        let label = match JobState::try_from(st.state).unwrap_or(JobState::Unspecified) {
            JobState::Queued => "queued",
            JobState::Restarting => "restarting",
            JobState::Failed => "failed",
            _ => "reason",
        };
        out.push_str(&format!("  {label}: {}\n", st.reason));
    }
    for r in &st.ranks {
        out.push_str(&format!(
            "  rank {:>2}  {}  {}  step {}",
            r.rank, r.worker_id, r.host, r.last_step
        ));
        // How a rank ended, or why its worker is silent, says more than a growing age; an
        // ended job's last heartbeats say nothing.
        match r.state.as_str() {
            "" | "running" if !is_terminal(st.state) => {
                out.push_str(&format!("  heartbeat {:.1}s ago", r.heartbeat_age_s))
            }
            "worker lost" if !is_terminal(st.state) => out.push_str(&format!(
                "  worker lost (last heartbeat {:.0}s ago)",
                r.heartbeat_age_s
            )),
            "" | "running" => {}
            state => out.push_str(&format!("  {state}")),
        }
        out.push('\n');
    }
    for (i, r) in st.restart_reasons.iter().enumerate() {
        out.push_str(&format!("  restart {}: {r}\n", i + 1));
    }
    if !st.attempt_started.is_empty() {
        out.push_str(&format!("  started: {}\n", st.attempt_started));
    }
    if let Some(e) = &st.last_eval {
        let values: Vec<String> = e
            .values
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        out.push_str(&format!(
            "  eval at step {}: {}\n",
            e.step,
            values.join("  ")
        ));
    }
    if st.last_checkpoint_step > 0 {
        out.push_str(&format!(
            "  last checkpoint: step {}\n",
            st.last_checkpoint_step
        ));
    }
    if let Some(b) = &st.best_checkpoint {
        out.push_str(&format!(
            "  best checkpoint: step {} ({} {:.4}) at {}\n",
            b.step, b.metric, b.value, b.path
        ));
    }
    out.push_str(&format!("  output_dir: {}\n", st.output_dir));
    if st.finished_unix > 0.0 && st.submitted_unix > 0.0 {
        out.push_str(&format!(
            "  finished {} after submission\n",
            fmt_duration(st.finished_unix - st.submitted_unix)
        ));
    }
    out
}

/// A job status as JSON (`--json`), for scripts and tests.
pub fn status_json(st: &pb::JobStatus) -> serde_json::Value {
    let m = st.last_metric.as_ref().map(|m| {
        serde_json::json!({
            "step": m.step, "epoch": m.epoch, "loss": m.loss, "learning_rate": m.learning_rate,
            "grad_norm": m.grad_norm, "tokens_per_sec": m.tokens_per_sec, "unix_time": m.unix_time,
        })
    });
    serde_json::json!({
        "job_id": st.job_id,
        "state": state_name(st.state),
        "reason": st.reason,
        "world_size": st.world_size,
        "step": st.step,
        "total_steps": st.total_steps,
        "restarts": st.restarts,
        "max_restarts": st.max_restarts,
        "restart_reasons": st.restart_reasons,
        "attempt_started": st.attempt_started,
        "ranks": st.ranks.iter().map(|r| serde_json::json!({
            "rank": r.rank, "worker_id": r.worker_id, "host": r.host, "last_step": r.last_step,
            "heartbeat_age_s": r.heartbeat_age_s, "state": r.state,
        })).collect::<Vec<_>>(),
        "last_metric": m,
        "last_eval": st.last_eval.as_ref().map(|e| serde_json::json!({
            "step": e.step, "epoch": e.epoch, "values": e.values,
        })),
        "last_checkpoint_step": st.last_checkpoint_step,
        "best_checkpoint": st.best_checkpoint.as_ref().map(|b| serde_json::json!({
            "step": b.step, "path": b.path, "metric": b.metric, "value": b.value,
        })),
        "output_dir": st.output_dir,
        "submitted_unix": st.submitted_unix,
        "started_unix": st.started_unix,
        "attempt_start_step": st.attempt_start_step,
        "finished_unix": st.finished_unix,
    })
}

/// A tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM: a server's graceful shutdown.
pub async fn shutdown_signal(what: &str) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("{what} shutting down");
}

pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One event line: `2026-11-22 05:12:01Z  RESTARTING  w-000002  rank 1 ...`.
pub fn render_event(e: &pb::Event) -> String {
    let mut line = format!("{}  {}", utc(e.unix_time), e.kind);
    if !e.worker_id.is_empty() {
        line.push_str(&format!("  {}", e.worker_id));
    }
    line.push_str(&format!("  {}", e.message));
    line
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (proleptic Gregorian, UTC; Howard Hinnant's
/// days-to-civil algorithm, so no date crate is needed for one format).
pub fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00Z"); // a leap day
        assert_eq!(utc(1_795_324_321.5), "2026-11-22 05:12:01Z");
        assert_eq!(utc(4_102_444_799.0), "2099-12-31 23:59:59Z");
    }

    fn st() -> pb::JobStatus {
        pb::JobStatus {
            job_id: "j-1".into(),
            state: JobState::Running as i32,
            world_size: 2,
            step: 5,
            total_steps: 10,
            started_unix: 100.0,
            max_restarts: 3,
            last_metric: Some(pb::Metric {
                step: 5,
                loss: 1.5,
                learning_rate: 1e-3,
                tokens_per_sec: 1234.0,
                ..Default::default()
            }),
            ranks: vec![pb::RankStatus {
                rank: 0,
                worker_id: "w-1".into(),
                host: "h".into(),
                last_step: 5,
                heartbeat_age_s: 0.4,
                state: "running".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn progress_shows_step_loss_lr_tps_eta() {
        let line = progress_line(&st(), 110.0);
        assert!(line.contains("5/10"), "{line}");
        assert!(line.contains("loss 1.5000"), "{line}");
        assert!(line.contains("lr 1.000e-3"), "{line}");
        assert!(line.contains("1234 tok/s"), "{line}");
        assert!(line.contains("ETA 0:10"), "{line}");
        for state in [JobState::Queued, JobState::Restarting, JobState::Cancelled] {
            let mut s = st();
            s.state = state as i32;
            let line = progress_line(&s, 110.0);
            assert!(!line.contains("ETA"), "{state:?}: {line}");
            assert!(line.contains("1234 tok/s"), "{state:?}: {line}");
        }
    }

    #[test]
    fn status_lists_ranks_and_reasons() {
        let mut s = st();
        s.restarts = 1;
        s.restart_reasons = vec!["rank 1 died".into()];
        s.last_checkpoint_step = 4;
        let text = render_status(&s, 110.0);
        assert!(
            text.contains("rank  0  w-1  h  step 5  heartbeat 0.4s ago"),
            "{text}"
        );
        assert!(text.contains("restart 1: rank 1 died"), "{text}");
        assert!(!text.contains("started:"), "{text}");
        s.attempt_started = "attempt 2 at step 4, resumed from /out/checkpoint-4".into();
        let text = render_status(&s, 110.0);
        assert!(
            text.contains("  started: attempt 2 at step 4, resumed from /out/checkpoint-4\n"),
            "{text}"
        );
        assert!(text.contains("restarts 1/3"), "{text}");
        assert!(!text.contains("best checkpoint"), "{text}");
        s.best_checkpoint = Some(pb::BestCheckpoint {
            step: 4,
            path: "/out/checkpoint-4".into(),
            metric: "eval_loss".into(),
            value: 1.23456,
        });
        let text = render_status(&s, 110.0);
        assert!(
            text.contains("best checkpoint: step 4 (eval_loss 1.2346) at /out/checkpoint-4\n"),
            "{text}"
        );
        assert_eq!(status_json(&s)["best_checkpoint"]["step"], 4);
        s.state = JobState::Succeeded as i32;
        let text = render_status(&s, 110.0);
        assert!(text.contains("rank  0  w-1  h  step 5\n"), "{text}");
        s.ranks[0].state = "completed".into();
        let text = render_status(&s, 110.0);
        assert!(
            text.contains("rank  0  w-1  h  step 5  completed\n"),
            "{text}"
        );
        assert_eq!(status_json(&s)["ranks"][0]["state"], "completed");
        let mut r = st();
        r.state = JobState::Restarting as i32;
        r.ranks[0].state = "worker left".into();
        r.ranks[0].heartbeat_age_s = 41.0;
        let text = render_status(&r, 110.0);
        assert!(text.contains("step 5  worker left\n"), "{text}");
        r.ranks[0].state = "worker lost".into();
        let text = render_status(&r, 110.0);
        assert!(
            text.contains("step 5  worker lost (last heartbeat 41s ago)\n"),
            "{text}"
        );
        // The job failed since: the rank that never reported is still told as lost.
        r.state = JobState::Failed as i32;
        let text = render_status(&r, 110.0);
        assert!(text.contains("step 5  worker lost\n"), "{text}");
        let mut q = st();
        q.state = JobState::Queued as i32;
        q.reason = "waiting for 4 idle workers (2 idle)".into();
        assert!(render_status(&q, 0.0).contains("queued: waiting for 4 idle workers"));
    }

    #[test]
    fn eta_needs_progress() {
        let mut s = st();
        s.step = 0;
        assert!(eta_s(&s, 110.0).is_none());
        assert_eq!(fmt_duration(3725.0), "1:02:05");
    }

    #[test]
    fn eta_measures_the_rate_from_where_the_attempt_began() {
        // Resumed at step 160 of 300 (no restart counted: a resubmitted job), 10 s ago, now at
        // 170: 1 s per step, 130 steps to go.
        let mut s = st();
        s.step = 170;
        s.total_steps = 300;
        s.attempt_start_step = Some(160);
        assert_eq!(eta_s(&s, 110.0), Some(130.0));
        // A restart or a preemption (restarts stays 0) whose rank 0 has not said yet: from
        // the last checkpoint, not from step 0.
        s.attempt_start_step = None;
        s.last_checkpoint_step = 160;
        assert_eq!(eta_s(&s, 110.0), Some(130.0));
        s.restarts = 1;
        assert_eq!(eta_s(&s, 110.0), Some(130.0));
    }
}
