//! `herd serve --model DIR`: the model over HTTP, as Alpaca-CoT and FastChat serve theirs.
//!
//! Routes: `GET /` a chat page (static; the browser sends the token the user types), `GET
//! /health`, and, with `Authorization: Bearer <token>`, `GET /v1/models`, `POST /v1/generate`
//! (the Alpaca prompt, as `herd generate`) and `POST /v1/chat/completions` (OpenAI's shape,
//! the Vicuna v1.1 prompt). Requests are decoded by one model thread in batches of whatever is
//! waiting ([`batcher`]). The token comes from `--token-file`, else `HERD_TOKEN`, else
//! `<state-dir>/token`, created (0600) on first start as the coordinator does.

mod api;
mod batcher;

use anyhow::{Context, Result};
use api::{ApiError, Completion, Prompt};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

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
    #[command(flatten)]
    pub placement: DeviceArgs,
}

struct AppState {
    model_name: String,
    token: String,
    queue: mpsc::Sender<batcher::Pending>,
    next_id: AtomicU64,
    /// Requests waiting for or being decoded by the model thread.
    in_flight: AtomicUsize,
    max_queue: usize,
}

pub fn run(a: &ServeArgs) -> Result<()> {
    anyhow::ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    let (token, token_note) =
        match herd_proto::auth::try_token_from_env_or_file(a.token_file.as_deref())
            .context("reading the token")?
        {
            Some(t) => (t, "the given token".to_string()),
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
    let queue = batcher::spawn(move || Generator::load(&dir, &placement), a.max_batch)?;
    let model_name = a
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.model.display().to_string());
    let state = Arc::new(AppState {
        model_name,
        token,
        queue,
        next_id: AtomicU64::new(1),
        in_flight: AtomicUsize::new(0),
        max_queue: a.max_queue.max(1),
    });
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/generate", post(generate))
        .route("/v1/chat/completions", post(chat))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/health", get(|| async { "ok\n" }))
        .merge(api)
        .fallback(|| async { failure(ApiError::new(404, "no such route")) })
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
    (status, Json(e.body())).into_response()
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
        .and_then(|v| v.strip_prefix("Bearer "));
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
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": s.model_name, "object": "model", "owned_by": "herd"}],
    }))
    .into_response()
}

/// Queue a prompt for the model thread and wait for its answer.
async fn complete(s: &AppState, prompt: Prompt) -> Result<Completion, ApiError> {
    // Counted until this function returns, also when the client went away meanwhile.
    struct Slot<'a>(&'a AtomicUsize);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let before = s.in_flight.fetch_add(1, Ordering::SeqCst);
    let _slot = Slot(&s.in_flight);
    if before >= s.max_queue {
        return Err(ApiError::new(
            503,
            format!(
                "busy: {before} requests are waiting or decoding (--max-queue {}); retry later",
                s.max_queue
            ),
        ));
    }
    let (reply, answer) = oneshot::channel();
    s.queue
        .send(batcher::Pending { prompt, reply })
        .map_err(|_| ApiError::new(503, "the model thread has stopped"))?;
    answer
        .await
        .map_err(|_| ApiError::new(503, "the model thread has stopped"))?
}

async fn generate(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let answer = async {
        let prompt = api::generate_prompt(&body)?;
        complete(&s, prompt).await
    };
    match answer.await {
        Ok(c) => Json(c.generate_answer()).into_response(),
        Err(e) => failure(e),
    }
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let answer = async {
        let prompt = api::chat_prompt(&body)?;
        complete(&s, prompt).await
    };
    match answer.await {
        Ok(c) => {
            let n = s.next_id.fetch_add(1, Ordering::Relaxed);
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Json(c.chat_answer(&format!("chatcmpl-{n}"), &s.model_name, created)).into_response()
        }
        Err(e) => failure(e),
    }
}
