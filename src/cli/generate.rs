//! `herd generate --model DIR`: answer an instruction with the Alpaca template.

use anyhow::{Context, Result};
use herd_model::generate::{generate, generate_batch, GenerateOptions};
use herd_model::{Llama, Tokenizer};
use herd_worker::data::{source_text, AlpacaRecord};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::placement::{DeviceArgs, Placed};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A model directory in HF layout: an output_dir or a checkpoint-<step> folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The instruction; without it, one instruction per line is read from standard input.
    #[arg(long)]
    pub instruction: Option<String>,
    /// Optional input (context) for the instruction.
    #[arg(long)]
    pub input: Option<String>,
    #[command(flatten)]
    pub sampling: super::eval::SamplingArgs,
    #[command(flatten)]
    pub placement: DeviceArgs,
}

/// A model and its tokenizer, loaded for inference on a device.
pub struct Generator {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The ids an answer ends before: generation_config.json's eos ids (or config.json's), as
    /// transformers' `generate` stops, and the tokenizer's eos.
    pub stop: Vec<u32>,
    _placed: Placed,
}

impl Generator {
    pub fn load(dir: &Path, placement: &DeviceArgs) -> Result<Self> {
        let placed = placement.open()?;
        let tokenizer = Tokenizer::from_dir(dir)
            .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        let mut model =
            Llama::load(dir).with_context(|| format!("loading the model in {}", dir.display()))?;
        if placed.moves() {
            model
                .to_device(&placed.device, placed.dtype)
                .with_context(|| format!("moving the model to {}", placement.device))?;
        }
        let stop =
            herd_model::generation_config::stop_ids(dir, model.config(), tokenizer.eos_id())?;
        Ok(Generator {
            model,
            tokenizer,
            stop,
            _placed: placed,
        })
    }

    /// The model's answer to an Alpaca record's instruction (and input).
    pub fn answer(&self, rec: &AlpacaRecord, opts: &GenerateOptions) -> Result<String> {
        let prompt = self.tokenizer.encode(&source_text(rec))?;
        let ids = generate(&self.model, &prompt, &self.stop, opts)?;
        Ok(self.tokenizer.decode(&ids, true)?.trim().to_string())
    }

    /// The answers to several records at once (one batched decode; record i with `opts[i]`):
    /// the same text [`Generator::answer`] gives each alone.
    pub fn answers(&self, recs: &[&AlpacaRecord], opts: &[GenerateOptions]) -> Result<Vec<String>> {
        let prompts = recs
            .iter()
            .map(|r| self.tokenizer.encode(&source_text(r)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        generate_batch(&self.model, &prompts, &self.stop, opts)?
            .iter()
            .map(|ids| Ok(self.tokenizer.decode(ids, true)?.trim().to_string()))
            .collect()
    }
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let g = Generator::load(&a.model, &a.placement)?;
    let opts = a.sampling.options(0);
    let ask = |instruction: String| -> Result<()> {
        let rec = AlpacaRecord {
            instruction,
            input: a.input.clone(),
            output: String::new(),
        };
        println!("{}", g.answer(&rec, &opts)?);
        Ok(())
    };
    match &a.instruction {
        Some(i) => ask(i.clone()),
        None => {
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading standard input")?;
                if !line.trim().is_empty() {
                    ask(line)?;
                }
            }
            Ok(())
        }
    }
}
