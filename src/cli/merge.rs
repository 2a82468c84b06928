//! `herd merge --base DIR --adapter DIR --out DIR`: fold a LoRA adapter into its base model
//! (W + B A * alpha / r, PEFT's `merge_and_unload`) and write a plain HF model directory.

use anyhow::{Context, Result};
use candle_core::DType;
use herd_model::{Llama, Tokenizer};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model (HF layout) the adapter was trained on.
    #[arg(long)]
    pub base: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), e.g. a
    /// LoRA job's output_dir or one of its checkpoints.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model (config.json, model.safetensors, tokenizer).
    #[arg(long)]
    pub out: PathBuf,
    /// Save the merged weights in bf16 instead of f32.
    #[arg(long)]
    pub bf16: bool,
}

pub fn run(a: &MergeArgs) -> Result<()> {
    // The merged model's files would replace what is being read.
    for (flag, dir) in [("--base", &a.base), ("--adapter", &a.adapter)] {
        if herd_model::weights::same_file(&a.out, dir) {
            anyhow::bail!(
                "--out {} is the {flag} directory: the merged model would overwrite it (give another directory)",
                a.out.display()
            );
        }
    }
    let mut model = Llama::load(&a.base)
        .with_context(|| format!("loading the base model in {}", a.base.display()))?;
    model
        .load_adapter(&a.adapter)
        .with_context(|| format!("loading the adapter in {}", a.adapter.display()))?;
    let merged = model.merged().context("merging the adapter")?;
    merged
        .save(&a.out, if a.bf16 { DType::BF16 } else { DType::F32 })
        .with_context(|| format!("writing {}", a.out.display()))?;
    herd_model::generation_config::save(&a.base, merged.config(), &a.out)
        .with_context(|| format!("writing the generation config to {}", a.out.display()))?;
    // The tokenizer the adapter was trained with (it may have gained [PAD]), else the base's.
    let tok_dir = if a.adapter.join("tokenizer.json").exists() {
        &a.adapter
    } else {
        &a.base
    };
    if tok_dir.join("tokenizer.json").exists() {
        let tok = Tokenizer::from_dir(tok_dir)
            .with_context(|| format!("loading the tokenizer of {}", tok_dir.display()))?;
        tok.save(&a.out)
            .with_context(|| format!("writing the tokenizer to {}", a.out.display()))?;
    }
    let l = model
        .lora()
        .context("the adapter directory held no LoRA adapter")?;
    println!(
        "merged {} (r={}, alpha={}, {:?}) into {} -> {} (vocab {})",
        a.adapter.display(),
        l.config.r,
        l.config.alpha,
        l.config.targets(),
        a.base.display(),
        a.out.display(),
        merged.config().vocab_size
    );
    Ok(())
}
