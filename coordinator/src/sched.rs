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
}

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

/// Strict FIFO gang scheduling: walk the jobs oldest first; a job starts when `world_size` idle
/// live workers exist (taking the lowest ids, rank r ← r-th); the first job that cannot start
/// blocks the ones behind it (so a big job is never starved by small ones). Every job not placed
/// gets a reason.
pub fn schedule(queued: &[PendingJob], idle_workers: &[String]) -> ScheduleOutcome {
    let mut free: Vec<String> = idle_workers.to_vec();
    free.sort();
    free.dedup();
    let mut out = ScheduleOutcome::default();
    let mut blocked_by: Option<&str> = None;
    for job in queued {
        if let Some(head) = blocked_by {
            out.waiting.push(Waiting {
                job_id: job.job_id.clone(),
                reason: format!(
                    "queued behind {head} (first in line); needs {} idle worker{} ({} idle)",
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
            blocked_by = Some(&job.job_id);
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
            blocked_by = Some(&job.job_id);
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
mod tests {
    use super::*;

    #[test]
    fn a_stall_of_the_coordinator_is_not_the_workers_silence() {
        let t0 = Instant::now();
        let tick = Duration::from_millis(250);
        assert_eq!(stalled_for(None, t0, tick), None);
        assert_eq!(stalled_for(Some(t0), t0 + tick, tick), None);
        assert_eq!(stalled_for(Some(t0), t0 + STALL, tick), None);
        let paused = stalled_for(Some(t0), t0 + Duration::from_secs(20), tick).unwrap();
        assert_eq!(paused, Duration::from_millis(19_750));
        // Credited, a worker that last beat just before the pause is alive after it ...
        let timeout = Duration::from_secs(10);
        let now = t0 + Duration::from_secs(20);
        let last = t0 - Duration::from_millis(500);
        assert!(is_dead(now, last, timeout));
        assert!(!is_dead(now, last + paused, timeout));
        // ... and one silent for longer than the timeout before it is still dead.
        assert!(is_dead(now, t0 - Duration::from_secs(11) + paused, timeout));
    }

    fn dead_rank_1() -> Failure {
        Failure {
            rank: 1,
            worker_id: "w-2".into(),
            host: "h2".into(),
            step: 3,
            kind: FailureKind::HeartbeatTimeout {
                silent_for: Duration::from_millis(10_200),
            },
        }
    }

    #[test]
    fn a_dead_peer_is_named_before_the_survivor_it_took_down() {
        let survivor = Failure {
            rank: 0,
            worker_id: "w-1".into(),
            host: "h1".into(),
            step: 3,
            kind: FailureKind::RankFailed {
                error: "collective (tcp-ring) failed: rank 0: connection closed by rank 1".into(),
                exit_code: 1,
                signal: 0,
                repeats_on_restart: false,
            },
        };
        let first = restart_decision(
            RestartState {
                attempt: 2,
                restarts: 1,
                max_restarts: 3,
            },
            &survivor,
        )
        .reason;
        let told = likely_cause(&first, 2, &dead_rank_1()).unwrap();
        assert_eq!(
            told,
            "attempt 2: rank 1 (worker w-2 on h2, step 3): missed heartbeats for 10.2 s, which \
             likely caused: rank 0 (worker w-1 on h1, step 3): failed (exit code 1): collective \
             (tcp-ring) failed: rank 0: connection closed by rank 1; restart 2 of 3"
        );
        // Told once; another attempt's reason, or one that already leads with the dead rank,
        // is left alone.
        assert_eq!(likely_cause(&told, 2, &dead_rank_1()), None);
        assert_eq!(likely_cause(&first, 1, &dead_rank_1()), None);
        let own = restart_decision(
            RestartState {
                attempt: 2,
                restarts: 1,
                max_restarts: 3,
            },
            &dead_rank_1(),
        )
        .reason;
        assert_eq!(likely_cause(&own, 2, &dead_rank_1()), None);
    }

    fn job(id: &str, n: usize) -> PendingJob {
        PendingJob {
            job_id: id.into(),
            world_size: n,
            draining_ranks: 0,
        }
    }
    fn ws(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn gang_places_when_enough_idle_with_sorted_ranks() {
        let out = schedule(&[job("j1", 2)], &ws(&["w-3", "w-1", "w-2"]));
        assert_eq!(
            out.placements,
            vec![Placement {
                job_id: "j1".into(),
                workers: ws(&["w-1", "w-2"])
            }]
        );
        assert!(out.waiting.is_empty());
    }

    #[test]
    fn waits_with_reason_and_fifo_blocks_later_jobs() {
        let out = schedule(&[job("j1", 4), job("j2", 1)], &ws(&["w-1", "w-2"]));
        assert!(out.placements.is_empty());
        assert_eq!(out.waiting[0].reason, "waiting for 4 idle workers (2 idle)");
        assert_eq!(out.waiting[1].job_id, "j2");
        assert!(
            out.waiting[1].reason.contains("behind j1"),
            "{}",
            out.waiting[1].reason
        );
    }

    #[test]
    fn several_jobs_take_disjoint_workers_in_order() {
        let out = schedule(
            &[job("a", 1), job("b", 2), job("c", 2)],
            &ws(&["w4", "w1", "w3", "w2"]),
        );
        assert_eq!(
            out.placements,
            vec![
                Placement {
                    job_id: "a".into(),
                    workers: ws(&["w1"])
                },
                Placement {
                    job_id: "b".into(),
                    workers: ws(&["w2", "w3"])
                },
            ]
        );
        assert_eq!(
            out.waiting,
            vec![Waiting {
                job_id: "c".into(),
                reason: "waiting for 2 idle workers (1 idle)".into()
            }]
        );
    }

    #[test]
    fn draining_job_waits_and_blocks() {
        let mut j = job("a", 1);
        j.draining_ranks = 1;
        let out = schedule(&[j, job("b", 1)], &ws(&["w1", "w2"]));
        assert!(out.placements.is_empty());
        assert_eq!(
            out.waiting[0].reason,
            "waiting for 1 rank of the previous attempt to stop"
        );
    }

    #[test]
    fn schedule_is_deterministic_regardless_of_input_order() {
        let a = schedule(&[job("a", 3)], &ws(&["c", "a", "b", "d"]));
        let b = schedule(&[job("a", 3)], &ws(&["d", "b", "c", "a"]));
        assert_eq!(a, b);
        assert_eq!(assign_ranks(&ws(&["b", "a"]), 2), Some(ws(&["a", "b"])));
        assert_eq!(assign_ranks(&ws(&["b", "a"]), 3), None);
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            rank: 1,
            worker_id: "w-2".into(),
            host: "h".into(),
            step: 40,
            kind,
        }
    }

    #[test]
    fn restart_until_max_then_fail() {
        let f = failure(FailureKind::HeartbeatTimeout {
            silent_for: Duration::from_millis(10_200),
        });
        let d = restart_decision(
            RestartState {
                attempt: 1,
                restarts: 0,
                max_restarts: 2,
            },
            &f,
        );
        assert_eq!(d.action, Action::Restart);
        assert!(d.counts);
        assert_eq!(
            d.reason,
            "attempt 1: rank 1 (worker w-2 on h, step 40): missed heartbeats for 10.2 s; restart 1 of 2"
        );
        let d = restart_decision(
            RestartState {
                attempt: 3,
                restarts: 2,
                max_restarts: 2,
            },
            &f,
        );
        assert_eq!(d.action, Action::Fail);
        assert!(d.reason.contains("no restarts left"), "{}", d.reason);
        let d = restart_decision(
            RestartState {
                attempt: 1,
                restarts: 0,
                max_restarts: 0,
            },
            &f,
        );
        assert_eq!(d.action, Action::Fail);
    }

    #[test]
    fn rank_failure_reason_has_exit_code_and_first_error_line() {
        let f = failure(FailureKind::RankFailed {
            error: "\nboom: bad\nmore".into(),
            exit_code: 2,
            signal: 0,
            repeats_on_restart: false,
        });
        let d = restart_decision(
            RestartState {
                attempt: 1,
                restarts: 0,
                max_restarts: 1,
            },
            &f,
        );
        assert!(
            d.reason.contains("failed (exit code 2): boom: bad"),
            "{}",
            d.reason
        );
        let f = failure(FailureKind::RankFailed {
            error: String::new(),
            exit_code: 0,
            signal: 9,
            repeats_on_restart: false,
        });
        assert!(describe_failure(&f).ends_with("failed (signal 9)"));
    }

    #[test]
    fn an_error_a_restart_would_repeat_fails_the_job_with_restarts_left() {
        let f = |repeats| {
            failure(FailureKind::RankFailed {
                error: "job: key `deepspeed`: warmup_num_steps is 10".into(),
                exit_code: 1,
                signal: 0,
                repeats_on_restart: repeats,
            })
        };
        let job = RestartState {
            attempt: 1,
            restarts: 0,
            max_restarts: 3,
        };
        let d = restart_decision(job, &f(true));
        assert_eq!((d.action, d.counts), (Action::Fail, false));
        assert_eq!(
            d.reason,
            "attempt 1: rank 1 (worker w-2 on h, step 40): failed (exit code 1): job: key \
             `deepspeed`: warmup_num_steps is 10; not restarted: the error comes from the job, \
             its data or its model files, and a restart from the last checkpoint would meet it \
             again"
        );
        assert_eq!(restart_decision(job, &f(false)).action, Action::Restart);
    }

    #[test]
    fn a_late_error_that_would_repeat_calls_off_the_restart_its_peer_decided() {
        let survivor = Failure {
            rank: 0,
            worker_id: "w-1".into(),
            host: "h".into(),
            step: 40,
            kind: FailureKind::RankFailed {
                error: "collective (tcp-ring) failed: rank 0: connection closed by rank 1".into(),
                exit_code: 1,
                signal: 0,
                repeats_on_restart: false,
            },
        };
        let job = RestartState {
            attempt: 2,
            restarts: 1,
            max_restarts: 3,
        };
        let first = restart_decision(job, &survivor);
        assert_eq!((first.action, first.counts), (Action::Restart, true));
        let late = |repeats| {
            failure(FailureKind::RankFailed {
                error: "data/alpaca.json record 7: `output` is not a string".into(),
                exit_code: 1,
                signal: 0,
                repeats_on_restart: repeats,
            })
        };
        let off = call_off_restart(&first.reason, 2, &late(true)).unwrap();
        assert_eq!(
            off.reason,
            "attempt 2: rank 1 (worker w-2 on h, step 40): failed (exit code 1): \
             data/alpaca.json record 7: `output` is not a string, which likely caused: rank 0 \
             (worker w-1 on h, step 40): failed (exit code 1): collective (tcp-ring) failed: \
             rank 0: connection closed by rank 1; not restarted: the error comes from the job, \
             its data or its model files, and a restart from the last checkpoint would meet it \
             again"
        );
        assert!(off.refund);
        // An error a restart may cure leaves the restart alone; so does another attempt's reason.
        assert_eq!(call_off_restart(&first.reason, 2, &late(false)), None);
        assert_eq!(call_off_restart(&first.reason, 3, &late(true)), None);
        // A preemption's restart did not count, so nothing is given back.
        let pre = restart_decision(job, &failure(FailureKind::Preempted));
        let off = call_off_restart(&pre.reason, 2, &late(true)).unwrap();
        assert!(!off.refund);
        assert!(
            off.reason.contains(
                "which likely caused: rank 1 (worker w-2 on h, step 40): \
                                 preempted (its worker was told to stop and checkpointed); \
                                 not restarted"
            ),
            "{}",
            off.reason
        );
    }

    #[test]
    fn preemption_restarts_without_counting() {
        let d = restart_decision(
            RestartState {
                attempt: 2,
                restarts: 3,
                max_restarts: 3,
            },
            &failure(FailureKind::Preempted),
        );
        assert_eq!(d.action, Action::Restart);
        assert!(!d.counts);
    }

    #[test]
    fn dead_worker_detection() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        assert!(!is_dead(t0 + Duration::from_secs(10), t0, timeout));
        assert!(is_dead(t0 + Duration::from_millis(10_001), t0, timeout));
        // a heartbeat "in the future" (clock races) is alive
        assert!(!is_dead(t0, t0 + Duration::from_secs(1), timeout));
        let now = t0 + Duration::from_secs(20);
        let dead = dead_workers(
            now,
            [
                ("b", t0),
                ("a", t0 + Duration::from_secs(5)),
                ("c", t0 + Duration::from_secs(15)),
            ],
            timeout,
        );
        assert_eq!(dead, ws(&["a", "b"]));
    }
}
