//! Continuous batching for the server (iteration-level scheduling, as Orca and vLLM do it): one
//! thread owns the model and a batched [`Engine`]; between two engine steps it takes new requests
//! from a bounded queue, admits waiting ones as slots free up, and drops those whose client went
//! away, so a request joins the running batch at the next step and leaves it as soon as it
//! finishes. Each request streams its events back over its own channel.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};

use axum::http::StatusCode;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::openai::{ApiError, GenParams};
use crate::chat::Message;
use crate::engine::{self, Chatbot, Engine, EngineConfig, Request, RequestId, Sampling};

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

/// What a request reports, in order: `Started` (when it joins the batch), then per choice its
/// `Text` pieces and `Finished`, then `Done`; or `Failed` at any point.
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
    /// Requests accepted and not yet running (in the queue or waiting for slots).
    pub waiting: AtomicU64,
    /// Sequences in the running batch (prefilling or decoding).
    pub running: AtomicU64,
    /// Requests finished, whatever the outcome.
    pub finished: AtomicU64,
    /// Tokens generated over all requests, including those of cancelled ones.
    pub generated_tokens: AtomicU64,
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most (`--max-batch`).
    pub max_batch: usize,
    /// Tokens through the model per step at most (`--max-batch-tokens`): decode tokens, then prompt chunks.
    pub token_budget: usize,
    /// Requests waiting beyond the running batch; more are refused with 503.
    pub queue: usize,
}

/// The sending side of the queue; cloned into every request handler.
#[derive(Clone)]
pub struct Scheduler {
    jobs: SyncSender<Job>,
    stats: Arc<Stats>,
    queue: usize,
}

/// A request admitted to the engine, and where its events go.
struct Active {
    events: UnboundedSender<Event>,
    left: usize,
}

impl Scheduler {
    /// Starts the scheduler thread. It ends when every `Scheduler` handle is dropped.
    pub fn spawn(bot: Arc<Chatbot>, cfg: SchedulerConfig) -> anyhow::Result<Self> {
        // Fails here, with the reason, rather than in the thread.
        EngineConfig {
            max_batch: cfg.max_batch,
            token_budget: cfg.token_budget,
            capacity: None,
        }
        .check()?;
        let (jobs, rx) = sync_channel(cfg.queue);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("talaria-generate".into())
            .spawn(move || crate::model::fused::on_pool(|| run(&bot, cfg, rx, &st)))?;
        Ok(Self {
            jobs,
            stats,
            queue: cfg.queue,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a request and returns its event stream, or 503 when the queue is full.
    pub fn submit(&self, prompt: Prompt, params: GenParams) -> Result<UnboundedReceiver<Event>, ApiError> {
        let busy = || ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the server is busy ({} requests waiting); retry later", self.queue),
            kind: "server_busy",
            param: None,
            code: None,
        };
        if self.stats.waiting.load(Ordering::Relaxed) >= self.queue as u64 {
            return Err(busy());
        }
        let (events, rx) = unbounded_channel();
        let seed = params.seed.unwrap_or_else(rand::random);
        let job = Job {
            prompt,
            params,
            seed,
            events,
        };
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => Err(busy()),
                    TrySendError::Disconnected(_) => Err(ApiError::internal("the generation thread has stopped")),
                }
            }
        }
    }
}

/// A job turned into an engine request, waiting for slots.
struct Waiting {
    request: Request,
    events: UnboundedSender<Event>,
}

fn run(bot: &Chatbot, cfg: SchedulerConfig, rx: Receiver<Job>, stats: &Stats) {
    let ecfg = EngineConfig {
        max_batch: cfg.max_batch,
        token_budget: cfg.token_budget,
        capacity: None,
    };
    let mut engine = match Engine::new(&bot.model, Some(&bot.tokenizer), ecfg) {
        Ok(e) => e,
        Err(e) => {
            // Checked at spawn, so only memory could fail here: refuse every request.
            for job in rx {
                let _ = job.events.send(Event::Failed(ApiError::internal(format!("{e:#}"))));
                stats.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut active: HashMap<RequestId, Active> = HashMap::new();
    let done_with = |stats: &Stats| {
        stats.finished.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        // 1. New jobs: wait for one when there is nothing to do, otherwise take what is queued.
        if engine.is_idle() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.extend(prepare(bot, job, stats)),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => waiting.extend(prepare(bot, job, stats)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if engine.is_idle() && waiting.is_empty() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        // 2. Clients that left: their waiting requests cost nothing, their running ones leave the batch.
        waiting.retain(|w| {
            let keep = !w.events.is_closed();
            if !keep {
                stats.waiting.fetch_sub(1, Ordering::Relaxed);
                done_with(stats);
            }
            keep
        });
        let gone: Vec<RequestId> = active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.cancel(id);
        }
        // 3. Admit waiting requests, oldest first, while their samples find slots.
        while let Some(w) = waiting.front() {
            let n = w.request.samples.len();
            if n <= cfg.max_batch && n > engine.free_slots() {
                break;
            }
            let w = waiting.pop_front().expect("front exists");
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let prompt_tokens = w.request.prompt.len();
            let left = w.request.samples.len();
            match engine.admit(w.request) {
                Ok(id) => {
                    let _ = w.events.send(Event::Started { prompt_tokens });
                    active.insert(id, Active { events: w.events, left });
                }
                Err(e) => {
                    let _ = w.events.send(Event::Failed(ApiError::bad_request(format!("{e:#}"))));
                    done_with(stats);
                }
            }
        }
        // 4. One step of the batch; a panic or error fails the requests in it, never the server.
        let step = catch_unwind(AssertUnwindSafe(|| engine.step()));
        let events = match step {
            Ok(Ok(events)) => events,
            failure => {
                let message = match failure {
                    Ok(Err(e)) => format!("generation failed: {e:#}"),
                    _ => "generation failed unexpectedly".to_string(),
                };
                for (_, a) in active.drain() {
                    let _ = a.events.send(Event::Failed(ApiError::internal(message.clone())));
                    done_with(stats);
                }
                match Engine::new(&bot.model, Some(&bot.tokenizer), ecfg) {
                    Ok(e) => engine = e,
                    Err(_) => return,
                }
                stats.running.store(0, Ordering::Relaxed);
                continue;
            }
        };
        for e in events {
            match e {
                engine::Event::Token { req, index, text, .. } => {
                    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    if let Some(a) = active.get(&req)
                        && !text.is_empty()
                    {
                        let _ = a.events.send(Event::Text { index, text });
                    }
                }
                engine::Event::Finished {
                    req,
                    index,
                    completion,
                    rest,
                } => {
                    let Some(a) = active.get_mut(&req) else { continue };
                    if !rest.is_empty() {
                        let _ = a.events.send(Event::Text { index, text: rest });
                    }
                    let _ = a.events.send(Event::Finished {
                        index,
                        reason: completion.finish.openai(),
                        tokens: completion.tokens.len(),
                    });
                    a.left -= 1;
                    if a.left == 0 {
                        let _ = a.events.send(Event::Done);
                        active.remove(&req);
                        done_with(stats);
                    }
                }
            }
        }
        stats
            .running
            .store((engine.running() + engine.prefilling()) as u64, Ordering::Relaxed);
    }
}

/// Turns a job into an engine request (the prompt rendered, fitted and checked), or reports why
/// it cannot run.
fn prepare(bot: &Chatbot, job: Job, stats: &Stats) -> Option<Waiting> {
    let p = &job.params;
    let samples: Vec<Sampling> = (0..p.n)
        .map(|i| Sampling {
            params: p.sampling.clone(),
            seed: job.seed.wrapping_add(i as u64),
        })
        .collect();
    let request = match &job.prompt {
        Prompt::Chat(_) if !bot.is_chat() => Err(ApiError::invalid(
            "messages",
            format!("{}; use /v1/completions", engine::NO_CHAT_TEMPLATE),
        )
        .with_code("model_not_chat")),
        Prompt::Chat(messages) => bot
            .request(messages, samples, p.max_tokens)
            .map(|(r, _)| r)
            .map_err(|e| too_long("messages", e.to_string())),
        Prompt::Text(text) => bot
            .completion_request(text, samples, p.max_tokens)
            .map_err(|e| too_long("prompt", format!("{e:#}"))),
    };
    match request {
        Ok(mut request) => {
            request.stop_strings = p.stop.clone();
            if p.ignore_eos {
                request.stop_tokens.clear();
            }
            request.stream = true;
            Some(Waiting {
                request,
                events: job.events,
            })
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(e));
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            stats.finished.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn too_long(param: &str, message: String) -> ApiError {
    ApiError::invalid(param, message).with_code("context_length_exceeded")
}
