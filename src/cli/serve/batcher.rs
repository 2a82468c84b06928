//! The model thread: it owns the model and decodes every admitted request in one running batch
//! ([`DecodeBatch`]): between two steps it lets the waiting requests join (prefilled together,
//! up to `max_batch` decoding at once) and finished ones leave, so a short answer never waits for a long one. Each
//! request gets the answer it gets alone. A request whose client went away (its event receiver
//! dropped) leaves the batch at the next step.

use super::api::{check_length, ApiError, Completion, Prompt};
use super::logprobs::{name, texts, within, Scored};
use super::text::{settled, stop_at, TextStream};
use crate::cli::generate::Generator;
use herd_model::decode::{DecodeBatch, Emitted, Finish, SeqId};
use herd_model::logprob::{prompt_logprobs, TokenLogprob};
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What the model thread tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The prompt ran and the request is decoding (the first event of every request that
    /// passed the checks, so a stream can start before any text is ready).
    Admitted,
    /// The next piece of the answer's text (streamed requests only).
    Delta(String),
    /// The whole answer, or why there is none; always the last event.
    End(Result<Completion, ApiError>),
}

/// One request waiting for the model.
pub struct Pending {
    pub prompt: Prompt,
    pub events: UnboundedSender<Event>,
}

/// A request in the batch.
struct Live {
    events: UnboundedSender<Event>,
    stream: Option<TextStream>,
    stops: Vec<String>,
    raw: bool,
    prompt_tokens: usize,
    /// The prompt's last token (what the first answer token's text follows).
    prompt_last: u32,
    tokens: Vec<u32>,
    /// The answer starts with this (`echo`: the prompt's text).
    echo: Option<String>,
    /// With `logprobs`: the echoed prompt's tokens, scored.
    echoed: Vec<Scored>,
    /// With `logprobs`: each answer token's log-probability.
    scores: Option<Vec<TokenLogprob>>,
    /// With `logprobs`: the end-of-sequence token's, when the answer ended with it (listed
    /// last with no text, as OpenAI lists its end token, so a client that drops the last entry
    /// of an echo drops that and not a prompt token).
    eos_score: Option<TokenLogprob>,
    started: Instant,
}

/// Start the model thread, which loads the model itself (the bf16-on-CPU guard of `--dtype`
/// belongs to the thread that runs the model); requests go in through the returned sender, and
/// the thread ends when every sender is dropped and the batch is done. A load failure is
/// returned here.
pub fn spawn(
    load: impl FnOnce() -> anyhow::Result<Generator> + Send + 'static,
    max_batch: usize,
    default_max_tokens: usize,
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
            let mut server = Server::new(&generator);
            server.default_max_tokens = default_max_tokens.max(1);
            server.serve(&rx, max_batch.max(1));
        })?;
    loaded_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the model thread ended while loading"))??;
    Ok(tx)
}

struct Server<'g> {
    g: &'g Generator,
    batch: DecodeBatch,
    live: HashMap<SeqId, Live>,
    /// The most tokens a request that asked for no length gets (it also stops at the context):
    /// one long answer widens every row of the batch's KV cache.
    default_max_tokens: usize,
}

impl<'g> Server<'g> {
    fn new(g: &'g Generator) -> Self {
        Server {
            g,
            batch: DecodeBatch::new(&g.model, &g.stop),
            live: HashMap::new(),
            default_max_tokens: usize::MAX,
        }
    }

    fn serve(&mut self, rx: &mpsc::Receiver<Pending>, max_batch: usize) {
        loop {
            // Idle: wait for a request; decoding: take only what is already waiting.
            let mut waiting = Vec::new();
            if self.batch.is_empty() {
                match rx.recv() {
                    Ok(p) => waiting.push(p),
                    Err(_) => return,
                }
            }
            while self.batch.len() + waiting.len() < max_batch {
                match rx.try_recv() {
                    Ok(p) => waiting.push(p),
                    Err(_) => break,
                }
            }
            if !waiting.is_empty() {
                self.admit(waiting);
            }
            self.drop_abandoned();
            if self.batch.is_empty() {
                continue;
            }
            match self.batch.step() {
                Ok(emitted) => emitted.into_iter().for_each(|e| self.deliver(e)),
                Err(e) => self.fail_all(&e),
            }
        }
    }

    /// Run the prompts (one prefill) and let them join the batch; a request that cannot run
    /// (over the context) or is done at once (one token, EOS) is answered now.
    fn admit(&mut self, waiting: Vec<Pending>) {
        let context = self.g.model.config().max_position_embeddings;
        let mut ready = Vec::with_capacity(waiting.len());
        for mut p in waiting {
            let ids = self.prompt_ids(&p.prompt).and_then(|ids| {
                if p.prompt.fill_context {
                    // No length asked for: up to the end of the context, at most the default.
                    if ids.len() >= context {
                        return Err(ApiError::bad(format!(
                            "the prompt is {} tokens, the model's whole context of {context} \
                             (max_position_embeddings): shorten it",
                            ids.len()
                        )));
                    }
                    p.prompt.options.max_new_tokens =
                        (context - ids.len()).min(self.default_max_tokens);
                }
                check_length(ids.len(), p.prompt.options.max_new_tokens, context)?;
                Ok(ids)
            });
            let echo = ids.and_then(|ids| {
                let echo = self.echo(&p.prompt, &ids)?;
                Ok((ids, echo))
            });
            match echo {
                Ok(x) => ready.push((p, x)),
                Err(e) => {
                    let _ = p.events.send(Event::End(Err(e)));
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let requests: Vec<(&[u32], _)> = ready
            .iter()
            .map(|(p, (ids, _))| (ids.as_slice(), p.prompt.options.clone()))
            .collect();
        let emitted = match self.batch.admit_all(&requests) {
            Ok(e) => e,
            Err(e) => {
                for (p, _) in ready {
                    let _ = p.events.send(Event::End(Err(ApiError::new(
                        500,
                        format!("the model failed: {e}"),
                    ))));
                }
                return;
            }
        };
        tracing::info!(
            requests = ready.len(),
            decoding = self.batch.len(),
            "requests admitted"
        );
        for ((p, (ids, (echo, echoed))), e) in ready.into_iter().zip(emitted) {
            let _ = p.events.send(Event::Admitted);
            self.live.insert(
                e.seq,
                Live {
                    events: p.events,
                    stream: p
                        .prompt
                        .stream
                        .then(|| TextStream::new(p.prompt.stop.clone(), p.prompt.raw)),
                    stops: p.prompt.stop,
                    raw: p.prompt.raw,
                    prompt_tokens: ids.len(),
                    prompt_last: ids[ids.len() - 1],
                    tokens: Vec::new(),
                    echo,
                    echoed,
                    scores: p.prompt.options.logprobs.map(|_| Vec::new()),
                    eos_score: None,
                    started: Instant::now(),
                },
            );
            self.deliver(e);
        }
    }

    /// Pass a new token on and answer a finished request (at its end of sequence, its length,
    /// or the first stop sequence in its text; one ended by a stop leaves the batch now).
    fn deliver(&mut self, e: Emitted) {
        let Some(mut live) = self.live.remove(&e.seq) else {
            return;
        };
        live.tokens.extend(e.token);
        if let (Some(scores), Some(lp)) = (&mut live.scores, e.logprob) {
            match e.token {
                Some(_) => scores.push(lp),
                None => live.eos_score = Some(lp),
            }
        }
        let answer = match self.next_piece(&mut live, e.finish) {
            Ok(None) => {
                self.live.insert(e.seq, live);
                return;
            }
            Ok(Some(done)) => {
                tracing::info!(
                    new_tokens = live.tokens.len(),
                    seconds = live.started.elapsed().as_secs_f64(),
                    "request answered"
                );
                Ok(done)
            }
            Err(err) => Err(err),
        };
        if e.finish.is_none() {
            let _ = self.batch.cancel(e.seq);
        }
        let _ = live.events.send(Event::End(answer));
    }

    /// Send a stream its new piece; once the request has ended, its answer.
    fn next_piece(
        &self,
        live: &mut Live,
        finish: Option<Finish>,
    ) -> Result<Option<Completion>, ApiError> {
        let mut hit_limit = finish.map(|f| f == Finish::Length);
        if live.stream.is_none() && hit_limit.is_none() && live.stops.is_empty() {
            return Ok(None); // nothing to look at before the end
        }
        let tok = &self.g.tokenizer;
        let decode = |ids: &[u32]| {
            tok.decode(ids, true)
                .map_err(|e| ApiError::new(500, format!("decoding the answer: {e}")))
        };
        let mut text = decode(&live.tokens)?;
        let cut = stop_at(&text, &live.stops);
        if let Some(cut) = cut {
            text.truncate(cut);
            hit_limit = Some(false);
        }
        if let Some(stream) = &mut live.stream {
            // Until the end, only the text of the settled tokens: it never changes later.
            let settled = settled(&live.tokens, |t| tok.is_byte_token(t));
            let piece = if hit_limit.is_some() || settled == live.tokens.len() {
                stream.piece(&text, hit_limit.is_some())
            } else {
                stream.piece(&decode(&live.tokens[..settled])?, false)
            };
            if !piece.is_empty() {
                let _ = live.events.send(Event::Delta(piece));
            }
        }
        let Some(hit_limit) = hit_limit else {
            return Ok(None);
        };
        let logprobs = live
            .scores
            .as_ref()
            .map(|scores| self.answer_logprobs(live, scores, cut));
        Ok(Some(Completion {
            text: match &live.echo {
                Some(prompt) => format!("{prompt}{text}"),
                None if live.raw => text,
                None => text.trim().to_string(),
            },
            prompt_tokens: live.prompt_tokens,
            completion_tokens: live.tokens.len(),
            hit_limit,
            logprobs,
        }))
    }

    /// The answer's tokens named and scored, after the echoed prompt's: up to a stop
    /// sequence's cut, else ending with the end-of-sequence token when the answer ended with
    /// it (with no text, as OpenAI lists its end token, so a client that drops an echo's last
    /// entry drops that and not an answer token).
    fn answer_logprobs(
        &self,
        live: &Live,
        scores: &[TokenLogprob],
        cut: Option<usize>,
    ) -> Vec<Scored> {
        let tok = &self.g.tokenizer;
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let pieces = texts(&live.tokens, &decode, |t| tok.is_byte_token(t));
        let mut answer = name(pieces, Some(live.prompt_last), scores, &decode);
        match (cut, &live.eos_score) {
            (Some(cut), _) => answer = within(answer, cut),
            (None, Some(eos)) => {
                let prev = live.tokens.last().copied().unwrap_or(live.prompt_last);
                let end = std::slice::from_ref(eos);
                answer.extend(name(vec![String::new()], Some(prev), end, &decode));
            }
            (None, None) => {}
        }
        live.echoed.iter().cloned().chain(answer).collect()
    }

    /// The prompt's token ids: as sent (each checked against the vocabulary), or the text
    /// tokenized (bos in front).
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
        let Some(ids) = &prompt.ids else {
            let ids = self
                .g
                .tokenizer
                .encode(&prompt.text)
                .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")))?;
            if ids.is_empty() {
                return Err(ApiError::bad("the prompt has no tokens"));
            }
            return Ok(ids);
        };
        let vocab = self.g.model.config().vocab_size;
        match ids.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(ApiError::bad(format!(
                "prompt: token {} (at {i}) is outside the model's vocabulary of {vocab}",
                ids[i]
            ))),
            None => Ok(ids.clone()),
        }
    }

    /// With `echo`, the text the answer starts with and, with `logprobs`, the prompt's tokens
    /// scored (the first has no value: nothing comes before it).
    fn echo(
        &self,
        prompt: &Prompt,
        ids: &[u32],
    ) -> Result<(Option<String>, Vec<Scored>), ApiError> {
        if !prompt.echo {
            return Ok((None, vec![]));
        }
        let tok = &self.g.tokenizer;
        let text = match &prompt.ids {
            Some(_) => tok
                .decode(ids, true)
                .map_err(|e| ApiError::new(500, format!("decoding the prompt: {e}")))?,
            None => prompt.text.clone(),
        };
        let Some(top) = prompt.options.logprobs else {
            return Ok((Some(text), vec![]));
        };
        let scores = prompt_logprobs(&self.g.model, ids, top)
            .map_err(|e| ApiError::new(500, format!("scoring the prompt: {e}")))?;
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let mut pieces = texts(ids, &decode, |t| tok.is_byte_token(t)).into_iter();
        let first = Scored {
            text: pieces.next().unwrap_or_default(),
            logprob: None,
            top: vec![],
        };
        let rest = name(pieces.collect(), Some(ids[0]), &scores, &decode);
        Ok((Some(text), std::iter::once(first).chain(rest).collect()))
    }

    /// Requests nobody waits for any more stop decoding.
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(&s, _)| s)
            .collect();
        for seq in gone {
            self.live.remove(&seq);
            if let Err(e) = self.batch.cancel(seq) {
                self.fail_all(&e);
                return;
            }
            tracing::info!(
                decoding = self.batch.len(),
                "a client went away; its request stopped"
            );
        }
    }

    /// A step failed: every request in the batch is answered with the error, and the batch
    /// starts over empty.
    fn fail_all(&mut self, e: &herd_model::Error) {
        tracing::error!("decoding a batch of {} failed: {e}", self.live.len());
        for (_, live) in self.live.drain() {
            let _ = live.events.send(Event::End(Err(ApiError::new(
                500,
                format!("the model failed: {e}"),
            ))));
        }
        self.batch = DecodeBatch::new(&self.g.model, &self.g.stop);
    }
}
