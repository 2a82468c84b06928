//! Helpers for tests that run the real `herd` binary in a temporary directory.
#![allow(dead_code)]

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
    assert!(!out.status.success(), "{cmd:?} should have failed:\n{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temp dir holding the demo model and a small slice of the demo data (`n` train records).
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run_ok(herd().current_dir(dir.path()).args(["demo", "init", "--dir", "demo"]));
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("demo/data/train.json")).unwrap()).unwrap();
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
        let batch = if extra.contains("per_device_train_batch_size") { "" } else { "per_device_train_batch_size: 4\n" };
        let text = format!(
            "model_name_or_path: demo/model\ndata_path: small.json\noutput_dir: {output_dir}\n\
             {batch}learning_rate: 1.0e-3\nlogging_steps: 1\n\
             warmup_steps: 2\nlr_scheduler_type: cosine\nweight_decay: 0.01\nmodel_max_length: 64\n{extra}"
        );
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn train(&self, job: &Path, extra_args: &[&str]) -> Output {
        run_ok(herd().current_dir(self.path()).arg("train").arg(job).arg("--no-progress").args(extra_args))
    }
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn trainer_state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&read(dir.join("trainer_state.json"))).unwrap()
}
