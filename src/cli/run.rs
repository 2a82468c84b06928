//! `herd run JOB.yaml --workers N`: the single-machine command (like `torchrun --standalone`).
//! Starts a private coordinator and N local worker daemons (this same binary) on loopback,
//! submits the job with `world_size = N`, follows it, and exits with its result. Every child is
//! stopped and reaped before this process exits, on success, on error and on Ctrl-C; on Linux
//! they also die with this process (PR_SET_PDEATHSIG) should it be killed. Ctrl-C (or SIGTERM)
//! lets the workers checkpoint first and exits with the signal's code (130/143, as `herd train`):
//! running the same command again resumes from there. A second one kills the workers. A worker
//! that dies is started again (up to the job's max_restarts), as torchrun restarts its worker
//! group.

use super::client::{client_token, runtime, Client, ClientArgs};
use super::jobs::{exit_for, job_text, submit_text, watch_job, world_size_note};
use anyhow::{bail, Context, Result};
use herd_proto::pb;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
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

/// A repeat of the first signal within this long is the same interrupt: `timeout -s INT` sends
/// its signal to the process and then to its whole process group, so `herd run` gets it twice
/// at once, and taking the second for a person's second Ctrl-C would kill the workers.
const SAME_INTERRUPT: Duration = Duration::from_millis(200);

/// How long the workers get to checkpoint after an interrupt before they are killed.
const CHECKPOINT_GRACE: Duration = Duration::from_secs(120);

/// SIGINT and SIGTERM as `herd run` takes them: the first stops the run with a checkpoint, a
/// second kills the children. The signal thread only sets these; the main thread acts on them,
/// since it alone reaps the children (a pid signalled from elsewhere could have been reaped and
/// reused in between).
#[derive(Clone, Default)]
struct Interrupts {
    first: Arc<AtomicI32>,
    second: Arc<AtomicI32>,
}

impl Interrupts {
    /// Replaces the signals' default action (exit at once, children orphaned) for good.
    fn install() -> Result<Interrupts> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flags = Interrupts::default();
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("installing the signal handler")?;
        let f = flags.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut first_at: Option<Instant> = None;
                for sig in signals.forever() {
                    match first_at {
                        None => {
                            first_at = Some(Instant::now());
                            f.first.store(sig, Ordering::SeqCst);
                        }
                        Some(t) if t.elapsed() < SAME_INTERRUPT => {}
                        Some(_) => {
                            if f.second.swap(sig, Ordering::SeqCst) == 0 {
                                eprintln!(
                                    "herd run: second interrupt: killing the workers; the \
                                     newest complete checkpoint is kept"
                                );
                            }
                        }
                    }
                }
            })
            .context("starting the signal thread")?;
        Ok(flags)
    }

    fn first(&self) -> Option<i32> {
        Some(self.first.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }

    fn second(&self) -> Option<i32> {
        Some(self.second.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }

    /// Resolves at the first interrupt, so a call can be raced against it.
    async fn first_came(&self) {
        while self.first().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn second_came(&self) {
        while self.second().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The children of this run; dropping it stops them (SIGTERM, then SIGKILL after a grace).
struct Children {
    coordinator: Option<Child>,
    workers: Vec<Child>,
    /// Set by a second interrupt: kill what still runs instead of waiting for it.
    kill: Arc<AtomicI32>,
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own (the child is not reaped yet, so the pid is still ours).
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits for the children to exit, up to `grace` or until `kill` is set; then SIGKILLs the
/// rest. Returns only once every one of them is reaped.
fn wait_all(children: &mut [&mut Child], grace: Duration, kill: &AtomicI32) {
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
        if Instant::now() >= deadline || kill.load(Ordering::SeqCst) != 0 {
            for c in children.iter_mut() {
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                }
            }
            // All killed first, then reaped, so none outlives the others by a wait.
            for c in children.iter_mut() {
                let _ = c.wait();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Children {
    fn first_signal(&self) -> i32 {
        if self.kill.load(Ordering::SeqCst) != 0 {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        }
    }

    /// The workers (SIGTERM: a running rank checkpoints at the end of its step).
    fn stop_workers(&mut self, grace: Duration) {
        for w in &self.workers {
            signal(w, self.first_signal());
        }
        let mut ws: Vec<&mut Child> = self.workers.iter_mut().collect();
        wait_all(&mut ws, grace, &self.kill);
        self.workers.clear();
    }

    /// The coordinator, once no worker is left to report to it.
    fn stop_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            signal(&c, self.first_signal());
            wait_all(&mut [&mut c], Duration::from_secs(5), &self.kill);
        }
    }

    fn stop(&mut self, worker_grace: Duration) {
        self.stop_workers(worker_grace);
        self.stop_coordinator();
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

/// The error a run stopped by a signal returns inside; its exit is [`Session::stop_interrupted`].
const INTERRUPTED: &str = "interrupted";

/// One run: its processes and what is known of its job.
struct Session<'a> {
    args: &'a RunArgs,
    job: &'a herd_proto::JobSpec,
    workers: usize,
    state_dir: PathBuf,
    exe: PathBuf,
    interrupts: Interrupts,
    children: Children,
    /// The coordinator's address, once it listens.
    addr: Option<String>,
    /// The submitted job, once the coordinator took it.
    job_id: Option<String>,
    /// Workers started again, each with a log of its own.
    starts: u32,
    t0: Instant,
}

fn client_args(addr: &str, state_dir: &Path) -> ClientArgs {
    ClientArgs {
        coordinator: addr.to_string(),
        token_file: None,
        state_dir: Some(state_dir.to_path_buf()),
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
    }
}

/// A worker daemon of the run, logging to `log` in the state directory.
fn spawn_worker(
    exe: &Path,
    addr: &str,
    state_dir: &Path,
    threads: usize,
    i: usize,
    log: &str,
) -> Result<Child> {
    let mut cmd = child_command(exe);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
    }
    cmd.args([
        "worker",
        "--coordinator",
        addr,
        "--collective-listen",
        "127.0.0.1:0",
        "--state-dir",
    ])
    .arg(state_dir)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log_file(state_dir, log)?)
    .spawn()
    .with_context(|| format!("starting worker {i}"))
}

/// What an interrupted run says last, as `herd train` does: where it stopped and how to go on.
fn stopped_line(st: Option<&pb::JobStatus>, sig: i32, output_dir: &Path) -> String {
    let name = if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    let Some((step, ckpt)) = st.map(|s| (s.step, s.last_checkpoint_step)) else {
        // The coordinator did not say: the workers checkpointed if they ran a step.
        return format!(
            "stopped ({name}); run the same command to resume from the newest checkpoint in {}",
            output_dir.display()
        );
    };
    if ckpt > 0 && ckpt >= step {
        format!("stopped at step {ckpt} with a checkpoint ({name}); run the same command to resume")
    } else if ckpt > 0 {
        format!(
            "stopped at step {step} ({name}); its newest checkpoint is at step {ckpt}; run the \
             same command to resume from there"
        )
    } else if step > 0 {
        format!(
            "stopped at step {step} without a new checkpoint ({name}); run the same command to \
             resume from the newest one in {}",
            output_dir.display()
        )
    } else {
        format!(
            "stopped before the job's first step ({name}); run the same command to start it \
             (from the newest checkpoint in {}, if any)",
            output_dir.display()
        )
    }
}

impl Session<'_> {
    /// The coordinator: port 0, its address read from its first stdout line.
    fn start_coordinator(&mut self) -> Result<String> {
        let coord_log = self.state_dir.join("coordinator.log");
        let mut coord = child_command(&self.exe)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&self.state_dir)
            .args([
                "--heartbeat-timeout-s",
                &self.args.heartbeat_timeout_s.to_string(),
                "--heartbeat-interval-ms",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&self.state_dir, "coordinator.log")?)
            .spawn()
            .context("starting the coordinator")?;
        let stdout = coord.stdout.take().expect("piped");
        self.children.coordinator = Some(coord);
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(addr) = line.strip_prefix("herd coordinator listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        // In short waits, so an interrupt meanwhile is not held up by a slow start.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => return Ok(addr),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if self.interrupts.first().is_some() {
                        bail!(INTERRUPTED);
                    }
                }
                Err(_) => bail!(
                    "the coordinator did not start; its log ({}):\n{}",
                    coord_log.display(),
                    tail(&coord_log, 20)
                ),
            }
        }
    }

    /// Starts the workers, submits the job and follows it to its end. An interrupt ends it
    /// with an error; the caller tells that from a failure by the interrupt flags.
    fn supervise(&mut self, rt: &tokio::runtime::Runtime, text: String) -> Result<pb::JobStatus> {
        let addr = self.start_coordinator()?;
        self.addr = Some(addr.clone());
        // Like torchrun's OMP_NUM_THREADS=1: split the cores between the local workers so N
        // processes don't each start (and spin) a thread per core.
        let threads = worker_threads(self.workers);
        for i in 0..self.workers {
            if self.interrupts.first().is_some() {
                bail!(INTERRUPTED);
            }
            let log = format!("worker-{i}.log");
            let w = spawn_worker(&self.exe, &addr, &self.state_dir, threads, i, &log)?;
            self.children.workers.push(w);
        }
        eprintln!(
            "herd run: coordinator {addr} and {} worker(s) started ({:.1}s); state and logs in {}",
            self.workers,
            self.t0.elapsed().as_secs_f64(),
            self.state_dir.display()
        );
        let args = client_args(&addr, &self.state_dir);
        let _ = client_token(None, Some(&self.state_dir))?;
        let Session {
            args: run_args,
            job,
            workers,
            state_dir,
            exe,
            interrupts,
            children,
            job_id,
            starts,
            t0,
            ..
        } = self;
        let coord_log = state_dir.join("coordinator.log");
        let mut worker_logs: Vec<String> =
            (0..*workers).map(|i| format!("worker-{i}.log")).collect();
        let mut respawns = 0u32; // after failed exits, bounded by max_restarts
        rt.block_on(async {
            let mut c = Client::connect(&args)?;
            let resp = tokio::select! {
                r = submit_text(&mut c, text, &run_args.job) => r?,
                _ = interrupts.first_came() => bail!(INTERRUPTED),
            };
            *job_id = Some(resp.job_id.clone());
            eprintln!("herd run: job {} submitted with world_size {workers}", resp.job_id);
            let watch = watch_job(&c, &resp.job_id, false, Some(*t0));
            tokio::pin!(watch);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    r = &mut watch => return r,
                    _ = tick.tick() => {
                        if interrupts.first().is_some() {
                            bail!(INTERRUPTED);
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
                            *starts += 1;
                            if status.success() {
                                *log_name = format!("worker-{i}.start-{starts}.log");
                                eprintln!("herd run: worker {i} stopped ({status}; log {}); starting it again", log.display());
                                *worker = spawn_worker(exe, &addr, state_dir, threads, i, log_name)?;
                                continue;
                            }
                            if respawns >= job.max_restarts {
                                bail!("worker {i} exited ({status}) and {respawns} worker restart(s) of max_restarts {} are used; its log ({}):\n{}", job.max_restarts, log.display(), tail(&log, 20));
                            }
                            respawns += 1;
                            *log_name = format!("worker-{i}.start-{starts}.log");
                            eprintln!("herd run: worker {i} exited ({status}; log {}); starting it again (restart {respawns} of max_restarts {})", log.display(), job.max_restarts);
                            *worker = spawn_worker(exe, &addr, state_dir, threads, i, log_name)?;
                        }
                    }
                }
            }
        })
    }

    /// The job's status, if the coordinator answers within a few seconds (and no second
    /// interrupt asks to be done sooner).
    fn job_status(&self, rt: &tokio::runtime::Runtime) -> Option<pb::JobStatus> {
        let (addr, id) = (self.addr.as_ref()?, self.job_id.as_ref()?);
        rt.block_on(async {
            let c = Client::connect(&client_args(addr, &self.state_dir)).ok()?;
            let mut jobs = c.jobs.clone();
            let get = jobs.get_job(c.req(pb::JobRef { job_id: id.clone() }));
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(5), get) => Some(r.ok()?.ok()?.into_inner()),
                _ = self.interrupts.second_came() => None,
            }
        })
    }

    /// After an interrupt: the workers checkpoint (or are killed by a second interrupt), every
    /// child is reaped, and the run exits with the signal's code (128 + its number, as
    /// `herd train`), so a script tells a paused run from a failed one.
    fn stop_interrupted(
        &mut self,
        rt: &tokio::runtime::Runtime,
        sig: i32,
        state: tempfile::TempDir,
    ) -> Result<()> {
        if self.interrupts.second().is_none() {
            eprintln!(
                "herd run: stopping; the workers write a checkpoint first (interrupt again to \
                 kill them)"
            );
        }
        self.children.stop_workers(CHECKPOINT_GRACE);
        // Asked before the coordinator goes: the workers reported their checkpoint to it.
        let st = self
            .interrupts
            .second()
            .is_none()
            .then(|| self.job_status(rt))
            .flatten();
        self.children.stop_coordinator();
        let kept = state.keep();
        eprintln!("herd run: state and logs kept in {}", kept.display());
        if let Some(second) = self.interrupts.second() {
            std::process::exit(128 + second);
        }
        // It ended while the workers stopped: its end is the run's.
        if let Some(st) = st.as_ref().filter(|s| super::client::is_terminal(s.state)) {
            return exit_for(st);
        }
        eprintln!(
            "herd run: {}",
            stopped_line(st.as_ref(), sig, &self.job.output_dir)
        );
        std::process::exit(128 + sig);
    }
}

pub fn run(a: &RunArgs) -> Result<()> {
    let t0 = Instant::now();
    anyhow::ensure!(a.workers != Some(0), "--workers must be at least 1");
    let source = a.job.display().to_string();
    let asked = std::fs::read_to_string(&a.job).with_context(|| format!("reading {source}"))?;
    let asked = herd_proto::JobSpec::from_yaml_str(&asked, &source)?;
    let workers = a.workers.unwrap_or(asked.world_size);
    // As torchrun's --nproc_per_node, the worker count sets the ranks; say what that does to a
    // batch the job file sized for another count.
    if let Some(note) = world_size_note(&asked, "--workers", workers) {
        eprintln!("herd run: {note}");
    }
    // Check the job here first so a typo costs no processes (at the world size it will run at:
    // a DeepSpeed config's train_batch_size is checked against it).
    let text = job_text(&a.job, Some(workers))?;
    let job = herd_proto::JobSpec::from_yaml_str(&text, &source)?;
    super::train::check_paths(&job)?;

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
    let rt = runtime()?;
    // Before any child exists, so no signal's default action can leave one behind.
    let interrupts = Interrupts::install()?;
    let mut s = Session {
        args: a,
        job: &job,
        workers,
        state_dir,
        exe,
        children: Children {
            coordinator: None,
            workers: vec![],
            kill: interrupts.second.clone(),
        },
        interrupts,
        addr: None,
        job_id: None,
        starts: 0,
        t0,
    };
    match s.supervise(&rt, text) {
        Ok(st) => {
            s.children.stop(Duration::from_secs(10));
            // A worker that died during the run leaves its log as the evidence.
            if a.keep_state || exit_for(&st).is_err() || s.starts > 0 {
                let kept = state.keep();
                eprintln!("herd run: state and logs kept in {}", kept.display());
            }
            exit_for(&st)
        }
        Err(e) => {
            if let Some(sig) = s.interrupts.first() {
                return s.stop_interrupted(&rt, sig, state);
            }
            s.children.stop(Duration::from_secs(10));
            let kept = state.keep();
            eprintln!("herd run: state and logs kept in {}", kept.display());
            Err(e)
        }
    }
}
