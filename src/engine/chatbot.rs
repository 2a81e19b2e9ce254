//! A chat model ready to answer: the model, its tokenizer and the chat template, with the one way
//! of turning a conversation into an engine request (used by `talaria chat`, the server and the
//! evaluations).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use super::batch::{self, Completion, FinishReason, Request, Sampling};
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
    /// `None` for a plain completion model: a tokenizer without Talaria's chat tokens (GPT-2's).
    pub template: Option<ChatTemplate>,
}

/// Why a plain completion model cannot chat, for the CLI and the server to say.
pub const NO_CHAT_TEMPLATE: &str = "this model's tokenizer has no chat tokens (<|user|>, <|assistant|>, <|end|>), \
     so it has no chat template: it is a plain completion model that continues text";

impl Chatbot {
    /// Loads a model from a checkpoint (which must carry a tokenizer): a chat model when the
    /// tokenizer has the chat tokens, else a plain completion model.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let ck = Checkpoint::load(path, DType::F32, device)?;
        let json = ck.tokenizer_json.as_deref().with_context(|| {
            format!(
                "{} has no tokenizer.json: chat needs a model trained with Talaria's tokenizer",
                path.display()
            )
        })?;
        let tokenizer = Tokenizer::from_json(json)?;
        let template = ChatTemplate::new(&tokenizer).ok();
        Ok(Self {
            model: ck.model()?,
            tokenizer,
            template,
        })
    }

    /// A chatbot from parts already loaded; an error unless the tokenizer has the chat tokens.
    pub fn new(model: Gpt, tokenizer: Tokenizer) -> Result<Self> {
        let template = Some(ChatTemplate::new(&tokenizer)?);
        Ok(Self {
            model,
            tokenizer,
            template,
        })
    }

    /// Decodes with weights in `dtype` and keys and values in `kv`, converted once now (every
    /// answer then reuses the converted copy).
    pub fn set_dtypes(&mut self, dtype: crate::model::WeightDtype, kv: crate::model::KvDtype) -> Result<()> {
        self.model.set_decode_dtype(dtype);
        self.model.set_kv_dtype(kv);
        self.model = self.model.for_decoding()?;
        Ok(())
    }

    /// Whether the model has a chat template (otherwise it only continues text).
    pub fn is_chat(&self) -> bool {
        self.template.is_some()
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().context(NO_CHAT_TEMPLATE)
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
        let template = self.template()?;
        let ctx = self.model.config().n_positions;
        let fit = template.fit_prompt(&self.tokenizer, messages, ctx, max_new_tokens.min(64))?;
        let req = Request::greedy(fit.ids, max_new_tokens, template.stop_tokens(&self.tokenizer)).with_samples(samples);
        Ok((req, fit.dropped_turns))
    }

    /// The engine request continuing `text` as a plain completion, stopping at `<|endoftext|>`;
    /// an error naming the sizes when the text leaves no room in the context (a prompt that is
    /// only scored, `max_new_tokens` 0, may fill it).
    pub fn completion_request(&self, text: &str, samples: Vec<Sampling>, max_new_tokens: usize) -> Result<Request> {
        self.ids_request(self.tokenizer.encode(text)?, samples, max_new_tokens)
    }

    /// [`Chatbot::completion_request`] for a prompt given as token ids.
    pub fn ids_request(&self, ids: Vec<u32>, samples: Vec<Sampling>, max_new_tokens: usize) -> Result<Request> {
        let ctx = self.model.config().n_positions;
        anyhow::ensure!(
            ids.len() < ctx || (ids.len() == ctx && max_new_tokens == 0),
            "the prompt is {} tokens and the model's context is {ctx} tokens",
            ids.len()
        );
        let eot = self.tokenizer.special_id(crate::tokenizer::EOT).into_iter().collect();
        Ok(Request::greedy(ids, max_new_tokens, eot).with_samples(samples))
    }

    /// Answers the conversation, streaming text pieces to `on_text` (which returns `false` to stop).
    pub fn answer(
        &self,
        messages: &[Message],
        params: &SamplingParams,
        seed: u64,
        max_new_tokens: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let sampling = Sampling::new(params, seed);
        let (req, dropped_turns) = self.request(messages, vec![sampling], max_new_tokens)?;
        self.stream(req, dropped_turns, on_text)
    }

    /// Continues `text` as a plain completion (for models without a chat template), streaming
    /// text pieces to `on_text` as [`Chatbot::answer`] does.
    pub fn complete(
        &self,
        text: &str,
        params: &SamplingParams,
        seed: u64,
        max_new_tokens: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let req = self.completion_request(text, vec![Sampling::new(params, seed)], max_new_tokens)?;
        self.stream(req, 0, on_text)
    }

    fn stream(&self, mut req: Request, dropped_turns: usize, mut on_text: impl FnMut(&str) -> bool) -> Result<Answer> {
        req.stream = true;
        let prompt_tokens = req.prompt.len();
        let mut done = batch::generate_streaming(&self.model, Some(&self.tokenizer), req, |e| {
            e.text().is_empty() || on_text(e.text())
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
