//! `herd score`: a reward model's scores on a comparison file (pairwise accuracy and mean margin)
//! or on an Alpaca instruction file (one reward per record, on (instruction + input, output)).
//! [`Scorer`] is also the reranker of `herd eval --best-of`.

use anyhow::{bail, Context, Result};
use herd_model::{RewardModel, Tokenizer};
use herd_worker::data::comparisons::{
    encode_comparison, encode_reward_text, load_comparisons, user_input_of,
};
use herd_worker::eval::reward::{score_pairs, score_sequences, summarize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::placement::{DeviceArgs, Placed};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A reward model directory (`herd train` with `task: reward`, or transformers'
    /// LlamaForSequenceClassification with one label).
    #[arg(long)]
    pub model: PathBuf,
    /// Comparison records {user_input, completion_a, completion_b}, or Alpaca records with
    /// `output` (JSON array or JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// JSONL of per-pair (reward_a, reward_b, margin) or per-record ("reward") scores.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Truncation of prompt + completion, as in training.
    #[arg(long, default_value_t = 512)]
    pub model_max_length: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub placement: DeviceArgs,
}

pub struct Scorer {
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    pub pad_id: u32,
    pub max_len: usize,
    _placed: Placed,
}

impl Scorer {
    pub fn load(dir: &Path, max_len: usize, placement: &DeviceArgs) -> Result<Self> {
        let placed = placement.open()?;
        let tokenizer = Tokenizer::from_dir(dir)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        if !dir.join("config.json").is_file() {
            bail!("{}: no config.json (not a model directory)", dir.display());
        }
        let mut model = RewardModel::load(dir, 0)
            .with_context(|| format!("loading the reward model in {}", dir.display()))?;
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let cfg: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}/config.json", dir.display()))?;
        let archs = cfg.get("architectures").and_then(Value::as_array);
        if !archs.is_some_and(|a| {
            a.iter().any(|v| {
                v.as_str()
                    .is_some_and(|s| s.ends_with("ForSequenceClassification"))
            })
        }) {
            // A causal LM would load with a random head and score noise: refuse it.
            bail!(
                "{}: not a reward model (config.json architectures lacks {})",
                dir.display(),
                herd_model::reward::ARCHITECTURE
            );
        }
        let pad_id = model
            .pad_token_id()
            .or(tokenizer.pad_id())
            .or(tokenizer.eos_id())
            .unwrap_or(0);
        if placed.moves() {
            model
                .to_device(&placed.device, placed.dtype)
                .with_context(|| format!("moving the reward model to {}", placement.device))?;
        }
        Ok(Scorer {
            model,
            tokenizer,
            pad_id,
            max_len,
            _placed: placed,
        })
    }

    /// Rewards of (user input, completion) texts.
    pub fn score(&self, items: &[(String, String)], batch_size: usize) -> Result<Vec<f32>> {
        let seqs = items
            .iter()
            .map(|(u, c)| encode_reward_text(&self.tokenizer, u, c, self.max_len))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(score_sequences(
            &self.model,
            &seqs,
            batch_size,
            self.pad_id,
        )?)
    }
}

/// Whether the file's first record has the comparison keys (else it is read as Alpaca records).
fn is_comparison_file(path: &Path) -> Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let values = herd_worker::data::records::read_values(path, &text)?;
    Ok(match values.into_iter().next() {
        Some((_, Ok(Value::Object(m)))) => m.contains_key("user_input"),
        _ => false,
    })
}

pub fn run(a: &ScoreArgs) -> Result<()> {
    if let Some(out) = &a.out {
        super::eval::check_out(out, &a.data)?;
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let comparisons = is_comparison_file(&a.data)?;
    let s = Scorer::load(&a.model, a.model_max_length, &a.placement)?;
    let mut lines = Vec::new();
    if comparisons {
        let loaded = load_comparisons(&a.data, false)?;
        let pairs = loaded
            .pairs
            .iter()
            .map(|c| encode_comparison(&s.tokenizer, c, s.max_len))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let scores = score_pairs(&s.model, &pairs, a.batch_size, s.pad_id)?;
        for (i, (ra, rb)) in scores.iter().enumerate() {
            lines.push(json!({"index": i, "reward_a": ra, "reward_b": rb, "margin": ra - rb}));
        }
        let sum = summarize(&scores);
        if a.json {
            println!(
                "{}",
                json!({"pairs": sum.pairs, "accuracy": sum.accuracy, "mean_margin": sum.mean_margin, "loss": sum.loss})
            );
        } else {
            println!(
                "pairs {}  accuracy {:.4}  mean_margin {:.4}  loss {:.4}",
                sum.pairs, sum.accuracy, sum.mean_margin, sum.loss
            );
        }
    } else {
        let records = herd_worker::eval::read_records(&a.data)?;
        if let Some(i) = records.iter().position(|r| !r.has_output) {
            bail!(
                "{}: record {} has no \"output\" to score",
                a.data.display(),
                i + 1
            );
        }
        let items: Vec<(String, String)> = records
            .iter()
            .map(|r| (user_input_of(&r.alpaca), r.alpaca.output.clone()))
            .collect();
        let rewards = s.score(&items, a.batch_size)?;
        for (r, reward) in records.iter().zip(&rewards) {
            let mut fields = r.fields.clone();
            fields.insert("reward".into(), json!(reward));
            lines.push(Value::Object(fields));
        }
        let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len().max(1) as f64;
        if a.json {
            println!("{}", json!({"records": rewards.len(), "mean_reward": mean}));
        } else {
            println!("records {}  mean_reward {:.4}", rewards.len(), mean);
        }
    }
    if let Some(out) = &a.out {
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        super::eval::write_text(out, &text)?;
    }
    Ok(())
}
