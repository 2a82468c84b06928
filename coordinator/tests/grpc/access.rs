//! Who may call, and what is refused before anything is stored.

use crate::harness::*;

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
            &[
                "job.yaml",
                "line 8: `learning_rat`: unknown field, did you mean `learning_rate`?",
            ],
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
        (
            ok.replace("output_dir: out", "output_dir: state/run1"),
            &["`output_dir`", "inside the coordinator's state directory"],
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
