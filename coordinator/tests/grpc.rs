//! The coordinator served in-process on 127.0.0.1:0, driven by tonic clients: a "fake worker" is
//! a test that calls the Workers service by hand.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use herd_coordinator::{serve_on, CoordinatorOptions};
use herd_proto::auth::BearerToken;
use herd_proto::pb::{
    self, jobs_client::JobsClient, workers_client::WorkersClient, DoneKind, JobState,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const TOKEN: &str = "test-token-0123456789";

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<herd_coordinator::Result<()>>,
}

impl Server {
    async fn start(state: &Path, timeout: Duration) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut opts = CoordinatorOptions::new(addr, state);
        opts.token = Some(TOKEN.into());
        opts.heartbeat_timeout = timeout;
        opts.heartbeat_interval = Duration::from_millis(100);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(serve_on(listener, opts, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            handle,
        }
    }

    async fn channel(&self) -> Channel {
        let ep = Endpoint::from_shared(format!("http://{}", self.addr)).unwrap();
        for _ in 0..100 {
            if let Ok(c) = ep.connect().await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot connect to {}", self.addr);
    }

    async fn jobs(&self, token: &str) -> JobsClient<InterceptedService<Channel, BearerToken>> {
        JobsClient::with_interceptor(self.channel().await, BearerToken::new(token).unwrap())
    }

    async fn workers(&self) -> WorkersClient<InterceptedService<Channel, BearerToken>> {
        WorkersClient::with_interceptor(self.channel().await, BearerToken::new(TOKEN).unwrap())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("shuts down")
            .unwrap()
            .unwrap();
    }
}

fn demo(dir: &Path) {
    herd_worker::demo::write_demo_assets(dir, 7).unwrap();
}

fn job_yaml(world: usize, max_restarts: u32) -> String {
    format!(
        "model_name_or_path: model\ndata_path: data/train.json\noutput_dir: out\n\
         per_device_train_batch_size: 2\nmax_steps: 10\nworld_size: {world}\nmax_restarts: {max_restarts}\n"
    )
}

fn submit_req(yaml: &str, base: &Path) -> pb::SubmitRequest {
    pb::SubmitRequest {
        job_yaml: yaml.into(),
        source_name: "job.yaml".into(),
        base_dir: base.display().to_string(),
    }
}

async fn register(
    w: &mut WorkersClient<InterceptedService<Channel, BearerToken>>,
    port: u16,
) -> String {
    w.register(pb::RegisterRequest {
        host: "testhost".into(),
        device: "cpu".into(),
        collective_addr: format!("127.0.0.1:{port}"),
        pid: 1000 + port as u32,
        worker_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

async fn hb(
    w: &mut WorkersClient<InterceptedService<Channel, BearerToken>>,
    id: &str,
    job: &str,
    attempt: u32,
    step: u64,
) -> pb::HeartbeatResponse {
    w.heartbeat(pb::HeartbeatRequest {
        worker_id: id.into(),
        job_id: job.into(),
        attempt,
        step,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Heartbeat idle until an assignment arrives.
async fn await_assignment(
    w: &mut WorkersClient<InterceptedService<Channel, BearerToken>>,
    id: &str,
    within: Duration,
) -> pb::Assignment {
    let t0 = Instant::now();
    loop {
        if let Some(a) = hb(w, id, "", 0, 0).await.assignment {
            return a;
        }
        assert!(
            t0.elapsed() < within,
            "no assignment for {id} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(
    j: &mut JobsClient<InterceptedService<Channel, BearerToken>>,
    id: &str,
) -> pb::JobStatus {
    j.get_job(pb::JobRef { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn await_state(
    j: &mut JobsClient<InterceptedService<Channel, BearerToken>>,
    id: &str,
    state: JobState,
    within: Duration,
) -> pb::JobStatus {
    let t0 = Instant::now();
    loop {
        let s = get(j, id).await;
        if s.state == state as i32 {
            return s;
        }
        assert!(
            t0.elapsed() < within,
            "{id} is {:?} ({}), not {state:?}",
            s.state(),
            s.reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn auth_is_required_and_health_is_open() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;

    // no token at all
    let mut bare = JobsClient::new(srv.channel().await);
    let e = bare.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = bare
        .submit(submit_req(&job_yaml(1, 0), dir.path()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut bare_w = WorkersClient::new(srv.channel().await);
    let e = bare_w
        .register(pb::RegisterRequest {
            host: "h".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // a wrong token
    let mut wrong = srv.jobs("not-the-token").await;
    let e = wrong
        .submit(submit_req(&job_yaml(1, 0), dir.path()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = wrong.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // nothing changed
    let mut good = srv.jobs(TOKEN).await;
    assert!(good
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());

    // health needs no token
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    for service in ["", "herd.v1.Jobs", "herd.v1.Workers"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn invalid_jobs_are_refused_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    std::fs::create_dir_all(dir.path().join("empty_model")).unwrap();
    std::fs::write(
        dir.path().join("two.json"),
        r#"[{"instruction":"a","output":"b"},{"instruction":"c","output":"d"}]"#,
    )
    .unwrap();
    let srv = Server::start(&dir.path().join("state"), Duration::from_secs(10)).await;
    let mut j = srv.jobs(TOKEN).await;
    let ok = job_yaml(1, 0);
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!("{ok}learning_rat: 1.0\n"),
            &["job.yaml", "learning_rat", "line 8", "column"],
        ),
        (
            ok.replace("world_size: 1", "world_size: 0"),
            &["world_size", "at least 1"],
        ),
        (
            ok.replace("max_steps: 10", "max_steps: many"),
            &["max_steps", "line"],
        ),
        (
            ok.replace("data/train.json", "data/nope.json"),
            &["data_path", "nope.json does not exist"],
        ),
        (
            ok.replace(
                "model_name_or_path: model",
                "model_name_or_path: empty_model",
            ),
            &["no config.json"],
        ),
        (
            ok.replace("data/train.json", "two.json")
                .replace("world_size: 1", "world_size: 3"),
            &["3 workers are more than the 2 usable records"],
        ),
        (
            ok.replace(
                "per_device_train_batch_size: 2",
                "per_device_train_batch_size: 5000",
            ),
            &["fewer than one global batch of 5000"],
        ),
    ];
    for (yaml, needles) in cases {
        let e = j.submit(submit_req(&yaml, dir.path())).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        for n in needles {
            assert!(e.message().contains(n), "{:?} lacks {n:?}", e.message());
        }
    }
    assert!(j
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
    assert!(!dir.path().join("out").exists(), "nothing written");
    srv.stop().await;
}

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
    })
    .await
    .unwrap();
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: wid.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 5,
        path: dir.path().join("out/checkpoint-5").display().to_string(),
        rotated: vec![],
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!((s.step, s.total_steps, s.last_checkpoint_step), (5, 10, 5));
    assert_eq!(s.last_metric.unwrap().loss, 2.5);
    assert_eq!(s.ranks.len(), 1);
    assert_eq!(s.ranks[0].worker_id, wid);
    assert_eq!(s.ranks[0].host, "testhost");

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
    let id = j
        .submit(submit_req(&job_yaml(1, 1), dir.path()))
        .await
        .unwrap()
        .into_inner()
        .job_id;

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
    let id = j
        .submit(submit_req(&job_yaml(2, 2), dir.path()))
        .await
        .unwrap()
        .into_inner()
        .job_id;
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
    })
    .await
    .unwrap();
    let s = get(&mut j, &id).await;
    assert_eq!(s.state(), JobState::Restarting);
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
        let id = j
            .submit(submit_req(&job_yaml(1, 0), dir.path()))
            .await
            .unwrap()
            .into_inner()
            .job_id;
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
        })
        .await
        .unwrap();
        // a second job waits behind it (one worker)
        let yaml2 = job_yaml(1, 0).replace("output_dir: out", "output_dir: out2");
        let id2 = j
            .submit(submit_req(&yaml2, dir.path()))
            .await
            .unwrap()
            .into_inner()
            .job_id;
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
async fn token_file_is_created_in_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = CoordinatorOptions::new(addr, &state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(serve_on(listener, opts, async move {
        let _ = rx.await;
    }));
    let srv = Server {
        addr,
        stop: Some(tx),
        handle: h,
    };
    let mut c = srv.jobs("wrong").await;
    assert_eq!(
        c.list_jobs(pb::ListJobsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let token = herd_proto::auth::read_token_file(&state.join("token")).unwrap();
    assert_eq!(token.len(), 64);
    let mut c = srv.jobs(&token).await;
    assert!(c
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .is_empty());
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
    let id = j
        .submit(submit_req(&job_yaml(1, 0), dir.path()))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    await_assignment(&mut w, &w1, Duration::from_secs(5)).await;
    hb(&mut w, &w1, &id, 1, 2).await;
    w.report_checkpoint(pb::CheckpointReport {
        worker_id: w1.clone(),
        job_id: id.clone(),
        attempt: 1,
        step: 3,
        path: "/c/checkpoint-3".into(),
        rotated: vec![],
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
