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
}

impl Worker {
    fn holds(&self, job_id: &str, attempt: u32) -> bool {
        self.rec.job_id == job_id && self.rec.attempt == attempt
    }
    fn idle(&self) -> bool {
        self.rec.alive && self.rec.job_id.is_empty() && self.reported_job.is_empty()
    }
    fn release(&mut self) {
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

    fn event(&self, job_id: &str, worker_id: &str, kind: &str, message: &str) {
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
                }
            })
            .collect();
        pb::JobStatus {
            job_id: r.id.clone(),
            state: r.state as i32,
            reason: r.reason.clone(),
            world_size: r.world_size,
            step: r.step,
            total_steps: r.total_steps,
            restarts: r.restarts,
            max_restarts: r.max_restarts,
            restart_reasons: r.restart_reasons.clone(),
            ranks,
            last_metric: r.last_metric,
            last_checkpoint_step: r.last_checkpoint_step,
            output_dir: r.output_dir.clone(),
            submitted_unix: r.submitted,
            started_unix: r.started,
            finished_unix: r.finished,
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

    fn publish(&mut self, job_id: &str) {
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

    fn save_job(&mut self, job_id: &str) -> Result<()> {
        if let Some(j) = self.jobs.get(job_id) {
            self.db.save_job(&j.rec)?;
        }
        self.publish(job_id);
        Ok(())
    }

    fn save_worker(&self, worker_id: &str) -> Result<()> {
        if let Some(w) = self.workers.get(worker_id) {
            self.db.save_worker(&w.rec)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ the client side

    pub fn submit(&mut self, v: ValidatedJob) -> Result<pb::JobStatus, Status> {
        let out = v.spec.output_dir.display().to_string();
        if let Some(other) = self
            .jobs
            .values()
            .find(|j| !is_terminal(j.rec.state) && j.rec.output_dir == out)
        {
            return Err(Status::failed_precondition(format!(
                "{}: `output_dir`: {out} is the output of {} ({}), which has not ended",
                v.source_name,
                other.rec.id,
                other.rec.state.as_str_name()
            )));
        }
        let seq = self.next_job_seq;
        let id = format!("job-{seq}");
        let rec = JobRecord {
            id: id.clone(),
            seq,
            state: JobState::Queued,
            reason: "waiting to be scheduled".into(),
            source_name: v.source_name.clone(),
            spec_yaml: v.yaml,
            world_size: v.spec.world_size as u32,
            max_restarts: v.spec.max_restarts,
            restarts: 0,
            restart_reasons: Vec::new(),
            attempt: 0,
            secret: Vec::new(),
            step: 0,
            total_steps: 0,
            last_metric: None,
            last_checkpoint_step: 0,
            last_checkpoint_path: String::new(),
            output_dir: out,
            submitted: unix_now(),
            started: 0.0,
            finished: 0.0,
        };
        self.db.save_job(&rec)?;
        self.next_job_seq += 1;
        self.jobs.insert(
            id.clone(),
            Job {
                rec,
                ranks: Vec::new(),
            },
        );
        self.event(
            &id,
            "",
            "submitted",
            &format!(
                "{} ({} records, world_size {})",
                v.source_name, v.records, v.spec.world_size
            ),
        );
        self.schedule()?;
        self.job_status(&id)
    }

    pub fn cancel(&mut self, job_id: &str) -> Result<pb::JobStatus, Status> {
        let state = self
            .jobs
            .get(job_id)
            .ok_or_else(|| Status::not_found(format!("no job {job_id:?}")))?
            .rec
            .state;
        if is_terminal(state) {
            return self.job_status(job_id);
        }
        self.end_job(job_id, JobState::Cancelled, "cancelled by a client".into())?;
        self.schedule()?;
        self.job_status(job_id)
    }

    pub fn logs(&self, job_id: &str, rank: u32, max_lines: u32) -> Result<Vec<String>, Status> {
        if !self.jobs.contains_key(job_id) {
            return Err(Status::not_found(format!("no job {job_id:?}")));
        }
        let n = if max_lines == 0 {
            DEFAULT_LOG_LINES
        } else {
            max_lines as usize
        };
        Ok(self.db.log_tail(job_id, rank, n)?)
    }

    // ------------------------------------------------------------------ the worker side

    pub fn register(&mut self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
        let now = Instant::now();
        let interval_ms = self
            .cfg
            .heartbeat_interval
            .as_millis()
            .clamp(1, u32::MAX as u128) as u32;
        if !req.worker_id.is_empty() {
            if req.worker_id.len() > 128 || req.worker_id.chars().any(|c| c.is_control()) {
                return Err(Status::invalid_argument(
                    "worker_id must be at most 128 printable characters",
                ));
            }
            if let Some(w) = self.workers.get_mut(&req.worker_id) {
                // Re-registration (this coordinator restarted, or the worker lost contact): keep
                // the id and whatever rank it holds; its heartbeats say whether it still runs it.
                w.rec.host = req.host;
                w.rec.device = req.device;
                w.rec.collective_addr = req.collective_addr;
                w.rec.pid = req.pid;
                w.rec.alive = true;
                w.rec.last_seen = unix_now();
                w.last_heartbeat = now;
                w.seen = true;
                let msg = format!(
                    "re-registered ({} {} pid {})",
                    w.rec.host, w.rec.device, w.rec.pid
                );
                let id = w.rec.id.clone();
                self.save_worker(&id)?;
                self.event("", &id, "worker", &msg);
                return Ok(pb::RegisterResponse {
                    worker_id: id,
                    heartbeat_interval_ms: interval_ms,
                });
            }
        }
        let seq = self.next_worker_seq;
        let id = if req.worker_id.is_empty() {
            format!("w-{seq:06}")
        } else {
            req.worker_id.clone()
        };
        let rec = WorkerRecord {
            id: id.clone(),
            seq,
            host: req.host,
            device: req.device,
            collective_addr: req.collective_addr,
            pid: req.pid,
            registered: unix_now(),
            last_seen: unix_now(),
            alive: true,
            job_id: String::new(),
            attempt: 0,
            rank: 0,
            delivered: false,
        };
        self.db.save_worker(&rec)?;
        self.next_worker_seq += 1;
        let msg = format!(
            "registered ({} {} pid {} collective {})",
            rec.host, rec.device, rec.pid, rec.collective_addr
        );
        self.workers.insert(
            id.clone(),
            Worker {
                rec,
                last_heartbeat: now,
                seen: true,
                reported_job: String::new(),
                reported_attempt: 0,
                reported_step: 0,
                no_report_since: None,
            },
        );
        self.event("", &id, "worker", &msg);
        self.schedule()?;
        Ok(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: interval_ms,
        })
    }

    fn assignment_for(&self, job_id: &str, rank: u32) -> Option<pb::Assignment> {
        let job = self.jobs.get(job_id)?;
        let peers = job
            .ranks
            .iter()
            .map(|r| {
                self.workers
                    .get(&r.worker_id)
                    .map(|w| w.rec.collective_addr.clone())
                    .unwrap_or_default()
            })
            .collect();
        Some(pb::Assignment {
            job_id: job_id.to_string(),
            attempt: job.rec.attempt,
            job_yaml: job.rec.spec_yaml.clone(),
            rank,
            world_size: job.rec.world_size,
            start_step: job.rec.last_checkpoint_step,
            end_step: 0,
            resume_checkpoint: job.rec.last_checkpoint_path.clone(),
            peers,
            job_secret: job.rec.secret.clone(),
            nccl_id: Vec::new(),
        })
    }

    pub fn heartbeat(
        &mut self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let now = Instant::now();
        let mut resp = pb::HeartbeatResponse::default();
        let Some(w) = self.workers.get_mut(&req.worker_id) else {
            resp.unknown_worker = true;
            return Ok(resp);
        };
        w.last_heartbeat = now;
        w.seen = true;
        w.reported_job = req.job_id.clone();
        w.reported_attempt = req.attempt;
        w.reported_step = req.step;
        let came_back = !w.rec.alive;
        let wid = w.rec.id.clone();
        if came_back {
            w.rec.alive = true;
            w.rec.last_seen = unix_now();
            self.save_worker(&wid)?;
            self.event("", &wid, "worker", "heartbeats again");
        }
        let mut changed_job: Option<String> = None;
        if req.job_id.is_empty() {
            let w = self.workers.get_mut(&wid).expect("present");
            if !w.rec.job_id.is_empty() {
                if !w.rec.delivered {
                    w.rec.delivered = true;
                    let (job_id, rank) = (w.rec.job_id.clone(), w.rec.rank);
                    self.save_worker(&wid)?;
                    resp.assignment = self.assignment_for(&job_id, rank);
                    if let Some(a) = &resp.assignment {
                        self.event(
                            &job_id,
                            &wid,
                            "assigned",
                            &format!("rank {} of attempt {}", a.rank, a.attempt),
                        );
                    }
                } else if w.no_report_since.is_none() {
                    w.no_report_since = Some(now);
                }
            }
        } else {
            let holds = self.workers[&wid].holds(&req.job_id, req.attempt);
            let job_running = self
                .jobs
                .get(&req.job_id)
                .map(|j| (j.rec.state, j.rec.attempt))
                .filter(|(s, a)| *s == JobState::Running && *a == req.attempt)
                .is_some();
            let job_state = self.jobs.get(&req.job_id).map(|j| j.rec.state);
            let in_ranks = job_running
                && self.jobs[&req.job_id]
                    .ranks
                    .iter()
                    .any(|r| r.worker_id == wid);
            if holds {
                let w = self.workers.get_mut(&wid).expect("present");
                w.no_report_since = None;
                w.rec.delivered = true;
            } else if in_ranks && self.workers[&wid].rec.job_id.is_empty() {
                // We lost track (e.g. a restart before the delivery was recorded): adopt.
                let rank = self.jobs[&req.job_id]
                    .ranks
                    .iter()
                    .find(|r| r.worker_id == wid)
                    .map(|r| r.rank)
                    .unwrap_or(0);
                let w = self.workers.get_mut(&wid).expect("present");
                w.rec.job_id = req.job_id.clone();
                w.rec.attempt = req.attempt;
                w.rec.rank = rank;
                w.rec.delivered = true;
                self.save_worker(&wid)?;
            }
            let holds = self.workers[&wid].holds(&req.job_id, req.attempt);
            if job_running && holds {
                let job = self.jobs.get_mut(&req.job_id).expect("present");
                if let Some(r) = job.ranks.iter_mut().find(|r| r.worker_id == wid) {
                    r.last_step = r.last_step.max(req.step);
                }
                if job.rec.started == 0.0 {
                    job.rec.started = unix_now();
                    changed_job = Some(req.job_id.clone());
                }
            } else if job_state != Some(JobState::Succeeded) || !holds {
                let reason = match self.jobs.get(&req.job_id) {
                    None => "unknown job".to_string(),
                    Some(j) if j.rec.attempt != req.attempt => {
                        format!(
                            "attempt {} is over (the job is at attempt {})",
                            req.attempt, j.rec.attempt
                        )
                    }
                    Some(j) => {
                        format!("the job is {}: {}", j.rec.state.as_str_name(), j.rec.reason)
                    }
                };
                resp.stop = Some(pb::StopOrder {
                    job_id: req.job_id.clone(),
                    attempt: req.attempt,
                    checkpoint: false,
                    reason,
                });
            }
        }
        if let Some(j) = changed_job {
            self.save_job(&j)?;
        }
        Ok(resp)
    }

    pub fn progress(&mut self, req: pb::ProgressReport) -> Result<(), Status> {
        let Some(job) = self.jobs.get_mut(&req.job_id) else {
            return Err(Status::not_found(format!("no job {:?}", req.job_id)));
        };
        let current = job.rec.attempt == req.attempt;
        if current {
            if req.total_steps > 0 {
                job.rec.total_steps = req.total_steps;
            }
            if let Some(r) = job.ranks.iter_mut().find(|r| r.rank == req.rank) {
                if let Some(m) = &req.metric {
                    r.last_step = r.last_step.max(m.step);
                }
            }
            if job.rec.started == 0.0 {
                job.rec.started = unix_now();
            }
        }
        let rank_rec = job.ranks.iter().find(|r| r.rank == req.rank).cloned();
        let metric = if current && req.rank == 0 && job.rec.state == JobState::Running {
            req.metric
        } else {
            None
        };
        if let Some(m) = &metric {
            job.rec.step = m.step;
            job.rec.last_metric = Some(*m);
        }
        let attempt = job.rec.attempt;
        self.db.add_log_lines(
            &req.job_id,
            req.rank,
            req.attempt,
            &req.log_lines,
            LOG_LINES_KEPT,
        )?;
        if let Some(m) = &metric {
            self.db.add_metric(&req.job_id, attempt, m)?;
        }
        if current {
            if let Some(r) = rank_rec {
                self.db.save_rank(&r)?;
            }
            self.save_job(&req.job_id)?;
        }
        Ok(())
    }

    pub fn checkpoint(&mut self, req: pb::CheckpointReport) -> Result<(), Status> {
        let Some(job) = self.jobs.get_mut(&req.job_id) else {
            return Err(Status::not_found(format!("no job {:?}", req.job_id)));
        };
        if job.rec.attempt != req.attempt {
            return Ok(()); // a report of an attempt that is over
        }
        if req.step >= job.rec.last_checkpoint_step {
            job.rec.last_checkpoint_step = req.step;
            job.rec.last_checkpoint_path = req.path.clone();
        }
        let c = CheckpointRecord {
            job_id: req.job_id.clone(),
            step: req.step,
            path: req.path.clone(),
            attempt: req.attempt,
            unix: unix_now(),
            rotated: false,
        };
        self.db.add_checkpoint(&c, &req.rotated)?;
        self.event(
            &req.job_id,
            &req.worker_id,
            "checkpoint",
            &format!("step {} at {}", req.step, req.path),
        );
        self.save_job(&req.job_id)?;
        Ok(())
    }

    pub fn done(&mut self, req: pb::DoneReport) -> Result<(), Status> {
        let kind = DoneKind::try_from(req.kind).unwrap_or(DoneKind::Unspecified);
        // Free the worker if this ends the rank it holds.
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            if w.holds(&req.job_id, req.attempt) {
                w.release();
                if w.reported_job == req.job_id {
                    w.reported_job.clear();
                }
                let id = w.rec.id.clone();
                self.save_worker(&id)?;
            }
        }
        if !self.jobs.contains_key(&req.job_id) {
            return Err(Status::not_found(format!("no job {:?}", req.job_id)));
        }
        if !req.error.is_empty() {
            let lines: Vec<String> = req.error.lines().map(str::to_string).collect();
            self.db
                .add_log_lines(&req.job_id, req.rank, req.attempt, &lines, LOG_LINES_KEPT)?;
        }
        let job = self.jobs.get_mut(&req.job_id).expect("present");
        let current = job.rec.attempt == req.attempt;
        let running = current && job.rec.state == JobState::Running;
        if current {
            if let Some(r) = job.ranks.iter_mut().find(|r| r.rank == req.rank) {
                r.done_kind = kind as i32;
                r.last_step = r.last_step.max(req.step);
                let r = r.clone();
                self.db.save_rank(&r)?;
            }
        }
        self.event(
            &req.job_id,
            &req.worker_id,
            "rank done",
            &format!(
                "attempt {} rank {} {} at step {}",
                req.attempt,
                req.rank,
                kind.as_str_name(),
                req.step
            ),
        );
        if running {
            let host = if req.host.is_empty() {
                self.workers
                    .get(&req.worker_id)
                    .map(|w| w.rec.host.clone())
                    .unwrap_or_default()
            } else {
                req.host.clone()
            };
            let failure = |kind| Failure {
                rank: req.rank,
                worker_id: req.worker_id.clone(),
                host: host.clone(),
                step: req.step,
                kind,
            };
            match kind {
                DoneKind::Completed => {
                    if req.rank == 0 {
                        let job = self.jobs.get_mut(&req.job_id).expect("present");
                        job.rec.step = job.rec.step.max(req.step);
                        if job.rec.total_steps == 0 {
                            job.rec.total_steps = req.step;
                        }
                        self.end_job(
                            &req.job_id,
                            JobState::Succeeded,
                            format!("completed at step {}", req.step),
                        )?;
                    }
                }
                DoneKind::Paused => {
                    // Nobody told it to stop: its worker was preempted (SIGTERM) and is leaving.
                    // Give it no new rank until it heartbeats again.
                    if let Some(w) = self.workers.get_mut(&req.worker_id) {
                        w.rec.alive = false;
                        let id = w.rec.id.clone();
                        self.save_worker(&id)?;
                    }
                    self.rank_failed(&req.job_id, failure(FailureKind::Preempted))?
                }
                DoneKind::FailedRank | DoneKind::Unspecified => self.rank_failed(
                    &req.job_id,
                    failure(FailureKind::RankFailed {
                        error: req.error.clone(),
                        exit_code: req.exit_code,
                        signal: req.signal,
                    }),
                )?,
            }
        } else {
            self.publish(&req.job_id);
        }
        self.schedule()?;
        Ok(())
    }

    // ------------------------------------------------------------------ transitions

    /// End a job (SUCCEEDED, FAILED, CANCELLED): ranks not yet delivered are withdrawn; the
    /// others get a StopOrder in their next heartbeat (a job that is not RUNNING answers every
    /// heartbeat about it with one).
    fn end_job(&mut self, job_id: &str, state: JobState, reason: String) -> Result<()> {
        self.withdraw_undelivered(job_id)?;
        let job = self.jobs.get_mut(job_id).expect("present");
        job.rec.state = state;
        job.rec.reason = reason.clone();
        job.rec.finished = unix_now();
        self.event(job_id, "", state.as_str_name(), &reason);
        self.save_job(job_id)
    }

    fn withdraw_undelivered(&mut self, job_id: &str) -> Result<()> {
        let ids: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.rec.job_id == job_id && !w.rec.delivered)
            .map(|w| w.rec.id.clone())
            .collect();
        for id in ids {
            self.workers.get_mut(&id).expect("present").release();
            self.save_worker(&id)?;
        }
        Ok(())
    }

    /// A rank of a RUNNING job is lost: restart or fail (sched::restart_decision).
    fn rank_failed(&mut self, job_id: &str, failure: Failure) -> Result<()> {
        let Some(job) = self.jobs.get(job_id) else {
            return Ok(());
        };
        if job.rec.state != JobState::Running {
            return Ok(());
        }
        let d = sched::restart_decision(
            RestartState {
                attempt: job.rec.attempt,
                restarts: job.rec.restarts,
                max_restarts: job.rec.max_restarts,
            },
            &failure,
        );
        match d.action {
            Action::Fail => {
                let job = self.jobs.get_mut(job_id).expect("present");
                job.rec.restart_reasons.push(d.reason.clone());
                self.end_job(job_id, JobState::Failed, d.reason)?;
            }
            Action::Restart => {
                self.withdraw_undelivered(job_id)?;
                let job = self.jobs.get_mut(job_id).expect("present");
                if d.counts {
                    job.rec.restarts += 1;
                }
                job.rec.restart_reasons.push(d.reason.clone());
                job.rec.state = JobState::Restarting;
                job.rec.reason = d.reason.clone();
                self.event(job_id, &failure.worker_id, "RESTARTING", &d.reason);
                self.save_job(job_id)?;
            }
        }
        Ok(())
    }

    /// Place waiting jobs on idle workers (sched::schedule) and record why the others wait.
    pub fn schedule(&mut self) -> Result<()> {
        let mut pending: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| matches!(j.rec.state, JobState::Queued | JobState::Restarting))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        pending.sort_by_key(|j| j.rec.seq);
        let queued: Vec<PendingJob> = pending
            .iter()
            .map(|j| PendingJob {
                job_id: j.rec.id.clone(),
                world_size: j.rec.world_size as usize,
                draining_ranks: self
                    .workers
                    .values()
                    .filter(|w| {
                        w.rec.alive && (w.rec.job_id == j.rec.id || w.reported_job == j.rec.id)
                    })
                    .count(),
            })
            .collect();
        let idle: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.idle())
            .map(|w| w.rec.id.clone())
            .collect();
        let outcome = sched::schedule(&queued, &idle);
        for wait in outcome.waiting {
            let job = self.jobs.get_mut(&wait.job_id).expect("present");
            let reason = if job.rec.state == JobState::Restarting {
                let why = job.rec.restart_reasons.last().cloned().unwrap_or_default();
                format!("{}; {why}", wait.reason)
            } else {
                wait.reason
            };
            if job.rec.reason != reason {
                job.rec.reason = reason;
                self.save_job(&wait.job_id)?;
            }
        }
        for p in outcome.placements {
            self.place(&p.job_id, &p.workers)?;
        }
        Ok(())
    }

    fn place(&mut self, job_id: &str, workers: &[String]) -> Result<()> {
        let secret = random_bytes(32)?;
        let job = self.jobs.get_mut(job_id).expect("present");
        job.rec.attempt += 1;
        job.rec.secret = secret;
        job.rec.state = JobState::Running;
        job.rec.reason = String::new();
        job.rec.started = 0.0;
        job.rec.step = job.rec.last_checkpoint_step;
        let attempt = job.rec.attempt;
        job.ranks = workers
            .iter()
            .enumerate()
            .map(|(r, w)| RankRecord {
                job_id: job_id.to_string(),
                attempt,
                rank: r as u32,
                worker_id: w.clone(),
                last_step: job.rec.last_checkpoint_step,
                done_kind: 0,
            })
            .collect();
        let resume = job.rec.last_checkpoint_path.clone();
        for r in &job.ranks {
            self.db.save_rank(r)?;
        }
        for (r, wid) in workers.iter().enumerate() {
            let w = self.workers.get_mut(wid).expect("idle worker exists");
            w.rec.job_id = job_id.to_string();
            w.rec.attempt = attempt;
            w.rec.rank = r as u32;
            w.rec.delivered = false;
            w.no_report_since = None;
            self.save_worker(wid)?;
        }
        let from = if resume.is_empty() {
            "from the start".to_string()
        } else {
            format!("resuming from {resume}")
        };
        self.event(
            job_id,
            "",
            "RUNNING",
            &format!("attempt {attempt} on {} ({from})", workers.join(", ")),
        );
        self.save_job(job_id)
    }

    /// The periodic check: dead workers, ranks that vanished, scheduling.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        let timeout = self.cfg.heartbeat_timeout;
        let dead = sched::dead_workers(
            now,
            self.workers
                .values()
                .filter(|w| w.rec.alive)
                .map(|w| (w.rec.id.as_str(), w.last_heartbeat)),
            timeout,
        );
        for wid in dead {
            let w = self.workers.get_mut(&wid).expect("present");
            let silent_for = now.saturating_duration_since(w.last_heartbeat);
            w.rec.alive = false;
            w.reported_job.clear();
            let held = (!w.rec.job_id.is_empty())
                .then(|| (w.rec.job_id.clone(), w.rec.attempt, w.rec.rank));
            let seen = w.seen;
            let host = w.rec.host.clone();
            w.release();
            self.save_worker(&wid)?;
            self.event(
                "",
                &wid,
                "worker",
                &format!("dead: no heartbeat for {:.1} s", silent_for.as_secs_f64()),
            );
            if let Some((job_id, attempt, rank)) = held {
                if self
                    .jobs
                    .get(&job_id)
                    .is_some_and(|j| j.rec.attempt == attempt)
                {
                    let step = self.jobs[&job_id]
                        .ranks
                        .iter()
                        .find(|r| r.rank == rank)
                        .map(|r| r.last_step)
                        .unwrap_or(0);
                    let kind = if seen {
                        FailureKind::HeartbeatTimeout { silent_for }
                    } else {
                        FailureKind::NotBack
                    };
                    self.rank_failed(
                        &job_id,
                        Failure {
                            rank,
                            worker_id: wid.clone(),
                            host,
                            step,
                            kind,
                        },
                    )?;
                }
            }
        }
        let vanished: Vec<String> = self
            .workers
            .values()
            .filter(|w| {
                w.no_report_since
                    .is_some_and(|t| now.saturating_duration_since(t) > timeout)
            })
            .map(|w| w.rec.id.clone())
            .collect();
        for wid in vanished {
            let w = self.workers.get_mut(&wid).expect("present");
            let (job_id, attempt, rank, host) = (
                w.rec.job_id.clone(),
                w.rec.attempt,
                w.rec.rank,
                w.rec.host.clone(),
            );
            w.release();
            self.save_worker(&wid)?;
            if self
                .jobs
                .get(&job_id)
                .is_some_and(|j| j.rec.attempt == attempt)
            {
                let step = self.jobs[&job_id]
                    .ranks
                    .iter()
                    .find(|r| r.rank == rank)
                    .map(|r| r.last_step)
                    .unwrap_or(0);
                self.rank_failed(
                    &job_id,
                    Failure {
                        rank,
                        worker_id: wid.clone(),
                        host,
                        step,
                        kind: FailureKind::Vanished,
                    },
                )?;
            }
        }
        self.schedule()
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
