//! `herd`: the command line. Each subcommand lives in `cli/`; this file only parses arguments
//! and sets up logging. Errors reach the user through `anyhow` with their full cause chain.

mod cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "herd", version, about = "Fine-tune LLaMA-family models: trainer, coordinator, workers")]
struct Args {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG works too.
    #[arg(long, global = true, default_value = "warn,herd=info,herd_worker=info")]
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
    },
    /// Answer an instruction with a trained model (Alpaca template, KV cache).
    Generate(cli::generate::GenerateArgs),
    /// Inspect a job's data as the model sees it.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// The no-download demo: a tiny LLaMA learns simple instruction tasks on the CPU.
    Demo(cli::demo::DemoArgs),
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

fn main() {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or(args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match args.cmd {
        Cmd::Train { job, until_step, no_progress } => cli::train::run(&job, until_step, !no_progress).map(|_| ()),
        Cmd::Generate(a) => cli::generate::run(&a),
        Cmd::Data { cmd: DataCmd::Preview { job, examples, tokens, color } } => cli::data::preview(&job, examples, tokens, color),
        Cmd::Demo(a) => cli::demo::run(&a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
