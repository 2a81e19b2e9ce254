//! `talaria serve`: an OpenAI-compatible HTTP API, the chat web page and the human-feedback
//! store, on axum/tokio.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `POST /v1/feedback`, `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics`
//! (Prometheus) and the page at `/`. Requests are validated here and queued to the scheduler
//! thread ([`scheduler`]), which batches them continuously; prompts are rendered only by
//! [`Chatbot`] and its chat template.
//!
//! Behaviour worth knowing as a client:
//! - One model is served; the request's `model` is not checked and responses name the
//!   checkpoint directory.
//! - Defaults: temperature 1, `max_tokens` 256 for chat and 16 for raw completions (at most the
//!   context), a fresh random seed unless `seed` is given (choice `i` of `n` uses `seed + i`).
//! - A conversation longer than the context loses its oldest exchanges (never the system message
//!   or the last user message), as in the terminal chat; a last message that cannot fit on its
//!   own is a 400 with code `context_length_exceeded`.
//! - Log-probabilities are those of the model's full distribution at temperature 1, whatever the
//!   sampling settings: `logprobs: K` (K <= 20) on completions, with `echo` over the prompt too
//!   (its first token has none; `max_tokens: 0` scores the prompt only), and `logprobs: true` with
//!   `top_logprobs: K` on chat. Completions take a string, a list of strings, a list of token ids
//!   or a list of them (one choice per prompt and sample, `index` = prompt x n + sample).
//! - Options the server does not implement (tools, penalties, JSON mode, suffix, ...) are
//!   refused with a 400 when set, never silently ignored.
//! - With an API key (`--api-key`, `--api-key-file` or `TALARIA_API_KEY`), every `/v1/*` route
//!   and `/tokenize`, `/detokenize` need `Authorization: Bearer KEY` (401 otherwise). POST routes
//!   take only `Content-Type: application/json` (415 otherwise), so a page on another site cannot
//!   post a form here; CORS headers are sent only for `--cors-origin`. Requests are cut off after
//!   `--request-timeout` seconds (408), and requests beyond `--max-connections` being started at
//!   once get a 503 (a stream counts until its response starts; then --max-batch and --queue bound it).
//! - Streamed completions with `logprobs` carry one entry per generated token; the whole response
//!   also ends with the stop token's entry when one ended the answer (scoring tools expect it).
//! - Requests run together: each joins the running batch at the next decode step once slots are
//!   free (`--max-batch` sequences, `--max-batch-tokens` per step) and leaves it when it finishes;
//!   up to `--queue` requests wait (then 503). A streamed response starts when its request joins
//!   the batch; a client that disconnects leaves the batch at the next step.

pub mod feedback;
pub mod metrics;
pub mod openai;
mod page;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

use crate::engine::{Chatbot, Completion, TokenLogprob};
use feedback::{Feedback, FeedbackStore};
use metrics::ServeMetrics;
use openai::{ApiError, GenParams, PromptInput};
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
    /// The precision generation reads the weights in.
    pub dtype: crate::model::WeightDtype,
    /// The element type of the KV cache.
    pub kv_dtype: crate::model::KvDtype,
    pub access: Access,
    /// Where the model runs (`--device`).
    pub device: candle_core::Device,
}

/// Who may call the API and how much at once.
#[derive(Debug, Clone)]
pub struct Access {
    /// Every `/v1/*` route (and tokenize, detokenize) then needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Send CORS headers allowing this origin (none otherwise).
    pub cors_origin: Option<String>,
    /// Longest a request may take to produce its response (a stream's start counts).
    pub request_timeout: Duration,
    /// Requests handled at once; more get a 503.
    pub max_connections: usize,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            api_key: None,
            cors_origin: None,
            request_timeout: Duration::from_secs(600),
            max_connections: 256,
        }
    }
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
    bot: Arc<Chatbot>,
    store: Arc<FeedbackStore>,
    model_id: String,
    /// SHA-256 of the served weights, recorded with each feedback.
    digest: String,
    context: usize,
    metrics: Arc<ServeMetrics>,
    api_key: Option<String>,
}

type Shared = State<Arc<AppState>>;

/// The complete application: routes, limits, access checks and state. `digest` names the
/// served weights in stored feedback.
pub fn router(
    bot: Chatbot,
    model_id: String,
    digest: String,
    store: FeedbackStore,
    sched: SchedulerConfig,
    access: &Access,
) -> Result<Router> {
    let context = bot.model.config().n_positions;
    let bot = Arc::new(bot);
    let metrics = Arc::new(ServeMetrics::new());
    let state = Arc::new(AppState {
        scheduler: Scheduler::spawn(bot.clone(), sched, metrics.clone())?,
        bot,
        store: Arc::new(store),
        model_id,
        digest,
        context,
        metrics,
        api_key: access.api_key.clone(),
    });
    // `Router::layer` wraps each route on its own: the concurrency limit is the global kind, one
    // count over all routes.
    let limits = tower::ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            access.max_connections.max(1),
        ))
        .timeout(access.request_timeout);
    let mut app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(post_feedback))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(get_metrics))
        .merge(page::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_access))
        .layer(limits)
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests));
    if let Some(origin) = &access.cors_origin {
        let origin: header::HeaderValue = origin
            .parse()
            .with_context(|| format!("--cors-origin {origin:?} is not a valid header value"))?;
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
        );
    }
    Ok(app.with_state(state))
}

/// The answer of the limits layer: 408 past the time limit, 503 beyond the concurrency limit.
async fn overloaded(e: tower::BoxError) -> ApiError {
    if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::bad_request("the request took longer than the server's --request-timeout")
            .with_status(StatusCode::REQUEST_TIMEOUT)
            .with_code("timeout")
    } else if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is handling its --max-connections requests; retry later".into(),
            kind: "server_busy",
            param: None,
            code: None,
        }
    } else {
        ApiError::internal(format!("{e}"))
    }
}

/// Whether a path needs the API key: the OpenAI routes and the tokenizer's.
fn protected(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize"
}

/// The key check (constant time) and the JSON-only rule for POST bodies.
async fn check_access(State(s): Shared, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key
        && protected(req.uri().path())
    {
        use subtle::ConstantTimeEq;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Equal lengths first: `ct_eq` of slices of different lengths is false at once.
        let ok = given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()));
        if !ok {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "a valid API key is needed: send the header Authorization: Bearer KEY".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return ApiError::bad_request("POST bodies must be sent with Content-Type: application/json")
                .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                .with_code("unsupported_media_type")
                .into_response();
        }
    }
    next.run(req).await
}

/// Counts every answer by route (the matched pattern, `other` for unknown paths) and status.
async fn count_requests(State(s): Shared, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    s.metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// Loads the model, opens the database and serves until Ctrl-C. Prints the bound address
/// (useful with port 0) as `listening on http://ADDR`.
pub fn serve(cfg: &ServeConfig) -> Result<()> {
    let mut bot = Chatbot::load(&cfg.ckpt, &cfg.device)?;
    bot.set_dtypes(cfg.dtype, cfg.kv_dtype)?;
    if !bot.is_chat() {
        eprintln!(
            "note: {}; /v1/completions serves it, /v1/chat/completions and the chat page answer 400",
            crate::engine::NO_CHAT_TEMPLATE
        );
    }
    let model_id = model_id(&cfg.ckpt);
    let digest = weights_digest(&cfg.ckpt)?;
    let app = router(
        bot,
        model_id.clone(),
        digest.clone(),
        FeedbackStore::open(&cfg.db)?,
        cfg.scheduler,
        &cfg.access,
    )?;
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
            "listening on http://{addr} (model {model_id}, weights sha256 {}, feedback in {})",
            &digest[..16],
            cfg.db.display()
        );
        if cfg.access.api_key.is_none() {
            eprintln!(
                "note: no API key, so anyone who can reach {addr} can use the API{}; give --api-key (or \
                 TALARIA_API_KEY) before serving beyond this machine",
                if addr.ip().is_loopback() {
                    " (only this machine can: it listens on the loopback address)"
                } else {
                    ""
                }
            );
        }
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

/// SHA-256 of a checkpoint's weights file, in hex: which weights produced a stored answer.
fn weights_digest(ckpt: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let path = crate::checkpoint::resolve(ckpt).join(crate::checkpoint::WEIGHTS_FILE);
    let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
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
    let m = &s.metrics;
    Json(json!({
        "status": "ok",
        "model": s.model_id,
        "running_sequences": m.running.get(),
        "waiting_requests": m.waiting.get(),
        "waiting_sequences": m.waiting_sequences.get(),
        "finished_requests": m.finished.get(),
        "generated_tokens": m.generated_tokens.get(),
    }))
}

async fn get_metrics(State(s): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

/// `POST /tokenize`: `{"prompt" | "content": text}` or `{"messages": [...]}` (rendered by the chat
/// template, with the assistant opener unless `"add_generation_prompt": false`) to token ids.
async fn tokenize(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let obj = openai::parse_object(&body(b)?)?;
    let text_key = ["prompt", "content"]
        .into_iter()
        .find(|k| obj.get(*k).is_some_and(|v| !v.is_null()));
    let ids = match (text_key, obj.get("messages")) {
        (Some(k), None) => {
            let text = openai::required_str(&obj, k)?;
            s.bot
                .tokenizer
                .encode(text)
                .map_err(|e| ApiError::invalid(k, format!("{e:#}")))?
        }
        (None, Some(raw)) => {
            let messages = openai::parse_messages(raw, "messages")?;
            let template = s.bot.template.as_ref().ok_or_else(|| {
                ApiError::invalid("messages", crate::engine::NO_CHAT_TEMPLATE).with_code("model_not_chat")
            })?;
            let prompt = match obj.get("add_generation_prompt") {
                None | Some(Value::Bool(true)) => true,
                Some(Value::Bool(false)) => false,
                Some(v) => {
                    return Err(ApiError::invalid(
                        "add_generation_prompt",
                        format!("add_generation_prompt must be true or false, got {v}"),
                    ));
                }
            };
            let tok = &s.bot.tokenizer;
            let rendered = if prompt {
                template.render_prompt(tok, &messages)
            } else {
                template.render(tok, &messages).map(|r| r.ids)
            };
            rendered.map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of \"prompt\" (or \"content\") with text, or \"messages\"",
            ));
        }
    };
    Ok(Json(json!({
        "tokens": ids,
        "count": ids.len(),
        "max_model_len": s.context,
    })))
}

/// `POST /detokenize`: `{"tokens": [ids]}` to text (as `prompt`, vLLM's name, and `content`, llama.cpp's).
async fn detokenize(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let obj = openai::parse_object(&body(b)?)?;
    let ids = openai::token_ids(
        obj.get("tokens"),
        "tokens",
        s.bot.tokenizer.vocab_size().max(s.bot.model.config().vocab_size),
    )?;
    let text = s
        .bot
        .tokenizer
        .decode(&ids)
        .map_err(|e| ApiError::invalid("tokens", format!("{e:#}")))?;
    Ok(Json(json!({"prompt": text, "content": text})))
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
    let source = feedback::Source {
        model: s.model_id.clone(),
        digest: s.digest.clone(),
    };
    let store = s.store.clone();
    let kind = f.kind();
    let id = tokio::task::spawn_blocking(move || store.insert(&f, Some(&source)))
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
    run(&s, Api::Chat, vec![Prompt::Chat(req.messages)], vec![], req.params).await
}

async fn completions(State(s): Shared, b: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req = openai::parse_completion(&body(b)?, s.context, s.bot.model.config().vocab_size)?;
    if req.params.echo && req.params.stream {
        return Err(ApiError::invalid("echo", "echo cannot be combined with stream"));
    }
    // The text `echo` returns before each answer: the prompt as given, or its ids decoded.
    let echoed = req
        .prompts
        .iter()
        .map(|p| match p {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Ids(ids) => s.bot.tokenizer.decode(ids).unwrap_or_default(),
        })
        .collect();
    let prompts = req
        .prompts
        .into_iter()
        .map(|p| match p {
            PromptInput::Text(t) => Prompt::Text(t),
            PromptInput::Ids(ids) => Prompt::Ids(ids),
        })
        .collect();
    run(&s, Api::Text, prompts, echoed, req.params).await
}

/// Queues the job and waits until it starts (or is refused), then answers whole or as a stream.
async fn run(
    s: &AppState,
    api: Api,
    prompts: Vec<Prompt>,
    echoed: Vec<String>,
    params: GenParams,
) -> Result<Response, ApiError> {
    let n = params.n * prompts.len();
    let mut rx = s.scheduler.submit(prompts, params.clone())?;
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
        bot: s.bot.clone(),
        logprobs: params.logprobs,
        echoed,
        n_per_prompt: params.n,
    };
    if params.stream {
        Ok(stream(meta, n, params, rx).into_response())
    } else {
        whole(meta, n, rx).await
    }
}

/// What every response and chunk of one request shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    api: Api,
    prompt_tokens: usize,
    bot: Arc<Chatbot>,
    /// `logprobs` / `top_logprobs` asked for.
    logprobs: Option<usize>,
    /// With `echo`, the text of each prompt.
    echoed: Vec<String>,
    n_per_prompt: usize,
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

    /// A token as clients see it, and its bytes: its text, or OpenAI's `bytes:\xNN` spelling when
    /// it holds only part of a character.
    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.bot.tokenizer.token_bytes(id).unwrap_or_default();
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t.to_string(),
            Err(_) => format!(
                "bytes:{}",
                bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()
            ),
        };
        (text, bytes)
    }

    /// The legacy completions `logprobs` object over `tokens` (each with its log-probability,
    /// `None` for an echoed prompt's first token), text offsets counted from `offset`.
    fn legacy_logprobs(&self, tokens: &[(u32, Option<&TokenLogprob>)], mut offset: usize) -> Value {
        let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for &(id, lp) in tokens {
            let (text, bytes) = self.token_text(id);
            offsets.push(offset);
            offset += String::from_utf8_lossy(&bytes).chars().count();
            texts.push(text);
            lps.push(lp.map(|l| json!(l.logprob)).unwrap_or(Value::Null));
            tops.push(lp.map_or(Value::Null, |l| {
                let mut m = serde_json::Map::new();
                for &(t, x) in &l.top {
                    m.entry(self.token_text(t).0).or_insert(json!(x));
                }
                Value::Object(m)
            }));
        }
        json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    /// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    fn chat_logprobs(&self, entries: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let (token, bytes) = self.token_text(id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = entries
            .iter()
            .map(|l| {
                let mut e = entry(l.token, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(t, x)| entry(t, x)).collect();
                e
            })
            .collect();
        json!({ "content": content })
    }

    /// Characters of the prompt text before choice `index`'s answer (its first text offset).
    fn prompt_chars(&self, index: usize) -> usize {
        self.echoed
            .get(index / self.n_per_prompt.max(1))
            .map_or(0, |t| t.chars().count())
    }

    /// One choice of a stream chunk: a text piece (with its token's log-probability), the role
    /// opener, or the finish.
    fn chunk_choice(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        logprob: Option<(&TokenLogprob, usize)>,
    ) -> Value {
        match self.api {
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                let lp = logprob.map_or(Value::Null, |(l, _)| self.chat_logprobs(std::slice::from_ref(l)));
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Api::Text => {
                let lp = logprob.map_or(Value::Null, |(l, offset)| {
                    self.legacy_logprobs(&[(l.token, Some(l))], offset)
                });
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish})
            }
        }
    }

    /// A whole choice of a response.
    fn choice(&self, index: usize, text: String, reason: &str, done: Option<&(Completion, Option<Vec<u32>>)>) -> Value {
        let wanted = self.logprobs.is_some();
        match self.api {
            Api::Chat => {
                let lp = match done.and_then(|(c, _)| c.logprobs.as_ref()) {
                    // The end-of-turn token is not part of the message.
                    Some(all) if wanted => {
                        self.chat_logprobs(&all[..all.len().min(done.map_or(0, |(c, _)| c.tokens.len()))])
                    }
                    _ => Value::Null,
                };
                json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": reason,
                })
            }
            Api::Text => {
                let echo = done.and_then(|(_, p)| p.as_ref());
                let prompt_text = self
                    .echoed
                    .get(index / self.n_per_prompt.max(1))
                    .cloned()
                    .unwrap_or_default();
                let lp = match done {
                    Some((c, _)) if wanted => {
                        let mut tokens: Vec<(u32, Option<&TokenLogprob>)> = vec![];
                        if let Some(ids) = echo {
                            let scores = c.prompt_logprobs.as_deref().unwrap_or_default();
                            tokens.extend(
                                ids.iter()
                                    .enumerate()
                                    .map(|(i, &id)| (id, scores.get(i).and_then(Option::as_ref))),
                            );
                        }
                        tokens.extend(c.logprobs.iter().flatten().map(|l| (l.token, Some(l))));
                        let start = if echo.is_some() { 0 } else { self.prompt_chars(index) };
                        self.legacy_logprobs(&tokens, start)
                    }
                    _ => Value::Null,
                };
                let text = if echo.is_some() { prompt_text + &text } else { text };
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": reason})
            }
        }
    }
}

/// Collects the whole answer of every choice into one response.
async fn whole(meta: Meta, n: usize, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut finish = vec!["stop"; n];
    let mut done: Vec<Option<(Completion, Option<Vec<u32>>)>> = vec![None; n];
    let mut completion_tokens = 0;
    loop {
        match rx.recv().await {
            Some(Event::Text { index, text, .. }) => texts[index].push_str(&text),
            Some(Event::Finished {
                index,
                reason,
                completion,
                prompt,
            }) => {
                finish[index] = reason;
                completion_tokens += completion.tokens.len();
                done[index] = Some((completion, prompt));
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
        .zip(&done)
        .enumerate()
        .map(|(index, ((text, reason), d))| meta.choice(index, text, reason, d.as_ref()))
        .collect();
    let mut body = meta.envelope(false, choices);
    body["usage"] = openai::usage(meta.prompt_tokens, completion_tokens);
    Ok(Json(body).into_response())
}

/// Streams the job as Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`. Dropping
/// the stream (the client left) closes `rx`, which stops the job at its next token.
fn stream(meta: Meta, n: usize, params: GenParams, rx: UnboundedReceiver<Event>) -> Response {
    struct St {
        meta: Meta,
        rx: UnboundedReceiver<Event>,
        include_usage: bool,
        completion_tokens: usize,
        opened: bool,
        n: usize,
        ended: bool,
        /// Per choice, the text offset of its next token (for completions' log-probabilities).
        offsets: Vec<usize>,
    }
    let offsets = (0..n).map(|i| meta.prompt_chars(i)).collect();
    let st = St {
        meta,
        rx,
        include_usage: params.include_usage,
        completion_tokens: 0,
        opened: false,
        n,
        ended: false,
        offsets,
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
                .map(|i| st.meta.chunk_choice(i, Some(""), true, None, None))
                .collect();
            out.push(data(st.meta.envelope(true, choices)));
        }
        match st.rx.recv().await {
            Some(Event::Text { index, text, logprob }) => {
                let offset = st.offsets[index];
                if let Some(l) = &logprob {
                    let bytes = st.meta.bot.tokenizer.token_bytes(l.token).unwrap_or_default();
                    st.offsets[index] += String::from_utf8_lossy(&bytes).chars().count();
                }
                let choice =
                    st.meta
                        .chunk_choice(index, Some(&text), false, None, logprob.as_ref().map(|l| (l, offset)));
                out.push(data(st.meta.envelope(true, vec![choice])));
            }
            Some(Event::Finished {
                index,
                reason,
                completion,
                ..
            }) => {
                st.completion_tokens += completion.tokens.len();
                let choice = st.meta.chunk_choice(index, None, false, Some(reason), None);
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
