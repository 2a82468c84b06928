//! `herd run JOB.yaml --workers N`: the single-machine command (like `torchrun --standalone`).
//! Starts a private coordinator and N local worker daemons (this same binary) on loopback,
//! submits the job with `world_size = N`, follows it, and exits with its result. Every child is
//! stopped on exit, on error and on Ctrl-C; on Linux they also die with this process
//! (PR_SET_PDEATHSIG), so nothing is left behind. Ctrl-C lets the workers checkpoint first:
//! running the same command again resumes from there. A worker that dies is started again
//! (up to the job's max_restarts), as torchrun restarts its worker group.

use super::client::{client_token, runtime, Client, ClientArgs};
use super::jobs::{exit_for, job_text, submit_text, watch_job};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    pub job: PathBuf,
    /// Worker daemons to start [default: the job's world_size]; another number becomes the
    /// job's world_size (and so changes its global batch).
    #[arg(long)]
    pub workers: Option<usize>,
    /// A worker silent for longer than this is dead.
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_timeout_s: f64,
    /// Keep the private state directory (database, token, logs of the coordinator and workers).
    #[arg(long)]
    pub keep_state: bool,
}

/// The children of this run; dropping it stops them (SIGTERM, then SIGKILL after a grace).
struct Children {
    coordinator: Option<Child>,
    workers: Vec<Child>,
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own (the child is not reaped yet, so the pid is still ours).
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn wait_all(children: &mut [&mut Child], grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        let running = children
            .iter_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .filter(|r| *r)
            .count();
        if running == 0 {
            return;
        }
        if Instant::now() >= deadline {
            for c in children.iter_mut() {
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Children {
    /// Workers first (SIGTERM: a running rank checkpoints), then the coordinator.
    fn stop(&mut self, worker_grace: Duration) {
        for w in &self.workers {
            signal(w, libc::SIGTERM);
        }
        let mut ws: Vec<&mut Child> = self.workers.iter_mut().collect();
        wait_all(&mut ws, worker_grace);
        self.workers.clear();
        if let Some(mut c) = self.coordinator.take() {
            signal(&c, libc::SIGTERM);
            wait_all(&mut [&mut c], Duration::from_secs(5));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A child of this process: its own process group (a terminal's Ctrl-C reaches only `herd run`,
/// which stops the children in order) and, on Linux, SIGTERM when this process dies.
fn child_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("HERD_TOKEN")
        .env_remove("HERD_COORDINATOR")
        .process_group(0);
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                );
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// Compute threads per local worker: the machine's cores split evenly, at least one.
pub fn worker_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

/// A child's log, readable by this user only (it may name paths and jobs of the run).
fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(a: &RunArgs) -> Result<()> {
    let t0 = Instant::now();
    anyhow::ensure!(a.workers != Some(0), "--workers must be at least 1");
    let source = a.job.display().to_string();
    let asked = std::fs::read_to_string(&a.job).with_context(|| format!("reading {source}"))?;
    let asked = herd_proto::JobSpec::from_yaml_str(&asked, &source)?;
    let workers = a.workers.unwrap_or(asked.world_size);
    if workers != asked.world_size {
        // As torchrun's --nproc_per_node, the worker count sets the ranks; say what that does
        // to a batch the job file sized for another count.
        eprintln!(
            "herd run: --workers {workers} overrides the job's world_size {}: global batch {} → {}",
            asked.world_size,
            asked.global_batch_size(),
            asked.global_batch_size() / asked.world_size.max(1) * workers
        );
    }
    // Check the job here first so a typo costs no processes (at the world size it will run at:
    // a DeepSpeed config's train_batch_size is checked against it).
    let text = job_text(&a.job, Some(workers))?;
    let job = herd_proto::JobSpec::from_yaml_str(&text, &source)?;
    super::train::check_paths(&job)?;
    let job_out = job.output_dir.clone();

    let state = tempfile::Builder::new()
        .prefix("herd-run-")
        .tempdir()
        .context("creating the private state directory")?;
    let state_dir = state.path().to_path_buf();
    // It holds the run's token and job database: this user's only, as a coordinator's is.
    std::fs::set_permissions(
        &state_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .context("making the private state directory private")?;
    herd_proto::auth::load_or_create_token(&state_dir).context("creating the token")?;
    let exe = std::env::current_exe().context("locating the herd binary")?;
    let mut children = Children {
        coordinator: None,
        workers: vec![],
    };

    // Stop cleanly on Ctrl-C / SIGTERM: the flag is checked by the watcher below.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping exits at once (the children then get SIGTERM from
        // the kernel through PR_SET_PDEATHSIG).
        signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, interrupted.clone())
            .context("installing the signal handler")?;
    }

    // The coordinator: port 0, its address read from its first stdout line.
    let coord_log = state_dir.join("coordinator.log");
    let mut coord = child_command(&exe)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state_dir)
        .args([
            "--heartbeat-timeout-s",
            &a.heartbeat_timeout_s.to_string(),
            "--heartbeat-interval-ms",
            "500",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&state_dir, "coordinator.log")?)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = coord.stdout.take().expect("piped");
    children.coordinator = Some(coord);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(addr) = line.strip_prefix("herd coordinator listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(a) => a,
        Err(_) => bail!(
            "the coordinator did not start; its log ({}):\n{}",
            coord_log.display(),
            tail(&coord_log, 20)
        ),
    };

    // Like torchrun's OMP_NUM_THREADS=1: split the cores between the local workers so N
    // processes don't each start (and spin) a thread per core.
    let threads = worker_threads(workers);
    let spawn_worker = |i: usize, log: &str| -> Result<Child> {
        let mut cmd = child_command(&exe);
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", threads.to_string());
        }
        cmd.args([
            "worker",
            "--coordinator",
            &addr,
            "--collective-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&state_dir, log)?)
        .spawn()
        .with_context(|| format!("starting worker {i}"))
    };
    for i in 0..workers {
        children
            .workers
            .push(spawn_worker(i, &format!("worker-{i}.log"))?);
    }
    eprintln!(
        "herd run: coordinator {addr} and {} worker(s) started ({:.1}s); state and logs in {}",
        workers,
        t0.elapsed().as_secs_f64(),
        state_dir.display()
    );

    let args = ClientArgs {
        coordinator: addr.clone(),
        token_file: None,
        state_dir: Some(state_dir.clone()),
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
    };
    let _ = client_token(None, Some(&state_dir))?;
    let rt = runtime()?;
    let mut worker_logs: Vec<String> = (0..workers).map(|i| format!("worker-{i}.log")).collect();
    let mut respawns = 0u32; // after failed exits, bounded by max_restarts
    let mut starts = 0u32; // every worker started again, naming its log
    let result: Result<herd_proto::pb::JobStatus> = rt.block_on(async {
        let mut c = Client::connect(&args)?;
        let resp = submit_text(&mut c, text, &a.job).await?;
        let job_id = resp.job_id.clone();
        eprintln!("herd run: job {job_id} submitted with world_size {workers}");
        let watch = watch_job(&c, &job_id, false, Some(t0));
        tokio::pin!(watch);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = &mut watch => return r,
                _ = tick.tick() => {
                    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                        bail!("interrupted; the workers checkpoint before they exit, and `herd run` with the same job resumes from {}", job_out.display());
                    }
                    // The coordinator exiting on its own is an error here.
                    if let Some(c) = children.coordinator.as_mut() {
                        if let Ok(Some(s)) = c.try_wait() {
                            bail!("the coordinator exited ({s}); its log ({}):\n{}", coord_log.display(), tail(&coord_log, 20));
                        }
                    }
                    // A worker that died is started again, as torchrun restarts its workers:
                    // the coordinator restarts the job from its last checkpoint on it. Past
                    // the job's max_restarts failed exits the run ends with the dead worker's log.
                    for (i, (worker, log_name)) in children.workers.iter_mut().zip(worker_logs.iter_mut()).enumerate() {
                        let Ok(Some(status)) = worker.try_wait() else { continue };
                        let log = state_dir.join(&*log_name);
                        // A worker that exits cleanly was told to stop (SIGTERM: it checkpointed,
                        // a preemption, which the coordinator does not count either).
                        starts += 1;
                        if status.success() {
                            *log_name = format!("worker-{i}.start-{starts}.log");
                            eprintln!("herd run: worker {i} stopped ({status}; log {}); starting it again", log.display());
                            *worker = spawn_worker(i, log_name)?;
                            continue;
                        }
                        if respawns >= job.max_restarts {
                            bail!("worker {i} exited ({status}) and {respawns} worker restart(s) of max_restarts {} are used; its log ({}):\n{}", job.max_restarts, log.display(), tail(&log, 20));
                        }
                        respawns += 1;
                        *log_name = format!("worker-{i}.start-{starts}.log");
                        eprintln!("herd run: worker {i} exited ({status}; log {}); starting it again (restart {respawns} of max_restarts {})", log.display(), job.max_restarts);
                        *worker = spawn_worker(i, log_name)?;
                    }
                }
            }
        }
    });
    match result {
        Ok(st) => {
            children.stop(Duration::from_secs(10));
            // A worker that died during the run leaves its log as the evidence.
            if a.keep_state || exit_for(&st).is_err() || starts > 0 {
                let kept = state.keep();
                eprintln!("herd run: state and logs kept in {}", kept.display());
            }
            exit_for(&st)
        }
        Err(e) => {
            let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
            if interrupted {
                eprintln!("herd run: stopping; the workers write a checkpoint first (run the same command to resume)");
            }
            children.stop(Duration::from_secs(if interrupted { 120 } else { 10 }));
            let kept = state.keep();
            eprintln!("herd run: state and logs kept in {}", kept.display());
            Err(e)
        }
    }
}
