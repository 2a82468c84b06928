//! The coordinator's decisions as pure functions: gang scheduling, rank assignment, restart or
//! fail, dead-worker detection. No I/O, no clocks: callers pass `now`.

use std::time::{Duration, Instant};

/// A job that wants workers, in FIFO order (oldest submission first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJob {
    pub job_id: String,
    pub world_size: usize,
    /// Ranks of the previous attempt still running (they were told to stop). A job is not
    /// started again until they are gone, so two attempts never write one output_dir.
    pub draining_ranks: usize,
    /// Whether it ran before (a restart): its size fitted the cluster then.
    pub placed_before: bool,
    /// How long it has been in the queue since submission.
    pub waited: Duration,
}

/// How long a job bigger than the live cluster holds the queue before the jobs behind it may
/// start: workers started together register within seconds, so a cluster that is coming up
/// keeps FIFO order.
pub const OVERSIZED_GRACE: Duration = Duration::from_secs(60);

/// A job started on workers; `workers[r]` runs rank `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job_id: String,
    pub workers: Vec<String>,
}

/// A job that keeps waiting, and why (shown in its status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScheduleOutcome {
    pub placements: Vec<Placement>,
    pub waiting: Vec<Waiting>,
}

/// Deterministic ranks: the idle workers sorted by id; rank r gets the r-th. `None` when fewer
/// than `n` are idle.
pub fn assign_ranks(idle_workers: &[String], n: usize) -> Option<Vec<String>> {
    let mut sorted: Vec<String> = idle_workers.to_vec();
    sorted.sort();
    sorted.dedup();
    (sorted.len() >= n).then(|| sorted.into_iter().take(n).collect())
}

/// FIFO gang scheduling: walk the jobs oldest first; a job starts when `world_size` idle live
/// workers exist (taking the lowest ids, rank r ← r-th); the first job that cannot start blocks
/// the ones behind it (so a big job is never starved by small ones). A job that never ran and
/// has wanted more workers than are alive at all (`live_workers`, idle or busy) for
/// [`OVERSIZED_GRACE`] blocks nothing: no amount of waiting for the running jobs would start
/// it, so one oversized job does not stall the queue (Slurm holds such a job too, rather than
/// the partition). Once enough workers have joined it is first in line again. A restarting job
/// keeps its place whatever the count: it fitted before. Every job not placed gets a reason.
pub fn schedule(
    queued: &[PendingJob],
    idle_workers: &[String],
    live_workers: usize,
) -> ScheduleOutcome {
    let mut free: Vec<String> = idle_workers.to_vec();
    free.sort();
    free.dedup();
    let mut out = ScheduleOutcome::default();
    // The job first in line that holds the queue, and what it waits for: "2 idle, 2 needed"
    // alone would read as if this one could start.
    let mut blocked_by: Option<(&str, String)> = None;
    for job in queued {
        if let Some((head, why)) = &blocked_by {
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: format!(
                    "queued behind {head} (first in line, {why}); needs {} idle worker{} ({} \
                     idle)",
                    job.world_size,
                    plural(job.world_size),
                    free.len()
                ),
            });
            continue;
        }
        if job.draining_ranks > 0 {
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: format!(
                    "waiting for {} rank{} of the previous attempt to stop",
                    job.draining_ranks,
                    plural(job.draining_ranks)
                ),
            });
            blocked_by = Some((
                &job.job_id,
                "its previous attempt's ranks are stopping".into(),
            ));
            continue;
        }
        if job.world_size == 0 {
            // validate() refuses this; never place a job on no workers.
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: "world_size is 0".into(),
            });
            continue;
        }
        if job.world_size > live_workers && !job.placed_before && job.waited >= OVERSIZED_GRACE {
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: format!(
                    "needs {} worker{}, {live_workers} {} alive: waiting for more to join (jobs \
                     behind it may start meanwhile)",
                    job.world_size,
                    plural(job.world_size),
                    if live_workers == 1 { "is" } else { "are" }
                ),
            });
            continue;
        }
        if free.len() >= job.world_size {
            let workers: Vec<String> = free.drain(..job.world_size).collect();
            out.placements.push(Placement {
                job_id: job.job_id.clone(),
                workers,
            });
        } else {
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: format!(
                    "waiting for {} idle worker{} ({} idle)",
                    job.world_size,
                    plural(job.world_size),
                    free.len()
                ),
            });
            blocked_by = Some((
                &job.job_id,
                format!(
                    "waiting for {} idle worker{}",
                    job.world_size,
                    plural(job.world_size)
                ),
            ));
        }
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Why a rank of a running job ended before the job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The worker missed heartbeats for longer than the timeout.
    HeartbeatTimeout { silent_for: Duration },
    /// The rank reported FAILED_RANK.
    RankFailed {
        error: String,
        exit_code: i32,
        signal: i32,
        /// The worker says a restart would meet the same error (the job, its data or model).
        repeats_on_restart: bool,
    },
    /// The rank paused without being told to (SIGTERM to its worker: preemption).
    Preempted,
    /// The worker says it runs nothing, yet it never reported how the rank ended.
    Vanished,
    /// The coordinator restarted and the rank's worker did not come back in time.
    NotBack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub rank: u32,
    pub worker_id: String,
    pub host: String,
    pub step: u64,
    pub kind: FailureKind,
}

/// What restart_decision needs to know about the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartState {
    pub attempt: u32,
    pub restarts: u32,
    pub max_restarts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Restart,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// Whether this restart counts against `max_restarts` (preemption does not).
    pub counts: bool,
    /// Human-readable, recorded in restart_reasons / the job's reason.
    pub reason: String,
}

/// One line describing a failure, e.g. "rank 1 (worker w-000002 on h1, step 40): missed
/// heartbeats for 10.2 s".
pub fn describe_failure(f: &Failure) -> String {
    let what = match &f.kind {
        FailureKind::HeartbeatTimeout { silent_for } => {
            format!("missed heartbeats for {:.1} s", silent_for.as_secs_f64())
        }
        FailureKind::RankFailed {
            error,
            exit_code,
            signal,
            ..
        } => {
            let mut s = String::from("failed");
            if *signal != 0 {
                s.push_str(&format!(" (signal {signal})"));
            } else if *exit_code != 0 {
                s.push_str(&format!(" (exit code {exit_code})"));
            }
            let first = error
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            if !first.is_empty() {
                let short: String = first.chars().take(300).collect();
                s.push_str(": ");
                s.push_str(&short);
            }
            s
        }
        FailureKind::Preempted => "preempted (its worker was told to stop and checkpointed)".into(),
        FailureKind::Vanished => "stopped running without reporting how it ended".into(),
        FailureKind::NotBack => "did not come back after the coordinator restarted".into(),
    };
    let host = if f.host.is_empty() {
        String::new()
    } else {
        format!(" on {}", f.host)
    };
    format!(
        "rank {} (worker {}{host}, step {}): {what}",
        f.rank, f.worker_id, f.step
    )
}

/// Restart or fail, with the reason (torchft's quorum function style: the decision carries its
/// explanation). Preemption always restarts and does not count; an error the rank says a restart
/// would repeat fails the job at once; any other failure restarts while `restarts <
/// max_restarts` and fails the job after that.
pub fn restart_decision(job: RestartState, failure: &Failure) -> Decision {
    let what = describe_failure(failure);
    if failure.kind == FailureKind::Preempted {
        return Decision {
            action: Action::Restart,
            counts: false,
            reason: format!(
                "attempt {}: {what}; restarting (preemption does not count)",
                job.attempt
            ),
        };
    }
    if matches!(
        failure.kind,
        FailureKind::RankFailed {
            repeats_on_restart: true,
            ..
        }
    ) {
        return Decision {
            action: Action::Fail,
            counts: false,
            reason: format!("attempt {}: {what}{NOT_RESTARTED}", job.attempt),
        };
    }
    if job.restarts < job.max_restarts {
        Decision {
            action: Action::Restart,
            counts: true,
            reason: format!(
                "attempt {}: {what}; restart {} of {}",
                job.attempt,
                job.restarts + 1,
                job.max_restarts
            ),
        }
    } else {
        Decision {
            action: Action::Fail,
            counts: false,
            reason: format!(
                "attempt {}: {what}; no restarts left ({} of max_restarts {} used)",
                job.attempt, job.restarts, job.max_restarts
            ),
        }
    }
}

/// The reason of an attempt that a survivor's error ended, re-told once a peer's worker of that
/// attempt is found dead: a SIGKILLed or OOM-killed worker cannot report, so its peers' "connection
/// closed" reaches the coordinator first and would otherwise be blamed. Returns None when the
/// reason already leads with this rank or was already re-told.
pub fn likely_cause(reason: &str, attempt: u32, dead: &Failure) -> Option<String> {
    let prefix = format!("attempt {attempt}: ");
    let rest = reason.strip_prefix(&prefix)?;
    if rest.starts_with(&format!("rank {} ", dead.rank)) || rest.contains(LIKELY_CAUSED) {
        return None;
    }
    Some(format!(
        "{prefix}{}{LIKELY_CAUSED}{rest}",
        describe_failure(dead)
    ))
}

const LIKELY_CAUSED: &str = ", which likely caused: ";

const NOT_RESTARTED: &str = "; not restarted: the error comes from the job, its data or its \
                             model files, and a restart from the last checkpoint would meet it \
                             again";

/// What becomes of a restart already decided when a late report calls it off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalledOff {
    /// The attempt's reason re-told: the late rank's error first, what it likely caused after.
    pub reason: String,
    /// The restart had counted against max_restarts; it never ran, so it is given back.
    pub refund: bool,
}

/// A rank's own error can reach the coordinator after the "connection closed" of a peer it took
/// down, which already decided a restart. When that late error is one a restart would meet again
/// (the job, its data or model files), the restart, not yet placed, is called off and the job
/// fails with that error named first; otherwise (None) the restart stands. `reason` is the
/// attempt's restart reason as restart_decision (or likely_cause) wrote it.
pub fn call_off_restart(reason: &str, attempt: u32, late: &Failure) -> Option<CalledOff> {
    if !matches!(
        late.kind,
        FailureKind::RankFailed {
            repeats_on_restart: true,
            ..
        }
    ) {
        return None;
    }
    let prefix = format!("attempt {attempt}: ");
    let rest = reason.strip_prefix(&prefix)?;
    // The tail restart_decision put on a restart: "; restart N of M" (counted) or
    // "; restarting (preemption does not count)".
    let (earlier, tail) = rest.rsplit_once("; restart")?;
    Some(CalledOff {
        reason: format!(
            "{prefix}{}{LIKELY_CAUSED}{earlier}{NOT_RESTARTED}",
            describe_failure(late)
        ),
        refund: tail.starts_with(' '),
    })
}

/// A worker is dead when its last heartbeat is older than `timeout`.
pub fn is_dead(now: Instant, last_heartbeat: Instant, timeout: Duration) -> bool {
    now.saturating_duration_since(last_heartbeat) > timeout
}

/// A gap between two periodic checks beyond which the coordinator itself was stalled (stopped,
/// swapped out, a VM pause, a long fsync), far above the 250 ms tick.
pub const STALL: Duration = Duration::from_secs(2);

/// The time the coordinator was stalled between its checks at `last` and `now`, if it was:
/// the gap less the `tick` it expected. Workers' heartbeats sent meanwhile were not read, so
/// this much of their silence is not theirs and must not be counted against them.
pub fn stalled_for(last: Option<Instant>, now: Instant, tick: Duration) -> Option<Duration> {
    let gap = now.saturating_duration_since(last?);
    (gap > STALL).then(|| gap.saturating_sub(tick))
}

/// The ids of the workers whose last heartbeat is older than `timeout`, sorted.
pub fn dead_workers<'a>(
    now: Instant,
    last_heartbeats: impl IntoIterator<Item = (&'a str, Instant)>,
    timeout: Duration,
) -> Vec<String> {
    let mut v: Vec<String> = last_heartbeats
        .into_iter()
        .filter(|(_, last)| is_dead(now, *last, timeout))
        .map(|(id, _)| id.to_string())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests;
