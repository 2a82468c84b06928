//! `herd`: the command line. Each subcommand lives in `cli/`; this file only parses arguments
//! and sets up logging. Errors reach the user through `anyhow` with their full cause chain.

mod cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "herd",
    version,
    about = "Fine-tune LLaMA-family models: trainer, coordinator, workers"
)]
struct Args {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG works too.
    #[arg(
        long,
        global = true,
        default_value = "warn,herd=info,herd_worker=info,herd_coordinator=info"
    )]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job in this process (rank 0 of 1), resuming from its newest complete checkpoint.
    Train {
        job: PathBuf,
        /// Stop after this many optimizer steps (with a checkpoint), as an assigned step range ends.
        #[arg(long)]
        until_step: Option<u64>,
        /// No progress bar (log lines only).
        #[arg(long)]
        no_progress: bool,
        /// cpu, or cuda:N (bf16 compute, f32 master weights; needs a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Answer an instruction with a trained model (Alpaca template, KV cache).
    Generate(cli::generate::GenerateArgs),
    /// Generate an answer for every record of an instruction file (JSONL out, record fields + "prediction").
    Predict(cli::eval::PredictArgs),
    /// Eval loss, ROUGE-L and exact match of a model on reference answers, by reference length.
    Eval(cli::eval::EvalArgs),
    /// A reward model's pairwise accuracy on comparisons, or its reward for each instruction record.
    Score(cli::score::ScoreArgs),
    /// Fold a LoRA adapter into its base model and write a plain HF model.
    Merge(cli::merge::MergeArgs),
    /// Serve a model over HTTP (authenticated): Alpaca generate, OpenAI-style chat, a web page.
    Serve(cli::serve::ServeArgs),
    /// Inspect a job's data as the model sees it.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Training throughput of a model config on random tokens: tokens/s, MFU, peak memory.
    Bench(cli::bench::BenchArgs),
    /// The no-download demo: a tiny LLaMA learns simple instruction tasks on the CPU.
    Demo(cli::demo::DemoArgs),
    /// Print the job file of a torchrun / deepspeed / accelerate / python train.py command
    /// (after `--`): TrainingArguments flags become job keys, the launcher gives world_size.
    FromCommand {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Run a job on this machine: a private coordinator and N local workers (like torchrun --standalone).
    Run(cli::run::RunArgs),
    /// Serve the job and worker services (SQLite state in --state-dir).
    Coordinator(cli::coordinator::CoordinatorArgs),
    /// The worker daemon of one device: registers, heartbeats, runs assigned ranks.
    Worker(cli::worker::WorkerArgs),
    /// Submit a job file to the coordinator; prints the job id.
    Submit {
        job: PathBuf,
        /// Override the job's world_size.
        #[arg(long)]
        world_size: Option<usize>,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
    /// A job's status (all jobs without JOB): progress, ranks, restarts, why it waits.
    Status {
        job: Option<String>,
        /// Follow the job until it ends (exit status: its result).
        #[arg(long)]
        watch: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
    /// List the coordinator's jobs.
    List {
        /// Print JSON (each job as `herd status --json` prints it).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
    /// Cancel a job (its ranks are stopped).
    Cancel {
        job: String,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
    /// What happened to a job: state changes, restarts and why (no job: the workers' events).
    Events {
        job: Option<String>,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
    /// The last log lines of a job's rank.
    Logs {
        job: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Lines to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
        #[command(flatten)]
        client: cli::client::ClientArgs,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Show a few examples (the masked prompt part marked) and the token-length distribution.
    Preview {
        job: PathBuf,
        /// Examples to show.
        #[arg(short = 'n', long, default_value_t = 3)]
        examples: usize,
        /// List every token as id:text.
        #[arg(long)]
        tokens: bool,
        /// Color instead of «» marks.
        #[arg(long)]
        color: bool,
    },
}

/// glibc's malloc hands freed blocks over its mmap threshold (128 KiB at first) back to the
/// kernel and trims the heap top, so every training step's fresh activations and gradients
/// fault in zeroed pages again: ~15 % of a small model's CPU step (`perf`: page faults,
/// clear_page, brk). Freed memory stays in the heap for the next step instead, as PyTorch's
/// caching allocators keep theirs: mmap only above 32 MiB (glibc's largest threshold), and
/// no trimming. Peak memory moves by ~2 % (reuse, not more held at once; bench/NOTES.md); a
/// user's own MALLOC_* or GLIBC_TUNABLES settings win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory_for_reuse() {
    let user_set = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    if !user_set {
        // SAFETY: mallopt only sets the allocator's parameters; no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}

/// candle's CPU thread pool spins 25,000 times between ops before a worker parks. On a quiet
/// machine that saves a wake-up; on a busy one (CI, a shared node, several ranks per host)
/// the spinning workers take the cores the computing thread needs, and 2 threads ran the
/// demo 5× slower than 1. 2,000 spins keep most of the quiet-machine gain and halve the loss
/// (bench/NOTES.md). The user's own CANDLE_BARRIER_POOL_SPIN_LIMIT wins.
fn spin_less_between_ops() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Before any other thread exists, so nothing reads the environment meanwhile; herd's
        // child processes (`herd run`'s workers) inherit it.
        std::env::set_var(VAR, "2000");
    }
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    keep_freed_memory_for_reuse();
    spin_less_between_ops();
    // A write past `ulimit -f` is an error that names its file (EFBIG, as Python reports it),
    // not a SIGXFSZ that kills a worker mid-checkpoint without a word.
    // SAFETY: setting a signal's disposition to ignore; no other thread runs yet.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let args = Args::parse();
    if args.cmd.prints_for_a_pipe() {
        // `herd events | head`: the reader leaving ends the command quietly, as it ends
        // grep or cat, instead of a panic in println!. Only commands that just print: the
        // daemons keep Rust's ignored SIGPIPE, so a closed socket is an error they handle.
        // SAFETY: restoring the default disposition; no other thread runs yet.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = std::env::var("RUST_LOG").unwrap_or(args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only on a terminal: worker and coordinator logs usually go to files.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let result = match args.cmd {
        Cmd::Train {
            job,
            until_step,
            no_progress,
            device,
        } => cli::train::run(&job, until_step, !no_progress, &device).map(|_| ()),
        Cmd::Generate(a) => cli::generate::run(&a),
        Cmd::Serve(a) => cli::serve::run(&a),
        Cmd::Merge(a) => cli::merge::run(&a),
        Cmd::Predict(a) => cli::eval::predict(&a),
        Cmd::Eval(a) => cli::eval::run_eval(&a),
        Cmd::Score(a) => cli::score::run(&a),
        Cmd::Data {
            cmd:
                DataCmd::Preview {
                    job,
                    examples,
                    tokens,
                    color,
                },
        } => cli::data::preview(&job, examples, tokens, color),
        Cmd::Demo(a) => cli::demo::run(&a),
        Cmd::Bench(a) => cli::bench::run(&a),
        Cmd::Run(a) => cli::run::run(&a),
        Cmd::FromCommand { command } => cli::from_command::run(&command),
        Cmd::Coordinator(a) => cli::coordinator::run(&a),
        Cmd::Worker(a) => cli::worker::run(&a),
        Cmd::Submit {
            job,
            world_size,
            client,
        } => cli::jobs::submit(&client, &job, world_size),
        Cmd::Status {
            job,
            watch,
            json,
            client,
        } => cli::jobs::status(&client, job.as_deref(), watch, json),
        Cmd::List { json, client } => cli::jobs::list(&client, json),
        Cmd::Cancel { job, client } => cli::jobs::cancel(&client, &job),
        Cmd::Events { job, client } => cli::jobs::events(&client, job.as_deref().unwrap_or("")),
        Cmd::Logs {
            job,
            rank,
            lines,
            client,
        } => cli::jobs::logs(&client, &job, rank, lines),
    };
    if let Err(e) = result {
        eprintln!("error: {}", render_chain(&e));
        std::process::exit(1);
    }
}

impl Cmd {
    /// Commands that print a listing and end, whose output is often piped into head or less.
    fn prints_for_a_pipe(&self) -> bool {
        match self {
            Cmd::Status { watch, .. } => !watch,
            Cmd::List { .. } | Cmd::Events { .. } | Cmd::Logs { .. } | Cmd::Data { .. } => true,
            Cmd::FromCommand { .. } => true,
            _ => false,
        }
    }
}

/// The error and its causes, skipping a cause whose text the message before it already includes
/// (library errors often embed their source in their own message).
fn render_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
