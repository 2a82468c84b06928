//! The in-process coordinator and the calls a fake worker and a client make.

pub(crate) use std::net::SocketAddr;
pub(crate) use std::path::Path;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use herd_coordinator::{serve_on, CoordinatorOptions};
pub(crate) use herd_proto::auth::BearerToken;
pub(crate) use herd_proto::pb::{
    self, jobs_client::JobsClient, workers_client::WorkersClient, DoneKind, JobState,
};
pub(crate) use tonic::service::interceptor::InterceptedService;
pub(crate) use tonic::transport::{Channel, Endpoint};
pub(crate) use tonic::Code;

pub(crate) const TOKEN: &str = "test-token-0123456789";

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) handle: tokio::task::JoinHandle<herd_coordinator::Result<()>>,
}

impl Server {
    pub(crate) async fn start(state: &Path, timeout: Duration) -> Server {
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

    pub(crate) async fn channel(&self) -> Channel {
        let ep = Endpoint::from_shared(format!("http://{}", self.addr)).unwrap();
        for _ in 0..100 {
            if let Ok(c) = ep.connect().await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot connect to {}", self.addr);
    }

    pub(crate) async fn jobs(
        &self,
        token: &str,
    ) -> JobsClient<InterceptedService<Channel, BearerToken>> {
        JobsClient::with_interceptor(self.channel().await, BearerToken::new(token).unwrap())
    }

    pub(crate) async fn workers(&self) -> WorkersClient<InterceptedService<Channel, BearerToken>> {
        WorkersClient::with_interceptor(self.channel().await, BearerToken::new(TOKEN).unwrap())
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("shuts down")
            .unwrap()
            .unwrap();
    }
}

pub(crate) fn demo(dir: &Path) {
    herd_worker::demo::write_demo_assets(dir, 7).unwrap();
}

pub(crate) fn job_yaml(world: usize, max_restarts: u32) -> String {
    format!(
        "model_name_or_path: model\ndata_path: data/train.json\noutput_dir: out\n\
         per_device_train_batch_size: 2\nmax_steps: 10\nworld_size: {world}\nmax_restarts: {max_restarts}\n"
    )
}

pub(crate) fn submit_req(yaml: &str, base: &Path) -> pb::SubmitRequest {
    pb::SubmitRequest {
        job_yaml: yaml.into(),
        source_name: "job.yaml".into(),
        base_dir: base.display().to_string(),
    }
}

/// Submits `yaml` (paths relative to `base`) and returns the new job's id.
pub(crate) async fn submit(
    j: &mut JobsClient<InterceptedService<Channel, BearerToken>>,
    yaml: &str,
    base: &Path,
) -> String {
    j.submit(submit_req(yaml, base))
        .await
        .unwrap()
        .into_inner()
        .job_id
}

pub(crate) async fn register(
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

pub(crate) async fn hb(
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
        leaving: false,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Heartbeat idle until an assignment arrives.
pub(crate) async fn await_assignment(
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

pub(crate) async fn get(
    j: &mut JobsClient<InterceptedService<Channel, BearerToken>>,
    id: &str,
) -> pb::JobStatus {
    j.get_job(pb::JobRef { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn await_state(
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
