//! `talaria serve`: an OpenAI-compatible HTTP API, the chat web page and the human-feedback
//! store, on axum/tokio.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `POST /v1/feedback`, and the page at `/`. Requests are validated here and
//! queued to the scheduler thread ([`scheduler`]), which batches them continuously; prompts are
//! rendered only by [`Chatbot`] and its chat template.
//!
//! Behaviour worth knowing as a client:
//! - One model is served; the request's `model` is not checked and responses name the
//!   checkpoint directory.
//! - Defaults: temperature 1, `max_tokens` 256 for chat and 16 for raw completions (at most the
//!   context), a fresh random seed unless `seed` is given (choice `i` of `n` uses `seed + i`).
//! - A conversation longer than the context loses its oldest exchanges (never the system message
//!   or the last user message), as in the terminal chat; a last message that cannot fit on its
//!   own is a 400 with code `context_length_exceeded`.
//! - Options the server does not implement (tools, logprobs, penalties, JSON mode, echo, ...) are
//!   refused with a 400 when set, never silently ignored.
//! - Requests run together: each joins the running batch at the next decode step once slots are
//!   free (`--max-batch` sequences, `--max-batch-tokens` per step) and leaves it when it finishes;
//!   up to `--queue` requests wait (then 503). A streamed response starts when its request joins
//!   the batch; a client that disconnects leaves the batch at the next step.

pub mod feedback;
pub mod openai;
mod page;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::Chatbot;
use feedback::{Feedback, FeedbackStore};
use openai::{ApiError, GenParams};
use scheduler::{Event, Prompt, Scheduler, SchedulerConfig};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1 << 20;

/// Settings of `talaria serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Chat checkpoint (or run directory).
    pub ckpt: PathBuf,
    pub host: String,
    /// 0 picks a free port (the address is printed).
    pub port: u16,
    /// The SQLite feedback database, created if absent.
    pub db: PathBuf,
    pub scheduler: SchedulerConfig,
}

impl SchedulerConfig {
    /// 16 sequences, 256 tokens per step, 64 requests waiting.
    pub fn standard() -> Self {
        Self {
            max_batch: 16,
            token_budget: crate::model::infer::MAX_ROWS,
            queue: 64,
        }
    }
}

struct AppState {
    scheduler: Scheduler,
    store: Arc<FeedbackStore>,
    model_id: String,
    context: usize,
}

type Shared = State<Arc<AppState>>;

/// The complete application: routes, body limit and state.
pub fn router(bot: Chatbot, model_id: String, store: FeedbackStore, sched: SchedulerConfig) -> Result<Router> {
    let context = bot.model.config().n_positions;
    let state = Arc::new(AppState {
        scheduler: Scheduler::spawn(Arc::new(bot), sched)?,
        store: Arc::new(store),
        model_id,
        context,
    });
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(post_feedback))
        .route("/health", get(health))
        .merge(page::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .with_state(state))
}

/// Loads the model, opens the database and serves until Ctrl-C. Prints the bound address
/// (useful with port 0) as `listening on http://ADDR`.
pub fn serve(cfg: &ServeConfig) -> Result<()> {
    let bot = Chatbot::load(&cfg.ckpt, &candle_core::Device::Cpu)?;
    if !bot.is_chat() {
        eprintln!(
            "note: {}; /v1/completions serves it, /v1/chat/completions and the chat page answer 400",
            crate::engine::NO_CHAT_TEMPLATE
        );
    }
    let model_id = model_id(&cfg.ckpt);
    let app = router(bot, model_id.clone(), FeedbackStore::open(&cfg.db)?, cfg.scheduler)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        println!(
            "listening on http://{addr} (model {model_id}, feedback in {})",
            cfg.db.display()
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}

/// The name the API reports for a checkpoint: its directory name.
fn model_id(ckpt: &std::path::Path) -> String {
    let dir = crate::checkpoint::resolve(ckpt);
    let dir = if dir.ends_with(crate::checkpoint::CHECKPOINT_DIR) {
        dir.parent().map(|p| p.to_path_buf()).unwrap_or(dir)
    } else {
        dir
    };
    dir.canonicalize()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(|| "talaria".into(), |n| n.to_string_lossy().into_owned())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::bad_request(format!("no route {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_found")
}

fn too_large() -> ApiError {
    ApiError::bad_request(format!("the request body is larger than {MAX_BODY} bytes"))
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// Refuses a body declared (by `Content-Length`) larger than the limit before reading any of
/// it, so a client that sent `Expect: 100-continue` is never asked for it. Undeclared bodies
/// are cut off at the limit while being read.
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large().into_response();
    }
    next.run(req).await
}

/// The body, or the body-limit / read error in OpenAI's shape.
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(r.body_text()).with_status(status)
        }
    })
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::bad_request(format!("{} does not accept this method", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .with_code("method_not_allowed")
}

/// Liveness plus the scheduler's counters.
async fn health(State(s): Shared) -> Json<Value> {
    let st = s.scheduler.stats();
    Json(json!({
        "status": "ok",
        "model": s.model_id,
        "running_sequences": st.running.load(Ordering::Relaxed),
        "waiting_requests": st.waiting.load(Ordering::Relaxed),
        "finished_requests": st.finished.load(Ordering::Relaxed),
        "generated_tokens": st.generated_tokens.load(Ordering::Relaxed),
    }))
}

async fn models(State(s): Shared) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "talaria",
            "context_length": s.context,
        }],
    }))
}

async fn post_feedback(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let obj = openai::parse_object(&body(b)?)?;
    let f = Feedback::from_json(&obj)?;
    let store = s.store.clone();
    let kind = f.kind();
    let id = tokio::task::spawn_blocking(move || store.insert(&f))
        .await
        .map_err(|e| ApiError::internal(format!("storing feedback: {e}")))?
        .map_err(|e| ApiError::internal(format!("storing feedback: {e:#}")))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "object": "feedback", "kind": kind})),
    )
        .into_response())
}

/// Which endpoint a job answers: decides the JSON shapes.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Text,
}

async fn chat_completions(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req = openai::parse_chat(&body(b)?, s.context)?;
    run(&s, Api::Chat, Prompt::Chat(req.messages), req.params).await
}

async fn completions(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req = openai::parse_completion(&body(b)?, s.context)?;
    run(&s, Api::Text, Prompt::Text(req.prompt), req.params).await
}

/// Queues the job and waits until it starts (or is refused), then answers whole or as a stream.
async fn run(s: &AppState, api: Api, prompt: Prompt, params: GenParams) -> Result<Response, ApiError> {
    let mut rx = s.scheduler.submit(prompt, params.clone())?;
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the generation thread stopped unexpectedly")),
    };
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if api == Api::Chat { "chatcmpl" } else { "cmpl" },
            rand::random::<u64>()
        ),
        created: openai::now(),
        model: s.model_id.clone(),
        api,
        prompt_tokens,
    };
    if params.stream {
        Ok(stream(meta, params, rx).into_response())
    } else {
        whole(meta, params.n, rx).await
    }
}

/// What every response and chunk of one request shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    api: Api,
    prompt_tokens: usize,
}

impl Meta {
    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        let object = match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Text, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One choice of a stream chunk: a text piece, the role opener, or the finish.
    fn chunk_choice(&self, index: usize, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        match self.api {
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": index, "delta": delta, "finish_reason": finish})
            }
            Api::Text => json!({"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
        }
    }
}

/// Collects the whole answer of every choice into one response.
async fn whole(meta: Meta, n: usize, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut finish = vec!["stop"; n];
    let mut completion_tokens = 0;
    loop {
        match rx.recv().await {
            Some(Event::Text { index, text }) => texts[index].push_str(&text),
            Some(Event::Finished { index, reason, tokens }) => {
                finish[index] = reason;
                completion_tokens += tokens;
            }
            Some(Event::Done) => break,
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Started { .. }) | None => {
                return Err(ApiError::internal("the generation thread stopped unexpectedly"));
            }
        }
    }
    let choices = texts
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(index, (text, reason))| match meta.api {
            Api::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Api::Text => json!({"index": index, "text": text, "logprobs": null, "finish_reason": reason}),
        })
        .collect();
    let mut body = meta.envelope(false, choices);
    body["usage"] = openai::usage(meta.prompt_tokens, completion_tokens);
    Ok(Json(body).into_response())
}

/// Streams the job as Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`. Dropping
/// the stream (the client left) closes `rx`, which stops the job at its next token.
fn stream(meta: Meta, params: GenParams, rx: UnboundedReceiver<Event>) -> Response {
    struct St {
        meta: Meta,
        rx: UnboundedReceiver<Event>,
        include_usage: bool,
        completion_tokens: usize,
        opened: bool,
        n: usize,
        ended: bool,
    }
    let st = St {
        meta,
        rx,
        include_usage: params.include_usage,
        completion_tokens: 0,
        opened: false,
        n: params.n,
        ended: false,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let events = futures_util::stream::unfold(st, move |mut st| async move {
        if st.ended {
            return None;
        }
        let mut out = vec![];
        if !st.opened && st.meta.api == Api::Chat {
            st.opened = true;
            let choices = (0..st.n)
                .map(|i| st.meta.chunk_choice(i, Some(""), true, None))
                .collect();
            out.push(data(st.meta.envelope(true, choices)));
        }
        match st.rx.recv().await {
            Some(Event::Text { index, text }) => {
                let choice = st.meta.chunk_choice(index, Some(&text), false, None);
                out.push(data(st.meta.envelope(true, vec![choice])));
            }
            Some(Event::Finished { index, reason, tokens }) => {
                st.completion_tokens += tokens;
                let choice = st.meta.chunk_choice(index, None, false, Some(reason));
                out.push(data(st.meta.envelope(true, vec![choice])));
            }
            Some(Event::Done) => {
                if st.include_usage {
                    let mut last = st.meta.envelope(true, vec![]);
                    last["usage"] = openai::usage(st.meta.prompt_tokens, st.completion_tokens);
                    out.push(data(last));
                }
                out.push(SseEvent::default().data("[DONE]"));
                st.ended = true;
            }
            Some(Event::Failed(e)) => {
                out.push(data(e.body()));
                st.ended = true;
            }
            Some(Event::Started { .. }) | None => {
                out.push(data(
                    ApiError::internal("the generation thread stopped unexpectedly").body(),
                ));
                st.ended = true;
            }
        }
        Some((
            futures_util::stream::iter(out.into_iter().map(Ok::<_, std::convert::Infallible>)),
            st,
        ))
    })
    .flatten();
    Sse::new(events).into_response()
}
