//! Delivers a rank's reports to the coordinator in order, retrying while it is unreachable.
//! Consecutive progress reports of one rank are merged (log lines concatenated, the newest
//! metric kept), so an outage costs one report, not a backlog.

use super::{authed, retryable};
use herd_proto::pb;
use herd_proto::pb::workers_client::WorkersClient;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tonic::transport::Channel;
use tonic::{Code, Status};

#[derive(Debug, Clone)]
pub(super) enum Report {
    Progress(pb::ProgressReport),
    Checkpoint(pb::CheckpointReport),
    Done(pb::DoneReport),
}

impl Report {
    fn key(&self) -> (&str, u32) {
        match self {
            Report::Progress(r) => (&r.job_id, r.attempt),
            Report::Checkpoint(r) => (&r.job_id, r.attempt),
            Report::Done(r) => (&r.job_id, r.attempt),
        }
    }
}

/// Merge `next` into `prev` when both are progress reports of the same rank attempt.
pub(super) fn merge(prev: &mut Report, next: Report) -> Option<Report> {
    match (prev, next) {
        (Report::Progress(p), Report::Progress(n))
            if p.job_id == n.job_id && p.attempt == n.attempt && p.rank == n.rank =>
        {
            p.log_lines.extend(n.log_lines);
            if n.total_steps > 0 {
                p.total_steps = n.total_steps;
            }
            if n.metric.is_some() {
                p.metric = n.metric;
            }
            if n.eval.is_some() {
                p.eval = n.eval;
            }
            if n.started.is_some() {
                p.started = n.started;
            }
            None
        }
        (_, n) => Some(n),
    }
}

pub(super) struct Reporter {
    pub client: WorkersClient<Channel>,
    pub token: Option<String>,
    pub rx: UnboundedReceiver<Report>,
    /// (job, attempt) of each done report once delivered (or given up on).
    pub delivered: UnboundedSender<(String, u32)>,
}

impl Reporter {
    pub async fn run(mut self) {
        let mut queue: VecDeque<Report> = VecDeque::new();
        let mut failures = 0u32;
        let mut first_failure: Option<Instant> = None;
        loop {
            if queue.is_empty() {
                match self.rx.recv().await {
                    Some(r) => queue.push_back(r),
                    None => return,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                // Never merge into the front: a copy of it may be on the wire.
                if queue.len() > 1 {
                    if let Some(r) = merge(queue.back_mut().unwrap(), r) {
                        queue.push_back(r);
                    }
                } else {
                    queue.push_back(r);
                }
            }
            let front = queue.front().expect("non-empty").clone();
            match self.send(&front).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!("reports reach the coordinator again");
                    }
                    failures = 0;
                    first_failure = None;
                    self.finish(queue.pop_front().unwrap());
                }
                Err(e) => {
                    failures += 1;
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    // Transport trouble: retry forever. A coordinator that answers but refuses
                    // (e.g. it does not know this worker yet after a restart) gets a while to
                    // sort itself out; after that the report is dropped.
                    let keep = retryable(e.code())
                        || (matches!(e.code(), Code::NotFound | Code::FailedPrecondition)
                            && since.elapsed() < Duration::from_secs(30));
                    if failures == 1 {
                        tracing::warn!(
                            "reporting to the coordinator failed ({}: {}); retrying",
                            e.code(),
                            e.message()
                        );
                    }
                    if keep {
                        let delay = Duration::from_millis(100u64 << failures.min(5))
                            .min(Duration::from_secs(2));
                        tokio::time::sleep(delay).await;
                    } else {
                        tracing::warn!(
                            job = front.key().0,
                            "the coordinator refused a report ({}: {}); dropping it",
                            e.code(),
                            e.message()
                        );
                        failures = 0;
                        first_failure = None;
                        self.finish(queue.pop_front().unwrap());
                    }
                }
            }
        }
    }

    fn finish(&self, r: Report) {
        if let Report::Done(d) = r {
            let _ = self.delivered.send((d.job_id, d.attempt));
        }
    }

    async fn send(&mut self, r: &Report) -> Result<(), Status> {
        let t = self.token.as_deref();
        let call = async {
            match r.clone() {
                Report::Progress(p) => self.client.report_progress(authed(t, p)).await.map(|_| ()),
                Report::Checkpoint(c) => self
                    .client
                    .report_checkpoint(authed(t, c))
                    .await
                    .map(|_| ()),
                Report::Done(d) => self.client.report_done(authed(t, d)).await.map(|_| ()),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("report timed out")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(lines: &[&str], step: Option<u64>) -> Report {
        Report::Progress(pb::ProgressReport {
            job_id: "j".into(),
            attempt: 1,
            total_steps: 10,
            metric: step.map(|s| pb::Metric {
                step: s,
                ..Default::default()
            }),
            log_lines: lines.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn progress_reports_merge_keeping_lines_and_newest_metric() {
        let mut a = prog(&["a"], Some(1));
        assert!(merge(&mut a, prog(&["b", "c"], Some(2))).is_none());
        let mut started = prog(&["d"], None);
        if let Report::Progress(p) = &mut started {
            p.started = Some(pb::Started {
                start_step: 4,
                resumed_from: "out/checkpoint-4".into(),
                changed: vec![],
            });
        }
        assert!(merge(&mut a, started).is_none());
        assert!(merge(&mut a, prog(&["e"], None)).is_none());
        let Report::Progress(p) = a else { panic!() };
        assert_eq!(p.log_lines, vec!["a", "b", "c", "d", "e"]);
        assert_eq!(p.metric.unwrap().step, 2);
        assert_eq!(p.started.unwrap().start_step, 4);
    }

    #[test]
    fn other_reports_do_not_merge() {
        let mut a = prog(&["a"], Some(1));
        let done = Report::Done(pb::DoneReport {
            job_id: "j".into(),
            attempt: 1,
            ..Default::default()
        });
        assert!(merge(&mut a, done).is_some());
        let mut other_attempt = prog(&[], None);
        let mut b = prog(&["x"], None);
        if let Report::Progress(p) = &mut b {
            p.attempt = 2;
        }
        assert!(merge(&mut other_attempt, b).is_some());
    }
}
