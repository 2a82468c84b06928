//! Restarts: silent workers, failed and preempted ranks, a restarted coordinator.

use crate::harness::*;

#[tokio::test]
async fn silent_worker_restarts_job_elsewhere_then_fails_after_max_restarts() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let timeout = Duration::from_millis(800);
    let srv = Server::start(&dir.path().join("state"), timeout).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7101).await;
    let w2 = register(&mut w, 7102).await;
    assert!(w1 < w2);
    let id = submit(&mut j, &job_yaml(1, 1), dir.path()).await;

    // rank 0 goes to the lowest id
    let a1 = await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    assert_eq!(a1.attempt, 1);
    hb(&mut w, &w1, &id, 1, 3).await;
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 2,
        path: "/ckpt/checkpoint-2".into(),
        rotated: vec![],
        best: None,
    })
    .await
    .unwrap();
    // w1 goes silent; w2 keeps heartbeating and gets attempt 2, resuming from the checkpoint
    let a2 = await_assignment(&mut w, &w2, Duration::from_secs(10)).await;
    assert_eq!(
        (a2.job_id.as_str(), a2.attempt, a2.rank),
        (id.as_str(), 2, 0)
    );
    assert_eq!(
        (a2.start_step, a2.resume_checkpoint.as_str()),
        (2, "/ckpt/checkpoint-2")
    );
    assert_ne!(a2.job_secret, a1.job_secret);
    let s = get(&mut j, &id).await;
    assert_eq!(s.state(), JobState::Running);
    assert_eq!(s.restarts, 1);
    assert_eq!(s.restart_reasons.len(), 1);
    assert!(
        s.restart_reasons[0].contains(&format!("worker {w1}")),
        "{:?}",
        s.restart_reasons
    );
    assert!(
        s.restart_reasons[0].contains("missed heartbeats"),
        "{:?}",
        s.restart_reasons
    );

    // a stale report of attempt 1 is ignored
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 9,
        path: "/ckpt/checkpoint-9".into(),
        rotated: vec![],
        best: None,
    })
    .await
    .unwrap();
    assert_eq!(get(&mut j, &id).await.last_checkpoint_step, 2);

    // w1 comes back still running attempt 1: it is told to stop
    let r = hb(&mut w, &w1, &id, 1, 4).await;
    let stop = r.stop.expect("a stop order for the stale attempt");
    assert_eq!((stop.job_id.as_str(), stop.attempt), (id.as_str(), 1));

    // now w2 goes silent too: max_restarts 1 is used up -> FAILED
    hb(&mut w, &w2, &id, 2, 3).await;
    let s = await_state(&mut j, &id, JobState::Failed, Duration::from_secs(10)).await;
    assert_eq!(s.restarts, 1);
    assert!(s.reason.contains("no restarts left"), "{}", s.reason);
    assert_eq!(s.restart_reasons.len(), 2);
    assert!(s.finished_unix > 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn failed_rank_stops_the_others_and_restarts_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7201).await;
    let w2 = register(&mut w, 7202).await;
    let id = submit(&mut j, &job_yaml(2, 2), dir.path()).await;
    let a = await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    let b = await_assignment(&mut w, &w2, Duration::from_secs(5)).await;
    assert_eq!((a.rank, b.rank), (0, 1));
    assert_eq!(
        a.peers,
        vec!["127.0.0.1:7201".to_string(), "127.0.0.1:7202".to_string()]
    );
    assert_eq!(a.peers, b.peers);
    assert_eq!(a.job_secret, b.job_secret);

    w.report_done(pb::DoneReport {
        worker_id: w2.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 1,
        kind: DoneKind::FailedRank as i32,
        step: 3,
        error: "Error: out of memory\nat step 3".into(),
        host: "testhost".into(),
        exit_code: 1,
        signal: 0,
        repeats_on_restart: false,
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!(s.state(), JobState::Restarting);
    let states: Vec<&str> = s.ranks.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["running", "failed"]);
    assert!(
        s.reason
            .contains("waiting for 1 rank of the previous attempt to stop"),
        "{}",
        s.reason
    );
    assert!(
        s.restart_reasons[0].contains("rank 1")
            && s.restart_reasons[0].contains("exit code 1): Error: out of memory"),
        "{:?}",
        s.restart_reasons
    );
    let logs = j
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            rank: 1,
            max_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.lines, vec!["Error: out of memory", "at step 3"]);

    // rank 0 gets a stop order, pauses, and the job restarts on both
    let stop = hb(&mut w, &w1, &id, 1, 3).await.stop.expect("stop order");
    assert!(!stop.checkpoint);
    w.report_done(pb::DoneReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        kind: DoneKind::Paused as i32,
        step: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let a = await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    let b = await_assignment(&mut w, &w2, Duration::from_secs(5)).await;
    assert_eq!((a.attempt, b.attempt, a.rank, b.rank), (2, 2, 0, 1));
    let s = get(&mut j, &id).await;
    assert_eq!((s.state(), s.restarts), (JobState::Running, 1));

    // cancel: both get stop orders
    let s = j
        .cancel_job(pb::JobRef { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), JobState::Cancelled);
    assert!(hb(&mut w, &w1, &id, 2, 4).await.stop.is_some());
    assert!(hb(&mut w, &w2, &id, 2, 4).await.stop.is_some());
    // Rank 0 finishes its step and checkpoints; rank 1's ring broke when rank 0 left, an error
    // after the cancel: the cancelled job shows where they stopped, and no rank as failed.
    for (wid, rank, kind) in [(&w1, 0, DoneKind::Paused), (&w2, 1, DoneKind::FailedRank)] {
        w.report_done(pb::DoneReport {
            worker_id: wid.clone(),
            job_id: id.clone(),
            attempt: 2,
            rank,
            kind: kind as i32,
            step: 5,
            error: "connection closed by rank 0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let s = get(&mut j, &id).await;
    assert_eq!((s.state(), s.step), (JobState::Cancelled, 5));
    let states: Vec<&str> = s.ranks.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["paused", "stopped"]);
    let logs = j
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            rank: 1,
            max_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        logs.lines.last().map(String::as_str),
        Some(
            "rank 1 stopped: its attempt had already ended (the job is CANCELLED), so the error \
             above is the stop, not a failure"
        ),
        "{:?}",
        logs.lines
    );
    srv.stop().await;
}

#[tokio::test]
async fn coordinator_restart_keeps_jobs_and_running_ranks() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let state = dir.path().join("state");
    let srv = Server::start(&state, Duration::from_secs(2)).await;
    let (id, id2, wid) = {
        let mut j = srv.jobs(TOKEN).await;
        let mut w = srv.workers().await;
        let wid = register(&mut w, 7301).await;
        let id = submit(&mut j, &job_yaml(1, 0), dir.path()).await;
        await_assignment(&mut w, &wid, Duration::from_secs(5)).await;
        hb(&mut w, &wid, &id, 1, 2).await;
        w.report_progress(pb::ProgressReport {
            worker_id: wid.clone(),
            job_id: id.clone(),
            attempt: 1,
            rank: 0,
            total_steps: 10,
            metric: Some(pb::Metric {
                step: 4,
                loss: 1.25,
                ..Default::default()
            }),
            log_lines: vec!["before the restart".into()],
            eval: None,
            started: None,
        })
        .await
        .unwrap();
        // a second job waits behind it (one worker)
        let yaml2 = job_yaml(1, 0).replace("output_dir: out", "output_dir: out2");
        let id2 = submit(&mut j, &yaml2, dir.path()).await;
        (id, id2, wid)
    };
    srv.stop().await;

    let srv = Server::start(&state, Duration::from_secs(2)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let jobs = j
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        jobs.iter()
            .map(|s| (s.job_id.clone(), s.state()))
            .collect::<Vec<_>>(),
        vec![
            (id.clone(), JobState::Running),
            (id2.clone(), JobState::Queued),
        ]
    );
    assert_eq!((jobs[0].step, jobs[0].total_steps), (4, 10));
    assert_eq!(jobs[0].last_metric.as_ref().unwrap().loss, 1.25);
    let logs = j
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            rank: 0,
            max_lines: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.lines, vec!["before the restart".to_string()]);

    // the worker re-registers with its id and keeps training: no stop, no new assignment
    let rr = w
        .register(pb::RegisterRequest {
            host: "testhost".into(),
            device: "cpu".into(),
            collective_addr: "127.0.0.1:7301".into(),
            pid: 1,
            worker_id: wid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rr.worker_id, wid);
    for _ in 0..30 {
        let r = hb(&mut w, &wid, &id, 1, 5).await;
        assert!(r.stop.is_none() && r.assignment.is_none() && !r.unknown_worker);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(&mut j, &id).await.state(),
        JobState::Running,
        "a live rank is kept past the timeout"
    );
    w.report_done(pb::DoneReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        kind: DoneKind::Completed as i32,
        step: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(get(&mut j, &id).await.state(), JobState::Succeeded);
    // the freed worker takes the queued job
    let a = await_assignment(&mut w, &wid, Duration::from_secs(5)).await;
    assert_eq!(a.job_id, id2);
    srv.stop().await;

    // a restart where the worker never comes back: the rank is lost after the timeout
    let srv = Server::start(&state, Duration::from_millis(500)).await;
    let mut j = srv.jobs(TOKEN).await;
    let s = await_state(&mut j, &id2, JobState::Failed, Duration::from_secs(10)).await;
    assert!(s.reason.contains("did not come back"), "{}", s.reason);
    srv.stop().await;
}

#[tokio::test]
async fn preempted_rank_restarts_without_counting_and_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7401).await;
    let id = submit(&mut j, &job_yaml(1, 0), dir.path()).await;
    await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    hb(&mut w, &w1, &id, 1, 2).await;
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 3,
        path: "/c/checkpoint-3".into(),
        rotated: vec![],
        best: None,
    })
    .await
    .unwrap();
    // SIGTERM: the worker checkpointed, reports PAUSED and leaves
    w.report_done(pb::DoneReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        kind: DoneKind::Paused as i32,
        step: 3,
        signal: 15,
        ..Default::default()
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!((s.state(), s.restarts), (JobState::Restarting, 0));
    assert!(
        s.restart_reasons[0].contains("preempted"),
        "{:?}",
        s.restart_reasons
    );
    assert!(
        s.reason.contains("waiting for 1 idle worker (0 idle)"),
        "{}",
        s.reason
    );
    // a new worker takes attempt 2 from the checkpoint
    let w2 = register(&mut w, 7402).await;
    let a = await_assignment(&mut w, &w2, Duration::from_secs(5)).await;
    assert_eq!(
        (a.attempt, a.start_step, a.resume_checkpoint.as_str()),
        (2, 3, "/c/checkpoint-3")
    );
    srv.stop().await;
}

#[tokio::test]
async fn the_job_events_name_the_rank_that_died_when_a_survivor_reported_first() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_millis(800)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7301).await;
    let w2 = register(&mut w, 7302).await;
    let id = submit(&mut j, &job_yaml(2, 2), dir.path()).await;
    await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    await_assignment(&mut w, &w2, Duration::from_secs(5)).await;
    hb(&mut w, &w2, &id, 1, 3).await;

    // w2 (rank 1) is killed; rank 0 sees its connection close and reports first.
    w.report_done(pb::DoneReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        kind: DoneKind::FailedRank as i32,
        step: 3,
        error: "collective (tcp-ring) failed: rank 0: receiving from rank 1 failed".into(),
        host: "testhost".into(),
        exit_code: 1,
        signal: 0,
        repeats_on_restart: false,
    })
    .await
    .unwrap();
    assert_eq!(get(&mut j, &id).await.state(), JobState::Restarting);
    let dead = |events: &[pb::Event]| {
        events.iter().any(|e| {
            e.kind == "worker"
                && e.worker_id == w2
                && e.message.contains("dead: no heartbeat")
                && e.message.contains("rank 1 of attempt 1")
        })
    };
    let t0 = Instant::now();
    loop {
        hb(&mut w, &w1, "", 0, 0).await; // w1 stays alive, idle
        let events = j
            .get_events(pb::JobRef { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .events;
        if dead(&events) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no job event names the dead rank 1: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restart's reason now leads with the dead rank, the survivor's error after it.
    let job = get(&mut j, &id).await;
    assert_eq!(job.state(), JobState::Restarting);
    let told = format!("attempt 1: rank 1 (worker {w2} on ");
    assert!(
        job.reason.contains(&told)
            && job.reason.contains("missed heartbeats")
            && job.reason.contains("which likely caused: rank 0 (worker "),
        "{}",
        job.reason
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_late_error_the_restart_would_repeat_fails_the_job_its_peer_had_restarted() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7401).await;
    let w2 = register(&mut w, 7402).await;
    let id = submit(&mut j, &job_yaml(2, 2), dir.path()).await;
    await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    await_assignment(&mut w, &w2, Duration::from_secs(5)).await;

    // Rank 1 meets a bad record and exits; rank 0's "connection closed" is reported first.
    let report = |worker: &str, rank, error: &str, repeats| pb::DoneReport {
        worker_id: worker.to_string(),
        job_id: id.clone(),
        attempt: 1,
        rank,
        kind: DoneKind::FailedRank as i32,
        step: 3,
        error: error.into(),
        host: "testhost".into(),
        exit_code: 1,
        signal: 0,
        repeats_on_restart: repeats,
    };
    w.report_done(report(
        &w1,
        0,
        "collective (tcp-ring) failed: rank 0: connection closed by rank 1",
        false,
    ))
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!((s.state(), s.restarts), (JobState::Restarting, 1));
    w.report_done(report(
        &w2,
        1,
        "data/alpaca.json record 7: `output` is not a string",
        true,
    ))
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!(
        (s.state(), s.restarts),
        (JobState::Failed, 0),
        "{}",
        s.reason
    );
    assert!(
        s.reason.starts_with(&format!(
            "attempt 1: rank 1 (worker {w2} on testhost, step 3): failed (exit code 1): \
             data/alpaca.json record 7"
        )) && s.reason.contains("which likely caused: rank 0 ")
            && s.reason
                .contains("not restarted: the error comes from the job"),
        "{}",
        s.reason
    );
    assert_eq!(s.restart_reasons, vec![s.reason.clone()]);
    // The restart was never placed: no worker gets an attempt 2.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for worker in [&w1, &w2] {
        let r = hb(&mut w, worker, "", 0, 0).await;
        assert!(r.assignment.is_none(), "{r:?}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_preemption_names_the_worker_that_got_the_signal_not_the_first_to_report() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let w1 = register(&mut w, 7501).await;
    let w2 = register(&mut w, 7502).await;
    let id = submit(&mut j, &job_yaml(2, 0), dir.path()).await;
    await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    await_assignment(&mut w, &w2, Duration::from_secs(5)).await;
    let paused = |wid: &String, rank, signal| pb::DoneReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank,
        kind: DoneKind::Paused as i32,
        step: 4,
        signal,
        ..Default::default()
    };
    // w2 got SIGTERM; both ranks agreed to stop at step 4, and rank 0 (w1) reports first.
    w.report_done(paused(&w1, 0, 0)).await.unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!(s.state(), JobState::Running, "{}", s.reason);
    assert_eq!(s.ranks[0].state, "paused");
    w.report_done(paused(&w2, 1, 15)).await.unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!((s.state(), s.restarts), (JobState::Restarting, 0));
    let reason = &s.restart_reasons[0];
    assert!(
        reason.contains("rank 1") && reason.contains(&w2) && reason.contains("preempted"),
        "{reason}"
    );
    assert!(!reason.contains(&w1), "{reason}");
    // w1 was not signalled: it stays in the pool; with a new worker for w2's place, attempt 2
    // starts on both.
    let w3 = register(&mut w, 7503).await;
    let a = await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    let b = await_assignment(&mut w, &w3, Duration::from_secs(5)).await;
    assert_eq!((a.attempt, b.attempt), (2, 2));
    srv.stop().await;
}
