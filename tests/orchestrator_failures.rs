//! Failures on loopback: a worker SIGKILLed mid-job, a worker hung (SIGSTOP), a coordinator
//! killed and restarted, a worker preempted with SIGTERM. Each job still ends with the weights of an uninterrupted run.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const STEPS: &str = "max_steps: 12\nsave_steps: 2\nsave_total_limit: 2\n";

/// The uninterrupted reference: one process with the same global batch as 2 workers.
fn reference(ws: &Workspace, name: &str) -> std::path::PathBuf {
    let job = ws.job(
        &format!("{name}.yaml"),
        name,
        &format!("{STEPS}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&job, &[]);
    ws.path().join(name)
}

fn submit(ws: &Workspace, addr: &str, state: &Path, job: &Path) -> String {
    let out = run_ok(&mut client(
        ws.path(),
        addr,
        state,
        &["submit", job.to_str().unwrap()],
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn watch_to_end(ws: &Workspace, addr: &str, state: &Path, job: &str) -> serde_json::Value {
    run_ok(&mut client(
        ws.path(),
        addr,
        state,
        &["status", job, "--watch"],
    ));
    job_status(ws.path(), addr, state, job)
}

#[test]
fn a_worker_killed_mid_job_restarts_from_the_checkpoint_with_the_same_result() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 2.0);
    let mut w0 = start_worker(ws.path(), &addr, &state, "w0");
    let _w1 = start_worker(ws.path(), &addr, &state, "w1");
    let job = ws.job("job.yaml", "out", &format!("{STEPS}world_size: 2\n"));
    let id = submit(&ws, &addr, &state, &job);
    let out = ws.path().join("out");
    wait_until("the first checkpoint", Duration::from_secs(60), || {
        out.join("checkpoint-2/herd_manifest.json").is_file()
    });
    w0.kill();
    let st = job_status(ws.path(), &addr, &state, &id);
    assert_ne!(
        st["state"], "SUCCEEDED",
        "the job ended before the kill; make it longer: {st}"
    );
    let _w2 = start_worker(ws.path(), &addr, &state, "w2");
    let st = watch_to_end(&ws, &addr, &state, &id);
    assert_eq!(st["state"], "SUCCEEDED", "{st}");
    assert!(st["restarts"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        !st["restart_reasons"].as_array().unwrap().is_empty(),
        "{st}"
    );
    let logs = run_ok(&mut client(
        ws.path(),
        &addr,
        &state,
        &["logs", &id, "--rank", "0"],
    ));
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("resumed from"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );
    // The job's events tell the story: running, the restart with its reason, success.
    let events = run_ok(&mut client(ws.path(), &addr, &state, &["events", &id]));
    let events = String::from_utf8_lossy(&events.stdout).into_owned();
    let kinds: Vec<&str> = events
        .lines()
        .filter_map(|l| l.split("  ").nth(1))
        .collect();
    let restart = kinds.iter().position(|k| *k == "RESTARTING");
    assert!(
        restart.is_some_and(|r| kinds[..r].contains(&"RUNNING"))
            && kinds.last() == Some(&"SUCCEEDED"),
        "{events}"
    );
    // Rank 0 says where each attempt really began: the first from the model, a later one from
    // the checkpoint it loaded.
    let started: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("  started  "))
        .collect();
    assert!(
        started.len() >= 2
            && started[0].ends_with("attempt 1 at step 0 from the model")
            && started[1..]
                .iter()
                .all(|l| l.contains("resumed from") && l.contains("checkpoint-")),
        "{events}"
    );
    let cluster = run_ok(&mut client(ws.path(), &addr, &state, &["events"]));
    assert!(
        String::from_utf8_lossy(&cluster.stdout).contains("worker"),
        "{}",
        String::from_utf8_lossy(&cluster.stdout)
    );

    let reference = reference(&ws, "reference");
    assert_eq!(trainer_state(&out)["global_step"], 12);
    assert_weights_close(
        &out.join("model.safetensors"),
        &reference.join("model.safetensors"),
        1e-5,
    );
}

#[test]
fn a_coordinator_restart_loses_no_job_and_the_running_job_finishes() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (mut coord, addr) = start_coordinator(ws.path(), &state, 0, 3.0);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let _w0 = start_worker(ws.path(), &addr, &state, "w0");
    let _w1 = start_worker(ws.path(), &addr, &state, "w1");
    let job = ws.job("job.yaml", "out", &format!("{STEPS}world_size: 2\n"));
    let id = submit(&ws, &addr, &state, &job);
    let queued = ws.job(
        "later.yaml",
        "later",
        "max_steps: 2\nworld_size: 2\neval_strategy: steps\neval_steps: 1\neval_data_path: small.json\n",
    );
    let later = submit(&ws, &addr, &state, &queued);
    let out = ws.path().join("out");
    wait_until("the first checkpoint", Duration::from_secs(60), || {
        out.join("checkpoint-2/herd_manifest.json").is_file()
    });
    coord.kill();
    std::thread::sleep(Duration::from_millis(500));
    let (_coord2, addr2) = start_coordinator(ws.path(), &state, port, 3.0);
    assert_eq!(addr2, addr);
    let list = run_ok(&mut client(ws.path(), &addr, &state, &["list"]));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&id) && text.contains(&later), "{text}");
    let st = watch_to_end(&ws, &addr, &state, &id);
    assert_eq!(st["state"], "SUCCEEDED", "{st}");
    let st2 = watch_to_end(&ws, &addr, &state, &later);
    assert_eq!(st2["state"], "SUCCEEDED", "{st2}");
    // The status carries the newest evaluation, the trainer's last eval entry.
    let history = trainer_state(&ws.path().join("later"))["log_history"].clone();
    let last_eval = history
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e.get("eval_loss").is_some())
        .expect("eval entries in the log history")
        .clone();
    assert_eq!(st2["last_eval"]["step"], last_eval["step"], "{st2}");
    let (a, b) = (
        st2["last_eval"]["values"]["eval_loss"].as_f64().unwrap(),
        last_eval["eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * b.abs(), "{a} vs {b}");
    let text = String::from_utf8_lossy(
        &run_ok(&mut client(ws.path(), &addr, &state, &["status", &later])).stdout,
    )
    .into_owned();
    assert!(text.contains("eval at step 2: eval_loss"), "{text}");
    let reference = reference(&ws, "reference");
    assert_weights_close(
        &out.join("model.safetensors"),
        &reference.join("model.safetensors"),
        1e-5,
    );
}

#[test]
fn sigterm_makes_a_worker_checkpoint_report_paused_and_exit() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 3.0);
    let mut w0 = start_worker(ws.path(), &addr, &state, "w0");
    let job = ws.job("job.yaml", "out", "max_steps: 40\nsave_steps: 100\n");
    let id = submit(&ws, &addr, &state, &job);
    wait_until("a step", Duration::from_secs(60), || {
        job_status(ws.path(), &addr, &state, &id)["step"]
            .as_u64()
            .unwrap()
            >= 1
    });
    w0.signal("TERM");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = w0.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "worker did not exit: {}",
            w0.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", w0.log_text());
    let st = job_status(ws.path(), &addr, &state, &id);
    let ckpt = st["last_checkpoint_step"].as_u64().unwrap();
    assert!(
        (1..40).contains(&ckpt),
        "a checkpoint at the stop step: {st}"
    );
    assert!(ws
        .path()
        .join(format!("out/checkpoint-{ckpt}/herd_manifest.json"))
        .is_file());
    let logs = run_ok(&mut client(ws.path(), &addr, &state, &["logs", &id]));
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("paused at step"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );
    // The worker said goodbye: counted out at once, not found dead after the timeout.
    let events = run_ok(&mut client(ws.path(), &addr, &state, &["events"]));
    let events = String::from_utf8_lossy(&events.stdout).into_owned();
    assert!(events.contains("left: stopped by SIGTERM"), "{events}");
    assert!(!events.contains("heartbeats again"), "{events}");
    // A new worker picks the job up where it stopped and finishes it.
    let _w1 = start_worker(ws.path(), &addr, &state, "w1");
    let st = watch_to_end(&ws, &addr, &state, &id);
    assert_eq!(st["state"], "SUCCEEDED", "{st}");
    let events = run_ok(&mut client(ws.path(), &addr, &state, &["events"]));
    let events = String::from_utf8_lossy(&events.stdout).into_owned();
    assert!(!events.contains("dead: no heartbeat"), "{events}");
}

#[test]
fn sigterm_to_the_worker_of_rank_1_checkpoints_the_whole_job() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 3.0);
    let workers = [
        start_worker(ws.path(), &addr, &state, "w0"),
        start_worker(ws.path(), &addr, &state, "w1"),
    ];
    let job = ws.job(
        "job.yaml",
        "out",
        "max_steps: 40
save_steps: 100
world_size: 2
",
    );
    let id = submit(&ws, &addr, &state, &job);
    let mut rank1 = String::new();
    wait_until("a step on both ranks", Duration::from_secs(60), || {
        let st = job_status(ws.path(), &addr, &state, &id);
        let ranks = st["ranks"].as_array().cloned().unwrap_or_default();
        if let Some(r) = ranks.iter().find(|r| r["rank"] == 1) {
            rank1 = r["worker_id"].as_str().unwrap_or_default().to_string();
        }
        st["step"].as_u64().unwrap_or(0) >= 1 && !rank1.is_empty()
    });
    // The worker whose log names the id of rank 1.
    let victim = workers
        .iter()
        .find(|w| {
            w.log_text()
                .contains(&format!("herd worker {rank1} registered"))
        })
        .expect("the worker of rank 1");
    victim.signal("TERM");
    wait_until(
        "the checkpoint of the stop",
        Duration::from_secs(60),
        || {
            let st = job_status(ws.path(), &addr, &state, &id);
            st["last_checkpoint_step"]
                .as_u64()
                .is_some_and(|s| (1..40).contains(&s))
        },
    );
    let st = job_status(ws.path(), &addr, &state, &id);
    let ckpt = st["last_checkpoint_step"].as_u64().unwrap();
    assert!(ws
        .path()
        .join(format!("out/checkpoint-{ckpt}/herd_manifest.json"))
        .is_file());
    // A new worker takes rank 1's place and the job ends.
    let _w2 = start_worker(ws.path(), &addr, &state, "w2");
    let st = watch_to_end(&ws, &addr, &state, &id);
    assert_eq!(st["state"], "SUCCEEDED", "{st}");
}

#[test]
fn a_hung_worker_is_given_up_and_its_peer_stops_at_once() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 2.0);
    let w0 = start_worker(ws.path(), &addr, &state, "w0");
    let w1 = start_worker(ws.path(), &addr, &state, "w1");
    let job = ws.job(
        "job.yaml",
        "out",
        "max_steps: 30\nsave_steps: 2\nworld_size: 2\n",
    );
    let id = submit(&ws, &addr, &state, &job);
    let out = ws.path().join("out");
    wait_until("the first checkpoint", Duration::from_secs(60), || {
        out.join("checkpoint-2/herd_manifest.json").is_file()
    });
    // Hung, not dead: its sockets stay open, so its peer's read would wait out the collective's
    // 120 s socket timeout. The coordinator gives it up after 2 s of silence and its stop order
    // ends the peer's collective at once.
    w0.signal("STOP");
    peer_gives_up_and_a_new_worker_finishes(
        &ws,
        (&addr, &state, &id),
        &w1,
        Duration::from_secs(30),
        "aborted: stop order from the coordinator",
        30,
    );
    drop(w0); // SIGKILL reaps a stopped process too
}

/// The hung worker's peer stops its rank within `within` (its log saying `peer_says`), the job
/// waits for a second idle worker, and a new worker finishes it at `steps`.
fn peer_gives_up_and_a_new_worker_finishes(
    ws: &Workspace,
    (addr, state, id): (&str, &Path, &str),
    peer: &Proc,
    within: Duration,
    peer_says: &str,
    steps: u64,
) {
    let t0 = std::time::Instant::now();
    wait_until("the peer to give the attempt up", within, || {
        let st = job_status(ws.path(), addr, state, id);
        st["state"] == "RESTARTING"
            && st["reason"]
                .as_str()
                .is_some_and(|r| r.contains("waiting for 2 idle workers (1 idle)"))
    });
    assert!(t0.elapsed() < within);
    let peer_log = peer.log_text();
    assert!(peer_log.contains(peer_says), "{peer_log}");
    // A new worker takes the hung one's place and the job finishes.
    let _w2 = start_worker(ws.path(), addr, state, "w2");
    let st = watch_to_end(ws, addr, state, id);
    assert_eq!(st["state"], "SUCCEEDED", "{st}");
    assert_eq!(trainer_state(&ws.path().join("out"))["global_step"], steps);
}

#[test]
fn a_worker_hung_before_its_ring_formed_does_not_hold_its_peer() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 4.0);
    let w0 = start_worker(ws.path(), &addr, &state, "w0");
    let w1 = start_worker(ws.path(), &addr, &state, "w1");
    wait_until("both workers to register", Duration::from_secs(30), || {
        [&w0, &w1]
            .iter()
            .all(|w| w.log_text().contains("registered with"))
    });
    // Hung while still looking idle (its last heartbeat is fresh): it is given rank 0 or 1
    // but never takes its assignment, so its peer waits in the ring's set-up for a
    // neighbour that never comes, until the ring's 120 s deadline but for the stop order.
    w0.signal("STOP");
    let job = ws.job("job.yaml", "out", "max_steps: 4\nworld_size: 2\n");
    let id = submit(&ws, &addr, &state, &job);
    peer_gives_up_and_a_new_worker_finishes(
        &ws,
        (&addr, &state, &id),
        &w1,
        Duration::from_secs(40),
        "aborted while forming the ring: stop order from the coordinator",
        4,
    );
    drop(w0);
}

#[test]
fn an_error_in_the_job_itself_fails_it_at_once_instead_of_spending_its_restarts() {
    let ws = Workspace::new(16);
    // Valid at submit; the DeepSpeed schedule's warmup is checked against the job's when the
    // ranks know their step count, as HF Trainer checks it, and disagrees.
    let job = ws.job(
        "bad.yaml",
        "bad",
        "max_steps: 4\nmax_restarts: 3\ndeepspeed:\n  scheduler:\n    type: WarmupLR\n    \
         params: {warmup_num_steps: 10}\n",
    );
    let err = run_err(
        herd_clean()
            .current_dir(ws.path())
            .arg("run")
            .arg(&job)
            .args(["--workers", "2"]),
    );
    assert!(
        err.contains("`scheduler.params.warmup_num_steps` is 10 but the job's warmup"),
        "{err}"
    );
    assert!(
        err.contains("not restarted: the error comes from the job"),
        "{err}"
    );
    assert!(!err.contains("restart 1 of 3"), "{err}");
}

/// `herd run` starts a worker that died again, as torchrun restarts its workers: the job
/// restarts from its checkpoint on it and ends with an uninterrupted run's weights.
#[test]
fn herd_run_starts_a_killed_worker_again_and_the_job_finishes() {
    let ws = Workspace::new(48);
    // Long enough that the kill comes mid-job on any machine.
    let steps = "max_steps: 60\nsave_steps: 2\nsave_total_limit: 2\n";
    let job = ws.job("job.yaml", "out", &format!("{steps}world_size: 2\n"));
    let err_path = ws.path().join("run.stderr");
    let mut run = herd_clean()
        .current_dir(ws.path())
        .arg("run")
        .arg(&job)
        // No --workers: the job's world_size (2) is the number of workers.
        .args(["--heartbeat-timeout-s", "2"])
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let out = ws.path().join("out");
    wait_until("the first checkpoint", Duration::from_secs(60), || {
        out.join("checkpoint-2/herd_manifest.json").is_file()
    });
    // The workers are the processes started with `worker ... --state-dir <the run's dir>`.
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let state = stderr
        .split("state and logs in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("herd run names its state dir")
        .to_string();
    let worker = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (cmd.contains(" worker ") && cmd.contains(&state)).then_some(pid)
        })
        .expect("a worker of the run");
    // SAFETY: kill(2) on a process this test's child started.
    unsafe {
        libc::kill(worker, libc::SIGKILL);
    }
    let status = run.wait().unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("starting it again (restart 1 of max_restarts 3)"),
        "{stderr}"
    );
    // The dead worker's log is kept, where the run said it was.
    assert!(
        stderr.contains(&format!("state and logs kept in {state}")),
        "{stderr}"
    );
    assert!(
        Path::new(&state).join("worker-0.log").is_file()
            || Path::new(&state).join("worker-1.log").is_file()
    );
    std::fs::remove_dir_all(&state).unwrap();
    assert_eq!(trainer_state(&out)["global_step"], 60);
    let one = ws.job(
        "one.yaml",
        "one",
        &format!("{steps}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&one, &[]);
    assert_weights_close(
        &out.join("model.safetensors"),
        &ws.path().join("one/model.safetensors"),
        1e-5,
    );
}
