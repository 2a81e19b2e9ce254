//! The generation worker: one thread owns the model and answers jobs from a bounded queue, one
//! at a time, so the async server never blocks on the CPU-bound decode loop. Each job streams
//! its events back over a channel; when the client goes away the channel closes and the job
//! stops at its next token.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use axum::http::StatusCode;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::openai::{ApiError, GenParams};
use crate::chat::{Message, Role};
use crate::engine::{self, Chatbot, FinishReason, GenerateOptions, Sampler, TextStream};
use crate::tokenizer;

/// Jobs waiting beyond the running one; more are refused with 503.
pub const QUEUE: usize = 64;

/// What to continue: a conversation (through the chat template) or raw text.
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

struct Job {
    prompt: Prompt,
    params: GenParams,
    seed: u64,
    events: UnboundedSender<Event>,
}

/// What a job reports, in order: `Started`, then per choice its `Text` pieces and `Finished`,
/// then `Done`; or `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text {
        index: usize,
        text: String,
    },
    Finished {
        index: usize,
        reason: &'static str,
        tokens: usize,
    },
    Done,
    Failed(ApiError),
}

/// Counters reported by `GET /health`.
#[derive(Default)]
pub struct Stats {
    /// Jobs submitted and not yet finished (running or waiting).
    pub pending: AtomicU64,
    /// Jobs finished, whatever the outcome.
    pub finished: AtomicU64,
    /// Tokens generated over all jobs, including those of cancelled ones.
    pub generated_tokens: AtomicU64,
}

/// The sending side of the queue; cloned into every request handler.
#[derive(Clone)]
pub struct Worker {
    jobs: SyncSender<Job>,
    stats: Arc<Stats>,
}

impl Worker {
    /// Starts the worker thread. It ends when every `Worker` handle is dropped.
    pub fn spawn(bot: Arc<Chatbot>) -> Self {
        let (jobs, rx) = sync_channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("talaria-generate".into())
            .spawn(move || crate::model::fused::on_pool(|| run(&bot, rx, &st)))
            .expect("spawning the generation thread");
        Self { jobs, stats }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a job and returns its event stream, or 503 when the queue is full.
    pub fn submit(&self, prompt: Prompt, params: GenParams) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (events, rx) = unbounded_channel();
        let seed = params.seed.unwrap_or_else(rand::random);
        let job = Job {
            prompt,
            params,
            seed,
            events,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.stats.pending.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("the server is busy ({QUEUE} requests waiting); retry later"),
                kind: "server_busy",
                param: None,
                code: None,
            }),
            Err(TrySendError::Disconnected(_)) => Err(ApiError::internal("the generation worker has stopped")),
        }
    }
}

fn run(bot: &Chatbot, rx: Receiver<Job>, stats: &Stats) {
    let max_token_bytes = bot.tokenizer.token_byte_lengths().into_iter().max().unwrap_or(1).max(1) as usize;
    for mut job in rx {
        if let Prompt::Chat(messages) = &mut job.prompt {
            drop_hopeless_turns(messages, bot.model.config().n_positions, max_token_bytes);
        }
        let events = job.events.clone();
        // A client that left while its job waited costs nothing; a panic in one job must not
        // take the server down: report it and carry on.
        if !events.is_closed() && catch_unwind(AssertUnwindSafe(|| run_job(bot, job, stats))).is_err() {
            let _ = events.send(Event::Failed(ApiError::internal("generation failed unexpectedly")));
        }
        stats.pending.fetch_sub(1, Ordering::Relaxed);
        stats.finished.fetch_add(1, Ordering::Relaxed);
    }
}

fn run_job(bot: &Chatbot, job: Job, stats: &Stats) {
    let tx = &job.events;
    let p = &job.params;
    let ctx = bot.model.config().n_positions;
    let text_prompt = match &job.prompt {
        Prompt::Chat(messages) => match bot.prompt_for(messages, p.max_tokens.min(64)) {
            Ok((ids, _)) => {
                let _ = tx.send(Event::Started {
                    prompt_tokens: ids.len(),
                });
                None
            }
            Err(e) => {
                let _ = tx.send(Event::Failed(too_long("messages", e.to_string())));
                return;
            }
        },
        Prompt::Text(text) => match bot.tokenizer.encode(text) {
            Ok(ids) if ids.len() >= ctx => {
                let msg = format!(
                    "the prompt is {} tokens and the model's context is {ctx} tokens",
                    ids.len()
                );
                let _ = tx.send(Event::Failed(too_long("prompt", msg)));
                return;
            }
            Ok(ids) => {
                let _ = tx.send(Event::Started {
                    prompt_tokens: ids.len(),
                });
                Some(ids)
            }
            Err(e) => {
                let _ = tx.send(Event::Failed(ApiError::invalid("prompt", e.to_string())));
                return;
            }
        },
    };
    for index in 0..p.n {
        let seed = job.seed.wrapping_add(index as u64);
        let mut stop = StopMatcher::new(&p.stop);
        let mut on_text = |piece: &str| {
            let (emit, hit) = stop.push(piece);
            let sent = emit.is_empty() || tx.send(Event::Text { index, text: emit }).is_ok();
            sent && !hit
        };
        let result = match (&job.prompt, &text_prompt) {
            (Prompt::Chat(messages), _) => bot
                .answer(messages, &p.sampling, seed, p.max_tokens, &mut on_text)
                .map(|a| (a.tokens.len(), a.finish)),
            (Prompt::Text(_), Some(ids)) => continue_text(bot, ids, p, seed, &mut on_text),
            (Prompt::Text(_), None) => unreachable!("text prompts are tokenized above"),
        };
        let (tokens, finish) = match result {
            Ok(r) => {
                stats.generated_tokens.fetch_add(r.0 as u64, Ordering::Relaxed);
                r
            }
            Err(e) => {
                let _ = tx.send(Event::Failed(ApiError::internal(format!("generation failed: {e:#}"))));
                return;
            }
        };
        let reason = if stop.hit {
            "stop"
        } else {
            let rest = stop.finish();
            if !rest.is_empty() && tx.send(Event::Text { index, text: rest }).is_err() {
                return;
            }
            match finish {
                FinishReason::Stop | FinishReason::Cancelled => "stop",
                FinishReason::Length | FinishReason::Context => "length",
            }
        };
        if tx.send(Event::Finished { index, reason, tokens }).is_err() {
            return;
        }
    }
    let _ = tx.send(Event::Done);
}

/// Drops the oldest exchanges that cannot be part of any prompt that fits the context of `ctx`
/// tokens: every message costs at least one token, and a text of `b` bytes at least
/// `b / max_token_bytes`. `Chatbot::prompt_for` would drop them too, but one render per
/// exchange; dropping them first bounds what a huge history can cost the worker.
fn drop_hopeless_turns(messages: &mut Vec<Message>, ctx: usize, max_token_bytes: usize) {
    let sys = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let bytes = |ms: &[Message]| ms.iter().map(|m| m.content.len()).sum::<usize>();
    let fixed = bytes(&messages[..sys]);
    let mut rest = bytes(&messages[sys..]);
    let mut start = sys;
    let hopeless = |rest: usize, count: usize| count > ctx || (fixed + rest).div_ceil(max_token_bytes) > ctx;
    while messages.len() - start > 1 && hopeless(rest, messages.len() - start + sys) {
        rest -= messages[start].content.len() + messages[start + 1].content.len();
        start += 2;
    }
    messages.drain(sys..start);
}

fn too_long(param: &str, message: String) -> ApiError {
    ApiError::invalid(param, message).with_code("context_length_exceeded")
}

/// Continues raw text with the model alone (no chat template), stopping at end-of-text.
fn continue_text(
    bot: &Chatbot,
    prompt: &[u32],
    p: &GenParams,
    seed: u64,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> anyhow::Result<(usize, FinishReason)> {
    let opts = GenerateOptions {
        max_new_tokens: p.max_tokens,
        stop_tokens: bot.tokenizer.special_id(tokenizer::EOT).into_iter().collect(),
    };
    let mut sampler = Sampler::new(p.sampling.clone(), seed)?;
    let mut stream = TextStream::new(&bot.tokenizer);
    let mut err = None;
    let g = engine::generate(&bot.model, prompt, &opts, &mut sampler, |id| match stream.push(id) {
        Ok(piece) => piece.is_empty() || on_text(&piece),
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok((g.tokens.len(), g.finish)),
    }
}

/// Cuts streamed text at the first stop string. Text that might be the start of a stop string
/// is held back until the next piece decides, so a stop string split across tokens is never
/// shown to the client.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
    hit: bool,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            pending: String::new(),
            hit: false,
        }
    }

    /// Adds a piece; returns the text that is now safe to emit and whether a stop string matched.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.hit = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - held].to_string();
        self.pending.drain(..self.pending.len() - held);
        (out, false)
    }

    /// The held-back text, once generation has ended without a match.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest proper suffix of `text` that is a prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - k..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out += &emit;
            if hit {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_pieces_are_cut_and_never_shown() {
        assert_eq!(run(&["END"], &["ab", "cE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&["xy", "b"], &["aab"]), ("aa".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
    }
}
