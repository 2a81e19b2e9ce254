//! The OpenAI wire format: request parsing with field-by-field validation, error bodies, and
//! the JSON of responses and stream chunks. Parsing works on `serde_json::Value` so every error
//! can name the offending field the way OpenAI's API does (`param`).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::chat::{self, Message, Role};
use crate::engine::SamplingParams;

/// Most samples one request may ask for.
pub const MAX_N: usize = 8;
/// Most stop strings one request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per token in `logprobs` / `top_logprobs`.
pub const MAX_LOGPROBS: usize = 20;
/// Most prompts in one `/v1/completions` batch.
pub const MAX_PROMPTS: usize = 256;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about one field of the request.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            param: None,
            ..Self::invalid("", message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// A failure on the server's side (500), with the cause in the message.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Parses a request body that must be a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// A field that is absent or `null` counts as not given.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    let Some(v) = field(obj, key) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a number, got {v}")))?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            key,
            format!("{key} must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x))
}

fn count(obj: &Map<String, Value>, key: &str, lo: u64, hi: u64) -> Result<Option<usize>, ApiError> {
    let Some(v) = field(obj, key) else {
        return Ok(None);
    };
    let x = v
        .as_i64()
        .ok_or_else(|| ApiError::invalid(key, format!("{key} must be an integer, got {v}")))?;
    if x < lo as i64 || x as u64 > hi {
        return Err(ApiError::invalid(
            key,
            format!("{key} must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x as usize))
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match field(obj, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(key, format!("{key} must be true or false, got {v}"))),
    }
}

/// Reads a string field that must be present.
pub fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, ApiError> {
    match field(obj, key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(ApiError::invalid(key, format!("{key} must be a string, got {v}"))),
        None => Err(ApiError::invalid(key, format!("missing required field {key:?}"))),
    }
}

/// Refuses OpenAI options this server does not implement when they are actually set (not
/// absent, `null`, `false`, 0 or empty), rather than silently ignoring them.
fn reject_unsupported(obj: &Map<String, Value>, keys: &[&str]) -> Result<(), ApiError> {
    for key in keys {
        let set = match field(obj, key) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0) && !(*key == "best_of" && n.as_f64() == Some(1.0)),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => {
                !(o.is_empty() || (*key == "response_format" && o.get("type") == Some(&json!("text"))))
            }
            Some(Value::String(s)) => !(s.is_empty() || s == "none"),
            Some(_) => true,
        };
        if set {
            return Err(ApiError::invalid(
                *key,
                format!("{key} is not supported by this server"),
            ));
        }
    }
    Ok(())
}

/// Sampling and length settings shared by both completion endpoints.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub n: usize,
    pub stop: Vec<String>,
    /// `None`: a fresh random seed for this request.
    pub seed: Option<u64>,
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a chunk carrying `usage`.
    pub include_usage: bool,
    /// vLLM's `ignore_eos` extension: keep generating past the end-of-turn and end-of-text
    /// tokens, to `max_tokens` (load tests use it for answers of a known length).
    pub ignore_eos: bool,
    /// Log-probabilities of the generated tokens with this many alternatives (`logprobs: K` of
    /// completions; `logprobs: true` with `top_logprobs: K` of chat).
    pub logprobs: Option<usize>,
    /// Completions' `echo`: the prompt comes back before the answer, with its log-probabilities
    /// when `logprobs` is set.
    pub echo: bool,
}

impl GenParams {
    /// Reads the shared fields; `context` bounds `max_tokens`, which defaults to `default_max`
    /// (and may be 0 when `echo` is set: the prompt is scored, nothing generated).
    fn parse(obj: &Map<String, Value>, context: usize, default_max: usize, echo: bool) -> Result<Self, ApiError> {
        let temperature = number(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
        let top_p = number(obj, "top_p", 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
        }
        let max_key = if field(obj, "max_completion_tokens").is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let max_tokens = count(obj, max_key, u64::from(!echo), context as u64)?.unwrap_or(default_max.min(context));
        let n = count(obj, "n", 1, MAX_N as u64)?.unwrap_or(1);
        let seed = match field(obj, "seed") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_i64().map(|x| x as u64))
                    .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer, got {v}")))?,
            ),
        };
        let stop = match field(obj, "stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| match s {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ApiError::invalid(
                        "stop",
                        format!("stop strings must be strings, got {other}"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => Err(ApiError::invalid(
                "stop",
                format!("stop must be a string or an array of strings, got {v}"),
            ))?,
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        let include_usage = match field(obj, "stream_options") {
            None => false,
            Some(Value::Object(o)) => {
                boolean(o, "include_usage").map_err(|e| ApiError::invalid("stream_options.include_usage", e.message))?
            }
            Some(v) => Err(ApiError::invalid(
                "stream_options",
                format!("stream_options must be an object, got {v}"),
            ))?,
        };
        let sampling = SamplingParams {
            temperature,
            top_k: None,
            top_p,
        };
        sampling.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Self {
            sampling,
            max_tokens,
            n,
            stop,
            seed,
            stream: boolean(obj, "stream")?,
            include_usage,
            ignore_eos: boolean(obj, "ignore_eos")?,
            logprobs: None,
            echo,
        })
    }
}

/// A validated `POST /v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub params: GenParams,
}

/// Parses a chat completion request for a model with `context` positions.
pub fn parse_chat(body: &[u8], context: usize) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    reject_unsupported(
        &obj,
        &[
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "response_format",
        ],
    )?;
    let Some(raw) = field(&obj, "messages") else {
        return Err(ApiError::invalid("messages", "missing required field \"messages\""));
    };
    let messages = parse_messages(raw, "messages")?;
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return Err(ApiError::invalid(
            "messages",
            "the last message must come from the user: the model answers it",
        ));
    }
    let mut params = GenParams::parse(&obj, context, 256, false)?;
    let top = count(&obj, "top_logprobs", 0, MAX_LOGPROBS as u64)?;
    params.logprobs = match (boolean(&obj, "logprobs")?, top) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            ));
        }
    };
    Ok(ChatRequest { messages, params })
}

/// Parses an OpenAI messages array (content as a string or as text parts) and checks that the
/// conversation has the shape the chat template accepts. `param` names the field in errors.
pub fn parse_messages(raw: &Value, param: &str) -> Result<Vec<Message>, ApiError> {
    let Value::Array(items) = raw else {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be an array of messages"),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(param, format!("{param} must not be empty")));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = format!("{param}[{i}]");
        let Value::Object(m) = m else {
            return Err(ApiError::invalid(
                &at,
                format!("{at} must be an object with role and content"),
            ));
        };
        let role = required_str(m, "role").map_err(|e| ApiError::invalid(format!("{at}.role"), e.message))?;
        let role = Role::parse(role).map_err(|e| ApiError::invalid(format!("{at}.role"), e.to_string()))?;
        let content = match field(m, "content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                text_parts(parts).map_err(|msg| ApiError::invalid(format!("{at}.content"), msg))?
            }
            Some(v) => Err(ApiError::invalid(
                format!("{at}.content"),
                format!("content must be a string, got {v}"),
            ))?,
            None => Err(ApiError::invalid(
                format!("{at}.content"),
                format!("missing required field \"content\" in {at}"),
            ))?,
        };
        messages.push(Message::new(role, content));
    }
    chat::validate(&messages).map_err(|e| ApiError::invalid(param, e.to_string()))?;
    Ok(messages)
}

/// Joins content given as `[{"type": "text", "text": ...}]` parts; other part types are refused.
fn text_parts(parts: &[Value]) -> Result<String, String> {
    parts
        .iter()
        .map(|p| {
            match (
                p.get("type").and_then(Value::as_str),
                p.get("text").and_then(Value::as_str),
            ) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(format!("only text content parts are supported, got {p}")),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| v.concat())
}

/// One prompt of `/v1/completions`: text, or token ids given by the client (as evaluation
/// harnesses send them, tokenized with the exported tokenizer).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A validated `POST /v1/completions` request: raw prompts, no chat template; one choice per
/// prompt and sample (`index` = prompt × n + sample).
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompts: Vec<PromptInput>,
    pub params: GenParams,
}

/// Parses a completion request for a model with `context` positions and `vocab` token ids.
pub fn parse_completion(body: &[u8], context: usize, vocab: usize) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    reject_unsupported(
        &obj,
        &[
            "best_of",
            "suffix",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
        ],
    )?;
    let prompts = parse_prompts(field(&obj, "prompt"), vocab)?;
    let echo = boolean(&obj, "echo")?;
    let mut params = GenParams::parse(&obj, context, 16, echo)?;
    params.logprobs = count(&obj, "logprobs", 0, MAX_LOGPROBS as u64)?;
    if params.stream && params.max_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens 0 (scoring the prompt) cannot be streamed",
        ));
    }
    Ok(CompletionRequest { prompts, params })
}

/// A list of token ids at `param`, every one inside a vocabulary of `vocab`, not empty.
pub fn token_ids(raw: Option<&Value>, param: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let Some(Value::Array(items)) = raw.filter(|v| !v.is_null()) else {
        return Err(ApiError::invalid(param, format!("{param} must be a list of token ids")));
    };
    ids(items, param, vocab)
}

fn ids(items: &[Value], at: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid(
            at,
            format!("{at} must not be an empty list of token ids"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(j, v)| match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::invalid(
                format!("{at}[{j}]"),
                format!("token id {id} is outside the vocabulary of {vocab} tokens"),
            )),
            None => Err(ApiError::invalid(
                format!("{at}[{j}]"),
                format!("a token id must be a non-negative integer, got {v}"),
            )),
        })
        .collect()
}

/// The `prompt` of a completion request: a string, a list of strings, a list of token ids or a
/// list of lists of token ids; every id inside the vocabulary, no prompt empty.
fn parse_prompts(raw: Option<&Value>, vocab: usize) -> Result<Vec<PromptInput>, ApiError> {
    const SHAPES: &str = "a string, a list of strings, a list of token ids or a list of lists of token ids";
    let text = |s: &str, at: &str| -> Result<PromptInput, ApiError> {
        if s.is_empty() {
            return Err(ApiError::invalid(at, format!("{at} must not be empty")));
        }
        Ok(PromptInput::Text(s.to_string()))
    };
    let prompts = match raw {
        None => return Err(ApiError::invalid("prompt", "missing required field \"prompt\"")),
        Some(Value::String(s)) => vec![text(s, "prompt")?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "prompt must not be an empty list"));
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![PromptInput::Ids(ids(items, "prompt", vocab)?)]
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .enumerate()
            .map(|(i, v)| text(v.as_str().unwrap_or_default(), &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(Value::Array(items)) if items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let inner = v.as_array().map(Vec::as_slice).unwrap_or_default();
                Ok(PromptInput::Ids(ids(inner, &format!("prompt[{i}]"), vocab)?))
            })
            .collect::<Result<_, ApiError>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("prompt mixes types: give {SHAPES}"),
            ));
        }
        Some(v) => return Err(ApiError::invalid("prompt", format!("prompt must be {SHAPES}, got {v}"))),
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!("at most {MAX_PROMPTS} prompts per request, got {}", prompts.len()),
        ));
    }
    Ok(prompts)
}

/// Token counts of a request, as OpenAI reports them.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Seconds since the Unix epoch, for `created`.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
