//! The client commands: `herd submit`, `status`, `list`, `cancel`, `logs`.

use super::client::{
    is_terminal, now_unix, progress_line, render_event, render_status, runtime, state_name,
    status_json, Client, ClientArgs, CALL_TIMEOUT,
};
use anyhow::{bail, Context, Result};
use herd_proto::pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::Path;
use tokio_stream::StreamExt;

async fn timed<T>(
    c: &Client,
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(c.explain(what, s)),
        Err(_) => bail!(
            "{what}: the coordinator at {} did not answer within {:?}",
            c.addr,
            CALL_TIMEOUT
        ),
    }
}

/// The job file's text with `world_size` replaced and a `deepspeed` file read in (the other
/// keys as the user wrote them), what herd does differently from that DeepSpeed config said
/// on stderr.
pub fn job_text(path: &Path, world_size: Option<usize>) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec = herd_proto::JobSpec::from_yaml_str(&text, &path.display().to_string())?;
    if world_size.is_none() && spec.deepspeed.is_none() {
        return Ok(text);
    }
    if let Some(n) = world_size {
        spec.world_size = n;
    }
    super::train::read_deepspeed(&mut spec, path)?;
    Ok(spec.to_yaml())
}

/// What `n` ranks instead of the job's `world_size` do to its global batch
/// (per_device_train_batch_size × world_size × gradient_accumulation_steps), with `flag` the
/// option that asked for them; None when `n` is the job's own count.
pub fn world_size_note(asked: &herd_proto::JobSpec, flag: &str, n: usize) -> Option<String> {
    (n != asked.world_size).then(|| {
        format!(
            "{flag} {n} overrides the job's world_size {}: global batch {} → {}",
            asked.world_size,
            asked.global_batch_size(),
            asked.global_batch_size() / asked.world_size.max(1) * n
        )
    })
}

pub async fn submit_text(
    c: &mut Client,
    text: String,
    source: &Path,
) -> Result<pb::SubmitResponse> {
    let base = std::env::current_dir().context("the current directory")?;
    let req = pb::SubmitRequest {
        job_yaml: text,
        source_name: source.display().to_string(),
        base_dir: base.display().to_string(),
    };
    let r = c.req(req);
    let what = format!("submitting {}", source.display());
    let mut jobs = c.jobs.clone();
    timed(c, &what, jobs.submit(r)).await
}

pub fn submit(args: &ClientArgs, job: &Path, world_size: Option<usize>) -> Result<()> {
    let text = job_text(job, world_size)?;
    // The global batch changes with the rank count; said as `herd run --workers` says it.
    if let Some(n) = world_size {
        let asked = herd_proto::JobSpec::from_file(job)?;
        if let Some(note) = world_size_note(&asked, "--world-size", n) {
            eprintln!("herd submit: {note}");
        }
    }
    runtime()?.block_on(async {
        let mut c = Client::connect(args)?;
        let resp = submit_text(&mut c, text, job).await?;
        let state = resp
            .status
            .as_ref()
            .map(|s| state_name(s.state))
            .unwrap_or("QUEUED");
        // Why it waits (too few workers, behind another job), so nobody has to ask status.
        let reason = resp
            .status
            .as_ref()
            .filter(|s| !s.reason.is_empty())
            .map(|s| format!(": {}", s.reason))
            .unwrap_or_default();
        eprintln!(
            "submitted {} as job {} ({state}{reason})",
            job.display(),
            resp.job_id
        );
        println!("{}", resp.job_id);
        Ok(())
    })
}

pub fn status(args: &ClientArgs, job: Option<&str>, watch: bool, json: bool) -> Result<()> {
    runtime()?.block_on(async {
        let c = Client::connect(args)?;
        if watch {
            let id = match job {
                Some(j) => j.to_string(),
                None => {
                    let list = timed(
                        &c,
                        "listing jobs",
                        c.jobs.clone().list_jobs(c.req(pb::ListJobsRequest {})),
                    )
                    .await?;
                    match list.jobs.last() {
                        Some(j) => j.job_id.clone(),
                        None => bail!("no jobs"),
                    }
                }
            };
            let last = watch_job(&c, &id, json, None).await?;
            return exit_for(&last);
        }
        let jobs = match job {
            Some(j) => vec![
                timed(
                    &c,
                    &format!("job {j}"),
                    c.jobs
                        .clone()
                        .get_job(c.req(pb::JobRef { job_id: j.into() })),
                )
                .await?,
            ],
            None => {
                timed(
                    &c,
                    "listing jobs",
                    c.jobs.clone().list_jobs(c.req(pb::ListJobsRequest {})),
                )
                .await?
                .jobs
            }
        };
        if json {
            let v: Vec<_> = jobs.iter().map(status_json).collect();
            let v = if job.is_some() {
                v.into_iter().next().unwrap()
            } else {
                serde_json::Value::Array(v)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else if jobs.is_empty() {
            println!("no jobs");
        } else {
            let now = now_unix();
            for j in &jobs {
                print!("{}", render_status(j, now));
            }
        }
        Ok(())
    })
}

/// A job's exit: success only when it succeeded.
pub fn exit_for(st: &pb::JobStatus) -> Result<()> {
    match pb::JobState::try_from(st.state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Succeeded => Ok(()),
        _ if !is_terminal(st.state) => Ok(()),
        _ => bail!(
            "job {} {}{}",
            st.job_id,
            state_name(st.state),
            if st.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", st.reason)
            }
        ),
    }
}

/// Follow a job until it ends: a progress bar on a terminal, a line per change otherwise.
/// Reconnects while the coordinator restarts. Returns the last status.
pub async fn watch_job(
    c: &Client,
    job_id: &str,
    json: bool,
    started: Option<std::time::Instant>,
) -> Result<pb::JobStatus> {
    let mut first_step_seen = false;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !json;
    let bar = tty.then(|| {
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        pb
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    let mut last: Option<pb::JobStatus> = None;
    // The attempt start told last: each attempt's is told once, when its rank 0 has said it.
    let mut told_start = String::new();
    let mut offline_since: Option<std::time::Instant> = None;
    loop {
        let stream = c
            .jobs
            .clone()
            .watch_job(c.req(pb::JobRef {
                job_id: job_id.into(),
            }))
            .await;
        let mut stream = match stream {
            Ok(s) => {
                if offline_since.take().is_some() {
                    say("coordinator reachable again".into());
                }
                s.into_inner()
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                let since = *offline_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > std::time::Duration::from_secs(120) {
                    return Err(c.explain(&format!("watching job {job_id}"), s));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(s) => return Err(c.explain(&format!("watching job {job_id}"), s)),
        };
        loop {
            let item = stream.next().await;
            let st = match item {
                Some(Ok(st)) => st,
                Some(Err(_)) | None => break,
            };
            report_change(last.as_ref(), &st, &say, json, &mut told_start);
            if !first_step_seen && st.step > 0 {
                first_step_seen = true;
                if let Some(t0) = started {
                    say(format!(
                        "first step done {:.1}s after start",
                        t0.elapsed().as_secs_f64()
                    ));
                }
            }
            if let Some(b) = &bar {
                if st.total_steps > 0 {
                    b.set_length(st.total_steps);
                }
                if last.as_ref().is_none_or(|l| l.step > st.step) {
                    b.reset_eta();
                }
                b.set_position(st.step);
                let mut msg = String::new();
                if let Some(m) = &st.last_metric {
                    msg = format!(
                        "loss {:.4} lr {:.3e} {:.0} tok/s",
                        m.loss, m.learning_rate, m.tokens_per_sec
                    );
                }
                if !st.ranks.is_empty() {
                    let max_age = st
                        .ranks
                        .iter()
                        .map(|r| r.heartbeat_age_s)
                        .fold(0.0, f64::max);
                    msg.push_str(&format!(
                        "  {} ranks, oldest heartbeat {max_age:.1}s",
                        st.ranks.len()
                    ));
                }
                b.set_message(msg);
            }
            let end = is_terminal(st.state);
            last = Some(st);
            if end {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let st = last.unwrap();
                say(format!(
                    "job {} {} at step {}/{}{}",
                    st.job_id,
                    state_name(st.state),
                    st.step,
                    st.total_steps,
                    if st.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", st.reason)
                    }
                ));
                if !json {
                    eprint!("{}", render_status(&st, now_unix()));
                }
                return Ok(st);
            }
        }
        // The stream ended before the job did: the coordinator went away; reconnect.
        offline_since.get_or_insert_with(std::time::Instant::now);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

fn report_change(
    prev: Option<&pb::JobStatus>,
    st: &pb::JobStatus,
    say: &dyn Fn(String),
    json: bool,
    told_start: &mut String,
) {
    if json {
        println!("{}", status_json(st));
        return;
    }
    let changed_state = prev.is_none_or(|p| p.state != st.state || p.reason != st.reason);
    // The end is told once, by the watcher's closing line.
    if changed_state && !is_terminal(st.state) {
        let mut line = format!("job {} {}", st.job_id, state_name(st.state));
        if !st.reason.is_empty() {
            line.push_str(&format!(": {}", st.reason));
        }
        say(line);
    }
    let prev_restarts = prev.map(|p| p.restart_reasons.len()).unwrap_or(0);
    // Each restart's reason says whether it counted ("restart 1 of 3", "preemption does not
    // count"); the newest is usually the state's reason, printed just above.
    for r in st.restart_reasons.iter().skip(prev_restarts) {
        if !(changed_state && *r == st.reason) {
            say(format!("restart: {r}"));
        }
    }
    // Where the attempt began (from the model, or resumed from which checkpoint, and the job's
    // keys changed since it), as `herd train` says it when it starts. Remembered apart from
    // `prev`, so a status in between without it (a restarted coordinator has forgotten it)
    // does not make the same line told twice.
    if !st.attempt_started.is_empty() && st.attempt_started != *told_start {
        say(format!("started: {}", st.attempt_started));
        told_start.clone_from(&st.attempt_started);
    }
    if prev.is_some_and(|p| p.last_checkpoint_step != st.last_checkpoint_step)
        && st.last_checkpoint_step > 0
    {
        say(format!("checkpoint at step {}", st.last_checkpoint_step));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stderr())
        && prev.is_some_and(|p| p.step != st.step)
    {
        say(progress_line(st, now_unix()));
    }
}

pub fn list(args: &ClientArgs, json: bool) -> Result<()> {
    runtime()?.block_on(async {
        let c = Client::connect(args)?;
        let jobs = timed(
            &c,
            "listing jobs",
            c.jobs.clone().list_jobs(c.req(pb::ListJobsRequest {})),
        )
        .await?
        .jobs;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&jobs.iter().map(status_json).collect::<Vec<_>>())?
            );
            return Ok(());
        }
        if jobs.is_empty() {
            println!("no jobs");
            return Ok(());
        }
        println!(
            "{:<12} {:<10} {:>11} {:>5} {:>8}  OUTPUT",
            "JOB", "STATE", "STEP", "WORLD", "RESTARTS"
        );
        for j in &jobs {
            println!(
                "{:<12} {:<10} {:>11} {:>5} {:>8}  {}",
                j.job_id,
                state_name(j.state),
                match j.total_steps {
                    0 => format!("{}/?", j.step), // not known before a rank has started
                    t => format!("{}/{t}", j.step),
                },
                j.world_size,
                j.restarts,
                j.output_dir
            );
        }
        Ok(())
    })
}

pub fn cancel(args: &ClientArgs, job: &str) -> Result<()> {
    runtime()?.block_on(async {
        let c = Client::connect(args)?;
        let st = timed(
            &c,
            &format!("cancelling job {job}"),
            c.jobs
                .clone()
                .cancel_job(c.req(pb::JobRef { job_id: job.into() })),
        )
        .await?;
        println!("job {} {}", st.job_id, state_name(st.state));
        Ok(())
    })
}

pub fn events(args: &ClientArgs, job: &str) -> Result<()> {
    runtime()?.block_on(async {
        let c = Client::connect(args)?;
        let what = if job.is_empty() {
            "the cluster's events".to_string()
        } else {
            format!("events of job {job}")
        };
        let r = timed(
            &c,
            &what,
            c.jobs
                .clone()
                .get_events(c.req(pb::JobRef { job_id: job.into() })),
        )
        .await?;
        for e in r.events {
            println!("{}", render_event(&e));
        }
        Ok(())
    })
}

pub fn logs(args: &ClientArgs, job: &str, rank: u32, lines: u32) -> Result<()> {
    runtime()?.block_on(async {
        let c = Client::connect(args)?;
        let req = pb::GetLogsRequest {
            job_id: job.into(),
            rank,
            max_lines: lines,
        };
        let r = timed(
            &c,
            &format!("logs of job {job} rank {rank}"),
            c.jobs.clone().get_logs(c.req(req)),
        )
        .await?;
        for l in r.lines {
            println!("{l}");
        }
        Ok(())
    })
}
