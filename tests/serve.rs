//! `talaria serve` driven over real HTTP on a loopback port: the OpenAI-compatible API with and
//! without streaming, request validation, concurrency, clients that leave mid-stream, the
//! feedback round trip to training files, the official Python client and the page in headless
//! Chromium (the last two skip, saying why, when their tools are absent).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde_json::{Value, json};
use talaria::data::conversations::read_conversations;
use talaria::model::{GptConfig, init_weights};
use talaria::serve::feedback::{Feedback, FeedbackStore};
use talaria::tokenizer::{self, Tokenizer};

mod common;

/// Context of the test model: long enough that a generation lasts a moment, so a client can
/// leave in the middle of one.
const CONTEXT: usize = 512;

/// Context of the model that [`Server::start_alone`] serves: a generation to its end is long
/// enough (thousands of tokens) that what a client that left costs shows clearly, even when a
/// busy machine lets the server decode a few hundred tokens before the client reads its first.
const LONG_CONTEXT: usize = 4096;

/// The test tokenizer as `tokenizer.json`: byte-level BPE with the 256 byte symbols and no
/// merges, plus the chat special tokens. The one place to switch to
/// `talaria::tokenizer::train_bpe` once it lands.
fn test_tokenizer_json() -> String {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []},
    });
    let mut hf: tokenizers::Tokenizer = spec.to_string().parse().unwrap();
    let specials: Vec<tokenizers::AddedToken> = [
        tokenizer::EOT,
        tokenizer::BOS,
        tokenizer::SYSTEM,
        tokenizer::USER,
        tokenizer::ASSISTANT,
        tokenizer::END,
    ]
    .iter()
    .map(|t| tokenizers::AddedToken::from(*t, true))
    .collect();
    hf.add_special_tokens(&specials);
    hf.to_string(false).unwrap()
}

/// A randomly initialised chat checkpoint: its answers are gibberish, but deterministic at
/// temperature 0, which is all the protocol needs. `preset` names the shape; the test preset
/// gets a longer context (`CONTEXT`).
fn chat_checkpoint(dir: &Path, preset: &str) -> PathBuf {
    chat_checkpoint_with_context(dir, preset, (preset == "test").then_some(CONTEXT))
}

/// [`chat_checkpoint`] with the preset's context replaced by `context`, where given.
fn chat_checkpoint_with_context(dir: &Path, preset: &str, context: Option<usize>) -> PathBuf {
    let json = test_tokenizer_json();
    let tok = Tokenizer::from_json(&json).unwrap();
    let mut cfg = GptConfig::preset(preset).unwrap();
    cfg.vocab_size = tok.vocab_size();
    if let Some(n) = context {
        cfg.n_positions = n;
    }
    let weights = init_weights(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("tiny-chat");
    common::save_checkpoint(&path, &cfg, &weights, Some(&json), "sft");
    path
}

/// A `talaria serve` process on a free loopback port, killed when dropped.
/// The tests' servers run side by side, except one whose test times how fast its server reacts
/// ([`Server::start_alone`]): on two cores, a dozen other servers decoding at once would measure
/// the machine's load instead.
static SIDE_BY_SIDE: RwLock<()> = RwLock::new(());

/// A server's hold on [`SIDE_BY_SIDE`], for as long as it runs.
enum Turn {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

struct Server {
    child: Child,
    url: String,
    db: PathBuf,
    ckpt: PathBuf,
    _dir: tempfile::TempDir,
    _turn: Turn,
}

impl Server {
    fn start() -> Self {
        Self::start_preset("test")
    }

    fn start_preset(preset: &str) -> Self {
        Self::start_with(preset, &[])
    }

    /// A server on a `preset` checkpoint with extra `talaria serve` flags.
    fn start_with(preset: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = chat_checkpoint(dir.path(), preset);
        Self::start_on(dir, ckpt, flags)
    }

    /// A server on the checkpoint `ckpt` (kept in `dir`, which the server owns).
    fn start_on(dir: tempfile::TempDir, ckpt: PathBuf, flags: &[&str]) -> Self {
        // A test that panicked while holding the lock poisons it; the lock itself is still sound.
        let turn = Turn::Shared(SIDE_BY_SIDE.read().unwrap_or_else(|e| e.into_inner()));
        Self::spawn(dir, ckpt, flags, turn)
    }

    /// A server on the `test` preset with [`LONG_CONTEXT`] that runs while no other test's
    /// server does.
    fn start_alone() -> Self {
        let turn = Turn::Alone(SIDE_BY_SIDE.write().unwrap_or_else(|e| e.into_inner()));
        let dir = tempfile::tempdir().unwrap();
        let ckpt = chat_checkpoint_with_context(dir.path(), "test", Some(LONG_CONTEXT));
        Self::spawn(dir, ckpt, &[], turn)
    }

    fn spawn(dir: tempfile::TempDir, ckpt: PathBuf, flags: &[&str], turn: Turn) -> Self {
        let db = dir.path().join("feedback.sqlite");
        let mut child = Command::new(env!("CARGO_BIN_EXE_talaria"))
            .args([
                "serve",
                ckpt.to_str().unwrap(),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
            ])
            .arg(&db)
            .args(flags)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from talaria serve: {line:?}"));
        Self {
            url: addr.to_string(),
            child,
            db,
            ckpt,
            _dir: dir,
            _turn: turn,
        }
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
    }

    /// Status and JSON body of a request, 4xx/5xx included.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let req = Self::agent()
            .request(method, &format!("{}{path}", self.url))
            .set("Content-Type", "application/json");
        let res = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path} gave non-JSON {text:?}"));
        (status, json)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(&body.to_string()))
    }

    /// Declares a body of `len` bytes with `Expect: 100-continue` and waits for the verdict
    /// without sending it (a client that sent it would race the server closing the connection).
    fn raw_oversized_post(&self, path: &str, len: usize) -> (u16, Value) {
        use std::io::Write;
        let mut conn = std::net::TcpStream::connect(self.url.trim_start_matches("http://")).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            conn,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        let status = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = reply.split_once("\r\n\r\n").unwrap().1;
        (
            status,
            serde_json::from_str(body).unwrap_or_else(|_| panic!("non-JSON reply {reply:?}")),
        )
    }

    /// The `data:` payloads of a streamed request, up to and including `[DONE]`.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let resp = Self::agent()
            .post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let mut out = vec![];
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(d) = line.strip_prefix("data: ") {
                out.push(d.to_string());
            } else {
                assert!(line.is_empty(), "unexpected SSE line {line:?}");
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Reassembles streamed chunks into each choice's text and finish reason.
fn reassemble(chunks: &[String], chat: bool) -> (Vec<String>, Vec<String>, Option<Value>) {
    assert_eq!(
        chunks.last().map(String::as_str),
        Some("[DONE]"),
        "the stream must end with [DONE]"
    );
    let mut texts = vec![];
    let mut finish = vec![];
    let mut usage = None;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        assert_eq!(
            v["object"],
            if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            }
        );
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for ch in v["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
                finish.resize(i + 1, String::new());
            }
            let piece = if chat { &ch["delta"]["content"] } else { &ch["text"] };
            texts[i] += piece.as_str().unwrap_or("");
            if let Some(f) = ch["finish_reason"].as_str() {
                finish[i] = f.to_string();
            }
        }
    }
    (texts, finish, usage)
}

#[test]
fn chat_completions_stream_and_reassemble_to_the_whole_answer() {
    let s = Server::start();
    let req = json!({"model": "x", "messages": user("Hello there!"), "temperature": 0, "max_tokens": 24, "seed": 1});
    let (status, whole) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], "tiny-chat");
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "{whole}");
    let usage = &whole["usage"];
    // <|bos|> <|user|> 12 bytes <|end|> <|assistant|>
    assert_eq!(usage["prompt_tokens"], 16);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), 16 + completion);
    if completion == 24 {
        assert_eq!(choice["finish_reason"], "length");
    }

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream("/v1/chat/completions", &streamed);
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (texts, finish, usage) = reassemble(&chunks, true);
    assert_eq!(texts, vec![text.to_string()]);
    assert_eq!(finish, vec![choice["finish_reason"].as_str().unwrap().to_string()]);
    assert_eq!(usage.unwrap(), whole["usage"]);
    assert!(chunks.len() > 3, "the answer must arrive in pieces: {chunks:?}");

    // n samples come back as n choices; a seed makes sampling repeatable; stop strings cut.
    let sample = json!({"messages": user("Hi"), "temperature": 1.0, "n": 3, "max_tokens": 12, "seed": 42});
    let (status, a) = s.post("/v1/chat/completions", &sample);
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    let (_, b) = s.post("/v1/chat/completions", &sample);
    assert_eq!(a["choices"], b["choices"]);
    let mut n_stream = sample.clone();
    n_stream["stream"] = json!(true);
    let (texts, _, _) = reassemble(&s.stream("/v1/chat/completions", &n_stream), true);
    let whole_texts: Vec<String> = (0..3)
        .map(|i| a["choices"][i]["message"]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, whole_texts);
    let cut: String = text.chars().skip(2).take(2).collect();
    let mut stopped = req.clone();
    stopped["stop"] = json!([cut]);
    let (_, st) = s.post("/v1/chat/completions", &stopped);
    let st_text = st["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with(st_text) && st_text.len() < text.len(),
        "{st_text:?} vs {text:?}"
    );
    assert_eq!(st["choices"][0]["finish_reason"], "stop");
}

#[test]
fn raw_completions_models_health_and_the_page() {
    let s = Server::start();
    let req = json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let (status, whole) = s.post("/v1/completions", &req);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["usage"]["prompt_tokens"], 16);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let (texts, _, _) = reassemble(&s.stream("/v1/completions", &streamed), false);
    assert_eq!(texts, vec![text]);

    let (status, models) = s.call("GET", "/v1/models", None);
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-chat");
    assert_eq!(models["data"][0]["context_length"], CONTEXT);
    let (status, health) = s.call("GET", "/health", None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    assert!(health["generated_tokens"].as_u64().unwrap() > 0);

    let page = Server::agent().get(&s.url).call().unwrap();
    assert!(page.content_type().starts_with("text/html"));
    let html = page.into_string().unwrap();
    for id in [
        "id=\"messages\"",
        "id=\"cmp-run\"",
        "id=\"lab-ideal\"",
        "/app.js",
        "/style.css",
    ] {
        assert!(html.contains(id), "the page lacks {id}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page must not load anything from elsewhere"
    );
    let js = Server::agent().get(&format!("{}/app.js", s.url)).call().unwrap();
    assert!(js.content_type().contains("javascript"));
}

#[test]
fn a_plain_completion_model_serves_completions_and_refuses_chat_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = common::plain_completion_checkpoint(dir.path(), "gpt2-style");
    let s = Server::start_on(dir, ckpt, &[]);
    let (status, body) = s.post(
        "/v1/completions",
        &json!({"prompt": "the cat", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], json!(5));
    let (status, body) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user("hello"), "max_tokens": 5}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], json!("model_not_chat"), "{body}");
    assert_eq!(body["error"]["param"], json!("messages"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("use /v1/completions"),
        "{body}"
    );
    assert_eq!(s.call("GET", "/health", None).0, 200);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_carries_on() {
    let s = Server::start();
    let chat = "/v1/chat/completions";
    let long = "x".repeat(CONTEXT + 10);
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        ("malformed JSON", chat, "{\"messages\": [".into(), 400, None),
        ("not an object", chat, "[1, 2]".into(), 400, None),
        (
            "missing messages",
            chat,
            json!({"model": "m"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "empty messages",
            chat,
            json!({"messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "unknown role",
            chat,
            json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            "missing content",
            chat,
            json!({"messages": [{"role": "user"}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "content not text",
            chat,
            json!({"messages": [{"role": "user", "content": 5}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "ends with the assistant",
            chat,
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "roles out of order",
            chat,
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "negative max_tokens",
            chat,
            json!({"messages": user("a"), "max_tokens": -1}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            chat,
            json!({"messages": user("a"), "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "absurd max_tokens",
            chat,
            json!({"messages": user("a"), "max_tokens": 1_000_000_000u64}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "fractional max_tokens",
            chat,
            json!({"messages": user("a"), "max_tokens": 2.5}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "zero n",
            chat,
            json!({"messages": user("a"), "n": 0}).to_string(),
            400,
            Some("n"),
        ),
        (
            "absurd n",
            chat,
            json!({"messages": user("a"), "n": 10_000}).to_string(),
            400,
            Some("n"),
        ),
        (
            "negative temperature",
            chat,
            json!({"messages": user("a"), "temperature": -0.5}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "huge temperature",
            chat,
            json!({"messages": user("a"), "temperature": 1e9}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "temperature as text",
            chat,
            json!({"messages": user("a"), "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "zero top_p",
            chat,
            json!({"messages": user("a"), "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "top_p above 1",
            chat,
            json!({"messages": user("a"), "top_p": 1.5}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "too many stops",
            chat,
            json!({"messages": user("a"), "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "empty stop",
            chat,
            json!({"messages": user("a"), "stop": ""}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "stream not a bool",
            chat,
            json!({"messages": user("a"), "stream": "yes"}).to_string(),
            400,
            Some("stream"),
        ),
        (
            "seed not an integer",
            chat,
            json!({"messages": user("a"), "seed": "abc"}).to_string(),
            400,
            Some("seed"),
        ),
        (
            "prompt beyond the context",
            chat,
            json!({"messages": user(&long)}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "raw prompt beyond the context",
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "missing raw prompt",
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "tools",
            chat,
            json!({"messages": user("a"), "tools": [{"type": "function"}]}).to_string(),
            400,
            Some("tools"),
        ),
        (
            "top_logprobs without logprobs",
            chat,
            json!({"messages": user("a"), "top_logprobs": 2}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "top_logprobs beyond 20",
            chat,
            json!({"messages": user("a"), "logprobs": true, "top_logprobs": 21}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "logprobs beyond 20",
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 21}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            "negative logprobs",
            "/v1/completions",
            json!({"prompt": "a", "logprobs": -1}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            "token id outside the vocabulary",
            "/v1/completions",
            json!({"prompt": [1, 99999]}).to_string(),
            400,
            Some("prompt[1]"),
        ),
        (
            "negative token id in a batch",
            "/v1/completions",
            json!({"prompt": [[1, 2], [1, -2]]}).to_string(),
            400,
            Some("prompt[1][1]"),
        ),
        (
            "empty batch",
            "/v1/completions",
            json!({"prompt": []}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "empty prompt in a batch",
            "/v1/completions",
            json!({"prompt": [[1], []]}).to_string(),
            400,
            Some("prompt[1]"),
        ),
        (
            "mixed prompt types",
            "/v1/completions",
            json!({"prompt": ["a", 1]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "max_tokens 0 without echo",
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "tokenize without text",
            "/tokenize",
            json!({"text": "a"}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "detokenize outside the vocabulary",
            "/detokenize",
            json!({"tokens": [100000]}).to_string(),
            400,
            Some("tokens[0]"),
        ),
        (
            "detokenize without a list",
            "/detokenize",
            json!({"tokens": "1 2"}).to_string(),
            400,
            Some("tokens"),
        ),
        (
            "json mode",
            chat,
            json!({"messages": user("a"), "response_format": {"type": "json_object"}}).to_string(),
            400,
            Some("response_format"),
        ),
        (
            "echo with stream",
            "/v1/completions",
            json!({"prompt": "a", "echo": true, "stream": true}).to_string(),
            400,
            Some("echo"),
        ),
        ("unknown route", "/v1/nothing", "{}".into(), 404, None),
        (
            "unknown feedback kind",
            "/v1/feedback",
            json!({"kind": "vibes"}).to_string(),
            400,
            Some("kind"),
        ),
    ];
    for (what, path, body, want, param) in &cases {
        let (status, err) = s.call("POST", path, Some(body));
        assert_eq!(status, *want, "{what}: {err}");
        let e = &err["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {err}");
        assert!(e["type"].is_string(), "{what}: {err}");
        assert!(e.as_object().unwrap().contains_key("code"), "{what}: {err}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{what}: {err}");
        }
    }
    // An oversized body is refused from its declared length, before the client sends it.
    let (status, err) = s.raw_oversized_post(chat, 2 << 20);
    assert_eq!(status, 413, "{err}");
    assert_eq!(err["error"]["type"], "invalid_request_error");

    let (_, err) = s.call("POST", chat, Some(&json!({"messages": user(&long)}).to_string()));
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    let (status, err) = s.call("GET", chat, None);
    assert_eq!(status, 405, "{err}");

    // A history longer than the context loses its oldest exchanges (the chat template's rule),
    // not the request.
    let mut history = vec![];
    for i in 0..12 {
        history.push(json!({"role": "user", "content": format!("question {i} {}", "q".repeat(40))}));
        history.push(json!({"role": "assistant", "content": "a".repeat(40)}));
    }
    history.push(json!({"role": "user", "content": "last"}));
    let (status, ok) = s.post(chat, &json!({"messages": history, "max_tokens": 4}));
    assert_eq!(status, 200, "{ok}");
    assert!(ok["usage"]["prompt_tokens"].as_u64().unwrap() < CONTEXT as u64);

    // A huge history (under the body limit) costs little: what cannot fit is dropped up front.
    let mut history: Vec<Value> = (0..20_000)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": ""}))
        .collect();
    history.push(json!({"role": "user", "content": "hi"}));
    let t = Instant::now();
    let (status, ok) = s.post(chat, &json!({"messages": history, "max_tokens": 4}));
    assert_eq!(status, 200, "{ok}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a long history took {:?}",
        t.elapsed()
    );

    // Options at their neutral values are accepted, as clients often send them.
    let neutral = json!({"messages": user("still there?"), "max_tokens": 4, "logprobs": false, "presence_penalty": 0,
                         "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "user": "someone"});
    let (status, ok) = s.post(chat, &neutral);
    assert_eq!(status, 200, "{ok}");
}

#[test]
fn concurrent_clients_are_all_answered_and_health_stays_responsive() {
    let s = Server::start();
    let started = Instant::now();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.post(
                        "/v1/chat/completions",
                        &json!({"messages": user(&format!("client {i}")), "max_tokens": 200, "temperature": 1.0, "seed": i}),
                    )
                })
            })
            .collect();
        // While four generations are queued or running, the async side still answers at once.
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let (status, _) = s.call("GET", "/health", None);
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "/health took {:?}", t.elapsed());
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    }
    println!("4 concurrent requests answered in {:?}", started.elapsed());
}

/// From `/metrics`: how many decode steps ran, how many of them with more than one sequence, and
/// how many with more than 8.
fn batch_sizes(s: &Server) -> (f64, f64, f64) {
    let resp = Server::agent().get(&format!("{}/metrics", s.url)).call().unwrap();
    let text = resp.into_string().unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    let steps = value("talaria_batch_size_count");
    (
        steps,
        steps - value("talaria_batch_size_bucket{le=\"1\"}"),
        steps - value("talaria_batch_size_bucket{le=\"8\"}"),
    )
}

#[test]
fn fifty_streams_with_disconnects_batch_together_and_leave_the_server_healthy() {
    // 50 streaming clients at once against a batch of at most 8: the even ones read their whole
    // answer, the odd ones leave after the first chunk. Greedy answers must not depend on what
    // else shares the batch, so every whole stream equals the same request answered alone. The
    // leaving clients ask for many more tokens than they read, so what they save shows even when
    // the server notices a closed connection only a few dozen tokens late (a busy 2-core machine).
    const CLIENTS: usize = 50;
    const WHOLE: u64 = 48;
    const ASKED: u64 = CONTEXT as u64 / 2;
    let s = Server::start_with("test", &["--max-batch", "8", "--queue", "64"]);
    let body = |i: usize| {
        let max_tokens = if i.is_multiple_of(2) { WHOLE } else { ASKED };
        json!({"messages": user(&format!("stream {i}")), "max_tokens": max_tokens, "temperature": 0, "stream": true, "ignore_eos": true})
    };
    let mut most_waiting = 0;
    let streams: Vec<Option<Vec<String>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (s, body) = (&s, body(i));
                scope.spawn(move || {
                    if i.is_multiple_of(2) {
                        return Some(s.stream("/v1/chat/completions", &body));
                    }
                    let resp = Server::agent()
                        .post(&format!("{}/v1/chat/completions", s.url))
                        .set("Content-Type", "application/json")
                        .send_string(&body.to_string())
                        .unwrap();
                    let mut first = String::new();
                    BufReader::new(resp.into_reader()).read_line(&mut first).unwrap();
                    assert!(first.starts_with("data: "), "{first:?}");
                    None
                })
            })
            .collect();
        // Meanwhile /health answers and shows sequences waiting for the batch.
        for _ in 0..20 {
            let (status, h) = s.call("GET", "/health", None);
            assert_eq!(status, 200);
            assert!(h["running_sequences"].as_i64().unwrap() <= 8, "{h}");
            most_waiting = most_waiting.max(h["waiting_sequences"].as_i64().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Continuous batching: steps ran with several sequences, never more than --max-batch.
    let (steps, batched, over) = batch_sizes(&s);
    assert!(batched > 0.0, "no step of {steps} ran more than one sequence");
    assert_eq!(over, 0.0, "steps ran more than --max-batch sequences");
    assert!(most_waiting > 0, "50 clients against 8 slots left none waiting");
    // The server is idle again soon: the abandoned streams left the batch.
    let t = Instant::now();
    loop {
        let h = s.call("GET", "/health", None).1;
        if h["running_sequences"] == 0 && h["waiting_sequences"] == 0 && h["waiting_requests"] == 0 {
            assert_eq!(h["finished_requests"], CLIENTS as u64, "{h}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "still busy: {h}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The whole streams decoded WHOLE tokens each; the abandoned ones stopped far short of ASKED.
    let spent = generated_tokens(&s);
    let half = CLIENTS as u64 / 2;
    let abandoned = spent.saturating_sub(half * WHOLE);
    assert!(
        abandoned < half * ASKED / 2,
        "the {half} abandoned streams decoded {abandoned} of the {} tokens they asked for",
        half * ASKED
    );
    for (i, chunks) in streams.iter().enumerate() {
        let Some(chunks) = chunks else { continue };
        let (texts, finish, _) = reassemble(chunks, true);
        let mut alone = body(i);
        alone["stream"] = json!(false);
        let (status, whole) = s.post("/v1/chat/completions", &alone);
        assert_eq!(status, 200, "{whole}");
        assert_eq!(texts[0], whole["choices"][0]["message"]["content"], "client {i}");
        assert_eq!(finish[0], "length", "client {i}");
    }
    println!(
        "{steps} steps, {batched} with several sequences; {abandoned} tokens for the {half} abandoned streams; up to {most_waiting} sequences waiting"
    );
}

#[test]
fn a_full_queue_answers_503_and_abandoned_requests_cost_nothing() {
    // The bench shape decodes slowly enough here that no request can finish within its client's
    // second: two requests of 8 sequences fill the batch of 16, QUEUE wait, the rest are refused.
    const QUEUE: usize = 4;
    const MAX_TOKENS: u64 = 200;
    let s = Server::start_with("bench", &["--queue", &QUEUE.to_string()]);
    let body =
        json!({"messages": user("long"), "max_tokens": MAX_TOKENS, "n": 8, "temperature": 1.0, "ignore_eos": true})
            .to_string();
    let outcomes: Vec<Result<u16, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..80)
            .map(|_| {
                let (url, body) = (&s.url, &body);
                scope.spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(1)).build();
                    match agent
                        .post(&format!("{url}/v1/chat/completions"))
                        .set("Content-Type", "application/json")
                        .send_string(body)
                    {
                        Ok(r) => Ok(r.status()),
                        Err(ureq::Error::Status(code, r)) => {
                            let err: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                            assert_eq!(err["error"]["type"], "server_busy");
                            Ok(code)
                        }
                        Err(e) => Err(e.to_string()),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every request is refused, answered or timed out, and at most 2 + QUEUE are admitted beyond
    // those that finished (a 200) and freed their place.
    let busy = outcomes.iter().filter(|o| matches!(o, Ok(503))).count();
    let finished = outcomes.iter().filter(|o| matches!(o, Ok(200))).count();
    let timed_out = outcomes.len() - busy - finished;
    assert!(
        outcomes.iter().all(|o| match o {
            Ok(code) => [200, 503].contains(code),
            Err(e) => e.to_lowercase().contains("timed out"),
        }),
        "{outcomes:?}"
    );
    assert!(
        busy + finished >= 80 - 2 - QUEUE,
        "{busy} refused, {finished} finished: {outcomes:?}"
    );
    assert!(
        timed_out >= 1,
        "the test needs requests that outlast their clients: {outcomes:?}"
    );
    // The clients that timed out are gone: their queued jobs are skipped and the running ones
    // stop, so the server is soon idle, having decoded far fewer tokens than the admitted
    // requests asked for, and answers at once.
    let t = Instant::now();
    let busy_now = |h: &Value| h["waiting_requests"] != 0 || h["running_sequences"] != 0;
    while busy_now(&s.call("GET", "/health", None).1) {
        assert!(t.elapsed() < Duration::from_secs(30), "abandoned jobs still pending");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spent = generated_tokens(&s);
    let asked = (finished + timed_out) as u64 * 8 * MAX_TOKENS;
    assert!(
        spent < asked / 2,
        "{spent} of the {asked} tokens asked for were decoded"
    );
    let (status, ok) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user("hello"), "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{ok}");
    println!(
        "{busy} of 80 refused with 503, {timed_out} abandoned; {spent} of {asked} tokens decoded; idle again {:?} after the clients left",
        t.elapsed()
    );
}

fn generated_tokens(s: &Server) -> u64 {
    s.call("GET", "/health", None).1["generated_tokens"].as_u64().unwrap()
}

#[test]
fn a_client_leaving_mid_stream_stops_its_generation() {
    let s = Server::start_alone();
    // A raw completion that runs to the end of the context unless stopped.
    let req =
        json!({"prompt": "abc", "max_tokens": LONG_CONTEXT - 8, "temperature": 0, "stream": true, "ignore_eos": true});
    let mut whole = req.clone();
    whole["stream"] = json!(false);
    let (_, full) = s.post("/v1/completions", &whole);
    assert_eq!(
        full["choices"][0]["finish_reason"], "length",
        "the test needs a generation that never stops early: {full}"
    );
    let before = generated_tokens(&s);

    let resp = Server::agent()
        .post(&format!("{}/v1/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(&req.to_string())
        .unwrap();
    let mut reader = resp.into_reader();
    let mut first = [0u8; 64];
    reader.read_exact(&mut first).unwrap();
    drop(reader);

    // The worker notices at its next token; after that the count no longer moves.
    let mut last = u64::MAX;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = generated_tokens(&s);
        if now == last {
            break;
        }
        last = now;
    }
    let spent = last - before;
    println!("the abandoned stream generated {spent} of {} tokens", LONG_CONTEXT - 8);
    // The same request run to the end makes exactly LONG_CONTEXT - 8 tokens (checked above), so any
    // fewer means the generation was stopped (typically after a handful).
    // The counter moves with every token decoded (not when a request ends), so an abandoned stream
    // that kept decoding would reach LONG_CONTEXT - 8 here.
    assert!(
        spent < (LONG_CONTEXT - 8) as u64 / 2,
        "the abandoned generation went on: {spent} tokens"
    );
    let health = s.call("GET", "/health", None).1;
    assert_eq!(health["running_sequences"], 0, "{health}");
    let (status, ok) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user("next"), "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{ok}");
}

#[test]
fn feedback_round_trip_to_training_files() {
    let s = Server::start();
    let prompt =
        json!([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What colour is the sky?"}]);
    let other = user("Name a fruit.");
    let good = [
        json!({"kind": "demonstration", "messages": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue, on a clear day."}]}),
        json!({"kind": "comparison", "prompt": prompt, "chosen": "Blue.", "rejected": "Green."}),
        json!({"kind": "ranking", "prompt": prompt, "ranked": ["Blue.", "Grey.", "Green."]}),
        json!({"kind": "thumbs", "prompt": other, "answer": "An apple.", "rating": "up"}),
        json!({"kind": "thumbs", "prompt": other, "answer": "A chair.", "rating": "down"}),
        json!({"kind": "thumbs", "prompt": prompt, "answer": "Blue.", "rating": "up"}),
    ];
    for (i, f) in good.iter().enumerate() {
        let (status, body) = s.post("/v1/feedback", f);
        assert_eq!(status, 201, "{f}: {body}");
        assert_eq!(body["id"], i as u64 + 1);
    }
    let bad = [
        (json!({"prompt": prompt}), "kind"),
        (json!({"kind": "demonstration", "messages": prompt}), "messages"),
        (
            json!({"kind": "comparison", "prompt": prompt, "chosen": "Same.", "rejected": "Same."}),
            "rejected",
        ),
        (
            json!({"kind": "comparison", "prompt": prompt, "chosen": "Blue."}),
            "rejected",
        ),
        (
            json!({"kind": "ranking", "prompt": prompt, "ranked": ["Only one."]}),
            "ranked",
        ),
        (
            json!({"kind": "thumbs", "prompt": prompt, "answer": "Blue.", "rating": "sideways"}),
            "rating",
        ),
        (
            json!({"kind": "thumbs", "prompt": [{"role": "robot", "content": "x"}], "answer": "a", "rating": "up"}),
            "prompt[0].role",
        ),
    ];
    for (f, param) in &bad {
        let (status, body) = s.post("/v1/feedback", f);
        assert_eq!(status, 400, "{f}: {body}");
        assert_eq!(body["error"]["param"], *param, "{f}: {body}");
    }
    let stored = FeedbackStore::open(&s.db).unwrap().all().unwrap();
    assert_eq!(stored.len(), good.len());
    assert!(matches!(&stored[1].1, Feedback::Comparison { chosen, .. } if chosen == "Blue."));

    let out = tempfile::tempdir().unwrap();
    let (sft, prefs) = (out.path().join("sft.jsonl"), out.path().join("prefs.jsonl"));
    let run = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["feedback", "export", "--db"])
        .arg(&s.db)
        .arg("--sft")
        .arg(&sft)
        .arg("--prefs")
        .arg(&prefs)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{said} {}", String::from_utf8_lossy(&run.stderr));
    assert!(
        said.contains("1 demonstrations") && said.contains("1 pairs from thumbs"),
        "{said}"
    );

    let convs = read_conversations(&sft).unwrap();
    assert_eq!(convs.conversations.len(), 1);
    assert_eq!(convs.conversations[0][1].content, "Blue, on a clear day.");
    // Closing the loop: `talaria sft` trains on the exported demonstrations as they are.
    let run = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["sft", "--init"])
        .arg(&s.ckpt)
        .arg("--data")
        .arg(&sft)
        .arg("--val-data")
        .arg(&sft)
        .arg("--out")
        .arg(out.path().join("sft-run"))
        .args([
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--warmup",
            "0",
            "--eval-every",
            "2",
            "--save-every",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "talaria sft on the export failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(&prefs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"prompt": prompt, "chosen": "Blue.", "rejected": "Green."}),
            json!({"prompt": prompt, "ranked": ["Blue.", "Grey.", "Green."]}),
            json!({"prompt": other, "chosen": "An apple.", "rejected": "A chair."}),
        ]
    );
}

/// Runs a checker script that needs tools outside Rust; the script itself prints why it skips.
fn run_checker(needs: &str, program: &str, args: &[&str]) -> Option<String> {
    let out = match Command::new(program).args(args).output() {
        Ok(o) => o,
        Err(e) => {
            common::skip(needs, &format!("cannot run {program}: {e}"));
            return None;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn the_official_openai_python_client_works() {
    let s = Server::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_openai_client.py");
    let Some(out) = run_checker("openai", "python3", &[script, &format!("{}/v1", s.url)]) else {
        return;
    };
    if out.contains("SKIPPED") {
        common::skip(
            "openai",
            "the openai Python package is not installed (pip install openai)",
        );
    } else {
        assert!(out.contains("openai client: ok"), "{out}");
    }
}

#[test]
fn the_page_chats_and_records_a_comparison_in_headless_chromium() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let missing: Vec<&str> = [
        ("node", Path::new("/usr/bin/node").exists() || which("node")),
        ("chromium", Path::new("/usr/bin/chromium").exists()),
        (
            "playwright-core",
            Path::new(dir).join("node_modules/playwright-core").exists(),
        ),
    ]
    .iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| *name)
    .collect();
    if !missing.is_empty() {
        common::skip(
            "browser",
            &format!(
                "the browser check needs {} (run tests/browser/setup.sh)",
                missing.join(", ")
            ),
        );
        return;
    }
    // Behind an API key: the page asks for it once and sends it with every call.
    let s = Server::start_with("test", &["--api-key", "page-key"]);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png");
    let script = format!("{dir}/page.mjs");
    run_checker(
        "browser",
        "node",
        &[&script, &s.url, shot.to_str().unwrap(), "page-key"],
    )
    .unwrap();
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "no screenshot at {}",
        shot.display()
    );
    let stored = FeedbackStore::open(&s.db).unwrap().all().unwrap();
    assert!(
        stored
            .iter()
            .any(|(_, f)| matches!(f, Feedback::Comparison { prompt, .. }
            if prompt.last().is_some_and(|m| m.content == "Which is better?"))),
        "the comparison made in the page is not in the database: {stored:?}"
    );
    assert!(
        stored
            .iter()
            .any(|(_, f)| matches!(f, Feedback::Thumbs { up: true, .. }))
    );
    assert!(
        stored
            .iter()
            .any(|(_, f)| matches!(f, Feedback::Demonstration { messages }
        if messages.last().is_some_and(|m| m.content == "Blue.")))
    );
    assert!(
        stored
            .iter()
            .any(|(_, f)| matches!(f, Feedback::Ranking { ranked, .. } if ranked.len() >= 2))
    );
    // Each judgement names the model that answered.
    let sources = FeedbackStore::open(&s.db)
        .unwrap()
        .matching(&Default::default())
        .unwrap();
    assert!(
        sources.iter().all(|(_, _, src)| src
            .as_ref()
            .is_some_and(|x| x.model == "tiny-chat" && x.digest.len() == 64)),
        "{sources:?}"
    );
    println!("screenshot: {}", shot.display());
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
}

/// Log-probabilities of every next token of `ids` under the checkpoint's model at temperature 1:
/// row `i` is the distribution after `ids[..=i]`.
fn model_logprobs(ckpt: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let model = talaria::checkpoint::Checkpoint::load(ckpt, DType::F32, &Device::Cpu)
        .unwrap()
        .model()
        .unwrap();
    let x = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    candle_nn::ops::log_softmax(&model.forward(&x).unwrap(), candle_core::D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn echo_and_logprobs_score_prompts_as_the_model_does() {
    let s = Server::start();
    // Token-id prompts, as evaluation harnesses send them: from /tokenize, back through /detokenize.
    let (status, t) = s.post("/tokenize", &json!({"prompt": "The cat sat on the mat."}));
    assert_eq!(status, 200, "{t}");
    let a = ids_of(&t["tokens"]);
    assert_eq!(t["count"], json!(a.len()));
    assert_eq!(t["max_model_len"], json!(CONTEXT));
    let (_, d) = s.post("/detokenize", &json!({"tokens": a}));
    assert_eq!(d["prompt"], json!("The cat sat on the mat."));
    let b = ids_of(&s.post("/tokenize", &json!({"content": "Once upon a time"})).1["tokens"]);

    // A batch scored with max_tokens 0: one choice per prompt, in order, the prompt's own tokens
    // with the first log-probability null and the others those of the model.
    let (status, r) = s.post(
        "/v1/completions",
        &json!({"prompt": [a, b], "max_tokens": 0, "echo": true, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, (ids, text)) in [(&a, "The cat sat on the mat."), (&b, "Once upon a time")]
        .into_iter()
        .enumerate()
    {
        let c = &choices[i];
        assert_eq!(c["index"], json!(i));
        assert_eq!(c["text"], json!(text));
        let lp = &c["logprobs"];
        let tokens = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(tokens.len(), ids.len());
        assert!(tokens[0].is_null() && lp["top_logprobs"][0].is_null());
        let want = model_logprobs(&s.ckpt, ids);
        for (j, got) in tokens.iter().enumerate().skip(1) {
            let w = want[j - 1][ids[j] as usize];
            assert!(
                (got.as_f64().unwrap() as f32 - w).abs() < 1e-4,
                "prompt {i} token {j}: {got} vs {w}"
            );
            let top = lp["top_logprobs"][j].as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2);
            let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
            assert!(best >= got.as_f64().unwrap() - 1e-6);
        }
        let joined: String = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(joined, text, "byte-level tokens of ASCII text are its characters");
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    }
    assert_eq!(r["usage"]["completion_tokens"], json!(0));

    // One greedy token after the echoed prompt: the most likely one, with the largest log-probability.
    let (_, r) = s.post(
        "/v1/completions",
        &json!({"prompt": a, "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0}),
    );
    let lp = &r["choices"][0]["logprobs"]["token_logprobs"];
    assert_eq!(lp.as_array().unwrap().len(), a.len() + 1, "{r}");
    let last_row = &model_logprobs(&s.ckpt, &a)[a.len() - 1];
    let best = last_row.iter().copied().fold(f32::MIN, f32::max);
    assert!((lp[a.len()].as_f64().unwrap() as f32 - best).abs() < 1e-4);

    // Sampled at temperature 1.5, the log-probabilities are still those at temperature 1.
    let (_, r) = s.post(
        "/v1/completions",
        &json!({"prompt": a, "max_tokens": 6, "logprobs": 3, "temperature": 1.5, "seed": 4, "ignore_eos": true}),
    );
    let c = &r["choices"][0];
    let generated = ids_of(&s.post("/tokenize", &json!({"prompt": c["text"]})).1["tokens"]);
    let lp = &c["logprobs"];
    let got = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), 6);
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(
        offsets[0],
        json!("The cat sat on the mat.".len()),
        "offsets count from the prompt's start"
    );
    // Re-tokenizing the text may merge differently, so the model is asked about the tokens sent.
    if generated.len() == 6 {
        let all: Vec<u32> = a.iter().chain(&generated).copied().collect();
        let want = model_logprobs(&s.ckpt, &all);
        for (k, g) in got.iter().enumerate() {
            let w = want[a.len() - 1 + k][generated[k] as usize];
            assert!((g.as_f64().unwrap() as f32 - w).abs() < 1e-4, "token {k}: {g} vs {w}");
        }
    }

    // Chat: logprobs and top_logprobs in the chat shape; the bytes of the tokens are the answer.
    let (status, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user("hello"), "max_tokens": 8, "logprobs": true, "top_logprobs": 3, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap());
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        r["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely.
        assert!((top[0]["logprob"].as_f64().unwrap() - e["logprob"].as_f64().unwrap()).abs() < 1e-6);
    }
    // Streamed, each chunk carries its token's entry.
    let chunks = s.stream(
        "/v1/chat/completions",
        &json!({"messages": user("hello"), "max_tokens": 8, "logprobs": true, "temperature": 0, "stream": true}),
    );
    let streamed: usize = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .map(|c| {
            let v: Value = serde_json::from_str(c).unwrap();
            v["choices"][0]["logprobs"]["content"].as_array().map_or(0, Vec::len)
        })
        .sum();
    assert_eq!(streamed, content.len());

    // /tokenize renders a conversation through the chat template.
    let (_, t) = s.post("/tokenize", &json!({"messages": user("hello")}));
    let tok = Tokenizer::from_json(&test_tokenizer_json()).unwrap();
    let template = talaria::chat::ChatTemplate::new(&tok).unwrap();
    let want = template
        .render_prompt(&tok, &[talaria::chat::Message::new(talaria::chat::Role::User, "hello")])
        .unwrap();
    assert_eq!(ids_of(&t["tokens"]), want);

    // The counters saw all of it.
    let metrics = Server::agent()
        .get(&format!("{}/metrics", s.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for want in [
        "talaria_http_requests_total{route=\"/v1/completions\",status=\"200\"} 3",
        "talaria_http_requests_total{route=\"/tokenize\",status=\"200\"} 4",
        "talaria_time_to_first_token_seconds_count",
        "talaria_time_per_output_token_seconds_bucket",
        "talaria_batch_size_bucket",
        "talaria_running_sequences 0",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want:?}:\n{metrics}");
    }
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("talaria_generation_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(generated >= 1 + 6 + 8, "{generated}");
}

fn request(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, ureq::Response) {
    let mut req = Server::agent().request(method, &format!("{}{path}", s.url));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

#[test]
fn an_api_key_guards_the_api_and_posts_must_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = chat_checkpoint(dir.path(), "test");
    let key_file = dir.path().join("key.txt");
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let s = Server::start_on(
        dir,
        ckpt,
        &[
            "--api-key-file",
            key_file.to_str().unwrap(),
            "--cors-origin",
            "https://app.example",
        ],
    );
    let body = json!({"messages": user("hi"), "max_tokens": 2}).to_string();
    let json_type = ("Content-Type", "application/json");
    for (what, auth) in [
        ("no key", None),
        ("a wrong key", Some("Bearer s3cret-kez")),
        ("no Bearer", Some("s3cret-key")),
    ] {
        let mut headers = vec![json_type];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let (status, r) = request(&s, "POST", "/v1/chat/completions", &headers, Some(&body));
        assert_eq!(status, 401, "{what}");
        let err: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
        assert_eq!(err["error"]["code"], json!("invalid_api_key"), "{what}");
        let (status, _) = request(&s, "GET", "/v1/models", &headers[1..], None);
        assert_eq!(status, 401, "{what}: /v1/models");
    }
    let good = ("Authorization", "Bearer s3cret-key");
    let (status, _) = request(&s, "POST", "/v1/chat/completions", &[json_type, good], Some(&body));
    assert_eq!(status, 200);
    let (status, _) = request(&s, "POST", "/tokenize", &[json_type], Some(r#"{"prompt": "a"}"#));
    assert_eq!(status, 401, "/tokenize is guarded too");
    // Liveness, metrics and the page stay open; the page asks for the key itself.
    for path in ["/health", "/metrics", "/"] {
        assert_eq!(request(&s, "GET", path, &[], None).0, 200, "{path}");
    }

    // A POST that is not JSON (a form another site could submit) is refused before it is read.
    for ct in [Some("application/x-www-form-urlencoded"), Some("text/plain"), None] {
        let mut headers = vec![good];
        if let Some(c) = ct {
            headers.push(("Content-Type", c));
        }
        let (status, r) = request(&s, "POST", "/v1/feedback", &headers, Some(r#"{"kind": "thumbs"}"#));
        assert_eq!(status, 415, "{ct:?}");
        let err: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
        assert_eq!(err["error"]["code"], json!("unsupported_media_type"));
    }
    let (status, _) = request(
        &s,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json; charset=utf-8"), good],
        Some(&body),
    );
    assert_eq!(status, 200, "a charset parameter is fine");

    // CORS headers for the origin given, and only then.
    let (_, r) = request(&s, "GET", "/health", &[("Origin", "https://app.example")], None);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    let plain = Server::start();
    let (_, r) = request(&plain, "GET", "/health", &[("Origin", "https://app.example")], None);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(s.call("GET", "/health", None).0, 200);
}

#[test]
fn slow_requests_time_out_and_too_many_at_once_are_shed() {
    // The bench shape decodes about 1,300 tokens per second here in a batch of 8: 8 x 250 tokens
    // take over a second, twice the time limit.
    let s = Server::start_with("bench", &["--request-timeout", "0.5", "--max-connections", "1"]);
    let long = json!({"prompt": "a", "max_tokens": 250, "n": 8, "ignore_eos": true}).to_string();
    let url = s.url.clone();
    let slow = std::thread::spawn(move || {
        let r = Server::agent()
            .post(&format!("{url}/v1/completions"))
            .set("Content-Type", "application/json")
            .send_string(&long);
        match r {
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let (status, err) = s.post("/v1/completions", &json!({"prompt": "b", "max_tokens": 1}));
    assert_eq!(status, 503, "a second request while the first runs: {err}");
    assert_eq!(err["error"]["type"], json!("server_busy"));
    let (status, body) = slow.join().unwrap();
    assert_eq!(status, 408, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], json!("timeout"));
    // The server carries on.
    let (status, _) = s.post("/v1/completions", &json!({"prompt": "c", "max_tokens": 2}));
    assert_eq!(status, 200);
}

/// lm-evaluation-harness scores an MMLU-format task through the server (token ids, `echo`,
/// `logprobs`) exactly as through `transformers` on the exported model, and runs a generation task
/// through the chat route (scripts/lm_eval_parity.py).
#[test]
fn lm_evaluation_harness_scores_the_server_as_it_scores_transformers() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data.join("eval/mmlu_test.jsonl").exists() {
        common::skip("data", "../shared/data/eval/mmlu_test.jsonl is absent");
        return;
    }
    let has = Command::new("python3")
        .args(["-c", "import lm_eval, accelerate, tenacity, torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        common::skip(
            "lm_eval",
            "lm-evaluation-harness is not installed (pip install \"lm-eval[api,hf]\")",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = chat_checkpoint(dir.path(), "test");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lm_eval_parity.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&ckpt)
        .args(["--limit", "12", "--talaria", env!("CARGO_BIN_EXE_talaria"), "--data"])
        .arg(&data)
        .arg("--work")
        .arg(dir.path().join("work"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains("12 questions, 48 answers"), "{summary}");
    println!("{summary}");
}
