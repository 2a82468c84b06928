//! The `herd` binary built with `--features cuda` (CUDA issue #5). The first test runs on any
//! machine with the build environment (the link-time stub libcuda stands in for the driver);
//! the others need a GPU and are ignored here (scripts/gpu-test.sh runs them).
#![cfg(feature = "cuda")]

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// With the stub driver (no GPU), `--device cuda:0` prints the clear no-driver error, no panic.
#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    let Ok(stub) = std::env::var("HERD_CUDA_SMOKE_LD_LIBRARY_PATH") else {
        eprintln!(
            "skipped: HERD_CUDA_SMOKE_LD_LIBRARY_PATH unset (eval the cuda-build-env script)"
        );
        return;
    };
    let ws = Workspace::new(8);
    let job = ws.job("job.yaml", "out", "max_steps: 1\n");
    let out = herd()
        .current_dir(ws.path())
        .env("LD_LIBRARY_PATH", stub)
        .args([
            "train",
            job.to_str().unwrap(),
            "--no-progress",
            "--device",
            "cuda:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("no usable CUDA driver (CUDA_ERROR_STUB_LIBRARY)"),
        "{stderr}"
    );
    assert!(stderr.contains("LD_LIBRARY_PATH"), "{stderr}");
}

/// Without the CUDA libraries on the library path the dynamic loader stops before `main`; its
/// message names the missing library (dynamic linking is what candle-core's cuda feature uses).
#[test]
fn missing_cuda_library_is_named() {
    let out = herd()
        .env_remove("LD_LIBRARY_PATH")
        .arg("--help")
        .output()
        .unwrap();
    if out.status.success() {
        eprintln!("skipped: the CUDA libraries are found without LD_LIBRARY_PATH here");
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error while loading shared libraries: lib"),
        "{stderr}"
    );
}

fn start_gpu_worker(dir: &Path, addr: &str, state: &Path, name: &str) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = herd_clean()
        .current_dir(dir)
        .args([
            "worker",
            "--coordinator",
            addr,
            "--collective-listen",
            "127.0.0.1:0",
        ])
        .args(["--device", "cuda:0", "--state-dir"])
        .arg(state)
        // two ranks on one GPU: NCCL refuses "duplicate GPUs" of one host; a host id per
        // process makes them look like two hosts (NCCL >= 2.30: NCCL_MULTI_RANK_GPU_ENABLE=1)
        .env("NCCL_HOSTID", name)
        .env("NCCL_MULTI_RANK_GPU_ENABLE", "1")
        // The two "hosts" talk over loopback sockets; NCCL's own account of its set-up goes
        // into the worker's log, which a failure prints.
        .env("NCCL_IB_DISABLE", "1")
        .env("NCCL_SOCKET_IFNAME", "lo")
        .env("NCCL_DEBUG", "INFO")
        .env("NCCL_DEBUG_SUBSYS", "INIT,NET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// The workers' logs, for a failure's message.
fn logs(workers: &[&Proc]) -> String {
    workers
        .iter()
        .map(|p| format!("\n--- {} ---\n{}", p.log.display(), p.log_text()))
        .collect()
}

/// Polls `cond` until it holds; past `within`, fails with the workers' logs as they are then.
fn wait_for(what: &str, within: Duration, workers: &[&Proc], mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < within,
            "no {what} after {within:?}{}",
            logs(workers)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// Waits for job `id` to end and asserts it succeeded. Bounded, so a hang (an NCCL set-up that
/// never completes) fails with the workers' logs instead of running into the device call's
/// limit with nothing to show.
fn assert_succeeds(ws: &Workspace, (addr, state): (&str, &Path), id: &str, workers: &[&Proc]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let st = loop {
        let st = job_status(ws.path(), addr, state, id);
        let now = st["state"].as_str().unwrap_or("").to_string();
        if ["SUCCEEDED", "FAILED", "CANCELLED"].contains(&now.as_str()) {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the two-GPU job is still {now} after 180 s: {st}{}",
            logs(workers)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(st["state"], "SUCCEEDED", "{st}{}", logs(workers));
}

/// Runs `job` on two GPU workers (one GPU, a host id each) through a coordinator to success.
fn run_on_two_gpu_workers(ws: &Workspace, job: &Path) {
    let state = ws.path().join("state");
    let _ = std::fs::remove_dir_all(&state);
    let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 30.0);
    let w0 = start_gpu_worker(ws.path(), &addr, &state, "w0");
    let w1 = start_gpu_worker(ws.path(), &addr, &state, "w1");
    let id = submit(ws, &addr, &state, job);
    assert_succeeds(ws, (&addr, &state), &id, &[&w0, &w1]);
}

const TWO_GPU_STEPS: &str = "max_steps: 4\nsave_steps: 4\nworld_size: 2\n";

/// A two-worker CUDA job (NCCL all-reduce) ends with the weights of one GPU process with twice
/// the gradient accumulation, within bf16 tolerance.
#[test]
#[ignore = "needs a CUDA GPU and NCCL (scripts/gpu-test.sh)"]
fn two_gpu_workers_equal_one() {
    let ws = Workspace::new(48);
    let job = ws.job("job.yaml", "dp", TWO_GPU_STEPS);
    run_on_two_gpu_workers(&ws, &job);
    let single = ws.job(
        "one.yaml",
        "one",
        "max_steps: 4\nsave_steps: 4\ngradient_accumulation_steps: 2\n",
    );
    ws.train(&single, &["--device", "cuda:0"]);
    assert_weights_close(
        &ws.path().join("dp/model.safetensors"),
        &ws.path().join("one/model.safetensors"),
        2e-2,
    );
}

/// ZeRO-1 on two GPU workers (weights shared by NCCL after each step, shards gathered at the
/// save) trains exactly what the unsharded two-worker job trains.
#[test]
#[ignore = "needs a CUDA GPU and NCCL (scripts/gpu-test.sh)"]
fn zero_1_on_two_gpu_workers_equals_unsharded() {
    let ws = Workspace::new(48);
    let plain = ws.job("plain.yaml", "plain", TWO_GPU_STEPS);
    run_on_two_gpu_workers(&ws, &plain);
    let zero = ws.job(
        "zero.yaml",
        "zero",
        &format!("{TWO_GPU_STEPS}zero_stage: 1\n"),
    );
    run_on_two_gpu_workers(&ws, &zero);
    for file in ["model.safetensors", "checkpoint-4/optimizer.safetensors"] {
        assert_weights_close(
            &ws.path().join("zero").join(file),
            &ws.path().join("plain").join(file),
            0.0,
        );
    }
}

/// ZeRO-2 on two GPU workers (each micro-batch's gradients reduced into their owner by
/// ncclReduce, bf16 weights shared by ncclBroadcast): without clipping, two ranks and one
/// micro-batch sum each gradient element once either way, so the model and the optimizer equal
/// the unsharded two-worker job's exactly; with accumulation and clipping within 1e-5.
#[test]
#[ignore = "needs a CUDA GPU and NCCL (scripts/gpu-test.sh)"]
fn zero_2_on_two_gpu_workers_equals_unsharded() {
    let ws = Workspace::new(48);
    for (name, extra, tol) in [
        (
            "exact",
            "max_grad_norm: 0.0
",
            0.0,
        ),
        (
            "close",
            "gradient_accumulation_steps: 2
",
            1e-5,
        ),
    ] {
        let steps = format!("{TWO_GPU_STEPS}{extra}");
        let (p, z) = (format!("plain-{name}"), format!("zero-{name}"));
        let plain = ws.job("plain.yaml", &p, &steps);
        run_on_two_gpu_workers(&ws, &plain);
        let zero = ws.job(
            "zero.yaml",
            &z,
            &format!(
                "{steps}zero_stage: 2
"
            ),
        );
        run_on_two_gpu_workers(&ws, &zero);
        for file in ["model.safetensors", "checkpoint-4/optimizer.safetensors"] {
            assert_weights_close(
                &ws.path().join(&z).join(file),
                &ws.path().join(&p).join(file),
                tol,
            );
        }
    }
}

/// A GPU worker hung mid-job (SIGSTOP: its sockets stay open, so NCCL sees no error and its
/// peer's all-reduce would wait for ever) or killed (SIGKILL: NCCL's proxy sees the socket
/// close) does not hold its peer: the coordinator gives it up after 2 s of silence, its stop
/// order (or the NCCL watchdog) aborts the peer's communicator, the peer's rank ends, and a new
/// GPU worker finishes the job with it from the last checkpoint.
#[test]
#[ignore = "needs a CUDA GPU and NCCL (scripts/gpu-test.sh)"]
fn two_gpu_workers_one_hung_or_killed_the_peer_stops_at_once() {
    for signal in ["STOP", "KILL"] {
        let ws = Workspace::new(48);
        let state = ws.path().join("state");
        let (_coord, addr) = start_coordinator(ws.path(), &state, 0, 2.0);
        let w0 = start_gpu_worker(ws.path(), &addr, &state, "w0");
        let w1 = start_gpu_worker(ws.path(), &addr, &state, "w1");
        let job = ws.job(
            "job.yaml",
            "out",
            "max_steps: 200\nsave_steps: 2\nsave_total_limit: 2\nworld_size: 2\n",
        );
        let id = submit(&ws, &addr, &state, &job);
        let ckpt = ws.path().join("out/checkpoint-2/herd_manifest.json");
        wait_for(
            "first checkpoint",
            Duration::from_secs(120),
            &[&w0, &w1],
            || ckpt.is_file(),
        );
        w0.signal(signal);
        let t0 = std::time::Instant::now();
        let what = format!("{signal}: peer giving the attempt up");
        wait_for(&what, Duration::from_secs(30), &[&w1], || {
            let st = job_status(ws.path(), &addr, &state, &id);
            st["state"] == "RESTARTING"
                && st["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("waiting for 2 idle workers (1 idle)"))
        });
        let took = t0.elapsed();
        let peer_log = w1.log_text();
        assert!(
            peer_log.contains("aborted"),
            "{signal}, {took:?}:{}",
            logs(&[&w1])
        );
        let w2 = start_gpu_worker(ws.path(), &addr, &state, "w2");
        assert_succeeds(&ws, (&addr, &state), &id, &[&w1, &w2]);
        assert_eq!(trainer_state(&ws.path().join("out"))["global_step"], 200);
        eprintln!("{signal}: the peer gave the attempt up {took:?} after the signal");
        drop(w0); // SIGKILL reaps a stopped process too
    }
}

/// `herd train --device cuda:0` runs the demo job to the end on a GPU.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-test.sh)"]
fn train_on_gpu_completes() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", "max_steps: 3\n");
    let out = ws.train(&job, &["--device", "cuda:0"]);
    let _ = Command::new("true").status();
    assert!(ws.path().join("out/model.safetensors").is_file(), "{out:?}");
}

/// `herd bench --device cuda:0` steps as a GPU rank does (bf16, f32 master weights) and reports
/// the device's peak allocation from the CUDA memory pool, as `bench/compare.sh` reads it.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-test.sh)"]
fn bench_on_gpu_reports_bf16_and_pool_peak_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        herd()
            .current_dir(dir.path())
            .args(["bench", "--device", "cuda:0", "--model", "demo", "--json"])
            .args(["--steps", "2", "--batch", "2", "--seq", "64"]),
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["dtype"], "bf16 (f32 master weights)", "{j}");
    assert!(
        j["peak_memory_kind"]
            .as_str()
            .unwrap()
            .contains("USED_MEM_HIGH"),
        "{j}"
    );
    let peak = j["peak_memory_bytes"].as_f64().unwrap();
    // At least the 16 bytes per parameter of master weights, moments and gradient sum.
    assert!(peak >= 16.0 * j["params"].as_f64().unwrap(), "{j}");
    assert!(j["mfu"].as_f64().unwrap() > 0.0, "{j}");
}

/// Inference on the GPU: `herd predict --device cuda:0 --dtype f32` writes the CPU's greedy
/// answers, and `herd eval --device cuda:0` (bf16, the default there) has the CPU's f32 eval
/// loss within 1 %.
#[test]
#[ignore = "needs a CUDA GPU (scripts/gpu-test.sh)"]
fn predict_and_eval_on_gpu_match_the_cpu() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", "max_steps: 3\n");
    ws.train(&job, &[]);
    let data = ws.path().join("demo/data/eval.json");
    let predict = |device: &str, out: &str| {
        run_ok(
            herd()
                .current_dir(ws.path())
                .args([
                    "predict",
                    "--model",
                    "out",
                    "--max-new-tokens",
                    "8",
                    "--limit",
                    "8",
                    "--dtype",
                    "f32",
                    "--device",
                    device,
                    "--out",
                    out,
                    "--data",
                ])
                .arg(&data),
        );
        String::from_utf8(read(ws.path().join(out))).unwrap()
    };
    assert_eq!(predict("cuda:0", "gpu.jsonl"), predict("cpu", "cpu.jsonl"));
    let eval_loss = |device: &str| {
        let out = run_ok(
            herd()
                .current_dir(ws.path())
                .args([
                    "eval",
                    "--model",
                    "out",
                    "--max-new-tokens",
                    "4",
                    "--limit",
                    "8",
                    "--json",
                    "--device",
                    device,
                    "--data",
                ])
                .arg(&data),
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        j["eval_loss"].as_f64().unwrap()
    };
    let (gpu, cpu) = (eval_loss("cuda:0"), eval_loss("cpu"));
    assert!(
        (gpu - cpu).abs() <= 0.01 * cpu,
        "cuda:0 bf16 {gpu} vs cpu f32 {cpu}"
    );
}
