//! The orchestrator end to end on loopback: `herd run` equals one process with the same global
//! batch, 16 workers on one machine, bad jobs and bad tokens refused with nothing stored.

mod common;
use common::*;
use std::time::{Duration, Instant};

const STEPS: &str = "max_steps: 6\nsave_steps: 2\n";

/// No process is left whose command line mentions `needle`.
fn assert_no_process_mentions(needle: &str) {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    assert!(found.is_empty(), "processes left behind: {found:?}");
}

fn state_dir_of(stderr: &str) -> String {
    let i = stderr
        .find("state and logs in ")
        .expect("herd run names its state dir")
        + "state and logs in ".len();
    stderr[i..].split_whitespace().next().unwrap().to_string()
}

#[test]
fn run_with_two_workers_equals_one_process_with_twice_the_accumulation() {
    let ws = Workspace::new(48);
    const SEEN: &str = "include_num_input_tokens_seen: non_padding\n";
    let job = ws.job("job.yaml", "dp", &format!("{STEPS}{SEEN}"));
    let stderr = ws.run_workers(&job, 2);
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    assert!(stderr.contains("loss"), "progress is shown: {stderr}");
    assert!(
        stderr.contains("--workers 2 overrides the job's world_size 1: global batch 4 → 8"),
        "{stderr}"
    );
    assert_no_process_mentions(&state_dir_of(&stderr));

    let single = ws.job(
        "single.yaml",
        "single",
        &format!("{STEPS}{SEEN}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&single, &[]);
    let (dp, one) = (ws.path().join("dp"), ws.path().join("single"));
    assert_eq!(trainer_state(&dp)["global_step"], 6);
    // total_flos and num_input_tokens_seen sum both ranks' tokens: the one process's counts.
    for key in ["total_flos", "num_input_tokens_seen"] {
        let n = trainer_state(&dp)[key].as_f64().unwrap();
        assert!(n > 0.0, "{key}");
        assert_eq!(n, trainer_state(&one)[key].as_f64().unwrap(), "{key}");
    }
    assert_weights_close(
        &dp.join("model.safetensors"),
        &one.join("model.safetensors"),
        1e-5,
    );
    // Same loss history (the logged losses are global-batch means).
    let (h1, h2) = (
        trainer_state(&dp)["log_history"].clone(),
        trainer_state(&one)["log_history"].clone(),
    );
    for (a, b) in h1.as_array().unwrap()[..6]
        .iter()
        .zip(&h2.as_array().unwrap()[..6])
    {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= 1e-4 * la.abs().max(1.0), "{a} vs {b}");
    }
    assert!(dp.join("checkpoint-6/herd_manifest.json").is_file());
}

/// Two worker processes sum their gradients bucket by bucket during the backward
/// (`ddp_bucket_cap_mb: 1` cuts the demo model's 3.6 MB into several buckets) or in one bucket
/// once the backward is done: the same bits, since a sum over two ranks has one order.
#[test]
fn bucketed_gradient_sums_on_two_workers_equal_one_sum_after_the_backward() {
    let ws = Workspace::new(24);
    let mut models = vec![];
    for (name, cap) in [("buckets", 1), ("one", 1000)] {
        let job = ws.job(
            &format!("{name}.yaml"),
            name,
            &format!("{STEPS}ddp_bucket_cap_mb: {cap}\n"),
        );
        let stderr = ws.run_workers(&job, 2);
        assert!(stderr.contains("SUCCEEDED"), "{stderr}");
        models.push(read(ws.path().join(name).join("model.safetensors")));
    }
    assert!(models[0] == models[1], "the two runs' weights differ");
}

/// LoRA dropout masks are keyed by the example, not by where it sits, so even with dropout on,
/// 2 workers train the same adapter as 1 process with twice the accumulation.
#[test]
fn lora_dropout_gives_the_same_adapter_on_two_workers_and_one_process() {
    let ws = Workspace::new(16);
    let lora = "max_steps: 3\nsave_steps: 3\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.2\n";
    let job = ws.job("job.yaml", "dp", lora);
    ws.run_workers(&job, 2);
    let single = ws.job(
        "single.yaml",
        "single",
        &format!("{lora}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&single, &[]);
    assert_weights_close(
        &ws.path().join("dp/adapter_model.safetensors"),
        &ws.path().join("single/adapter_model.safetensors"),
        1e-5,
    );
}

#[test]
fn sixteen_workers_on_one_machine_finish_a_tiny_job() {
    let ws = Workspace::new(64);
    let job = ws.job(
        "job16.yaml",
        "w16",
        "per_device_train_batch_size: 1\nmax_steps: 4\nsave_steps: 2\n",
    );
    let t0 = Instant::now();
    let stderr = ws.run_workers(&job, 16);
    eprintln!(
        "16 workers: {:.1}s in all; {}",
        t0.elapsed().as_secs_f64(),
        stderr
            .lines()
            .find(|l| l.contains("first step"))
            .unwrap_or("?")
    );
    assert!(stderr.contains("world_size 16"), "{stderr}");
    assert_eq!(trainer_state(&ws.path().join("w16"))["global_step"], 4);
    assert!(ws.path().join("w16/model.safetensors").is_file());
    assert_no_process_mentions(&state_dir_of(&stderr));
}

#[test]
fn invalid_jobs_are_refused_at_submit_and_nothing_is_queued() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 10.0);
    let cases: Vec<(std::path::PathBuf, Vec<&str>, &str)> = vec![
        (
            ws.job("unknown.yaml", "o1", "learning_rat: 1\n"),
            vec![],
            "learning_rat",
        ),
        (
            ws.job("type.yaml", "o2", "max_steps: many\n"),
            vec![],
            "max_steps",
        ),
        (
            ws.job("zero.yaml", "o3", "world_size: 0\n"),
            vec![],
            "world_size",
        ),
        (
            ws.job("big.yaml", "o4", "max_steps: 2\n"),
            vec!["--world-size", "100"],
            "world",
        ),
        {
            let p = ws.path().join("nodata.yaml");
            std::fs::write(
                &p,
                "model_name_or_path: demo/model\ndata_path: missing.json\noutput_dir: o5\n",
            )
            .unwrap();
            (p, vec![], "missing.json")
        },
        {
            let p = ws.path().join("nomodel.yaml");
            std::fs::write(
                &p,
                "model_name_or_path: demo/data\ndata_path: small.json\noutput_dir: o6\n",
            )
            .unwrap();
            (p, vec![], "config.json")
        },
    ];
    for (job, extra, needle) in cases {
        let mut args = vec!["submit", job.to_str().unwrap()];
        args.extend(extra);
        let err = run_err(&mut client(ws.path(), &addr, &state, &args));
        assert!(
            err.contains("refused") || err.contains(needle),
            "{}: {err}",
            job.display()
        );
        assert!(
            err.contains(needle),
            "{}: message should mention {needle}: {err}",
            job.display()
        );
    }
    let out = run_ok(&mut client(ws.path(), &addr, &state, &["list"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no jobs");
    for o in ["o1", "o2", "o3", "o4", "o5", "o6"] {
        assert!(!ws.path().join(o).exists(), "{o} was written");
    }
    // `herd run` checks the job before it starts anything.
    let err = run_err(herd_clean().current_dir(ws.path()).args([
        "run",
        "unknown.yaml",
        "--workers",
        "2",
    ]));
    assert!(err.contains("learning_rat"), "{err}");
}

#[test]
fn calls_without_or_with_a_wrong_token_are_refused_and_change_nothing() {
    let ws = Workspace::new(48);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 10.0);
    // The coordinator made a private token.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let job = ws.job("job.yaml", "out", STEPS);

    let none = run_err(herd_clean().current_dir(ws.path()).args([
        "submit",
        "job.yaml",
        "--coordinator",
        &addr,
    ]));
    assert!(none.to_lowercase().contains("unauthenticated"), "{none}");
    let bad_file = ws.path().join("bad-token");
    std::fs::write(&bad_file, "not-the-token\n").unwrap();
    let loose = run_err(
        herd_clean()
            .current_dir(ws.path())
            .args(["submit", "job.yaml", "--coordinator", &addr, "--token-file"])
            .arg(&bad_file),
    );
    assert!(loose.contains("chmod 600"), "{loose}");
    std::fs::set_permissions(
        &bad_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let wrong = run_err(
        herd_clean()
            .current_dir(ws.path())
            .args(["submit", "job.yaml", "--coordinator", &addr, "--token-file"])
            .arg(&bad_file),
    );
    assert!(wrong.to_lowercase().contains("unauthenticated"), "{wrong}");
    let wrong_env = run_err(
        herd_clean()
            .current_dir(ws.path())
            .env("HERD_TOKEN", "nope")
            .args(["list", "--coordinator", &addr]),
    );
    assert!(
        wrong_env.to_lowercase().contains("unauthenticated"),
        "{wrong_env}"
    );
    let cancel = run_err(
        herd_clean()
            .current_dir(ws.path())
            .env("HERD_TOKEN", "nope")
            .args(["cancel", "job-1", "--coordinator", &addr]),
    );
    assert!(
        cancel.to_lowercase().contains("unauthenticated"),
        "{cancel}"
    );

    // A worker with a wrong token is refused and says so.
    let t0 = Instant::now();
    let out = herd_clean()
        .current_dir(ws.path())
        .env("HERD_TOKEN", "nope")
        .args(["worker", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unauthenticated") || err.contains("unauthenticated"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20));

    // Nothing changed: with the right token there are no jobs (and no workers ran anything).
    let out = run_ok(&mut client(ws.path(), &addr, &state, &["list"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no jobs");
    assert!(!ws.path().join("out").exists());
    let _ = job;

    // The GPU device is refused clearly by this CPU build.
    let err = run_err(herd_clean().args(["worker", "--coordinator", &addr, "--device", "cuda:0"]));
    assert!(err.contains("without CUDA support"), "{err}");
}

#[test]
fn a_job_resumed_at_another_world_size_continues_exactly() {
    // The same global batch of 4: one process with accumulation 2 for steps 1-3, then two
    // workers with accumulation 1 from checkpoint-3, against one process for all 6 steps.
    let ws = Workspace::new(48);
    let steps = "per_device_train_batch_size: 2\nmax_steps: 6\nsave_steps: 3\n";
    let full = ws.job(
        "full.yaml",
        "full",
        &format!("{steps}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&full, &[]);
    let first = ws.job(
        "first.yaml",
        "moved",
        &format!("{steps}gradient_accumulation_steps: 2\n"),
    );
    ws.train(&first, &["--until-step", "3"]);
    let second = ws.job("second.yaml", "moved", steps);
    let stderr = ws.run_workers(&second, 2);
    assert!(stderr.contains("SUCCEEDED"));
    let st = trainer_state(&ws.path().join("moved"));
    assert_eq!(st["global_step"], 6);
    assert!(ws
        .path()
        .join("moved/checkpoint-6/herd_manifest.json")
        .is_file());
    let manifest: serde_json::Value = serde_json::from_slice(&read(
        ws.path().join("moved/checkpoint-6/herd_manifest.json"),
    ))
    .unwrap();
    assert_eq!(
        manifest["world_size"], 2,
        "the second part ran on two ranks"
    );
    assert_weights_close(
        &ws.path().join("full/model.safetensors"),
        &ws.path().join("moved/model.safetensors"),
        1e-5,
    );
}

#[test]
fn a_worker_of_a_loopback_coordinator_listens_on_loopback_by_default() {
    let ws = Workspace::new(8);
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 5.0);
    let log = ws.path().join("w.log");
    let child = herd_clean()
        .current_dir(ws.path())
        .args(["worker", "--coordinator", &addr, "--state-dir"])
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let w = Proc { child, log };
    wait_until("the worker to register", Duration::from_secs(30), || {
        w.log_text().contains("registered with")
    });
    // A coordinator elsewhere makes it listen on every interface instead (unit-tested in the
    // worker's daemon::address, as no second machine is here).
    let text = w.log_text();
    assert!(text.contains("(collective 127.0.0.1:"), "{text}");
}

/// `herd run` says where the job's attempt began, once: resumed from the checkpoint a paused
/// `herd train` left, with the keys changed since it, as `herd train` says it when it resumes.
#[test]
fn herd_run_says_once_where_the_attempt_started_and_what_changed() {
    let ws = Workspace::new(16);
    let steps = "max_steps: 4\nsave_steps: 2\n";
    let first = ws.job("first.yaml", "out", steps);
    ws.train(&first, &["--until-step", "2"]);
    let second = ws.job(
        "second.yaml",
        "out",
        &format!("{steps}max_grad_norm: 0.5\n"),
    );
    let stderr = ws.run_workers(&second, 1);
    assert!(stderr.contains("SUCCEEDED"), "{stderr}");
    let started: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("started: "))
        .collect();
    assert_eq!(started.len(), 1, "{stderr}");
    let out = ws.path().join("out").canonicalize().unwrap();
    assert!(
        started[0].starts_with(&format!(
            "started: attempt 1 at step 2, resumed from {}",
            out.join("checkpoint-2").display()
        )),
        "{stderr}"
    );
    assert!(
        started[0].ends_with("; the job changed since: max_grad_norm 1.0 → 0.5"),
        "{stderr}"
    );
}

/// `herd submit --world-size N` says what N does to the job's global batch, as
/// `herd run --workers N` does, and says nothing when N is the job's own world_size.
#[test]
fn submit_at_another_world_size_says_how_the_global_batch_changes() {
    let ws = Workspace::new(24); // one global batch of 3 ranks
    let state = ws.path().join("state");
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 10.0);
    // Each job its own output_dir: a queued job holds its own.
    let submit = |out: &str, n: &str| {
        let job = ws.job(
            &format!("{out}.yaml"),
            out,
            "max_steps: 2\ngradient_accumulation_steps: 2\n",
        );
        let out = run_ok(&mut client(
            ws.path(),
            &addr,
            &state,
            &["submit", job.to_str().unwrap(), "--world-size", n],
        ));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = submit("three", "3");
    assert!(
        err.contains(
            "herd submit: --world-size 3 overrides the job's world_size 1: global batch 8 → 24"
        ),
        "{err}"
    );
    let err = submit("one", "1");
    assert!(!err.contains("overrides"), "{err}");
}
