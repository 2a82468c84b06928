//! The scheduling decisions' unit tests.

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
        placed_before: false,
        waited: Duration::ZERO,
    }
}
fn ws(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[test]
fn gang_places_when_enough_idle_with_sorted_ranks() {
    let out = schedule(&[job("j1", 2)], &ws(&["w-3", "w-1", "w-2"]), 3);
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
    let out = schedule(&[job("j1", 4), job("j2", 1)], &ws(&["w-1", "w-2"]), 4);
    assert!(out.placements.is_empty());
    assert_eq!(out.waiting[0].reason, "waiting for 4 idle workers (2 idle)");
    assert_eq!(out.waiting[1].job_id, "j2");
    assert_eq!(
        out.waiting[1].reason,
        "queued behind j1 (first in line, waiting for 4 idle workers); needs 1 idle worker (2 \
         idle)"
    );
    // A restarting job whose old ranks still stop holds the line with its reason told.
    let draining = PendingJob {
        draining_ranks: 1,
        ..job("j1", 2)
    };
    let out = schedule(&[draining, job("j2", 2)], &ws(&["w-1", "w-2"]), 4);
    assert!(out.placements.is_empty());
    assert_eq!(
        out.waiting[1].reason,
        "queued behind j1 (first in line, its previous attempt's ranks are stopping); needs 2 \
         idle workers (2 idle)"
    );
}

#[test]
fn a_job_bigger_than_the_cluster_waits_without_blocking_the_queue() {
    // 3 workers alive, 2 idle: a 4-worker job queued for over a minute cannot start on them,
    // so the 1-worker job submitted after it starts; a 3-worker job behind it still queues in
    // FIFO order.
    let big = PendingJob {
        waited: OVERSIZED_GRACE,
        ..job("big", 4)
    };
    let out = schedule(
        &[big.clone(), job("small", 1), job("three", 3)],
        &ws(&["w2", "w1"]),
        3,
    );
    assert_eq!(
        out.placements,
        vec![Placement {
            job_id: "small".into(),
            workers: ws(&["w1"])
        }]
    );
    assert_eq!(out.waiting[0].job_id, "big");
    assert_eq!(
        out.waiting[0].reason,
        "needs 4 workers, 3 are alive: waiting for more to join (jobs behind it may start \
         meanwhile)"
    );
    assert_eq!(out.waiting[1].job_id, "three");
    assert_eq!(out.waiting[1].reason, "waiting for 3 idle workers (1 idle)");

    // Once a fourth worker has joined, the big job is first in line again and holds the rest.
    let out = schedule(&[big.clone(), job("small", 1)], &ws(&["w1", "w2"]), 4);
    assert!(out.placements.is_empty());
    assert!(
        out.waiting[1].reason.contains("behind big"),
        "{:?}",
        out.waiting
    );

    // Within its first minute (a cluster still coming up) it keeps FIFO order ...
    let fresh = schedule(&[job("big", 4), job("small", 1)], &ws(&["w1"]), 1);
    assert!(fresh.placements.is_empty(), "{fresh:?}");
    assert_eq!(
        fresh.waiting[0].reason,
        "waiting for 4 idle workers (1 idle)"
    );
    // ... and a restarting job keeps its place whatever the count: it fitted before.
    let restarting = PendingJob {
        placed_before: true,
        ..big
    };
    let out = schedule(&[restarting, job("small", 1)], &ws(&["w1"]), 1);
    assert!(out.placements.is_empty(), "{out:?}");
}

#[test]
fn several_jobs_take_disjoint_workers_in_order() {
    let out = schedule(
        &[job("a", 1), job("b", 2), job("c", 2)],
        &ws(&["w4", "w1", "w3", "w2"]),
        4,
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
    let out = schedule(&[j, job("b", 1)], &ws(&["w1", "w2"]), 3);
    assert!(out.placements.is_empty());
    assert_eq!(
        out.waiting[0].reason,
        "waiting for 1 rank of the previous attempt to stop"
    );
}

#[test]
fn schedule_is_deterministic_regardless_of_input_order() {
    let a = schedule(&[job("a", 3)], &ws(&["c", "a", "b", "d"]), 4);
    let b = schedule(&[job("a", 3)], &ws(&["d", "b", "c", "a"]), 4);
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
