//! Helpers for tests that run the real `herd` binary in a temporary directory.
#![allow(dead_code)]

pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn herd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
    c.env_remove("RUST_LOG");
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("herd starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("herd starts");
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temp dir holding the demo model and a small slice of the demo data (`n` train records).
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            herd()
                .current_dir(dir.path())
                .args(["demo", "init", "--dir", "demo"]),
        );
        let all: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("demo/data/train.json")).unwrap(),
        )
        .unwrap();
        let small = serde_json::to_string_pretty(&all[..n]).unwrap();
        std::fs::write(dir.path().join("small.json"), small).unwrap();
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a job file `name` with the demo model, the small data and `extra` YAML lines.
    pub fn job(&self, name: &str, output_dir: &str, extra: &str) -> PathBuf {
        // `extra` may override the batch size; YAML refuses duplicate keys.
        let batch = if extra.contains("per_device_train_batch_size") {
            ""
        } else {
            "per_device_train_batch_size: 4\n"
        };
        let max_len = if extra.contains("model_max_length") {
            ""
        } else {
            "model_max_length: 64\n"
        };
        let text = format!(
            "model_name_or_path: demo/model\ndata_path: small.json\noutput_dir: {output_dir}\n\
             {batch}learning_rate: 1.0e-3\nlogging_steps: 1\n\
             warmup_steps: 2\nlr_scheduler_type: cosine\nweight_decay: 0.01\n{max_len}{extra}"
        );
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `heldout.json`: the first `n` of the demo's held-out records (an eval_data_path).
    pub fn heldout(&self, n: usize) {
        let all: Vec<serde_json::Value> =
            serde_json::from_slice(&read(self.path().join("demo/data/eval.json"))).unwrap();
        std::fs::write(
            self.path().join("heldout.json"),
            serde_json::to_vec(&all[..n]).unwrap(),
        )
        .unwrap();
    }

    /// `herd run JOB --workers N` here (coordinator and workers on loopback); its stderr.
    pub fn run_workers(&self, job: &Path, workers: usize) -> String {
        let out = run_ok(
            herd_clean()
                .current_dir(self.path())
                .arg("run")
                .arg(job)
                .args(["--workers", &workers.to_string()]),
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn train(&self, job: &Path, extra_args: &[&str]) -> Output {
        run_ok(
            herd()
                .current_dir(self.path())
                .arg("train")
                .arg(job)
                .arg("--no-progress")
                .args(extra_args),
        )
    }
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn trainer_state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&read(dir.join("trainer_state.json"))).unwrap()
}

/// The training losses logged in `dir`'s trainer_state.json, in order.
pub fn losses(dir: &Path) -> Vec<f64> {
    trainer_state(dir)["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["loss"].as_f64())
        .collect()
}

// ---------------------------------------------------------------- orchestrator helpers

/// A `herd` command with no ambient coordinator address or token.
pub fn herd_clean() -> Command {
    let mut c = herd();
    c.env_remove("HERD_TOKEN").env_remove("HERD_COORDINATOR");
    c
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `herd coordinator` on loopback with short heartbeat timings; `port` 0 picks a free one.
pub fn start_coordinator(
    dir: &Path,
    state: &Path,
    port: u16,
    heartbeat_timeout_s: f64,
) -> (Proc, String) {
    start_coordinator_with(dir, state, port, heartbeat_timeout_s, &[])
}

/// [`start_coordinator`] with more command-line arguments (e.g. TLS files).
pub fn start_coordinator_with(
    dir: &Path,
    state: &Path,
    port: u16,
    heartbeat_timeout_s: f64,
    extra: &[&str],
) -> (Proc, String) {
    let log = dir.join(format!(
        "coordinator-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = herd_clean()
        .current_dir(dir)
        .args([
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(state)
        .args([
            "--heartbeat-timeout-s",
            &heartbeat_timeout_s.to_string(),
            "--heartbeat-interval-ms",
            "200",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = announced(&mut child, "herd coordinator listening on ", &log);
    (Proc { child, log }, addr)
}

/// What follows `prefix` on the first stdout line of `child` that starts with it (a server's
/// address); panics with the log if the child ends first.
pub fn announced(child: &mut std::process::Child, prefix: &str, log: &Path) -> String {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix(prefix) {
                    return a.trim().to_string();
                }
            }
            _ => panic!(
                "{prefix:?} never came: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

/// `herd worker` for the coordinator at `addr`, reading the token from `state`.
pub fn start_worker(dir: &Path, addr: &str, state: &Path, name: &str) -> Proc {
    start_worker_with(dir, addr, state, name, &[])
}

/// [`start_worker`] with more command-line arguments.
pub fn start_worker_with(dir: &Path, addr: &str, state: &Path, name: &str, extra: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = herd_clean()
        .current_dir(dir)
        .args([
            "worker",
            "--coordinator",
            addr,
            "--collective-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(state)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A client command (`herd <args> --coordinator addr --state-dir state`).
pub fn client(dir: &Path, addr: &str, state: &Path, args: &[&str]) -> Command {
    let mut c = herd_clean();
    c.current_dir(dir)
        .args(args)
        .args(["--coordinator", addr, "--state-dir"])
        .arg(state);
    c
}

/// `herd status JOB --json` parsed.
pub fn job_status(dir: &Path, addr: &str, state: &Path, job: &str) -> serde_json::Value {
    let out = run_ok(&mut client(dir, addr, state, &["status", job, "--json"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes (then panic with `what`).
pub fn wait_until(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Every f32 tensor of a safetensors file, by name.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = read(path);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

/// The two models have the same tensors, equal within `rel` of each tensor's largest magnitude.
pub fn assert_weights_close(a: &Path, b: &Path, rel: f32) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, va) in &ta {
        let vb = &tb[name];
        assert_eq!(va.len(), vb.len(), "{name}");
        let scale = va
            .iter()
            .chain(vb.iter())
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(1e-6);
        let diff = va
            .iter()
            .zip(vb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= rel * scale,
            "{name}: max difference {diff} exceeds {rel} x {scale}"
        );
    }
}
