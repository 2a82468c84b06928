//! The model thread: it owns the model, takes the requests waiting when it is free (up to
//! `max_batch`) and decodes them as one left-padded batch (`generate_batch`, whose answers
//! equal one-at-a-time decoding), so concurrent clients share the forward passes.

use super::api::{check_length, ApiError, Completion, Prompt};
use crate::cli::generate::Generator;
use herd_model::generate::generate_batch;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// One request waiting for the model.
pub struct Pending {
    pub prompt: Prompt,
    pub reply: oneshot::Sender<Result<Completion, ApiError>>,
}

/// Start the model thread, which loads the model itself (the bf16-on-CPU guard of `--dtype`
/// belongs to the thread that runs the model); requests go in through the returned sender, and
/// the thread ends when every sender is dropped. A load failure is returned here.
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Generator> + Send + 'static,
    max_batch: usize,
) -> anyhow::Result<mpsc::Sender<Pending>> {
    let (tx, rx) = mpsc::channel::<Pending>();
    let (loaded_tx, loaded_rx) = mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("herd-serve-model".into())
        .spawn(move || {
            let generator = match load() {
                Ok(g) => {
                    let _ = loaded_tx.send(Ok(()));
                    g
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < max_batch.max(1) {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                run_batch(&generator, batch);
            }
        })?;
    loaded_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the model thread ended while loading"))??;
    Ok(tx)
}

fn run_batch(g: &Generator, batch: Vec<Pending>) {
    let context = g.model.config().max_position_embeddings;
    // Requests that cannot run are answered now; the others decode together.
    let mut ready = Vec::with_capacity(batch.len());
    for p in batch {
        let encoded = g
            .tokenizer
            .encode(&p.prompt.text)
            .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")))
            .and_then(|ids| {
                check_length(ids.len(), p.prompt.options.max_new_tokens, context)?;
                Ok(ids)
            });
        match encoded {
            Ok(ids) => ready.push((p, ids)),
            Err(e) => {
                let _ = p.reply.send(Err(e));
            }
        }
    }
    if ready.is_empty() {
        return;
    }
    let (ready, prompts): (Vec<Pending>, Vec<Vec<u32>>) = ready.into_iter().unzip();
    let opts: Vec<_> = ready.iter().map(|p| p.prompt.options.clone()).collect();
    let t0 = std::time::Instant::now();
    match generate_batch(&g.model, &prompts, g.tokenizer.eos_id(), &opts) {
        Ok(outs) => {
            let new_tokens: usize = outs.iter().map(Vec::len).sum();
            tracing::info!(
                requests = ready.len(),
                new_tokens,
                seconds = t0.elapsed().as_secs_f64(),
                "decoded a batch"
            );
            for ((p, ids), out) in ready.into_iter().zip(&prompts).zip(outs) {
                let answer = g
                    .tokenizer
                    .decode(&out, true)
                    .map(|text| Completion {
                        text: text.trim().to_string(),
                        prompt_tokens: ids.len(),
                        completion_tokens: out.len(),
                        hit_limit: out.len() >= p.prompt.options.max_new_tokens,
                    })
                    .map_err(|e| ApiError::new(500, format!("decoding the answer: {e}")));
                let _ = p.reply.send(answer);
            }
        }
        Err(e) => {
            tracing::error!("decoding a batch of {} failed: {e}", ready.len());
            for p in ready {
                let _ = p
                    .reply
                    .send(Err(ApiError::new(500, format!("the model failed: {e}"))));
            }
        }
    }
}
