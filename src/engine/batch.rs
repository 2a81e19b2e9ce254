//! The batched decoder every caller generates with. Sequences live in the slots of a
//! [`KvSlots`] cache, each with its own length; one [`Engine::step`] runs every running sequence
//! one token further and prefills newly admitted prompts (in chunks, within a token budget), all
//! in one packed forward pass with nothing padded. A request's samples prefill their prompt once
//! and start from copies of its cache entries. Each sequence samples with its own seeded stream
//! and stops on its own stop tokens, stop strings and token budget, so what else is in the batch
//! never changes its tokens.
//!
//! Requests join between steps and leave when they finish or are cancelled, which is what the
//! server's continuous batching (`serve::scheduler`) builds on; offline callers use
//! [`generate_batch`].

use std::collections::VecDeque;

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Tensor};

use super::sampling::{Sampler, SamplingParams};
use super::stream::{StopMatcher, TextStream};
use crate::model::{Gpt, KvSlots, Segment};
use crate::tokenizer::Tokenizer;

/// How one sequence of a request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub params: SamplingParams,
    pub seed: u64,
}

impl Sampling {
    pub fn new(params: &SamplingParams, seed: u64) -> Self {
        Self {
            params: params.clone(),
            seed,
        }
    }

    pub fn greedy() -> Self {
        Self {
            params: SamplingParams::greedy(),
            seed: 0,
        }
    }
}

/// One prompt to continue, with one or more sequences ("samples") that share its prefill.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// One sequence per entry.
    pub samples: Vec<Sampling>,
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (not part of its output).
    pub stop_tokens: Vec<u32>,
    /// Text that ends a sequence, cut from its text (needs the engine's tokenizer).
    pub stop_strings: Vec<String>,
    /// Report text pieces as they are produced (otherwise the text is decoded once at the end).
    pub stream: bool,
    /// Log-probabilities of the generated tokens, with this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's tokens too (every one but the first), with alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Per sampled token (the stop token included), its log-probability and the entropy of the
    /// distribution it was drawn from: the logits at the sequence's temperature, before any top-k or
    /// top-p cut (what RL's loss scores).
    pub sampled_stats: bool,
}

impl Request {
    /// A greedy request with no stop strings, streaming or log-probabilities.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize, stop_tokens: Vec<u32>) -> Self {
        Self {
            prompt,
            samples: vec![Sampling::greedy()],
            max_new_tokens,
            stop_tokens,
            stop_strings: vec![],
            stream: false,
            logprobs: None,
            prompt_logprobs: None,
            sampled_stats: false,
        }
    }

    /// The same request with these samples instead.
    pub fn with_samples(mut self, samples: Vec<Sampling>) -> Self {
        self.samples = samples;
        self
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// This stop token was sampled (it is not in the output tokens).
    StopToken(u32),
    /// The text reached this stop string (cut from the text; the tokens that formed it are kept).
    StopString(String),
    /// `max_new_tokens` were produced.
    Length,
    /// Prompt and output fill the model's context (or the cache's slot).
    Context,
    /// The caller cancelled it.
    Cancelled,
}

impl FinishReason {
    /// Whether the sequence ended by itself, as a finished answer does.
    pub fn ended(&self) -> bool {
        matches!(self, Self::StopToken(_) | Self::StopString(_))
    }

    /// OpenAI's `finish_reason`: `stop` or `length`.
    pub fn openai(&self) -> &'static str {
        match self {
            Self::StopToken(_) | Self::StopString(_) | Self::Cancelled => "stop",
            Self::Length | Self::Context => "length",
        }
    }
}

/// A token's log-probability under the model's full distribution at temperature 1, and the most
/// likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// One finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// The text (empty without a tokenizer), cut before a stop string.
    pub text: String,
    pub finish: FinishReason,
    /// Per token of `tokens`, then the stop token if one ended it, when the request asked for
    /// them (scoring tools such as lm-evaluation-harness expect the end token's entry too).
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Per prompt token (the first has none), when the request asked for them.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// Per token of `tokens`, then the stop token if one ended it: (log-probability, entropy) under
    /// the sampling distribution, when the request asked for them.
    pub sampled: Option<Vec<(f32, f32)>>,
}

/// Identifies an admitted request.
pub type RequestId = u64;

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Sequence `index` of request `req` produced `token`; `text` is the text that can now be
    /// shown (streaming requests only; may be empty).
    Token {
        req: RequestId,
        index: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Sequence `index` of request `req` ended; `rest` is text held back until now.
    Finished {
        req: RequestId,
        index: usize,
        completion: Completion,
        rest: String,
    },
}

impl Event {
    /// The text this event makes showable: a token's piece, or what a finished sequence held back.
    pub fn text(&self) -> &str {
        match self {
            Event::Token { text, .. } | Event::Finished { rest: text, .. } => text,
        }
    }
}

/// Sizes of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences decoded together at most (KV slots).
    pub max_batch: usize,
    /// Tokens through the model per step at most: decode tokens first, then prompt chunks.
    pub token_budget: usize,
    /// Positions per KV slot (`None`: the model's context): offline callers that know their
    /// longest prompt and answer allocate only that.
    pub capacity: Option<usize>,
}

impl EngineConfig {
    /// Rejects sizes the engine cannot run with, naming the setting.
    pub fn check(&self) -> Result<()> {
        ensure!(self.max_batch > 0, "the batch must hold at least one sequence");
        ensure!(
            self.token_budget <= 8192,
            "the token budget per step ({}) is above 8192 tokens",
            self.token_budget
        );
        ensure!(
            self.token_budget >= self.max_batch,
            "the token budget per step ({}) must cover a decode step of the whole batch ({})",
            self.token_budget,
            self.max_batch
        );
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            token_budget: crate::model::infer::MAX_ROWS,
            capacity: None,
        }
    }
}

/// A sequence in a slot.
struct Seq<'t> {
    req: RequestId,
    index: usize,
    slot: usize,
    sampler: Sampler,
    tokens: Vec<u32>,
    /// The token the next step feeds (the last one sampled).
    next: Option<u32>,
    text: Option<(TextStream<'t>, StopMatcher)>,
    shown: String,
    logprobs: Option<Vec<TokenLogprob>>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    sampled: Option<Vec<(f32, f32)>>,
}

/// A request whose prompt is being prefilled into the first of its slots.
struct Prefill<'t> {
    req: RequestId,
    prompt: Vec<u32>,
    done: usize,
    seqs: Vec<Seq<'t>>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

/// Per-request settings shared by its sequences.
struct Limits {
    req: RequestId,
    /// Its sequences not yet finished.
    live: usize,
    prompt_len: usize,
    max_new: usize,
    stop_tokens: Vec<u32>,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
}

pub struct Engine<'a> {
    /// The caller's model, untracked and with its matrices laid out for decoding.
    model: Gpt,
    tokenizer: Option<&'a Tokenizer>,
    cfg: EngineConfig,
    cache: KvSlots,
    free: Vec<usize>,
    prefilling: VecDeque<Prefill<'a>>,
    running: Vec<Seq<'a>>,
    limits: Vec<Limits>,
    events: Vec<Event>,
    next_id: RequestId,
}

impl<'a> Engine<'a> {
    /// An engine with `cfg.max_batch` slots of the model's full context. It decodes with its own
    /// copy of the weights in the kernels' layout ([`Gpt::for_decoding`]), taken now.
    pub fn new(model: &Gpt, tokenizer: Option<&'a Tokenizer>, cfg: EngineConfig) -> Result<Self> {
        cfg.check()?;
        let ctx = model.config().n_positions;
        Ok(Self {
            model: model.for_decoding()?,
            tokenizer,
            cfg,
            cache: model.new_slots(cfg.max_batch, cfg.capacity.unwrap_or(ctx).clamp(1, ctx))?,
            free: (0..cfg.max_batch).rev().collect(),
            prefilling: VecDeque::new(),
            running: vec![],
            limits: vec![],
            events: vec![],
            next_id: 0,
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    /// Slots not held by any sequence.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Sequences decoding.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences whose prompt is still being prefilled.
    pub fn prefilling(&self) -> usize {
        self.prefilling.iter().map(|p| p.seqs.len()).sum()
    }

    /// Nothing left to run and no event left to report.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.prefilling.is_empty() && self.events.is_empty()
    }

    /// Checks a request against the model and the engine (prompt, vocabulary, context,
    /// sampling settings) without admitting it.
    pub fn validate(&self, req: &Request) -> Result<()> {
        ensure!(!req.prompt.is_empty(), "the prompt is empty: give at least one token");
        self.model.check_input(&req.prompt, 0)?;
        ensure!(
            req.prompt.len() <= self.cache.capacity(),
            "the prompt of {} tokens exceeds the model's context of {} tokens",
            req.prompt.len(),
            self.cache.capacity()
        );
        ensure!(!req.samples.is_empty(), "a request needs at least one sample");
        ensure!(
            req.samples.len() <= self.cfg.max_batch,
            "{} samples do not fit a batch of {} sequences",
            req.samples.len(),
            self.cfg.max_batch
        );
        for s in &req.samples {
            s.params.validate()?;
        }
        if let Some(&bad) = req
            .stop_tokens
            .iter()
            .find(|&&t| t as usize >= self.model.config().vocab_size)
        {
            bail!("stop token {bad} is outside the vocabulary");
        }
        ensure!(
            req.stop_strings.is_empty() && !req.stream || self.tokenizer.is_some(),
            "stop strings and streamed text need a model with a tokenizer"
        );
        Ok(())
    }

    /// Admits a request if there are slots for all its samples; it starts at the next step.
    pub fn admit(&mut self, req: Request) -> Result<RequestId> {
        self.validate(&req)?;
        ensure!(
            req.samples.len() <= self.free.len(),
            "{} samples need as many free slots; {} are free",
            req.samples.len(),
            self.free.len()
        );
        let id = self.next_id;
        self.next_id += 1;
        let text = |tok: &'a Tokenizer| (TextStream::new(tok), StopMatcher::new(&req.stop_strings));
        let wants_text = req.stream || !req.stop_strings.is_empty();
        let seqs = req
            .samples
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let slot = self.free.pop().expect("checked above");
                self.cache.clear(slot);
                Ok(Seq {
                    req: id,
                    index,
                    slot,
                    sampler: Sampler::new(s.params.clone(), s.seed)?,
                    tokens: vec![],
                    next: None,
                    text: self.tokenizer.filter(|_| wants_text).map(text),
                    shown: String::new(),
                    logprobs: req.logprobs.map(|_| vec![]),
                    prompt_logprobs: None,
                    sampled: req.sampled_stats.then(Vec::new),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.limits.push(Limits {
            req: id,
            live: seqs.len(),
            prompt_len: req.prompt.len(),
            max_new: req.max_new_tokens,
            stop_tokens: req.stop_tokens,
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs,
        });
        self.prefilling.push_back(Prefill {
            req: id,
            prompt_logprobs: req.prompt_logprobs.map(|_| vec![None]),
            prompt: req.prompt,
            done: 0,
            seqs,
        });
        Ok(id)
    }

    /// Ends every sequence of `req` now (each reports `Cancelled` at the next step) and frees
    /// their slots.
    pub fn cancel(&mut self, req: RequestId) {
        let mut gone: Vec<Seq<'a>> = vec![];
        if let Some(i) = self.prefilling.iter().position(|p| p.req == req) {
            gone.extend(self.prefilling.remove(i).expect("present").seqs);
        }
        let (keep, cancel): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.req != req);
        self.running = keep;
        gone.extend(cancel);
        for s in gone {
            self.finish(s, FinishReason::Cancelled);
        }
    }

    /// Runs one step: every running sequence one token further, and prompt chunks within the
    /// remaining token budget. Returns what happened, in order.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut segs = vec![];
        let mut ids = vec![];
        // Decode tokens first: one per running sequence.
        for s in &self.running {
            let t = s.next.expect("a running sequence has a token to feed");
            segs.push(Segment {
                slot: s.slot,
                past: self.cache.len(s.slot),
                len: 1,
            });
            ids.push(t);
        }
        let decoding = segs.len();
        // Then prompt chunks, oldest request first, while the budget lasts.
        let mut budget = self.cfg.token_budget.saturating_sub(decoding);
        let mut chunks = vec![];
        for (i, p) in self.prefilling.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let take = (p.prompt.len() - p.done).min(budget);
            budget -= take;
            segs.push(Segment {
                slot: p.seqs[0].slot,
                past: p.done,
                len: take,
            });
            ids.extend_from_slice(&p.prompt[p.done..p.done + take]);
            chunks.push((i, take));
        }
        if segs.is_empty() {
            return Ok(std::mem::take(&mut self.events));
        }
        // Rows whose logits are needed: each decode token, the prompt tokens whose
        // log-probabilities were asked for, and the last token of a finishing prompt.
        let mut rows: Vec<u32> = (0..decoding as u32).collect();
        let mut at = decoding;
        let mut chunk_rows = vec![];
        for &(i, take) in &chunks {
            let p = &self.prefilling[i];
            let finishes = p.done + take == p.prompt.len();
            let first = rows.len();
            if p.prompt_logprobs.is_some() {
                rows.extend((at..at + take).map(|r| r as u32));
            } else if finishes {
                rows.push((at + take - 1) as u32);
            }
            chunk_rows.push((first, rows.len() - first, finishes));
            at += take;
        }
        let hidden = self.model.forward_packed(&ids, &segs, &mut self.cache)?;
        let logits = if rows.is_empty() {
            vec![]
        } else {
            let picked = hidden.index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?;
            self.model
                .lm_head_rows(&picked)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
        };
        // Sample the decoding sequences.
        let running = std::mem::take(&mut self.running);
        for (s, row) in running.into_iter().zip(&logits) {
            self.advance(s, row);
        }
        // Move the prompt chunks on; finished prompts start their samples.
        let mut finished_prompts = vec![];
        for (&(i, take), &(first, n_rows, finishes)) in chunks.iter().zip(&chunk_rows) {
            let lim = self.limit(self.prefilling[i].req);
            let k = lim.prompt_logprobs;
            let p = &mut self.prefilling[i];
            if let (Some(lp), Some(k)) = (p.prompt_logprobs.as_mut(), k) {
                // Row j predicts prompt token done + j + 1.
                for (j, row) in logits[first..first + n_rows].iter().enumerate() {
                    let pos = p.done + j + 1;
                    if pos < p.prompt.len() {
                        lp.push(Some(token_logprob(row, p.prompt[pos], k)));
                    }
                }
            }
            p.done += take;
            if finishes {
                finished_prompts.push((i, first + n_rows - 1));
            }
        }
        for &(i, row) in finished_prompts.iter().rev() {
            let p = self.prefilling.remove(i).expect("present");
            let len = p.prompt.len();
            let leader = p.seqs[0].slot;
            // Every sample starts from the prompt's entries before any of them may finish (and
            // free its slot).
            for s in &p.seqs[1..] {
                self.cache.copy_prefix(leader, s.slot, len)?;
            }
            for mut s in p.seqs {
                s.prompt_logprobs = p.prompt_logprobs.clone();
                if self.limit(s.req).max_new == 0 {
                    self.finish(s, FinishReason::Length);
                } else {
                    self.advance(s, &logits[row]);
                }
            }
        }
        Ok(std::mem::take(&mut self.events))
    }

    fn limit(&self, req: RequestId) -> &Limits {
        self.limits
            .iter()
            .find(|l| l.req == req)
            .expect("every sequence has its limits")
    }

    /// Samples the next token of `s` from its logits row and either keeps it running or finishes it.
    fn advance(&mut self, mut s: Seq<'a>, row: &[f32]) {
        let lim = self.limit(s.req);
        let token = s.sampler.sample(row);
        let logprob = lim.logprobs.map(|k| token_logprob(row, token, k));
        if let Some(st) = s.sampled.as_mut() {
            st.push(sampled_stats(row, token, s.sampler.params().temperature));
        }
        if let (Some(all), Some(lp)) = (s.logprobs.as_mut(), &logprob) {
            all.push(lp.clone());
        }
        if lim.stop_tokens.contains(&token) {
            return self.finish(s, FinishReason::StopToken(token));
        }
        let (max_new, prompt_len) = (lim.max_new, lim.prompt_len);
        s.tokens.push(token);
        let mut stop_hit = None;
        let mut text = String::new();
        if let Some((stream, matcher)) = s.text.as_mut() {
            // A token that does not decode (never for a byte-level vocabulary) shows nothing.
            let piece = stream.push(token).unwrap_or_default();
            let (emit, hit) = matcher.push(&piece);
            text = emit;
            stop_hit = hit;
        }
        s.shown.push_str(&text);
        self.events.push(Event::Token {
            req: s.req,
            index: s.index,
            token,
            text,
            logprob,
        });
        if let Some(stop) = stop_hit {
            return self.finish(s, FinishReason::StopString(stop));
        }
        if s.tokens.len() >= max_new {
            return self.finish(s, FinishReason::Length);
        }
        if prompt_len + s.tokens.len() >= self.cache.capacity() {
            return self.finish(s, FinishReason::Context);
        }
        s.next = Some(token);
        self.running.push(s);
    }

    /// Reports `s` finished and frees its slot (and its request's limits once it has no sequence left).
    fn finish(&mut self, mut s: Seq<'a>, reason: FinishReason) {
        let streamed = s.text.is_some();
        let rest = match (&mut s.text, &reason) {
            (Some((_, m)), FinishReason::StopString(_)) => {
                m.finish();
                String::new()
            }
            (Some((_, m)), _) => m.finish(),
            (None, _) => String::new(),
        };
        s.shown.push_str(&rest);
        let text = if streamed {
            std::mem::take(&mut s.shown)
        } else {
            self.tokenizer
                .and_then(|t| t.decode(&s.tokens).ok())
                .unwrap_or_default()
        };
        self.cache.clear(s.slot);
        self.free.push(s.slot);
        let req = s.req;
        self.events.push(Event::Finished {
            req,
            index: s.index,
            completion: Completion {
                tokens: s.tokens,
                text,
                finish: reason,
                logprobs: s.logprobs,
                prompt_logprobs: s.prompt_logprobs,
                sampled: s.sampled,
            },
            rest,
        });
        if let Some(i) = self.limits.iter().position(|l| l.req == req) {
            self.limits[i].live -= 1;
            if self.limits[i].live == 0 {
                self.limits.swap_remove(i);
            }
        }
    }
}

/// The log-probability of `token` under `softmax(logits / temperature)` (temperature 1 for greedy
/// decoding) and that distribution's entropy.
fn sampled_stats(logits: &[f32], token: u32, temperature: f64) -> (f32, f32) {
    let inv = if temperature > 0.0 { 1.0 / temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let (mut z, mut ez) = (0f64, 0f64);
    for &l in logits.iter().filter(|l| l.is_finite()) {
        let a = (l as f64 - max) * inv;
        let e = a.exp();
        z += e;
        ez += e * a;
    }
    let lse = z.ln();
    let logprob = (logits[token as usize] as f64 - max) * inv - lse;
    (logprob as f32, (lse - ez / z) as f32)
}

/// The log-probability of `token` in `logits` at temperature 1, with the `k` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut top: Vec<(u32, f32)> = vec![];
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect();
    }
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top,
    }
}

/// Runs `requests` to completion, `cfg.max_batch` sequences at a time (a request joins as soon as
/// its samples find free slots), and returns each request's completions in sample order.
/// `on_done` is called with a request's index as it finishes (for progress bars).
pub fn generate_batch(
    model: &Gpt,
    tokenizer: Option<&Tokenizer>,
    requests: Vec<Request>,
    cfg: EngineConfig,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<Vec<Completion>>> {
    // Slots as long as the longest prompt and answer need (never shorter than the context would
    // make a sequence stop).
    let longest = requests
        .iter()
        .map(|r| r.prompt.len() + r.max_new_tokens)
        .max()
        .unwrap_or(1);
    let cfg = EngineConfig {
        capacity: Some(cfg.capacity.unwrap_or(usize::MAX).min(longest)),
        ..cfg
    };
    let mut engine = Engine::new(model, tokenizer, cfg)?;
    for (i, r) in requests.iter().enumerate() {
        engine
            .validate(r)
            .map_err(|e| e.context(format!("request {}", i + 1)))?;
    }
    let mut out: Vec<Vec<Option<Completion>>> = requests.iter().map(|r| vec![None; r.samples.len()]).collect();
    let mut left: Vec<usize> = requests.iter().map(|r| r.samples.len()).collect();
    let mut ids: Vec<(RequestId, usize)> = vec![];
    let mut queue = requests.into_iter().enumerate().peekable();
    loop {
        while let Some((_, r)) = queue.peek() {
            if r.samples.len() > engine.free_slots() {
                break;
            }
            let (i, r) = queue.next().expect("peeked");
            ids.push((engine.admit(r)?, i));
        }
        if engine.is_idle() {
            break;
        }
        for e in engine.step()? {
            if let Event::Finished {
                req, index, completion, ..
            } = e
            {
                let i = ids.iter().find(|(r, _)| *r == req).expect("admitted").1;
                out[i][index] = Some(completion);
                left[i] -= 1;
                if left[i] == 0 {
                    on_done(i);
                }
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|cs| cs.into_iter().map(|c| c.expect("every sequence finishes")).collect())
        .collect())
}

/// Runs one request alone, calling `on_event` with each event as it happens; returning `false`
/// cancels the request. Returns its completions in sample order.
pub fn generate_streaming(
    model: &Gpt,
    tokenizer: Option<&Tokenizer>,
    request: Request,
    mut on_event: impl FnMut(&Event) -> bool,
) -> Result<Vec<Completion>> {
    let n = request.samples.len();
    let cfg = EngineConfig {
        max_batch: n,
        token_budget: crate::model::infer::MAX_ROWS.max(n),
        capacity: None,
    };
    let mut engine = Engine::new(model, tokenizer, cfg)?;
    let id = engine.admit(request)?;
    let mut out: Vec<Option<Completion>> = vec![None; n];
    let mut cancelled = false;
    while !engine.is_idle() {
        for e in engine.step()? {
            if !cancelled && !on_event(&e) {
                cancelled = true;
                engine.cancel(id);
            }
            if let Event::Finished { index, completion, .. } = e {
                out[index] = Some(completion);
            }
        }
    }
    Ok(out.into_iter().map(|c| c.expect("every sequence finishes")).collect())
}
