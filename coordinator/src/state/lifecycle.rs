//! Core: ending jobs, rank failures and restarts, scheduling, and the periodic tick.
use super::*;

impl Core {
    /// End a job (SUCCEEDED, FAILED, CANCELLED): ranks not yet delivered are withdrawn; the
    /// others get a StopOrder in their next heartbeat (a job that is not RUNNING answers every
    /// heartbeat about it with one).
    pub(super) fn end_job(&mut self, job_id: &str, state: JobState, reason: String) -> Result<()> {
        self.withdraw_undelivered(job_id)?;
        let job = self.jobs.get_mut(job_id).expect("present");
        job.rec.state = state;
        job.rec.reason = reason.clone();
        job.rec.finished = unix_now();
        self.event(job_id, "", state.as_str_name(), &reason);
        self.save_job(job_id)
    }

    pub(super) fn withdraw_undelivered(&mut self, job_id: &str) -> Result<()> {
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
    pub(super) fn rank_failed(&mut self, job_id: &str, failure: Failure) -> Result<()> {
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

    /// A rank's error arrives after a peer's report of the same attempt already decided a
    /// restart. If a restart would meet that error again, the restart (not yet placed: this
    /// rank's worker held it back) is called off and the job fails with that error named first
    /// (sched::call_off_restart), the restart given back to max_restarts.
    pub(super) fn late_failure(&mut self, job_id: &str, failure: Failure) -> Result<()> {
        let off = self
            .jobs
            .get(job_id)
            .filter(|j| j.rec.state == JobState::Restarting)
            .and_then(|j| {
                let reason = j.rec.restart_reasons.last()?;
                sched::call_off_restart(reason, j.rec.attempt, &failure)
            });
        let Some(off) = off else {
            self.publish(job_id); // a rank of the old attempt fewer to wait for
            return Ok(());
        };
        let job = self.jobs.get_mut(job_id).expect("present");
        if let Some(last) = job.rec.restart_reasons.last_mut() {
            *last = off.reason.clone();
        }
        if off.refund {
            job.rec.restarts = job.rec.restarts.saturating_sub(1);
        }
        self.end_job(job_id, JobState::Failed, off.reason)
    }

    /// A worker of `attempt` is found dead after a survivor's error already ended that attempt:
    /// its death is the likely cause, so the attempt's reason names it first
    /// (sched::likely_cause). The restart was already decided and counted.
    fn retell_cause(&mut self, job_id: &str, attempt: u32, dead: &Failure) -> Result<()> {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return Ok(());
        };
        if !matches!(job.rec.state, JobState::Restarting | JobState::Failed) {
            return Ok(());
        }
        let Some(last) = job.rec.restart_reasons.last_mut() else {
            return Ok(());
        };
        let Some(told) = sched::likely_cause(last, attempt, dead) else {
            return Ok(());
        };
        *last = told.clone();
        if job.rec.state == JobState::Failed {
            job.rec.reason = told;
        }
        // A RESTARTING job's reason is rebuilt from restart_reasons by the next schedule().
        self.save_job(job_id)
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
        let now = unix_now();
        let queued: Vec<PendingJob> = pending
            .iter()
            .map(|j| PendingJob {
                job_id: j.rec.id.clone(),
                world_size: j.rec.world_size as usize,
                placed_before: j.rec.attempt > 0,
                waited: Duration::from_secs_f64((now - j.rec.submitted).max(0.0)),
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
        let live = self.workers.values().filter(|w| w.rec.alive).count();
        let outcome = sched::schedule(&queued, &idle, live);
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

    pub(super) fn place(&mut self, job_id: &str, workers: &[String]) -> Result<()> {
        let secret = random_bytes(32)?;
        let job = self.jobs.get_mut(job_id).expect("present");
        job.rec.attempt += 1;
        job.rec.secret = secret;
        job.rec.state = JobState::Running;
        job.rec.reason = String::new();
        job.rec.started = 0.0;
        job.rec.step = job.rec.last_checkpoint_step;
        job.attempt_start_step = None;
        job.attempt_started = None;
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
        // Where training really begins, rank 0 says in its first report ("started"): it also
        // resumes from a checkpoint the coordinator never saw (one already in output_dir).
        let from = if resume.is_empty() {
            String::new()
        } else {
            format!(" (resuming from {resume})")
        };
        self.event(
            job_id,
            "",
            "RUNNING",
            &format!("attempt {attempt} on {}{from}", workers.join(", ")),
        );
        self.save_job(job_id)
    }

    /// The periodic check: dead workers, ranks that vanished, scheduling.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        let timeout = self.cfg.heartbeat_timeout;
        if let Some(stalled) = sched::stalled_for(self.last_tick, now, crate::TICK) {
            // Heartbeats that came while this process was stalled were not read yet: the
            // stall is credited to every worker rather than declaring healthy ones dead.
            tracing::warn!(
                "the coordinator was stalled for {:.1} s; not counted as workers' silence",
                stalled.as_secs_f64()
            );
            for w in self.workers.values_mut() {
                w.last_heartbeat = (w.last_heartbeat + stalled).min(now);
            }
        }
        self.last_tick = Some(now);
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
            let dead = format!("dead: no heartbeat for {:.1} s", silent_for.as_secs_f64());
            self.event("", &wid, "worker", &dead);
            if let Some((job_id, attempt, rank)) = held {
                // Also in the job's events: when a survivor's collective error restarted the
                // job first, this is the line that names the rank that actually died.
                self.event(
                    &job_id,
                    &wid,
                    "worker",
                    &format!("{dead} (it ran rank {rank} of attempt {attempt})"),
                );
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
                    let failure = Failure {
                        rank,
                        worker_id: wid.clone(),
                        host,
                        step,
                        kind,
                    };
                    self.retell_cause(&job_id, attempt, &failure)?;
                    self.rank_failed(&job_id, failure)?;
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
}
