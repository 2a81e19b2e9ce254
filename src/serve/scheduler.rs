//! Continuous batching for the server (iteration-level scheduling, as Orca and vLLM do it): one
//! thread owns the model and a batched [`Engine`]; between two engine steps it takes new requests
//! from a bounded queue, admits waiting ones as slots free up, and drops those whose client went
//! away, so a request joins the running batch at the next step and leaves it as soon as it
//! finishes. Each request streams its events back over its own channel.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::metrics::ServeMetrics;
use super::openai::{ApiError, GenParams};
use crate::chat::Message;
use crate::engine::{self, Chatbot, Completion, Engine, EngineConfig, Request, RequestId, Sampling, TokenLogprob};

/// What to continue: a conversation (through the chat template), raw text, or token ids.
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
    Ids(Vec<u32>),
}

struct Job {
    /// One or more prompts (a `/v1/completions` batch); choice `i * n + j` is sample `j` of prompt `i`.
    prompts: Vec<Prompt>,
    params: GenParams,
    seed: u64,
    events: UnboundedSender<Event>,
    arrived: Instant,
}

/// What a request reports, in order: `Started` (when its first prompt joins the batch), then per
/// choice its `Text` pieces and `Finished`, then `Done`; or `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    Started {
        /// Over all the request's prompts.
        prompt_tokens: usize,
    },
    /// A piece of text of choice `index`; with log-probabilities requested, one per token (the
    /// piece may be empty while text is held back).
    Text {
        index: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: &'static str,
        completion: Completion,
        /// The prompt's ids, for `echo`.
        prompt: Option<Vec<u32>>,
    },
    Done,
    Failed(ApiError),
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
    metrics: Arc<ServeMetrics>,
    queue: usize,
}

/// One job's shared state on the scheduler thread.
struct JobState {
    events: UnboundedSender<Event>,
    /// Sequences not finished yet, over all its prompts.
    left: Cell<usize>,
    started: Cell<bool>,
    prompt_tokens: usize,
    arrived: Instant,
    echo: bool,
    /// Whether the job has been counted as finished (it ends once, whichever way).
    counted: Cell<bool>,
}

impl JobState {
    /// Counts the job as finished, the first time only.
    fn finish(&self, m: &ServeMetrics) {
        if !self.counted.replace(true) {
            m.finished.inc();
        }
    }
}

/// A job's engine requests waiting for slots, with the choice index of each one's first sample.
struct Waiting {
    requests: VecDeque<(usize, Request)>,
    job: Rc<JobState>,
}

/// A request admitted to the engine.
struct Active {
    job: Rc<JobState>,
    /// Choice index of its first sample.
    base: usize,
    /// Its samples not finished yet.
    left: usize,
    prompt: Option<Vec<u32>>,
    /// When each sample last produced a token (for the time-to-first-token and per-token metrics).
    last_token: Vec<Option<Instant>>,
}

impl Scheduler {
    /// Starts the scheduler thread. It ends when every `Scheduler` handle is dropped.
    pub fn spawn(bot: Arc<Chatbot>, cfg: SchedulerConfig, metrics: Arc<ServeMetrics>) -> anyhow::Result<Self> {
        // Fails here, with the reason, rather than in the thread.
        EngineConfig {
            max_batch: cfg.max_batch,
            token_budget: cfg.token_budget,
            capacity: None,
        }
        .check()?;
        let (jobs, rx) = sync_channel(cfg.queue);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("talaria-generate".into())
            .spawn(move || crate::model::fused::on_pool(|| run(&bot, cfg, rx, &m)))?;
        Ok(Self {
            jobs,
            metrics,
            queue: cfg.queue,
        })
    }

    pub fn metrics(&self) -> &ServeMetrics {
        &self.metrics
    }

    /// Queues a request and returns its event stream, or 503 when the queue is full.
    pub fn submit(&self, prompts: Vec<Prompt>, params: GenParams) -> Result<UnboundedReceiver<Event>, ApiError> {
        let busy = || ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the server is busy ({} requests waiting); retry later", self.queue),
            kind: "server_busy",
            param: None,
            code: None,
        };
        if self.metrics.waiting.get() >= self.queue as i64 {
            return Err(busy());
        }
        let (events, rx) = unbounded_channel();
        let seed = params.seed.unwrap_or_else(rand::random);
        let job = Job {
            prompts,
            params,
            seed,
            events,
            arrived: Instant::now(),
        };
        self.metrics.waiting.inc();
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.metrics.waiting.dec();
                match e {
                    TrySendError::Full(_) => Err(busy()),
                    TrySendError::Disconnected(_) => Err(ApiError::internal("the generation thread has stopped")),
                }
            }
        }
    }
}

fn run(bot: &Chatbot, cfg: SchedulerConfig, rx: Receiver<Job>, m: &ServeMetrics) {
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
                m.waiting.dec();
            }
            return;
        }
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut active: HashMap<RequestId, Active> = HashMap::new();
    loop {
        // 1. New jobs: wait for one when there is nothing to do, otherwise take what is queued.
        if engine.is_idle() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.extend(prepare(bot, job, m)),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => waiting.extend(prepare(bot, job, m)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) if engine.is_idle() && waiting.is_empty() => return,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        // 2. Clients that left: their waiting requests cost nothing, their running ones leave the batch.
        waiting.retain(|w| {
            let keep = !w.job.events.is_closed();
            if !keep {
                leave(w, &active, &mut engine, m);
            }
            keep
        });
        let gone: Vec<RequestId> = active
            .iter()
            .filter(|(_, a)| a.job.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.cancel(id);
        }
        // 3. Admit waiting requests, oldest job first, while their samples find slots.
        while let Some(w) = waiting.front_mut() {
            let Some((_, r)) = w.requests.front() else {
                waiting.pop_front();
                continue;
            };
            let n = r.samples.len();
            if n <= cfg.max_batch && n > engine.free_slots() {
                break;
            }
            let (base, request) = w.requests.pop_front().expect("front exists");
            let job = w.job.clone();
            let prompt = job.echo.then(|| request.prompt.clone());
            match engine.admit(request) {
                Ok(id) => {
                    if !job.started.replace(true) {
                        m.waiting.dec();
                        m.prompt_tokens.inc_by(job.prompt_tokens as u64);
                        let _ = job.events.send(Event::Started {
                            prompt_tokens: job.prompt_tokens,
                        });
                    }
                    active.insert(
                        id,
                        Active {
                            job,
                            base,
                            left: n,
                            prompt,
                            last_token: vec![None; n],
                        },
                    );
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(ApiError::bad_request(format!("{e:#}"))));
                    let w = waiting.pop_front().expect("front exists");
                    leave(&w, &active, &mut engine, m);
                }
            }
        }
        m.waiting_sequences.set(waiting_sequences(&waiting));
        // 4. One step of the batch; a panic or error fails the requests in it, never the server.
        let in_batch = engine.running() + engine.prefilling();
        if in_batch > 0 {
            m.batch_size.observe(in_batch as f64);
        }
        let step = catch_unwind(AssertUnwindSafe(|| engine.step()));
        let events = match step {
            Ok(Ok(events)) => events,
            failure => {
                let message = match failure {
                    Ok(Err(e)) => format!("generation failed: {e:#}"),
                    _ => "generation failed unexpectedly".to_string(),
                };
                let mut failed: Vec<Rc<JobState>> = vec![];
                for (_, a) in active.drain() {
                    if !failed.iter().any(|j| Rc::ptr_eq(j, &a.job)) {
                        let _ = a.job.events.send(Event::Failed(ApiError::internal(message.clone())));
                        a.job.finish(m);
                        failed.push(a.job);
                    }
                }
                // Their prompts not yet admitted go too.
                waiting.retain(|w| !failed.iter().any(|j| Rc::ptr_eq(j, &w.job)));
                m.waiting_sequences.set(waiting_sequences(&waiting));
                match Engine::new(&bot.model, Some(&bot.tokenizer), ecfg) {
                    Ok(e) => engine = e,
                    Err(_) => return,
                }
                m.running.set(0);
                continue;
            }
        };
        for e in events {
            match e {
                engine::Event::Token {
                    req,
                    index,
                    text,
                    logprob,
                    ..
                } => {
                    m.generated_tokens.inc();
                    let Some(a) = active.get_mut(&req) else { continue };
                    let now = Instant::now();
                    match a.last_token[index].replace(now) {
                        None => m.time_to_first_token.observe((now - a.job.arrived).as_secs_f64()),
                        Some(t) => m.time_per_token.observe((now - t).as_secs_f64()),
                    }
                    if !text.is_empty() || logprob.is_some() {
                        let _ = a.job.events.send(Event::Text {
                            index: a.base + index,
                            text,
                            logprob,
                        });
                    }
                }
                engine::Event::Finished {
                    req,
                    index,
                    completion,
                    rest,
                } => {
                    let Some(a) = active.get_mut(&req) else { continue };
                    let choice = a.base + index;
                    if !rest.is_empty() {
                        let _ = a.job.events.send(Event::Text {
                            index: choice,
                            text: rest,
                            logprob: None,
                        });
                    }
                    let _ = a.job.events.send(Event::Finished {
                        index: choice,
                        reason: completion.finish.openai(),
                        completion,
                        prompt: a.prompt.clone(),
                    });
                    a.left -= 1;
                    let job = a.job.clone();
                    if a.left == 0 {
                        active.remove(&req);
                    }
                    job.left.set(job.left.get() - 1);
                    if job.left.get() == 0 {
                        let _ = job.events.send(Event::Done);
                        job.finish(m);
                    }
                }
            }
        }
        m.running.set((engine.running() + engine.prefilling()) as i64);
    }
}

/// Sequences not yet admitted: each waiting request's samples.
fn waiting_sequences(waiting: &VecDeque<Waiting>) -> i64 {
    waiting
        .iter()
        .flat_map(|w| &w.requests)
        .map(|(_, r)| r.samples.len() as i64)
        .sum()
}

/// A job that leaves before it is done (its client went away, or one of its prompts failed): its
/// running requests leave the batch and the counters say so.
fn leave(w: &Waiting, active: &HashMap<RequestId, Active>, engine: &mut Engine, m: &ServeMetrics) {
    if !w.job.started.get() {
        m.waiting.dec();
    }
    for (id, a) in active {
        if Rc::ptr_eq(&a.job, &w.job) {
            engine.cancel(*id);
        }
    }
    w.job.finish(m);
}

/// Turns a job into engine requests (every prompt rendered, fitted and checked), or reports why
/// it cannot run.
fn prepare(bot: &Chatbot, job: Job, m: &ServeMetrics) -> Option<Waiting> {
    let p = &job.params;
    let mut requests = VecDeque::with_capacity(job.prompts.len());
    for (i, prompt) in job.prompts.iter().enumerate() {
        let base = i * p.n;
        let samples: Vec<Sampling> = (0..p.n)
            .map(|j| Sampling::new(&p.sampling, job.seed.wrapping_add((base + j) as u64)))
            .collect();
        let at = |name: &str| {
            if job.prompts.len() > 1 {
                format!("{name}[{i}]")
            } else {
                name.to_string()
            }
        };
        let request = match prompt {
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
                .map_err(|e| too_long(&at("prompt"), format!("{e:#}"))),
            Prompt::Ids(ids) => bot
                .ids_request(ids.clone(), samples, p.max_tokens)
                .map_err(|e| too_long(&at("prompt"), format!("{e:#}"))),
        };
        match request {
            Ok(mut request) => {
                request.stop_strings = p.stop.clone();
                if p.ignore_eos {
                    request.stop_tokens.clear();
                }
                request.stream = true;
                request.logprobs = p.logprobs;
                request.prompt_logprobs = p.logprobs.filter(|_| p.echo);
                requests.push_back((base, request));
            }
            Err(e) => {
                let _ = job.events.send(Event::Failed(e));
                m.waiting.dec();
                m.finished.inc();
                return None;
            }
        }
    }
    let prompt_tokens = requests.iter().map(|(_, r)| r.prompt.len()).sum();
    Some(Waiting {
        job: Rc::new(JobState {
            events: job.events,
            left: Cell::new(requests.len() * p.n),
            started: Cell::new(false),
            prompt_tokens,
            arrived: job.arrived,
            echo: p.echo,
            counted: Cell::new(false),
        }),
        requests,
    })
}

fn too_long(param: &str, message: String) -> ApiError {
    ApiError::invalid(param, message).with_code("context_length_exceeded")
}
