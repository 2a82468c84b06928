//! Core: what workers report (register, heartbeat, progress, checkpoints, done).
use super::*;

impl Core {
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
                left: false,
            },
        );
        self.event("", &id, "worker", &msg);
        self.schedule()?;
        Ok(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: interval_ms,
        })
    }

    pub(super) fn assignment_for(&self, job_id: &str, rank: u32) -> Option<pb::Assignment> {
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
        w.left = req.leaving;
        let wid = w.rec.id.clone();
        if req.leaving {
            // Shutting down: it finishes (and reports) the rank it holds, takes no new one.
            if w.rec.alive && w.rec.job_id.is_empty() {
                w.rec.alive = false;
                self.save_worker(&wid)?;
                self.event("", &wid, "worker", "leaving: it is shutting down");
            }
        } else if !w.rec.alive {
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

    /// A worker exiting on a signal. One that still holds a rank is left to the rank's own
    /// report or its heartbeat timeout, as a rank that vanished is.
    pub fn leave(&mut self, req: pb::LeaveRequest) -> Result<(), Status> {
        let Some(w) = self.workers.get_mut(&req.worker_id) else {
            return Err(Status::not_found(format!("no worker {:?}", req.worker_id)));
        };
        if !w.rec.job_id.is_empty() {
            return Ok(());
        }
        w.rec.alive = false;
        w.left = true;
        w.reported_job.clear();
        let wid = w.rec.id.clone();
        self.save_worker(&wid)?;
        self.event("", &wid, "worker", &format!("left: {}", req.reason));
        self.schedule()?;
        Ok(())
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
        // Before the metric: a merged report carries the start and a later step.
        let started = (current && req.rank == 0 && job.rec.state == JobState::Running)
            .then_some(req.started.as_ref())
            .flatten()
            .map(|s| {
                job.rec.step = s.start_step;
                job.attempt_start_step = Some(s.start_step);
                // The ETA's clock starts with the training loop, not with the model's loading.
                job.rec.started = unix_now();
                if s.resumed_from.is_empty() {
                    format!(
                        "attempt {} at step {} from the model",
                        req.attempt, s.start_step
                    )
                } else if s.changed.is_empty() {
                    format!(
                        "attempt {} at step {}, resumed from {}",
                        req.attempt, s.start_step, s.resumed_from
                    )
                } else {
                    format!(
                        "attempt {} at step {}, resumed from {}; the job changed since: {}",
                        req.attempt,
                        s.start_step,
                        s.resumed_from,
                        s.changed.join(", ")
                    )
                }
            });
        if let Some(line) = &started {
            job.attempt_started = Some(line.clone());
        }
        if let Some(m) = &metric {
            job.rec.step = m.step;
            job.rec.last_metric = Some(*m);
        }
        if current && req.rank == 0 && job.rec.state == JobState::Running && req.eval.is_some() {
            job.rec.last_eval = req.eval;
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
        if let Some(line) = started {
            self.event(&req.job_id, &req.worker_id, "started", &line);
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
            // The newest save names the best checkpoint as its trainer state does.
            job.rec.best_checkpoint = req.best.clone();
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

    /// Whether every rank of the job's current attempt has reported its end.
    fn all_ranks_done(&self, job_id: &str) -> bool {
        self.jobs
            .get(job_id)
            .is_some_and(|j| j.ranks.iter().all(|r| r.done_kind != 0))
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
        let restarting = current && job.rec.state == JobState::Restarting;
        // An error after the attempt ended (a cancel, a restart, a peer's failure) is the
        // rank being stopped: its collective was aborted or its peers went away.
        let kind = match kind {
            DoneKind::FailedRank | DoneKind::Unspecified
                if current && !running && !req.repeats_on_restart =>
            {
                // Its log ends with the error; say there what it was.
                let line = format!(
                    "rank {} stopped: its attempt had already ended (the job is {}), so the \
                     error above is the stop, not a failure",
                    req.rank,
                    job.rec.state.as_str_name()
                );
                self.db.add_log_lines(
                    &req.job_id,
                    req.rank,
                    req.attempt,
                    &[line],
                    LOG_LINES_KEPT,
                )?;
                DoneKind::Stopped
            }
            k => k,
        };
        if current {
            if let Some(r) = job.ranks.iter_mut().find(|r| r.rank == req.rank) {
                r.done_kind = kind as i32;
                r.last_step = r.last_step.max(req.step);
                let r = r.clone();
                self.db.save_rank(&r)?;
            }
            // A cancelled job's ranks finish their step and checkpoint after the CANCELLED
            // state: its status shows the step they stopped at, as its rank lines do.
            if job.rec.state == JobState::Cancelled && req.step > job.rec.step {
                job.rec.step = req.step;
                self.save_job(&req.job_id)?;
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
        if running || restarting {
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
            let rank_failed = || FailureKind::RankFailed {
                error: req.error.clone(),
                exit_code: req.exit_code,
                signal: req.signal,
                repeats_on_restart: req.repeats_on_restart,
            };
            match kind {
                // This attempt already ended on a peer's report; only an error that calls off
                // the restart changes anything.
                DoneKind::FailedRank | DoneKind::Unspecified if restarting => {
                    self.late_failure(&req.job_id, failure(rank_failed()))?
                }
                _ if restarting => self.publish(&req.job_id),
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
                // Nobody told it to stop. The ranks agree each step on stopping, so when one
                // worker is preempted every rank pauses at the same step; the signal is in the
                // report of the rank whose worker got it, and that one names the cause.
                DoneKind::Paused if req.signal == 0 && !self.all_ranks_done(&req.job_id) => {
                    self.publish(&req.job_id)
                }
                DoneKind::Paused => {
                    // Its worker was preempted (SIGTERM) and is leaving: give it no new rank
                    // until it heartbeats again.
                    if let Some(w) = self
                        .workers
                        .get_mut(&req.worker_id)
                        .filter(|_| req.signal != 0)
                    {
                        w.rec.alive = false;
                        w.left = true;
                        let id = w.rec.id.clone();
                        self.save_worker(&id)?;
                    }
                    self.rank_failed(&req.job_id, failure(FailureKind::Preempted))?
                }
                DoneKind::FailedRank | DoneKind::Unspecified | DoneKind::Stopped => {
                    self.rank_failed(&req.job_id, failure(rank_failed()))?
                }
            }
        } else {
            self.publish(&req.job_id);
        }
        self.schedule()?;
        Ok(())
    }

    // ------------------------------------------------------------------ transitions
}
