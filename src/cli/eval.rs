//! `herd predict` (Alpaca-CoT's predict: an answer for every record of an instruction file) and
//! `herd eval` (eval loss as HF's Trainer computes it, ROUGE-L as `rouge-score` computes it, and
//! exact match, overall and by reference length in words as GPT-4-LLM reports them).
//!
//! Generation is batched: records are left-padded and decoded together with a KV cache
//! (`herd_model::generate::generate_batch`); answers are the same for any batch size.

use super::generate::Generator;
use super::score::Scorer;
use anyhow::{bail, Context, Result};
use herd_model::generate::GenerateOptions;
use herd_worker::data::comparisons::user_input_of;
use herd_worker::eval::{self, EvalLoss, GenerationScores, RawRecord};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed (with several records, record i uses seed + i, whatever the batch size).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn options(&self, i: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.wrapping_add(i as u64),
            logprobs: None,
        }
    }
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A model directory in HF layout (an output_dir or a checkpoint-<step> folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Alpaca records (JSON array or JSONL); `output` is optional.
    #[arg(long)]
    pub data: PathBuf,
    /// JSONL: every record with all its fields plus "prediction" (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Records decoded together (left-padded, KV cache); answers do not depend on it.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Only the first N records.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub placement: super::placement::DeviceArgs,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Alpaca records with reference `output`s (JSON array or JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Only the first N records (for both the loss and the generations).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Batch size of the eval-loss forward passes (HF: per_device_eval_batch_size) and of the
    /// batched decoding (answers do not depend on it).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Truncation of prompt + answer for the eval loss (train.py's model_max_length).
    #[arg(long, default_value_t = 512)]
    pub model_max_length: usize,
    /// Also write the predictions (JSONL, as `herd predict`).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Sample N answers per record and keep the one the --reward-model scores highest
    /// (GPT-4-LLM's best-of-n). N > 1 needs --temperature > 0.
    #[arg(long, default_value_t = 1)]
    pub best_of: usize,
    /// The reward model that ranks the --best-of candidates.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub placement: super::placement::DeviceArgs,
}

fn load(data: &Path, limit: Option<usize>) -> Result<Vec<RawRecord>> {
    let mut records =
        eval::read_records(data).with_context(|| format!("reading {}", data.display()))?;
    if let Some(n) = limit {
        records.truncate(n);
    }
    Ok(records)
}

/// Predictions for `records`, in order, decoded `batch` records at a time.
fn predict_all(
    g: &Generator,
    records: &[RawRecord],
    s: &SamplingArgs,
    batch: usize,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(records.len());
    for (c, chunk) in records.chunks(batch.max(1)).enumerate() {
        let first = c * batch.max(1);
        let recs: Vec<_> = chunk.iter().map(|r| &r.alpaca).collect();
        let opts: Vec<_> = (first..first + chunk.len()).map(|i| s.options(i)).collect();
        out.extend(
            g.answers(&recs, &opts)
                .with_context(|| format!("records {}..={}", first + 1, first + chunk.len()))?,
        );
        tracing::info!("generated {}/{}", out.len(), records.len());
    }
    Ok(out)
}

/// Best-of-n: `n` samples per record (record i, sample k uses seed + i·n + k, so n = 1 is plain
/// `predict_all`), each scored by the reward model on (instruction + input, answer); the highest
/// (the first of ties) is kept. Returns the kept answers and their rewards.
/// The most samples `--best-of` takes per record.
const MAX_BEST_OF: usize = 256;

fn best_of_n(
    g: &Generator,
    scorer: &Scorer,
    records: &[RawRecord],
    s: &SamplingArgs,
    n: usize,
) -> Result<(Vec<String>, Vec<f32>)> {
    let (mut kept, mut rewards) = (Vec::new(), Vec::new());
    for (i, r) in records.iter().enumerate() {
        let user = user_input_of(&r.alpaca);
        // The n samples of a record decode together, each with its own seed.
        let opts: Vec<_> = (0..n).map(|k| s.options(i * n + k)).collect();
        let answers = g
            .answers(&vec![&r.alpaca; n], &opts)
            .with_context(|| format!("record {}", i + 1))?;
        let mut candidates: Vec<(String, String)> =
            answers.into_iter().map(|a| (user.clone(), a)).collect();
        let scores = scorer.score(&candidates, n)?;
        let best = (0..n).fold(0, |b, k| if scores[k] > scores[b] { k } else { b });
        kept.push(candidates.swap_remove(best).1);
        rewards.push(scores[best]);
        if (i + 1) % 50 == 0 || i + 1 == records.len() {
            tracing::info!("best-of-{n}: {}/{}", i + 1, records.len());
        }
    }
    Ok((kept, rewards))
}

fn write_predictions(path: &Path, records: &[RawRecord], predictions: &[String]) -> Result<()> {
    let mut text = String::new();
    for (r, p) in records.iter().zip(predictions) {
        let mut fields = r.fields.clone();
        fields.insert("prediction".into(), Value::String(p.clone()));
        text.push_str(&serde_json::to_string(&Value::Object(fields))?);
        text.push('\n');
    }
    write_text(path, &text)
}

/// Refuses, before any generation, an output file that could not be written at the end or
/// that would replace `data`, the file being read.
pub fn check_out(out: &Path, data: &Path) -> Result<()> {
    if out.is_dir() {
        bail!(
            "{}: is a directory (expected a file to write)",
            out.display()
        );
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Some(problem) = herd_worker::checkpoint::output_dir_problem(dir) {
            bail!(
                "{}: its directory {} {problem}",
                out.display(),
                dir.display()
            );
        }
    }
    if herd_model::weights::same_file(out, data) {
        bail!(
            "{}: is the data file being read; writing the output there would replace it (give another path)",
            out.display()
        );
    }
    Ok(())
}

/// Writes `text` to `path` atomically, creating its directory.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    // A bare file name has an empty parent, which write_atomic cannot fsync: anchor it at ".".
    let path = &if path.parent().is_some_and(|d| d.as_os_str().is_empty()) {
        Path::new(".").join(path)
    } else {
        path.to_path_buf()
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    herd_worker::checkpoint::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn predict(a: &PredictArgs) -> Result<()> {
    check_out(&a.out, &a.data)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let records = load(&a.data, a.limit)?;
    let g = Generator::load(&a.model, &a.placement)?;
    let predictions = predict_all(&g, &records, &a.sampling, a.batch_size)?;
    write_predictions(&a.out, &records, &predictions)?;
    eprintln!(
        "wrote {} predictions to {}",
        predictions.len(),
        a.out.display()
    );
    Ok(())
}

pub fn run_eval(a: &EvalArgs) -> Result<()> {
    if a.best_of == 0 || a.batch_size == 0 {
        bail!("--best-of and --batch-size must be at least 1");
    }
    if let Some(p) = &a.predictions {
        check_out(p, &a.data)?;
    }
    if a.best_of > MAX_BEST_OF {
        bail!(
            "--best-of {} is more than {MAX_BEST_OF} samples per record (each is a full \
             generation, and all of a record's are held at once)",
            a.best_of
        );
    }
    if a.best_of > 1 && a.sampling.temperature <= 0.0 {
        bail!("--best-of {} needs sampling: set --temperature above 0 (greedy decoding gives {} identical answers)", a.best_of, a.best_of);
    }
    if a.best_of > 1 && a.reward_model.is_none() {
        bail!(
            "--best-of {} needs --reward-model DIR to rank the answers",
            a.best_of
        );
    }
    let records = load(&a.data, a.limit)?;
    if let Some(i) = records.iter().position(|r| !r.has_output) {
        bail!(
            "{}: record {} has no \"output\" to compare with",
            a.data.display(),
            i + 1
        );
    }
    let g = Generator::load(&a.model, &a.placement)?;
    let alpaca: Vec<_> = records.iter().map(|r| r.alpaca.clone()).collect();
    let examples = eval::encode_records(&g.tokenizer, &alpaca, a.model_max_length)?;
    let pad_id = g.tokenizer.pad_id().or(g.tokenizer.eos_id()).unwrap_or(0);
    let loss = eval::eval_loss(&g.model, &examples, a.batch_size, pad_id)?;
    let (predictions, rewards) = match &a.reward_model {
        Some(dir) => {
            let scorer = Scorer::load(dir, a.model_max_length, &a.placement)?;
            let (p, r) = best_of_n(&g, &scorer, &records, &a.sampling, a.best_of)?;
            (p, Some(r))
        }
        None => (predict_all(&g, &records, &a.sampling, a.batch_size)?, None),
    };
    let reward = rewards.map(|r| BestOf {
        n: a.best_of,
        mean_reward: r.iter().map(|&x| x as f64).sum::<f64>() / r.len().max(1) as f64,
    });
    if let Some(p) = &a.predictions {
        write_predictions(p, &records, &predictions)?;
    }
    let pairs: Vec<(String, String)> = alpaca
        .iter()
        .map(|r| r.output.clone())
        .zip(predictions)
        .collect();
    let scores = eval::score_generations(&pairs);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report_json(&a.model, &a.data, &loss, &scores, reward))?
        );
    } else {
        print!("{}", report_text(&loss, &scores));
        if let Some(b) = reward {
            println!(
                "best-of-{}: mean reward of the kept answers {:.4}",
                b.n, b.mean_reward
            );
        }
    }
    Ok(())
}

/// What best-of-n reranking adds to the report.
#[derive(Clone, Copy)]
struct BestOf {
    n: usize,
    mean_reward: f64,
}

fn report_json(
    model: &Path,
    data: &Path,
    loss: &EvalLoss,
    s: &GenerationScores,
    best_of: Option<BestOf>,
) -> Value {
    let buckets: serde_json::Map<String, Value> = s
        .by_reference_length
        .iter()
        .map(|(k, g)| (k.clone(), json!(g)))
        .collect();
    let mut v = json!({
        "model": model,
        "data": data,
        "records": s.overall.count,
        "eval_loss": loss.loss,
        "eval_token_loss": loss.token_loss,
        "eval_tokens": loss.tokens,
        "rouge_l": s.overall.rouge_l,
        "exact_match": s.overall.exact_match,
        "by_reference_length": buckets,
    });
    if let Some(b) = best_of {
        v["best_of"] = json!(b.n);
        v["mean_reward"] = json!(b.mean_reward);
    }
    v
}

fn report_text(loss: &EvalLoss, s: &GenerationScores) -> String {
    let mut out = format!(
        "eval_loss {:.4} (token-weighted {:.4} over {} tokens)\n{:<12} {:>6} {:>8} {:>8}\n",
        loss.loss, loss.token_loss, loss.tokens, "ref words", "count", "rougeL", "exact"
    );
    for (name, g) in s
        .by_reference_length
        .iter()
        .map(|(k, g)| (k.as_str(), g))
        .chain([("all", &s.overall)])
    {
        // A bucket no reference falls in has no score (not a score of 0).
        let (rouge, exact) = match g.count {
            0 => ("-".to_string(), "-".to_string()),
            _ => (format!("{:.4}", g.rouge_l), format!("{:.4}", g.exact_match)),
        };
        out.push_str(&format!(
            "{:<12} {:>6} {:>8} {:>8}\n",
            name, g.count, rouge, exact
        ));
    }
    out
}
