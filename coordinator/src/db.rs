//! The job database: SQLite in WAL mode at `<state_dir>/herd.db`. Only the coordinator opens it.
//!
//! It holds every job's per-attempt collective secret, so the database and its `-wal` / `-shm`
//! files are the owner's alone (mode 0600; SQLite gives the side files the database's mode),
//! and a state directory the coordinator creates is 0700.
//!
//! The in-memory state is written through on every change, so a coordinator that is killed and
//! started again reloads workers, jobs, the current attempt's rank assignments, checkpoints,
//! metrics, events and log lines as they were.

use std::path::{Path, PathBuf};

use herd_proto::pb;
use rusqlite::{params, Connection};

use crate::error::{Error, Result};

mod open;
pub use open::create_private_dir;

pub const DB_FILE_NAME: &str = "herd.db";

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    /// Submission order (FIFO).
    pub seq: u64,
    pub state: pb::JobState,
    pub reason: String,
    pub source_name: String,
    /// The validated job, paths absolute (what assignments carry).
    pub spec_yaml: String,
    pub world_size: u32,
    pub max_restarts: u32,
    pub restarts: u32,
    pub restart_reasons: Vec<String>,
    /// 0 until the first placement; +1 at each (re)start.
    pub attempt: u32,
    /// The current attempt's collective secret.
    pub secret: Vec<u8>,
    pub step: u64,
    pub total_steps: u64,
    pub last_metric: Option<pb::Metric>,
    /// The newest evaluation during training (eval_strategy: steps).
    pub last_eval: Option<pb::EvalMetric>,
    /// metric_for_best_model: the checkpoint the newest save named best.
    pub best_checkpoint: Option<pb::BestCheckpoint>,
    pub last_checkpoint_step: u64,
    pub last_checkpoint_path: String,
    pub output_dir: String,
    pub submitted: f64,
    pub started: f64,
    pub finished: f64,
}

/// One rank of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankRecord {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub worker_id: String,
    pub last_step: u64,
    /// `pb::DoneKind` as i32; 0 while the rank runs.
    pub done_kind: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub id: String,
    pub seq: u64,
    pub host: String,
    pub device: String,
    pub collective_addr: String,
    pub pid: u32,
    pub registered: f64,
    pub last_seen: f64,
    pub alive: bool,
    /// The rank it was given ("" = none).
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    /// Whether the assignment went out in a heartbeat reply.
    pub delivered: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    pub job_id: String,
    pub step: u64,
    pub path: String,
    pub attempt: u32,
    pub unix: f64,
    pub rotated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub unix: f64,
    pub job_id: String,
    pub worker_id: String,
    pub kind: String,
    pub message: String,
}

/// Everything a restarted coordinator reloads.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub jobs: Vec<JobRecord>,
    /// The ranks of each job's current attempt.
    pub ranks: Vec<RankRecord>,
    pub workers: Vec<WorkerRecord>,
}

pub struct Db {
    conn: Connection,
    path: PathBuf,
}

impl Db {
    /// The directory the database lives in (the coordinator's state directory).
    pub fn dir(&self) -> &std::path::Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        }
    }
}

fn metric_to_json(m: &pb::Metric) -> String {
    serde_json::json!({
        "step": m.step, "epoch": m.epoch, "loss": m.loss, "learning_rate": m.learning_rate,
        "grad_norm": m.grad_norm, "tokens_per_sec": m.tokens_per_sec, "unix_time": m.unix_time,
    })
    .to_string()
}

fn eval_to_json(e: &pb::EvalMetric) -> String {
    serde_json::json!({ "step": e.step, "epoch": e.epoch, "values": e.values }).to_string()
}

fn eval_from_json(s: &str) -> Option<pb::EvalMetric> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(pb::EvalMetric {
        step: v.get("step")?.as_u64()?,
        epoch: v.get("epoch")?.as_f64()?,
        values: serde_json::from_value(v.get("values")?.clone()).ok()?,
    })
}

fn best_to_json(b: &pb::BestCheckpoint) -> String {
    serde_json::json!({ "step": b.step, "path": b.path, "metric": b.metric, "value": b.value })
        .to_string()
}

fn best_from_json(s: &str) -> Option<pb::BestCheckpoint> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(pb::BestCheckpoint {
        step: v.get("step")?.as_u64()?,
        path: v.get("path")?.as_str()?.to_string(),
        metric: v.get("metric")?.as_str()?.to_string(),
        value: v.get("value")?.as_f64()?,
    })
}

fn metric_from_json(s: &str) -> Option<pb::Metric> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
    Some(pb::Metric {
        step: v.get("step").and_then(|x| x.as_u64()).unwrap_or(0),
        epoch: f("epoch"),
        loss: f("loss"),
        learning_rate: f("learning_rate"),
        grad_norm: f("grad_norm"),
        tokens_per_sec: f("tokens_per_sec"),
        unix_time: f("unix_time"),
    })
}

impl Db {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ctx(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |e| Error::Db {
            path: self.path.clone(),
            source: e,
        }
    }

    /// Insert or replace a job's row.
    pub fn save_job(&self, j: &JobRecord) -> Result<()> {
        let reasons = serde_json::to_string(&j.restart_reasons).expect("strings serialize");
        self.conn
            .execute(
                "INSERT OR REPLACE INTO jobs (id, seq, state, reason, source_name, spec_yaml, world_size,
                 max_restarts, restarts, restart_reasons, attempt, secret, step, total_steps, last_metric,
                 last_checkpoint_step, last_checkpoint_path, output_dir, submitted, started, finished, last_eval,
                 best_checkpoint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
                params![
                    j.id,
                    j.seq as i64,
                    j.state as i32,
                    j.reason,
                    j.source_name,
                    j.spec_yaml,
                    j.world_size,
                    j.max_restarts,
                    j.restarts,
                    reasons,
                    j.attempt,
                    j.secret,
                    j.step as i64,
                    j.total_steps as i64,
                    j.last_metric.as_ref().map(metric_to_json),
                    j.last_checkpoint_step as i64,
                    j.last_checkpoint_path,
                    j.output_dir,
                    j.submitted,
                    j.started,
                    j.finished,
                    j.last_eval.as_ref().map(eval_to_json),
                    j.best_checkpoint.as_ref().map(best_to_json),
                ],
            )
            .map_err(self.ctx())?;
        Ok(())
    }

    pub fn save_rank(&self, r: &RankRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO assignments (job_id, attempt, rank, worker_id, last_step, done_kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.job_id, r.attempt, r.rank, r.worker_id, r.last_step as i64, r.done_kind],
            )
            .map_err(self.ctx())?;
        Ok(())
    }

    pub fn save_worker(&self, w: &WorkerRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO workers (id, seq, host, device, collective_addr, pid, registered,
                 last_seen, alive, job_id, attempt, rank, delivered)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    w.id,
                    w.seq as i64,
                    w.host,
                    w.device,
                    w.collective_addr,
                    w.pid,
                    w.registered,
                    w.last_seen,
                    w.alive,
                    w.job_id,
                    w.attempt,
                    w.rank,
                    w.delivered
                ],
            )
            .map_err(self.ctx())?;
        Ok(())
    }

    /// Record a complete checkpoint and mark the steps rank 0 rotated away.
    pub fn add_checkpoint(&self, c: &CheckpointRecord, rotated: &[u64]) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(self.ctx())?;
        tx.execute(
            "INSERT OR REPLACE INTO checkpoints (job_id, step, path, attempt, unix, rotated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                c.job_id,
                c.step as i64,
                c.path,
                c.attempt,
                c.unix,
                c.rotated
            ],
        )
        .map_err(self.ctx())?;
        for s in rotated {
            tx.execute(
                "UPDATE checkpoints SET rotated = 1 WHERE job_id = ?1 AND step = ?2",
                params![c.job_id, *s as i64],
            )
            .map_err(self.ctx())?;
        }
        tx.commit().map_err(self.ctx())?;
        Ok(())
    }

    pub fn checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let mut st = self
            .conn
            .prepare("SELECT job_id, step, path, attempt, unix, rotated FROM checkpoints WHERE job_id = ?1 ORDER BY step")
            .map_err(self.ctx())?;
        let rows = st
            .query_map(params![job_id], |r| {
                Ok(CheckpointRecord {
                    job_id: r.get(0)?,
                    step: r.get::<_, i64>(1)? as u64,
                    path: r.get(2)?,
                    attempt: r.get(3)?,
                    unix: r.get(4)?,
                    rotated: r.get(5)?,
                })
            })
            .map_err(self.ctx())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.ctx())
    }

    pub fn add_metric(&self, job_id: &str, attempt: u32, m: &pb::Metric) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO metrics (job_id, attempt, step, epoch, loss, learning_rate, grad_norm, tokens_per_sec, unix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    job_id,
                    attempt,
                    m.step as i64,
                    m.epoch,
                    m.loss,
                    m.learning_rate,
                    m.grad_norm,
                    m.tokens_per_sec,
                    m.unix_time
                ],
            )
            .map_err(self.ctx())?;
        Ok(())
    }

    /// The metric history of a job, oldest first.
    pub fn metrics(&self, job_id: &str) -> Result<Vec<pb::Metric>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT step, epoch, loss, learning_rate, grad_norm, tokens_per_sec, unix FROM metrics
                 WHERE job_id = ?1 ORDER BY id",
            )
            .map_err(self.ctx())?;
        let rows = st
            .query_map(params![job_id], |r| {
                Ok(pb::Metric {
                    step: r.get::<_, i64>(0)? as u64,
                    epoch: r.get(1)?,
                    loss: r.get(2)?,
                    learning_rate: r.get(3)?,
                    grad_norm: r.get(4)?,
                    tokens_per_sec: r.get(5)?,
                    unix_time: r.get(6)?,
                })
            })
            .map_err(self.ctx())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.ctx())
    }

    pub fn add_event(&self, e: &EventRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO events (unix, job_id, worker_id, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.unix, e.job_id, e.worker_id, e.kind, e.message],
            )
            .map_err(self.ctx())?;
        Ok(())
    }

    /// A job's events ("" = the coordinator's and workers' events), oldest first.
    pub fn events(&self, job_id: &str) -> Result<Vec<EventRecord>> {
        let mut st = self
            .conn
            .prepare("SELECT unix, job_id, worker_id, kind, message FROM events WHERE job_id = ?1 ORDER BY id")
            .map_err(self.ctx())?;
        let rows = st
            .query_map(params![job_id], |r| {
                Ok(EventRecord {
                    unix: r.get(0)?,
                    job_id: r.get(1)?,
                    worker_id: r.get(2)?,
                    kind: r.get(3)?,
                    message: r.get(4)?,
                })
            })
            .map_err(self.ctx())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.ctx())
    }

    /// Append log lines of one rank in one transaction; keeps at most `keep` lines per rank.
    pub fn add_log_lines(
        &self,
        job_id: &str,
        rank: u32,
        attempt: u32,
        lines: &[String],
        keep: usize,
    ) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction().map_err(self.ctx())?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO log_lines (job_id, rank, attempt, line) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(self.ctx())?;
            for l in lines {
                st.execute(params![job_id, rank, attempt, l])
                    .map_err(self.ctx())?;
            }
        }
        tx.execute(
            "DELETE FROM log_lines WHERE job_id = ?1 AND rank = ?2 AND id <= (
                 SELECT id FROM log_lines WHERE job_id = ?1 AND rank = ?2 ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            params![job_id, rank, keep as i64],
        )
        .map_err(self.ctx())?;
        tx.commit().map_err(self.ctx())?;
        Ok(())
    }

    /// The last `max_lines` lines of a rank, oldest first.
    pub fn log_tail(&self, job_id: &str, rank: u32, max_lines: usize) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT line FROM log_lines WHERE job_id = ?1 AND rank = ?2 ORDER BY id DESC LIMIT ?3")
            .map_err(self.ctx())?;
        let rows = st
            .query_map(params![job_id, rank, max_lines as i64], |r| {
                r.get::<_, String>(0)
            })
            .map_err(self.ctx())?;
        let mut v = rows
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.ctx())?;
        v.reverse();
        Ok(v)
    }

    /// Everything the coordinator keeps in memory.
    pub fn load(&self) -> Result<Loaded> {
        let mut out = Loaded::default();
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT id, seq, state, reason, source_name, spec_yaml, world_size, max_restarts, restarts,
                     restart_reasons, attempt, secret, step, total_steps, last_metric, last_checkpoint_step,
                     last_checkpoint_path, output_dir, submitted, started, finished, last_eval, best_checkpoint
                     FROM jobs ORDER BY seq",
                )
                .map_err(self.ctx())?;
            let rows = st
                .query_map([], |r| {
                    let reasons: String = r.get(9)?;
                    let metric: Option<String> = r.get(14)?;
                    Ok(JobRecord {
                        id: r.get(0)?,
                        seq: r.get::<_, i64>(1)? as u64,
                        state: pb::JobState::try_from(r.get::<_, i32>(2)?)
                            .unwrap_or(pb::JobState::Unspecified),
                        reason: r.get(3)?,
                        source_name: r.get(4)?,
                        spec_yaml: r.get(5)?,
                        world_size: r.get(6)?,
                        max_restarts: r.get(7)?,
                        restarts: r.get(8)?,
                        restart_reasons: serde_json::from_str(&reasons).unwrap_or_default(),
                        attempt: r.get(10)?,
                        secret: r.get(11)?,
                        step: r.get::<_, i64>(12)? as u64,
                        total_steps: r.get::<_, i64>(13)? as u64,
                        last_metric: metric.as_deref().and_then(metric_from_json),
                        last_eval: r
                            .get::<_, Option<String>>(21)?
                            .as_deref()
                            .and_then(eval_from_json),
                        best_checkpoint: r
                            .get::<_, Option<String>>(22)?
                            .as_deref()
                            .and_then(best_from_json),
                        last_checkpoint_step: r.get::<_, i64>(15)? as u64,
                        last_checkpoint_path: r.get(16)?,
                        output_dir: r.get(17)?,
                        submitted: r.get(18)?,
                        started: r.get(19)?,
                        finished: r.get(20)?,
                    })
                })
                .map_err(self.ctx())?;
            out.jobs = rows
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(self.ctx())?;
        }
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT a.job_id, a.attempt, a.rank, a.worker_id, a.last_step, a.done_kind
                     FROM assignments a JOIN jobs j ON a.job_id = j.id AND a.attempt = j.attempt
                     ORDER BY j.seq, a.rank",
                )
                .map_err(self.ctx())?;
            let rows = st
                .query_map([], |r| {
                    Ok(RankRecord {
                        job_id: r.get(0)?,
                        attempt: r.get(1)?,
                        rank: r.get(2)?,
                        worker_id: r.get(3)?,
                        last_step: r.get::<_, i64>(4)? as u64,
                        done_kind: r.get(5)?,
                    })
                })
                .map_err(self.ctx())?;
            out.ranks = rows
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(self.ctx())?;
        }
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT id, seq, host, device, collective_addr, pid, registered, last_seen, alive, job_id,
                     attempt, rank, delivered FROM workers ORDER BY id",
                )
                .map_err(self.ctx())?;
            let rows = st
                .query_map([], |r| {
                    Ok(WorkerRecord {
                        id: r.get(0)?,
                        seq: r.get::<_, i64>(1)? as u64,
                        host: r.get(2)?,
                        device: r.get(3)?,
                        collective_addr: r.get(4)?,
                        pid: r.get(5)?,
                        registered: r.get(6)?,
                        last_seen: r.get(7)?,
                        alive: r.get(8)?,
                        job_id: r.get(9)?,
                        attempt: r.get(10)?,
                        rank: r.get(11)?,
                        delivered: r.get(12)?,
                    })
                })
                .map_err(self.ctx())?;
            out.workers = rows
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(self.ctx())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
