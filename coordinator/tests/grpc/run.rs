//! A job from submission to success, driven by a fake worker.

use crate::harness::*;

#[tokio::test]
async fn fake_worker_runs_a_job_to_success() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;

    let sub = j
        .submit(submit_req(&job_yaml(1, 0), dir.path()))
        .await
        .unwrap()
        .into_inner();
    let id = sub.job_id.clone();
    let st = sub.status.unwrap();
    assert_eq!(st.state(), JobState::Queued);
    assert_eq!(st.reason, "waiting for 1 idle worker (0 idle)");
    assert_eq!(st.output_dir, dir.path().join("out").display().to_string());

    let mut watch = j
        .watch_job(pb::JobRef { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let watcher = tokio::spawn(async move {
        let mut states = Vec::new();
        while let Some(s) = watch.message().await.unwrap() {
            if states.last() != Some(&s.state()) {
                states.push(s.state());
            }
        }
        states
    });

    let wid = register(&mut w, 7001).await;
    let a = await_assignment(&mut w, &wid, Duration::from_secs(5)).await;
    assert_eq!(
        (a.job_id.as_str(), a.rank, a.world_size, a.attempt),
        (id.as_str(), 0, 1, 1)
    );
    assert_eq!(a.peers, vec!["127.0.0.1:7001".to_string()]);
    assert_eq!(a.job_secret.len(), 32);
    assert_eq!(a.resume_checkpoint, "");
    let spec = herd_proto::JobSpec::from_yaml_str(&a.job_yaml, "assignment").unwrap();
    assert!(spec
        .data_path
        .paths()
        .iter()
        .all(|p| p.is_absolute() && p.is_file()));

    let r = hb(&mut w, &wid, &id, 1, 0).await;
    assert!(r.assignment.is_none() && r.stop.is_none());
    assert_eq!(get(&mut j, &id).await.state(), JobState::Running);

    let metric = pb::Metric {
        step: 5,
        epoch: 0.5,
        loss: 2.5,
        learning_rate: 1e-3,
        grad_norm: 1.0,
        tokens_per_sec: 100.0,
        unix_time: 1.0,
    };
    w.report_progress(pb::ProgressReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        total_steps: 10,
        metric: Some(metric),
        log_lines: vec!["step 5 loss 2.5".into(), "hello".into()],
        eval: None,
        started: None,
    })
    .await
    .unwrap();
    let best = pb::BestCheckpoint {
        step: 5,
        path: dir.path().join("out/checkpoint-5").display().to_string(),
        metric: "eval_loss".into(),
        value: 1.25,
    };
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 5,
        path: dir.path().join("out/checkpoint-5").display().to_string(),
        rotated: vec![],
        best: Some(best.clone()),
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!((s.step, s.total_steps, s.last_checkpoint_step), (5, 10, 5));
    assert_eq!(s.best_checkpoint, Some(best));
    assert_eq!(s.last_metric.unwrap().loss, 2.5);
    assert_eq!(s.ranks.len(), 1);
    assert_eq!(s.ranks[0].worker_id, wid);
    assert_eq!(s.ranks[0].host, "testhost");
    // Between logging steps the step moves with rank 0's heartbeats.
    hb(&mut w, &wid, &id, 1, 7).await;
    let s = get(&mut j, &id).await;
    assert_eq!((s.step, s.last_metric.unwrap().step), (7, 5));
    assert_eq!(s.ranks[0].state, "running");

    w.report_done(pb::DoneReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        rank: 0,
        kind: DoneKind::Completed as i32,
        step: 10,
        host: "testhost".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!(s.state(), JobState::Succeeded, "{}", s.reason);
    assert_eq!(s.step, 10);
    assert_eq!(s.ranks[0].state, "completed");
    assert!(s.finished_unix > 0.0);
    let states = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        states,
        vec![JobState::Queued, JobState::Running, JobState::Succeeded]
    );

    let logs = j
        .get_logs(pb::GetLogsRequest {
            job_id: id.clone(),
            rank: 0,
            max_lines: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.lines, vec!["hello".to_string()]);
    // the worker is idle again
    let r = hb(&mut w, &wid, "", 0, 0).await;
    assert!(r.assignment.is_none() && r.stop.is_none() && !r.unknown_worker);
    // an unknown worker id is told to register
    assert!(hb(&mut w, "w-nobody", "", 0, 0).await.unknown_worker);
    srv.stop().await;
}

/// A worker shutting down takes no new rank, and its goodbye counts it out at once.
#[tokio::test]
async fn a_leaving_worker_gets_no_work_and_its_goodbye_counts_it_out() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let mut w = srv.workers().await;
    let leaving = register(&mut w, 7501).await;
    let leaving_hb = pb::HeartbeatRequest {
        worker_id: leaving.clone(),
        leaving: true,
        ..Default::default()
    };
    w.heartbeat(leaving_hb.clone()).await.unwrap();
    let id = submit(&mut j, &job_yaml(1, 0), dir.path()).await;
    let r = w.heartbeat(leaving_hb).await.unwrap().into_inner();
    assert!(r.assignment.is_none());
    let st = get(&mut j, &id).await;
    assert_eq!(st.state(), JobState::Queued, "{}", st.reason);
    assert_eq!(st.reason, "waiting for 1 idle worker (0 idle)");

    w.leave(pb::LeaveRequest {
        worker_id: leaving.clone(),
        reason: "stopped by SIGTERM".into(),
    })
    .await
    .unwrap();
    let events = j
        .get_events(pb::JobRef { job_id: "".into() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.worker_id == leaving && e.message == "left: stopped by SIGTERM"),
        "{events:?}"
    );
    // Another worker gets the job.
    let other = register(&mut w, 7502).await;
    let a = await_assignment(&mut w, &other, Duration::from_secs(5)).await;
    assert_eq!(a.job_id, id);
    srv.stop().await;
}
