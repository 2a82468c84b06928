//! `herd run` under signals: one interrupt checkpoints and exits with the signal's code, an
//! interrupt delivered twice at once (as `timeout -s INT` delivers it) is still one, and a second
//! interrupt kills the workers. In every case no child outlives `herd run`.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Runs until a signal stops it; its only checkpoint is the one a stop writes.
const ENDLESS: &str = "max_steps: 100000\nsave_steps: 100000\n";

/// The processes whose command line mentions `needle` (the run's private state directory names
/// its coordinator and workers).
fn pids_mentioning(needle: &str) -> Vec<(i32, String)> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push((pid, cmd));
            }
        }
    }
    found
}

fn send(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process this test started (or one its `herd run` started).
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A `herd run` of `job` with one worker, its stderr in a file. Dropped, it kills `herd run`
/// and whatever of its run is left, so a failed test leaves no stopped worker behind.
struct Run {
    child: Child,
    stderr: std::path::PathBuf,
    state: Option<String>,
}

impl Run {
    fn start(ws: &Workspace, job: &Path) -> Run {
        let stderr = ws.path().join("run.stderr");
        let child = herd_clean()
            .current_dir(ws.path())
            .arg("run")
            .arg(job)
            .args(["--workers", "1"])
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut run = Run {
            child,
            stderr,
            state: None,
        };
        wait_until("the first step", Duration::from_secs(120), || {
            run.text().contains("first step done")
        });
        let text = run.text();
        run.state = text
            .split("state and logs in ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string);
        assert!(run.state.is_some(), "herd run names its state dir: {text}");
        run
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn state(&self) -> &str {
        self.state.as_deref().unwrap_or_default()
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait(&mut self, within: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < within,
                "herd run did not exit within {within:?}: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Nothing of the run is left the moment `herd run` has exited.
    fn assert_nothing_left(&self) {
        let left = pids_mentioning(self.state());
        assert!(
            left.is_empty(),
            "processes left behind: {left:?}\n{}",
            self.text()
        );
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(state) = &self.state {
            for (pid, _) in pids_mentioning(state) {
                send(pid, libc::SIGKILL);
            }
        }
    }
}

/// The worker's graceful stop is held (SIGSTOP, as a worker slow to write a big checkpoint),
/// so the second Ctrl-C comes while `herd run` waits for it: the worker is killed and reaped
/// before `herd run` exits 130, not left to checkpoint into output_dir behind a new run.
#[test]
fn a_second_interrupt_kills_the_workers_and_herd_run_exits_after_them() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", ENDLESS);
    let mut run = Run::start(&ws, &job);
    let workers: Vec<i32> = pids_mentioning(run.state())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" worker "))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(workers.len(), 1, "{:?}", pids_mentioning(run.state()));
    send(workers[0], libc::SIGSTOP);
    send(run.pid(), libc::SIGINT);
    wait_until("the graceful stop", Duration::from_secs(10), || {
        run.text().contains("the workers write a checkpoint first")
    });
    // Well past the window in which a repeated signal counts as the same interrupt.
    std::thread::sleep(Duration::from_millis(500));
    send(run.pid(), libc::SIGINT);
    let status = run.wait(Duration::from_secs(30));
    run.assert_nothing_left();
    let text = run.text();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains(
            "herd run: second interrupt: killing the workers; the newest complete checkpoint is kept"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("state and logs kept in {}", run.state())),
        "{text}"
    );
    std::fs::remove_dir_all(run.state()).unwrap();
}

/// `timeout -s INT` signals the process and then its process group, so `herd run` gets SIGINT
/// twice at once: that is one interrupt, which checkpoints, says where, and exits 130.
#[test]
fn an_interrupt_delivered_twice_at_once_stops_the_run_once_with_a_checkpoint() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", ENDLESS);
    let mut run = Run::start(&ws, &job);
    send(run.pid(), libc::SIGINT);
    std::thread::sleep(Duration::from_millis(2));
    send(run.pid(), libc::SIGINT);
    let status = run.wait(Duration::from_secs(120));
    run.assert_nothing_left();
    let text = run.text();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(!text.contains("second interrupt"), "{text}");
    let last = text.lines().last().unwrap_or_default();
    let step: u64 = last
        .strip_prefix("herd run: stopped at step ")
        .and_then(|s| s.strip_suffix(" with a checkpoint (SIGINT); run the same command to resume"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the last line says where it stopped: {text}"));
    assert!(ws
        .path()
        .join(format!("out/checkpoint-{step}/herd_manifest.json"))
        .is_file());
    std::fs::remove_dir_all(run.state()).unwrap();
}

/// SIGTERM (a service manager's stop) pauses the run as Ctrl-C does, with its own code, 143,
/// so a script tells a paused run from a failed one (1); the state directory is kept.
#[test]
fn sigterm_pauses_herd_run_with_a_checkpoint_and_exit_143() {
    let ws = Workspace::new(16);
    let job = ws.job("job.yaml", "out", ENDLESS);
    let mut run = Run::start(&ws, &job);
    send(run.pid(), libc::SIGTERM);
    let status = run.wait(Duration::from_secs(120));
    run.assert_nothing_left();
    let text = run.text();
    assert_eq!(status.code(), Some(143), "{text}");
    assert!(
        text.contains("with a checkpoint (SIGTERM); run the same command to resume"),
        "{text}"
    );
    assert!(!text.contains("error:"), "{text}");
    assert!(Path::new(run.state()).join("coordinator.log").is_file());
    std::fs::remove_dir_all(run.state()).unwrap();
}
