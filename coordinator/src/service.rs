//! The gRPC services: thin I/O around [`crate::state::Core`] (which uses the pure decisions of
//! [`crate::sched`]). Authentication is an interceptor in front of both (see `serve_on`).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use herd_proto::pb::{self, JobState};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::state::Core;
use crate::validate;

/// The shared state behind both services.
#[derive(Clone)]
pub struct Coordinator {
    core: Arc<Mutex<Core>>,
}

impl Coordinator {
    pub fn new(core: Core) -> Self {
        Coordinator {
            core: Arc::new(Mutex::new(core)),
        }
    }

    /// Lock the state (a poisoned lock is taken over: every change is written through anyway).
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn terminal(s: &pb::JobStatus) -> bool {
    matches!(
        JobState::try_from(s.state).unwrap_or(JobState::Unspecified),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for Coordinator {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = request.into_inner();
        let validated = tokio::task::spawn_blocking(move || {
            validate::validate_submission(&req.job_yaml, &req.source_name, &req.base_dir)
        })
        .await
        .map_err(|e| Status::internal(format!("validation task: {e}")))??;
        let status = self.lock().submit(validated)?;
        Ok(Response::new(pb::SubmitResponse {
            job_id: status.job_id.clone(),
            status: Some(status),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(
            self.lock().job_status(&request.into_inner().job_id)?,
        ))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = request.into_inner().job_id;
        let mut rx = self.lock().subscribe(&job_id)?;
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::JobStatus, Status>>(16);
        tokio::spawn(async move {
            loop {
                let status = rx.borrow_and_update().clone();
                let end = terminal(&status);
                if tx.send(Ok(status)).await.is_err() || end {
                    break;
                }
                if rx.changed().await.is_err() {
                    let _ = tx
                        .send(Err(Status::unavailable("the coordinator is shutting down")))
                        .await;
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.lock().list(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(
            self.lock().cancel(&request.into_inner().job_id)?,
        ))
    }

    async fn get_events(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::GetEventsResponse>, Status> {
        let job = request.into_inner().job_id;
        Ok(Response::new(pb::GetEventsResponse {
            events: self.lock().events(&job)?,
        }))
    }

    async fn get_logs(
        &self,
        request: Request<pb::GetLogsRequest>,
    ) -> Result<Response<pb::GetLogsResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::GetLogsResponse {
            lines: self.lock().logs(&r.job_id, r.rank, r.max_lines)?,
        }))
    }
}

#[tonic::async_trait]
impl pb::workers_server::Workers for Coordinator {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(self.lock().register(request.into_inner())?))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(self.lock().heartbeat(request.into_inner())?))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ProgressReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.lock().progress(request.into_inner())?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_checkpoint(
        &self,
        request: Request<pb::CheckpointReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.lock().checkpoint(request.into_inner())?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_done(
        &self,
        request: Request<pb::DoneReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        self.lock().done(request.into_inner())?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        self.lock().leave(request.into_inner())?;
        Ok(Response::new(pb::Ack {}))
    }
}
