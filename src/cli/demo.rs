//! `herd demo`: the whole recipe on a fresh machine with nothing downloaded. Writes a tiny LLaMA,
//! its tokenizer and generated instruction data under `--dir`, measures exact-match accuracy per
//! task family, trains with `configs/demo.yaml`, and measures again.

use super::generate::Generator;
use anyhow::{Context, Result};
use herd_model::generate::GenerateOptions;
use herd_proto::JobSpec;
use herd_worker::demo::{exact_match_by_task, load_demo_records, write_demo_assets, DemoRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const DEMO_JOB: &str = include_str!("../../configs/demo.yaml");

#[derive(clap::Args)]
pub struct DemoArgs {
    #[command(subcommand)]
    cmd: Option<DemoCmd>,
    /// Where the demo's model, data and output live.
    #[arg(long, default_value = "demo", global = true)]
    dir: PathBuf,
    /// Seed for the random model and the generated data.
    #[arg(long, default_value_t = 42, global = true)]
    seed: u64,
    /// Evaluate on at most this many held-out records.
    #[arg(long, default_value_t = 200, global = true)]
    eval_limit: usize,
    /// Train with this many local worker daemons through `herd run` (coordinator + workers on
    /// loopback) instead of in this process. The global batch stays that of configs/demo.yaml.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(clap::Subcommand)]
enum DemoCmd {
    /// Only write the demo model, tokenizer and data.
    Init,
    /// Exact-match accuracy of a model on demo records, per task family.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// Demo records (JSON with a "task" key); default: DIR/data/eval.json.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

/// The demo job with its paths pointed into `dir`.
pub fn demo_job(dir: &Path) -> Result<JobSpec> {
    let mut job = JobSpec::from_yaml_str(DEMO_JOB, "configs/demo.yaml")?;
    job.model_name_or_path = dir.join("model");
    job.data_path = dir.join("data/train.json").into();
    job.output_dir = dir.join("output");
    Ok(job)
}

fn init(dir: &Path, seed: u64) -> Result<()> {
    let s = write_demo_assets(dir, seed)
        .with_context(|| format!("writing the demo into {}", dir.display()))?;
    eprintln!(
        "demo written to {}: model {} parameters (vocab {}), {} train / {} eval records, tasks {:?}",
        s.dir.display(),
        s.num_parameters,
        s.vocab_size,
        s.train_records,
        s.eval_records,
        s.tasks
    );
    Ok(())
}

/// Per task: (exact matches, records).
pub type TaskScores = BTreeMap<String, (usize, usize)>;

/// Greedy answers for `records` and exact match per task.
pub fn evaluate(model_dir: &Path, records: &[DemoRecord]) -> Result<(TaskScores, Vec<String>)> {
    let g = Generator::load(model_dir, &super::placement::DeviceArgs::default())?;
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        logprobs: None,
    };
    let answers = records
        .iter()
        .map(|r| g.answer(&r.alpaca(), &opts))
        .collect::<Result<Vec<_>>>()?;
    Ok((exact_match_by_task(records, &answers), answers))
}

fn print_table(title: &str, scores: &BTreeMap<String, (usize, usize)>) {
    let (c, t) = scores
        .values()
        .fold((0, 0), |(a, b), (c, t)| (a + c, b + t));
    println!(
        "{title}: exact match {c}/{t} ({:.1}%)",
        100.0 * c as f64 / t.max(1) as f64
    );
    for (task, (c, t)) in scores {
        println!(
            "  {task:<14} {c:>4}/{t:<4} {:>5.1}%",
            100.0 * *c as f64 / (*t).max(1) as f64
        );
    }
}

fn eval_records(dir: &Path, data: Option<&Path>, limit: usize) -> Result<Vec<DemoRecord>> {
    let path = data
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("data/eval.json"));
    let mut recs = load_demo_records(&path)?;
    recs.truncate(limit);
    Ok(recs)
}

pub fn run(a: &DemoArgs) -> Result<()> {
    match &a.cmd {
        Some(DemoCmd::Init) => return init(&a.dir, a.seed),
        Some(DemoCmd::Eval { model, data }) => {
            let recs = eval_records(&a.dir, data.as_deref(), a.eval_limit)?;
            let (scores, _) = evaluate(model, &recs)?;
            print_table(&format!("{}", model.display()), &scores);
            return Ok(());
        }
        None => {}
    }
    let t0 = Instant::now();
    if !a.dir.join("model/config.json").is_file() {
        init(&a.dir, a.seed)?;
    }
    let job = demo_job(&a.dir)?;
    let recs = eval_records(&a.dir, None, a.eval_limit)?;
    let shown: Vec<usize> = pick_one_per_task(&recs);

    let (before, answers_before) = evaluate(&job.model_name_or_path, &recs)?;
    print_table("before training", &before);
    let t_train = Instant::now();
    if job.output_dir.join("trainer_state.json").is_file() {
        eprintln!(
            "{} already holds a finished run; evaluating it (delete it to train again)",
            job.output_dir.display()
        );
    } else if a.workers <= 1 {
        super::train::run_job(&job, None, true)?;
    } else {
        train_with_workers(&a.dir, job.clone(), a.workers)?;
    }
    let train_s = t_train.elapsed().as_secs_f64();
    let (after, answers_after) = evaluate(&job.output_dir, &recs)?;
    print_table("after training", &after);
    println!("\nexamples (before → after):");
    for &i in &shown {
        let r = &recs[i];
        let input = r
            .input
            .as_deref()
            .map(|s| format!(" [{s}]"))
            .unwrap_or_default();
        println!(
            "  {}{input}\n    expected {:?}; before {:?}; after {:?}",
            r.instruction, r.output, answers_before[i], answers_after[i]
        );
    }
    println!(
        "\ntraining took {train_s:.0}s, the whole demo {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "try: herd generate --model {} --instruction \"What is 3 + 4?\"",
        job.output_dir.display()
    );
    Ok(())
}

/// The demo job through `herd run` with `workers` ranks: per-device batch divided so the global
/// batch (and so every update) equals the single-process job's.
fn train_with_workers(dir: &Path, mut job: JobSpec, workers: usize) -> Result<()> {
    let global = job.per_device_train_batch_size * job.gradient_accumulation_steps;
    anyhow::ensure!(
        global.is_multiple_of(workers),
        "--workers {workers} does not divide the demo's global batch of {global}"
    );
    job.per_device_train_batch_size = global / workers;
    job.gradient_accumulation_steps = 1;
    job.world_size = workers;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    job.resolve_paths(&cwd);
    let path = dir.join("job.yaml");
    std::fs::write(&path, job.to_yaml()).with_context(|| format!("writing {}", path.display()))?;
    super::run::run(&super::run::RunArgs {
        job: path,
        workers: Some(workers),
        heartbeat_timeout_s: 10.0,
        keep_state: false,
    })
}

fn pick_one_per_task(recs: &[DemoRecord]) -> Vec<usize> {
    let mut seen = std::collections::BTreeSet::new();
    (0..recs.len())
        .filter(|&i| seen.insert(recs[i].task.clone()))
        .collect()
}
