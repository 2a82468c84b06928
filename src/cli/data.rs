//! `herd data preview JOB.yaml`.

use anyhow::Result;
use herd_model::Tokenizer;
use herd_worker::data::mixture::load_mixture;
use herd_worker::data::preview::{preview_mixture, PreviewOptions};
use std::path::Path;

pub fn preview(job_path: &Path, examples: usize, show_tokens: bool, color: bool) -> Result<()> {
    let job = super::train::load_job(job_path)?;
    let tok_dir = job
        .tokenizer_name
        .as_deref()
        .unwrap_or(&job.model_name_or_path);
    let mut tok = Tokenizer::from_dir(tok_dir)?;
    tok.add_missing_special_tokens();
    let mix = load_mixture(&job.data_path, job.seed, job.skip_bad_records)?;
    let opts = PreviewOptions {
        examples,
        max_len: job.model_max_length,
        color,
        show_tokens,
    };
    print!("{}", preview_mixture(&tok, &mix, &opts)?);
    Ok(())
}
