//! Core: what clients ask (submit, cancel, logs).
use super::*;

impl Core {
    // ------------------------------------------------------------------ the client side

    pub fn submit(&mut self, v: ValidatedJob) -> Result<pb::JobStatus, Status> {
        // The state directory holds the token: a model written there would be shared with it.
        let state = self.db.dir();
        let state = state.canonicalize().unwrap_or_else(|_| state.to_path_buf());
        if v.spec.output_dir.starts_with(&state) {
            return Err(Status::invalid_argument(format!(
                "{}: `output_dir`: {} is inside the coordinator's state directory {} (its \
                 database and token): give another directory",
                v.source_name,
                v.spec.output_dir.display(),
                state.display()
            )));
        }
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
            last_eval: None,
            best_checkpoint: None,
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
                attempt_start_step: None,
                attempt_started: None,
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
        for w in &v.warnings {
            self.event(&id, "", "warning", &format!("deepspeed: {w}"));
        }
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

    /// The stored events of a job ("" = the cluster's), oldest first.
    pub fn events(&self, job_id: &str) -> Result<Vec<pb::Event>, Status> {
        if !job_id.is_empty() && !self.jobs.contains_key(job_id) {
            return Err(Status::not_found(format!("no job {job_id:?}")));
        }
        Ok(self
            .db
            .events(job_id)?
            .into_iter()
            .map(|e| pb::Event {
                unix_time: e.unix,
                job_id: e.job_id,
                worker_id: e.worker_id,
                kind: e.kind,
                message: e.message,
            })
            .collect())
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
}
