//! One assigned rank: the trainer on its own thread, its events turned into reports.

use super::reporter::Report;
use crate::collective::{Collective, RingAborter, SingleProcess, TcpRing};
use crate::trainer::{self, Event, Outcome, RunOptions};
use herd_proto::{pb, JobSpec};
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedSender;

/// Log lines a rank keeps for its failure report.
const TAIL_LINES: usize = 30;

pub(super) struct RankCtx {
    pub worker_id: String,
    pub host: String,
    pub listener: Option<TcpListener>,
    pub timeout: Duration,
    pub reports: UnboundedSender<Report>,
    pub finished: UnboundedSender<(String, u32)>,
    /// `--device` (cpu or cuda:N), checked at start-up.
    pub device: String,
}

/// The daemon's view of a running rank.
pub(super) struct RankHandle {
    pub job_id: String,
    pub attempt: u32,
    pub stop: Arc<AtomicBool>,
    /// Steps completed (for heartbeats).
    pub step: Arc<AtomicU64>,
    /// The signal that stopped the rank (SIGTERM → reported with the PAUSED done).
    pub signal: Arc<AtomicI32>,
    /// The trainer thread returned and its done report is queued.
    pub finished: bool,
    /// Ends the rank's collective when the attempt is given up (a stop order).
    pub abort: CollectiveAbort,
    thread: Option<JoinHandle<()>>,
}

/// Lets the daemon end a rank's collective from outside (see [`RingAborter`]), also while its
/// ring is still forming; an abort asked for before the rank reaches its ring applies there.
#[derive(Clone, Default)]
pub(super) struct CollectiveAbort(Arc<std::sync::Mutex<AbortSlot>>);

#[derive(Default)]
struct AbortSlot {
    reason: Option<String>,
    ring: Option<RingAborter>,
}

impl CollectiveAbort {
    pub fn abort(&self, reason: &str) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let reason = slot
            .reason
            .get_or_insert_with(|| reason.to_string())
            .clone();
        if let Some(ring) = &slot.ring {
            ring.abort(&reason);
        }
    }

    /// Whether the daemon ended the collective (a stop order).
    fn ended(&self) -> bool {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.reason.is_some()
    }

    fn attach(&self, ring: RingAborter) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &slot.reason {
            ring.abort(reason);
        }
        slot.ring = Some(ring);
    }
}

impl RankHandle {
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Parse the assignment's peers (collective addresses by rank).
pub fn peers_from(peers: &[String], world_size: usize) -> Result<Vec<SocketAddr>, String> {
    if peers.len() != world_size {
        return Err(format!(
            "the assignment lists {} peers for world size {world_size}",
            peers.len()
        ));
    }
    peers
        .iter()
        .enumerate()
        .map(|(r, p)| {
            p.parse::<SocketAddr>()
                .map_err(|e| format!("peer of rank {r} `{p}`: {e}"))
        })
        .collect()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn start(a: pb::Assignment, ctx: RankCtx) -> RankHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let step = Arc::new(AtomicU64::new(a.start_step));
    let signal = Arc::new(AtomicI32::new(0));
    let (job_id, attempt) = (a.job_id.clone(), a.attempt);
    let abort = CollectiveAbort::default();
    let thread = {
        let (stop, step, signal) = (stop.clone(), step.clone(), signal.clone());
        let abort = abort.clone();
        std::thread::Builder::new()
            .name(format!("rank-{}-{}", a.job_id, a.rank))
            .spawn(move || {
                let finished = ctx.finished.clone();
                let reports = ctx.reports.clone();
                let key = (a.job_id.clone(), a.attempt);
                let done = run_rank(&a, ctx, stop, step, signal, abort);
                let _ = reports.send(Report::Done(done));
                let _ = finished.send(key);
            })
            .expect("spawning the rank thread")
    };
    RankHandle {
        job_id,
        attempt,
        stop,
        step,
        signal,
        finished: false,
        abort,
        thread: Some(thread),
    }
}

/// Collects a rank's log lines: new ones for the next progress report, a tail for failures.
struct Lines {
    new: Vec<String>,
    tail: VecDeque<String>,
}

impl Lines {
    fn push(&mut self, line: String) {
        tracing::debug!(target: "herd::rank", "{line}");
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.clone());
        self.new.push(line);
    }
}

fn run_rank(
    a: &pb::Assignment,
    ctx: RankCtx,
    stop: Arc<AtomicBool>,
    step: Arc<AtomicU64>,
    signal: Arc<AtomicI32>,
    abort: CollectiveAbort,
) -> pb::DoneReport {
    let span = tracing::info_span!("rank", job = %a.job_id, attempt = a.attempt, rank = a.rank);
    let _g = span.enter();
    let lines = std::cell::RefCell::new(Lines {
        new: vec![],
        tail: VecDeque::new(),
    });
    let progress = |total_steps: u64, metric: Option<pb::Metric>| pb::ProgressReport {
        eval: None,
        started: None,
        worker_id: ctx.worker_id.clone(),
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        total_steps,
        metric,
        log_lines: std::mem::take(&mut lines.borrow_mut().new),
    };
    let mut done = pb::DoneReport {
        worker_id: ctx.worker_id.clone(),
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        kind: pb::DoneKind::FailedRank as i32,
        step: step.load(Ordering::Relaxed),
        error: String::new(),
        host: ctx.host.clone(),
        exit_code: 0,
        signal: 0,
        repeats_on_restart: false,
    };

    let mut total_steps = 0u64;
    let mut last_tps = 0.0f64;
    let reports = ctx.reports.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        // The error, and whether a restart would meet it again (Error::repeats_on_restart).
        || -> Result<Outcome, (String, bool)> {
            let mut job = JobSpec::from_yaml_str(&a.job_yaml, &format!("job {}", a.job_id))
                .map_err(|e| (e.to_string(), true))?;
            let world = a.world_size as usize;
            job.world_size = world;
            if a.rank as usize >= world {
                return Err((
                    format!("rank {} is outside world size {world}", a.rank),
                    false,
                ));
            }
            let mut collective: Box<dyn Collective> = if world == 1 {
                Box::new(SingleProcess)
            } else {
                let peers = peers_from(&a.peers, world).map_err(|e| (e, false))?;
                let listener = ctx
                    .listener
                    .ok_or(("the collective listener is unavailable".to_string(), false))?;
                lines.borrow_mut().push(format!(
                    "rank {} joining the ring of {world} ({})",
                    a.rank,
                    a.peers.join(", ")
                ));
                // Attached before the ring forms, so a stop order also ends a formation
                // that waits on a neighbour that never comes.
                let aborter = RingAborter::default();
                abort.attach(aborter.clone());
                let ring = TcpRing::form(
                    a.rank as usize,
                    listener,
                    peers,
                    &a.job_secret,
                    ctx.timeout,
                    aborter,
                )
                .map_err(|e| (e.to_string(), false))?;
                Box::new(ring)
            };
            let until_step = (a.end_step > 0).then_some(a.end_step);
            let opts = RunOptions {
                until_step,
                stop: Some(stop.clone()),
                device: herd_kernels::device::DeviceSpec::parse(&ctx.device)
                    .map_err(|e| (e.to_string(), false))?,
            };
            let mut observer = |e: &Event| match e {
                Event::Started {
                    start_step,
                    total_steps: t,
                    examples,
                    parameters,
                    resumed_from,
                    changed_since_checkpoint,
                    ..
                } => {
                    total_steps = *t;
                    step.store(*start_step, Ordering::Relaxed);
                    let mut line = format!("rank {} training {parameters} parameters on {examples} examples, steps {start_step}..{t}", a.rank);
                    if let Some(d) = resumed_from {
                        line.push_str(&format!("; resumed from {}", d.display()));
                    }
                    lines.borrow_mut().push(line);
                    if !changed_since_checkpoint.is_empty() {
                        let line = trainer::resume::changed_line(changed_since_checkpoint);
                        lines.borrow_mut().push(format!("rank {} {line}", a.rank));
                    }
                    let mut report = progress(total_steps, None);
                    report.started = Some(pb::Started {
                        start_step: *start_step,
                        resumed_from: resumed_from
                            .as_ref()
                            .map(|d| d.display().to_string())
                            .unwrap_or_default(),
                        changed: changed_since_checkpoint.clone(),
                    });
                    let _ = reports.send(Report::Progress(report));
                }
                Event::Step {
                    step: s,
                    total_steps: t,
                    tokens_per_sec,
                    ..
                } => {
                    total_steps = *t;
                    step.store(*s, Ordering::Relaxed);
                    last_tps = *tokens_per_sec;
                }
                Event::Logged(entry) => {
                    lines.borrow_mut().push(entry.to_string());
                    let f = |k: &str| entry.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                    let metric = pb::Metric {
                        step: entry
                            .get("step")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(step.load(Ordering::Relaxed)),
                        epoch: f("epoch"),
                        loss: f("loss"),
                        learning_rate: f("learning_rate"),
                        grad_norm: f("grad_norm"),
                        tokens_per_sec: last_tps,
                        unix_time: now_unix(),
                    };
                    let _ = reports.send(Report::Progress(progress(total_steps, Some(metric))));
                }
                Event::Evaluated(entry) => {
                    lines.borrow_mut().push(entry.to_string());
                    let mut report = progress(total_steps, None);
                    report.eval = Some(eval_metric(entry));
                    let _ = reports.send(Report::Progress(report));
                }
                Event::Saved {
                    step: s,
                    path,
                    rotated,
                    best,
                } => {
                    let line = trainer::saved_line(*s, path, rotated, best.as_ref());
                    lines.borrow_mut().push(line);
                    let best = best.as_ref().map(|b| pb::BestCheckpoint {
                        step: b.step,
                        path: b.path.clone(),
                        metric: b.metric.clone(),
                        value: b.value,
                    });
                    let _ = reports.send(Report::Checkpoint(pb::CheckpointReport {
                        worker_id: ctx.worker_id.clone(),
                        job_id: a.job_id.clone(),
                        attempt: a.attempt,
                        step: *s,
                        path: path.display().to_string(),
                        rotated: rotated.clone(),
                        best,
                    }));
                }
                Event::Finished { summary, .. } => {
                    if !summary.is_null() {
                        lines.borrow_mut().push(summary.to_string());
                    }
                    // Only rank 0 writes the final model; the others just finished their part.
                    let line = match a.rank {
                        0 => trainer::finished_line(e),
                        _ => "done (rank 0 writes the final model)".to_string(),
                    };
                    lines.borrow_mut().push(format!("rank {} {line}", a.rank));
                }
            };
            let outcome = trainer::run(&job, &opts, collective.as_mut(), &mut observer)
                .map_err(|e| (render(&e), e.repeats_on_restart()));
            drop(collective);
            outcome
        },
    ));
    done.step = step.load(Ordering::Relaxed);
    match result {
        Ok(Ok(Outcome::Completed { steps })) => {
            done.kind = pb::DoneKind::Completed as i32;
            done.step = steps;
        }
        Ok(Ok(Outcome::Paused { step: s })) => {
            done.kind = pb::DoneKind::Paused as i32;
            done.step = s;
            done.signal = signal.load(Ordering::SeqCst);
            lines
                .borrow_mut()
                .push(format!("rank {} paused at step {s}", a.rank));
        }
        // The coordinator gave the attempt up and this daemon ended its collective: the error
        // that follows is the stop, not a failure of the rank. The error already names the
        // stop order ("... aborted: stop order from the coordinator: ..."): told once.
        Ok(Err((e, false))) if abort.ended() => {
            done.kind = pb::DoneKind::Stopped as i32;
            let line = format!("rank {} stopped at step {}: {e}", a.rank, done.step);
            tracing::warn!("{line}");
            lines.borrow_mut().push(line);
            done.error = e;
        }
        Ok(Err((e, repeats))) => {
            lines.borrow_mut().push(format!("error: {e}"));
            done.exit_code = 1;
            done.error = failure_text(&e, &lines.borrow().tail);
            done.repeats_on_restart = repeats;
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let e = format!("the rank panicked: {msg}");
            lines.borrow_mut().push(format!("error: {e}"));
            done.exit_code = 101;
            done.error = failure_text(&e, &lines.borrow().tail);
        }
    }
    if done.kind == pb::DoneKind::FailedRank as i32 {
        tracing::error!(
            "rank {} failed on {}: {}",
            a.rank,
            ctx.host,
            done.error.lines().next().unwrap_or("")
        );
    }
    // Flush the last lines before the done report.
    let last = progress(total_steps, None);
    if !last.log_lines.is_empty() {
        let _ = ctx.reports.send(Report::Progress(last));
    }
    done
}

fn failure_text(error: &str, tail: &VecDeque<String>) -> String {
    let mut s = error.to_string();
    if !tail.is_empty() {
        s.push_str("\n--- last log lines ---\n");
        for l in tail {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

fn render(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

/// The numbers of an HF eval log entry (`eval_loss`, `eval_accuracy`, ...), without the timings.
fn eval_metric(entry: &serde_json::Value) -> pb::EvalMetric {
    let values = entry
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            k.starts_with("eval_") && k.as_str() != "eval_runtime" && !k.ends_with("_per_second")
        })
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    pb::EvalMetric {
        step: entry.get("step").and_then(|v| v.as_u64()).unwrap_or(0),
        epoch: entry.get("epoch").and_then(|v| v.as_f64()).unwrap_or(0.0),
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_count() {
        let p = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        assert_eq!(peers_from(&p, 2).unwrap().len(), 2);
        assert!(peers_from(&p, 3)
            .unwrap_err()
            .contains("2 peers for world size 3"));
        assert!(peers_from(&["nope".to_string()], 1)
            .unwrap_err()
            .contains("rank 0"));
    }
}
