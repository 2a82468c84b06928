//! The coordinator's state machine: jobs, workers, attempts. Every change is written through to
//! the database and published to the job's watchers. Decisions come from [`crate::sched`].
//!
//! Worker life: registered → idle (alive, no rank, its last heartbeat said it runs nothing) →
//! given a rank (the assignment goes out in its next heartbeat reply) → running → its
//! `ReportDone` frees it. A worker whose heartbeats stop for `heartbeat_timeout` is dead; a worker
//! that says it runs nothing while we think it runs a rank, and sends no report within the
//! timeout, lost that rank.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herd_proto::pb::{self, DoneKind, JobState};
use herd_proto::JobSpec;
use tokio::sync::watch;
use tonic::Status;

use crate::db::{CheckpointRecord, Db, EventRecord, JobRecord, RankRecord, WorkerRecord};
use crate::error::{Error, Result};
use crate::sched::{self, Action, Failure, FailureKind, PendingJob, RestartState};
use crate::validate::ValidatedJob;

/// Log lines kept per rank in the database.
pub const LOG_LINES_KEPT: usize = 2000;
/// Lines GetLogs returns when the request says 0.
pub const DEFAULT_LOG_LINES: usize = 100;

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What a rank line says besides its step: how the rank ended, or why its worker is silent.
fn rank_state(rank: &RankRecord, worker: Option<&Worker>) -> &'static str {
    match DoneKind::try_from(rank.done_kind).unwrap_or(DoneKind::Unspecified) {
        DoneKind::Completed => return "completed",
        DoneKind::Paused => return "paused",
        DoneKind::FailedRank => return "failed",
        DoneKind::Stopped => return "stopped",
        DoneKind::Unspecified => {}
    }
    match worker {
        Some(w) if w.rec.alive => "running",
        Some(w) if w.left => "worker left",
        _ => "worker lost",
    }
}

fn is_terminal(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

#[derive(Debug, Clone, Copy)]
pub struct CoreConfig {
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
}

pub struct Job {
    pub rec: JobRecord,
    /// The current attempt's ranks (empty before the first placement).
    pub ranks: Vec<RankRecord>,
    /// The step the current attempt began at, from its rank 0's first report (kept in memory:
    /// status's ETA measures the attempt's rate from it).
    pub attempt_start_step: Option<u64>,
    /// How the current attempt began, as its rank 0 said (the "started" event's line).
    pub attempt_started: Option<String>,
}

pub struct Worker {
    pub rec: WorkerRecord,
    pub last_heartbeat: Instant,
    /// Whether it has heartbeated since this coordinator process started.
    pub seen: bool,
    /// The job its last heartbeat said it runs ("" = idle).
    pub reported_job: String,
    pub reported_attempt: u32,
    pub reported_step: u64,
    /// Since when it says it runs nothing while holding a delivered rank (awaiting ReportDone).
    pub no_report_since: Option<Instant>,
    /// It said it is leaving (a goodbye, a preemption) rather than falling silent.
    pub left: bool,
}

impl Worker {
    pub(super) fn holds(&self, job_id: &str, attempt: u32) -> bool {
        self.rec.job_id == job_id && self.rec.attempt == attempt
    }
    pub(super) fn idle(&self) -> bool {
        self.rec.alive && self.rec.job_id.is_empty() && self.reported_job.is_empty()
    }
    pub(super) fn release(&mut self) {
        self.rec.job_id.clear();
        self.rec.attempt = 0;
        self.rec.rank = 0;
        self.rec.delivered = false;
        self.no_report_since = None;
    }
}

pub struct Core {
    db: Db,
    cfg: CoreConfig,
    jobs: BTreeMap<String, Job>,
    workers: BTreeMap<String, Worker>,
    next_job_seq: u64,
    next_worker_seq: u64,
    watchers: HashMap<String, watch::Sender<pb::JobStatus>>,
    /// When the last periodic check ran (a long gap means this process was stalled).
    last_tick: Option<Instant>,
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).map_err(|e| Error::Random(e.to_string()))?;
    Ok(v)
}

impl Core {
    /// Load the state from the database. RUNNING jobs stay RUNNING; known workers get one
    /// heartbeat timeout (from now) to come back before their ranks count as lost.
    pub fn load(db: Db, cfg: CoreConfig) -> Result<Core> {
        let loaded = db.load()?;
        let now = Instant::now();
        let mut jobs = BTreeMap::new();
        let mut next_job_seq = 1;
        for rec in loaded.jobs {
            next_job_seq = next_job_seq.max(rec.seq + 1);
            jobs.insert(
                rec.id.clone(),
                Job {
                    rec,
                    ranks: Vec::new(),
                    attempt_start_step: None,
                    attempt_started: None,
                },
            );
        }
        for r in loaded.ranks {
            if let Some(j) = jobs.get_mut(&r.job_id) {
                j.ranks.push(r);
            }
        }
        let mut workers = BTreeMap::new();
        let mut next_worker_seq = 1;
        for rec in loaded.workers {
            next_worker_seq = next_worker_seq.max(rec.seq + 1);
            let running = !rec.job_id.is_empty() && rec.delivered;
            let w = Worker {
                reported_job: if running {
                    rec.job_id.clone()
                } else {
                    String::new()
                },
                reported_attempt: if running { rec.attempt } else { 0 },
                reported_step: 0,
                last_heartbeat: now,
                seen: false,
                no_report_since: None,
                left: false,
                rec,
            };
            workers.insert(w.rec.id.clone(), w);
        }
        let n_jobs = jobs.len();
        let n_workers = workers.len();
        let core = Core {
            db,
            cfg,
            jobs,
            workers,
            next_job_seq,
            next_worker_seq,
            watchers: HashMap::new(),
            last_tick: None,
        };
        if n_jobs + n_workers > 0 {
            tracing::info!(
                "reloaded {n_jobs} jobs and {n_workers} workers from {}",
                core.db.path().display()
            );
        }
        Ok(core)
    }

    pub fn config(&self) -> CoreConfig {
        self.cfg
    }

    pub(super) fn event(&self, job_id: &str, worker_id: &str, kind: &str, message: &str) {
        if job_id.is_empty() {
            tracing::info!(worker = worker_id, "{kind}: {message}");
        } else {
            let span = tracing::info_span!("job", id = job_id);
            let _g = span.enter();
            tracing::info!(worker = worker_id, "{kind}: {message}");
        }
        let e = EventRecord {
            unix: unix_now(),
            job_id: job_id.into(),
            worker_id: worker_id.into(),
            kind: kind.into(),
            message: message.into(),
        };
        if let Err(err) = self.db.add_event(&e) {
            tracing::error!("{err}");
        }
    }

    // ------------------------------------------------------------------ status and watching

    pub fn status(&self, job: &Job, now: Instant) -> pb::JobStatus {
        let r = &job.rec;
        let ranks = job
            .ranks
            .iter()
            .map(|rk| {
                let w = self.workers.get(&rk.worker_id);
                pb::RankStatus {
                    rank: rk.rank,
                    worker_id: rk.worker_id.clone(),
                    host: w.map(|w| w.rec.host.clone()).unwrap_or_default(),
                    last_step: rk.last_step,
                    heartbeat_age_s: w
                        .map(|w| {
                            now.saturating_duration_since(w.last_heartbeat)
                                .as_secs_f64()
                        })
                        .unwrap_or(0.0),
                    state: rank_state(rk, w).into(),
                }
            })
            .collect();
        // Rank 0's heartbeats carry every step; the job's step otherwise moves only with the
        // logged metrics (logging_steps apart). Restarting, it is where the attempt got to.
        let step = match r.state {
            JobState::Running | JobState::Restarting => job
                .ranks
                .iter()
                .find(|rk| rk.rank == 0)
                .map_or(r.step, |rk| r.step.max(rk.last_step)),
            _ => r.step,
        };
        pb::JobStatus {
            job_id: r.id.clone(),
            state: r.state as i32,
            reason: r.reason.clone(),
            world_size: r.world_size,
            step,
            total_steps: r.total_steps,
            restarts: r.restarts,
            max_restarts: r.max_restarts,
            restart_reasons: r.restart_reasons.clone(),
            ranks,
            last_metric: r.last_metric,
            last_eval: r.last_eval.clone(),
            best_checkpoint: r.best_checkpoint.clone(),
            last_checkpoint_step: r.last_checkpoint_step,
            output_dir: r.output_dir.clone(),
            submitted_unix: r.submitted,
            started_unix: r.started,
            finished_unix: r.finished,
            attempt_start_step: job.attempt_start_step,
            attempt_started: job.attempt_started.clone().unwrap_or_default(),
        }
    }

    pub fn job_status(&self, job_id: &str) -> Result<pb::JobStatus, Status> {
        let job = self
            .jobs
            .get(job_id)
            .ok_or_else(|| Status::not_found(format!("no job {job_id:?}")))?;
        Ok(self.status(job, Instant::now()))
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        let now = Instant::now();
        let mut v: Vec<&Job> = self.jobs.values().collect();
        v.sort_by_key(|j| j.rec.seq);
        v.into_iter().map(|j| self.status(j, now)).collect()
    }

    /// A receiver that sees the job's status now and after each change.
    pub fn subscribe(&mut self, job_id: &str) -> Result<watch::Receiver<pb::JobStatus>, Status> {
        let status = self.job_status(job_id)?;
        let tx = self
            .watchers
            .entry(job_id.to_string())
            .or_insert_with(|| watch::channel(status.clone()).0);
        tx.send_replace(status);
        Ok(tx.subscribe())
    }

    pub(super) fn publish(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let status = self.status(job, Instant::now());
        if let Some(tx) = self.watchers.get(job_id) {
            if tx.receiver_count() == 0 {
                self.watchers.remove(job_id);
            } else {
                tx.send_replace(status);
            }
        }
    }

    /// Drop every watch channel: open WatchJob streams end (used at shutdown).
    pub fn close_watchers(&mut self) {
        self.watchers.clear();
    }

    /// Refresh the watchers of running jobs (heartbeat ages move).
    pub fn publish_active(&mut self) {
        let ids: Vec<String> = self.watchers.keys().cloned().collect();
        for id in ids {
            self.publish(&id);
        }
    }

    pub(super) fn save_job(&mut self, job_id: &str) -> Result<()> {
        if let Some(j) = self.jobs.get(job_id) {
            self.db.save_job(&j.rec)?;
        }
        self.publish(job_id);
        Ok(())
    }

    pub(super) fn save_worker(&self, worker_id: &str) -> Result<()> {
        if let Some(w) = self.workers.get(worker_id) {
            self.db.save_worker(&w.rec)?;
        }
        Ok(())
    }

    /// For tests and the CLI: a job's record and spec.
    pub fn job_spec(&self, job_id: &str) -> Option<JobSpec> {
        let j = self.jobs.get(job_id)?;
        JobSpec::from_yaml_str(&j.rec.spec_yaml, &j.rec.source_name).ok()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

mod client;
mod lifecycle;
mod workers;
