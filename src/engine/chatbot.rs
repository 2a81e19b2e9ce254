//! A chat model ready to answer: the model, its tokenizer and the chat template, with the one way
//! of turning a conversation into an engine request (used by `talaria chat`, the server and the
//! evaluations).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use super::batch::{self, Completion, Event, FinishReason, Request, Sampling};
use super::sampling::SamplingParams;
use crate::chat::{ChatTemplate, Message};
use crate::checkpoint::Checkpoint;
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;

/// A chat answer: its text and why generation ended.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// Prompt tokens after any trimming of old turns.
    pub prompt_tokens: usize,
    /// Old exchanges dropped so the prompt fits the context.
    pub dropped_turns: usize,
}

/// Everything needed to answer chat messages with a model.
pub struct Chatbot {
    pub model: Gpt,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl Chatbot {
    /// Loads a chat model from a checkpoint (which must carry a tokenizer with the chat tokens).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let ck = Checkpoint::load(path, DType::F32, device)?;
        let json = ck.tokenizer_json.as_deref().with_context(|| {
            format!(
                "{} has no tokenizer.json: chat needs a model trained with Talaria's tokenizer",
                path.display()
            )
        })?;
        let tokenizer = Tokenizer::from_json(json)?;
        let template = ChatTemplate::new(&tokenizer)?;
        Ok(Self {
            model: ck.model()?,
            tokenizer,
            template,
        })
    }

    /// A chatbot from parts already loaded.
    pub fn new(model: Gpt, tokenizer: Tokenizer) -> Result<Self> {
        let template = ChatTemplate::new(&tokenizer)?;
        Ok(Self {
            model,
            tokenizer,
            template,
        })
    }

    /// The engine request answering `messages` (which end with a user message): the prompt with
    /// the oldest exchanges dropped until it leaves room for `max_new_tokens` (at most 64 of them
    /// reserved), stopping at the end of the assistant's turn. Also returns how many exchanges
    /// were dropped.
    pub fn request(
        &self,
        messages: &[Message],
        samples: Vec<Sampling>,
        max_new_tokens: usize,
    ) -> Result<(Request, usize)> {
        let ctx = self.model.config().n_positions;
        let fit = self
            .template
            .fit_prompt(&self.tokenizer, messages, ctx, max_new_tokens.min(64))?;
        let req =
            Request::greedy(fit.ids, max_new_tokens, self.template.stop_tokens(&self.tokenizer)).with_samples(samples);
        Ok((req, fit.dropped_turns))
    }

    /// Answers the conversation, streaming text pieces to `on_text` (which returns `false` to stop).
    pub fn answer(
        &self,
        messages: &[Message],
        params: &SamplingParams,
        seed: u64,
        max_new_tokens: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let sampling = Sampling {
            params: params.clone(),
            seed,
        };
        let (mut req, dropped_turns) = self.request(messages, vec![sampling], max_new_tokens)?;
        req.stream = true;
        let prompt_tokens = req.prompt.len();
        let mut done = batch::generate_streaming(&self.model, Some(&self.tokenizer), req, |e| match e {
            Event::Token { text, .. } | Event::Finished { rest: text, .. } => text.is_empty() || on_text(text),
        })?;
        let Completion {
            tokens, text, finish, ..
        } = done.remove(0);
        Ok(Answer {
            text,
            tokens,
            finish,
            prompt_tokens,
            dropped_turns,
        })
    }
}

/// A chat model's greedy answers to conversations (each ending with a user turn), in order, and
/// whether each ended properly (an answer that never ends is returned as it is). Decoded as one batch.
pub fn chat_answers(
    model: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    conversations: &[&[Message]],
    max_new: usize,
) -> Result<Vec<(String, bool)>> {
    Ok(
        chat_samples(model, tok, template, conversations, &[Sampling::greedy()], max_new)?
            .into_iter()
            .map(|mut c| {
                let c = c.remove(0);
                (c.text, c.finish.ended())
            })
            .collect(),
    )
}

/// One completion per entry of `samples` for each conversation, the samples of one conversation
/// sharing its prefill (conversation `i` draws with seed `seed ^ mix(i)`); decoded as one batch.
pub fn chat_samples(
    model: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    conversations: &[&[Message]],
    samples: &[Sampling],
    max_new: usize,
) -> Result<Vec<Vec<Completion>>> {
    let stops = template.stop_tokens(tok);
    let requests = conversations
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let own: Vec<Sampling> = samples
                .iter()
                .map(|s| Sampling {
                    params: s.params.clone(),
                    seed: s.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                })
                .collect();
            Ok(Request::greedy(template.render_prompt(tok, m)?, max_new, stops.clone()).with_samples(own))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = batch::EngineConfig {
        max_batch: samples.len() * 32usize.div_ceil(samples.len().max(1)),
        ..batch::EngineConfig::default()
    };
    batch::generate_batch(model, Some(tok), requests, cfg, |_| {})
}
