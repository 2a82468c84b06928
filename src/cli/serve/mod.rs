//! `herd serve --model DIR`: the model over HTTP, as Alpaca-CoT and FastChat serve theirs.
//!
//! Routes: `GET /` a chat page (static; the browser sends the token the user types), `GET
//! /health`, and, with `Authorization: Bearer <token>`, `GET /v1/models` (and `/v1/models/{id}`),
//! `POST /v1/generate`
//! (the Alpaca prompt, as `herd generate`), `POST /v1/chat/completions` (OpenAI's shape,
//! the Vicuna v1.1 prompt) and `POST /v1/completions` (OpenAI's text completion, the prompt as
//! it is); with `"stream": true` all three answer in server-sent events as the
//! tokens come (OpenAI's `chat.completion.chunk`s, then `data: [DONE]`). One model thread decodes
//! every request in one running batch that requests join and leave between steps
//! ([`batcher`]). The token comes from `--token-file`, else `HERD_TOKEN`, else
//! `<state-dir>/token`, created (0600) on first start as the coordinator does.

mod api;
mod batcher;
mod chat;
mod completions;
mod logprobs;
mod text;

use anyhow::{Context, Result};
use api::{ApiError, Completion, Prompt};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batcher::Event;
use chat::ChatChunks;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::generate::Generator;
use super::placement::DeviceArgs;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A model directory in HF layout (an output_dir, a checkpoint-<step> folder, or a LoRA
    /// adapter dir with its base).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to listen (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File holding the bearer token (default: env HERD_TOKEN, else <state-dir>/token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where the token is created on first start when none is given.
    #[arg(long, default_value = ".herd-serve")]
    pub state_dir: PathBuf,
    /// Requests decoded together at most (they share each forward pass; answers do not depend
    /// on it).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting or decoding at most; more are answered 503 at once (retry later)
    /// instead of queueing without bound.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The most tokens a chat answer gets when the request gives no `max_tokens` (it also
    /// stops at the end of the model's context).
    #[arg(long, default_value_t = 2048)]
    pub default_max_tokens: usize,
    /// The model's name in `/v1/models` and in answers (vLLM's --served-model-name; default:
    /// the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub placement: DeviceArgs,
}

struct AppState {
    model_name: String,
    /// When the server started (the model object's `created`).
    started: u64,
    /// Random per server start, so answer ids do not repeat across restarts.
    id_run: String,
    token: String,
    queue: std::sync::mpsc::Sender<batcher::Pending>,
    next_id: AtomicU64,
    /// Requests waiting for or being decoded by the model thread.
    in_flight: AtomicUsize,
    max_queue: usize,
}

impl AppState {
    /// A fresh answer id (`<prefix>-<run><n>`) and the Unix time it was made.
    fn answer_id(&self, prefix: &str) -> (String, u64) {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        (format!("{prefix}-{}{n}", self.id_run), created)
    }
}

pub fn run(a: &ServeArgs) -> Result<()> {
    anyhow::ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    let (token, token_note) =
        match herd_proto::auth::try_token_from_env_or_file(a.token_file.as_deref())
            .context("reading the token")?
        {
            Some(t) => {
                herd_proto::auth::check_strength(&t, "--token-file / HERD_TOKEN")?;
                (t, "the given token".to_string())
            }
            None => (
                herd_proto::auth::load_or_create_token(&a.state_dir)
                    .context("creating the token")?,
                format!(
                    "the token in {}",
                    herd_proto::auth::token_path(&a.state_dir).display()
                ),
            ),
        };
    let (dir, placement) = (a.model.clone(), a.placement.clone());
    let queue = batcher::spawn(
        move || Generator::load(&dir, &placement),
        a.max_batch,
        a.default_max_tokens,
    )?;
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.model.display().to_string())
    });
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id_run = herd_proto::auth::generate_token()
        .map(|t| t[..8].to_string())
        .unwrap_or_else(|_| format!("{started:x}"));
    let state = Arc::new(AppState {
        model_name,
        started,
        id_run,
        token,
        queue,
        next_id: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
        max_queue: a.max_queue.max(1),
    });
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/generate", post(generate))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(text_completion))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/health", get(|| async { "ok\n" }))
        .merge(api)
        .fallback(|| async { failure(ApiError::new(404, "no such route")) })
        .method_not_allowed_fallback(|| async {
            failure(ApiError::new(405, "this route does not take that method"))
        })
        .layer(middleware::map_response(json_413))
        .with_state(state);

    super::client::runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        println!("herd serve listening on http://{addr}");
        let _ = std::io::stdout().flush();
        eprintln!(
            "herd serve: model {}, clients authenticate with {token_note}",
            a.model.display()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(super::client::shutdown_signal("herd serve"))
            .await
            .context("serving")
    })
}

fn failure(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Busy: clients (the openai SDK among them) wait this long before retrying.
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// axum refuses an oversized body with a plain-text 413; clients expect OpenAI's error body.
async fn json_413(r: Response) -> Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match r.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        true => failure(ApiError::new(
            413,
            "the request body is too large (axum's default limit, 2 MB)",
        )),
        false => r,
    }
}

/// Every API route needs the bearer token (compared in constant time).
async fn authenticate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 7235): "bearer x" is "Bearer x".
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
    match given {
        Some(t) if herd_proto::auth::constant_time_eq(t.trim().as_bytes(), s.token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => failure(ApiError::new(401, "wrong token")),
        None => failure(ApiError::new(
            401,
            "missing `Authorization: Bearer <token>` (the token is in the file herd serve named)",
        )),
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({"object": "list", "data": [model_object(&s)]})).into_response()
}

/// `GET /v1/models/{id}` (the SDK's `models.retrieve`).
async fn model(
    State(s): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match id == s.model_name {
        true => Json(model_object(&s)).into_response(),
        false => failure(ApiError::new(
            404,
            format!("no model `{id}`: this server serves `{}`", s.model_name),
        )),
    }
}

fn model_object(s: &AppState) -> serde_json::Value {
    serde_json::json!({"id": s.model_name, "object": "model", "created": s.started,
                       "owned_by": "herd"})
}

/// Counts a request in flight until dropped (when its answer, or its stream, is done, also when
/// the client went away meanwhile).
struct Slot(Arc<AppState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Queue a prompt for the model thread; its events come through the receiver.
fn submit(
    s: &Arc<AppState>,
    prompt: Prompt,
) -> Result<(Slot, mpsc::UnboundedReceiver<Event>), ApiError> {
    let before = s.in_flight.fetch_add(1, Ordering::SeqCst);
    let slot = Slot(s.clone());
    if before >= s.max_queue {
        return Err(ApiError::new(
            503,
            format!(
                "busy: {before} requests are waiting or decoding (--max-queue {}); retry later",
                s.max_queue
            ),
        ));
    }
    let (events, rx) = mpsc::unbounded_channel();
    s.queue
        .send(batcher::Pending { prompt, events })
        .map_err(|_| stopped())?;
    Ok((slot, rx))
}

fn stopped() -> ApiError {
    // Permanent (a 503 would have clients retry a server that cannot answer).
    ApiError::new(500, "the model thread has stopped")
}

/// The whole answer (the model thread sends no pieces for an unstreamed request).
async fn whole(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Completion, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::End(answer)) => return answer,
            Some(Event::Admitted | Event::Delta(_)) => continue,
            None => return Err(stopped()),
        }
    }
}

/// How a route writes an answer: whole, and as the `data:` payloads of a stream.
trait Answers: Send + 'static {
    /// The answers of a request, `n` per prompt, in order.
    fn whole(&self, cs: &[Completion], n: usize) -> serde_json::Value;
    /// What a stream sends before the first piece.
    fn start(&self) -> Vec<serde_json::Value> {
        vec![]
    }
    fn piece(&self, text: &str) -> serde_json::Value;
    /// What ends a stream (before `[DONE]`).
    fn end(&self, c: &Completion) -> Vec<serde_json::Value>;
}

/// `/v1/generate`: `{"delta": ...}` pieces, then the whole answer.
struct Generated;

impl Answers for Generated {
    fn whole(&self, cs: &[Completion], _n: usize) -> serde_json::Value {
        cs.first()
            .map(Completion::generate_answer)
            .unwrap_or_default()
    }
    fn piece(&self, text: &str) -> serde_json::Value {
        serde_json::json!({ "delta": text })
    }
    fn end(&self, c: &Completion) -> Vec<serde_json::Value> {
        vec![c.generate_answer()]
    }
}

struct Chat(ChatChunks, bool);

impl Answers for Chat {
    fn whole(&self, cs: &[Completion], n: usize) -> serde_json::Value {
        chat::chat_answer(cs, n, &self.0.id, &self.0.model, self.0.created)
    }
    fn start(&self) -> Vec<serde_json::Value> {
        vec![self.0.role()]
    }
    fn piece(&self, text: &str) -> serde_json::Value {
        self.0.content(text)
    }
    fn end(&self, c: &Completion) -> Vec<serde_json::Value> {
        self.0.end(c, self.1)
    }
}

struct Text(completions::TextChunks, bool);

impl Answers for Text {
    fn whole(&self, cs: &[Completion], n: usize) -> serde_json::Value {
        self.0.answer(cs, n)
    }
    fn piece(&self, text: &str) -> serde_json::Value {
        self.0.piece(text)
    }
    fn end(&self, c: &Completion) -> Vec<serde_json::Value> {
        self.0.end(c, self.1)
    }
}

/// Queue a request's prompts (each `n` times) and answer them, whole or (one prompt and
/// choice that asks) streamed, in the route's shape. All are queued at once, so they decode
/// together.
async fn respond<A: Answers>(
    s: &Arc<AppState>,
    prompts: Result<Vec<Prompt>, ApiError>,
    answers: impl FnOnce(&Prompt) -> A,
) -> Response {
    let prompts = match prompts {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return failure(ApiError::bad("no prompt")),
        Err(e) => return failure(e),
    };
    let (n, answers) = (prompts[0].choices, answers(&prompts[0]));
    let mut prompts = api::expand(prompts);
    if prompts.len() == 1 && prompts[0].stream {
        return match submit(s, prompts.remove(0)) {
            Ok((slot, rx)) => streamed(slot, rx, answers).await,
            Err(e) => failure(e),
        };
    }
    let mut waiting = Vec::with_capacity(prompts.len());
    for p in prompts {
        match submit(s, p) {
            Ok(x) => waiting.push(x),
            Err(e) => return failure(e), // the queued ones are dropped, so cancelled
        }
    }
    let mut done = Vec::with_capacity(waiting.len());
    for (_slot, rx) in waiting {
        match whole(rx).await {
            Ok(c) => done.push(c),
            Err(e) => return failure(e),
        }
    }
    Json(answers.whole(&done, n)).into_response()
}

/// A streamed answer as server-sent events, ended by `data: [DONE]`. The response starts
/// once the prompt has run; errors found before (a prompt over the context) are answered with
/// their status instead, as unstreamed.
async fn streamed(
    slot: Slot,
    mut rx: mpsc::UnboundedReceiver<Event>,
    answers: impl Answers,
) -> Response {
    let head = match rx.recv().await {
        None => return failure(stopped()),
        Some(Event::End(Err(e))) => return failure(e),
        Some(e) => e,
    };
    let (out, body) = mpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    tokio::spawn(async move {
        let _slot = slot;
        let send = |v: serde_json::Value| out.send(Ok(SseEvent::default().data(v.to_string())));
        let mut next = Some(head);
        let mut lead = answers.start();
        while let Some(e) = next.take() {
            let end = matches!(e, Event::End(_));
            let payloads = match e {
                Event::Admitted => vec![],
                Event::Delta(piece) => vec![answers.piece(&piece)],
                Event::End(Ok(c)) => answers.end(&c),
                Event::End(Err(e)) => vec![e.body()],
            };
            for v in lead.drain(..).chain(payloads) {
                // A client that went away drops the body: stop, which drops `rx` and so
                // takes the request out of the batch.
                if send(v).is_err() {
                    return;
                }
            }
            if end {
                let _ = out.send(Ok(SseEvent::default().data("[DONE]")));
                return;
            }
            next = rx.recv().await;
        }
        // The model thread stopped without an answer.
        let _ = send(stopped().body());
    });
    Sse::new(UnboundedReceiverStream::new(body))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn generate(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(&s, api::generate_prompt(&body).map(|p| vec![p]), |_| {
        Generated
    })
    .await
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(&s, chat::chat_prompt(&body).map(|p| vec![p]), |p| {
        let (id, created) = s.answer_id("chatcmpl");
        let model = s.model_name.clone();
        Chat(ChatChunks { id, model, created }, p.include_usage)
    })
    .await
}

async fn text_completion(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(&s, completions::completion_prompts(&body), |p| {
        let (id, created) = s.answer_id("cmpl");
        let model = s.model_name.clone();
        Text(
            completions::TextChunks { id, model, created },
            p.include_usage,
        )
    })
    .await
}
