//! THE chat template: the only code that turns a conversation into token ids (with the loss
//! mask used in training) and the only code that renders a prompt for generation. SFT, reward
//! modelling, RLHF, evaluation, the engine and the server all call it, so training and inference
//! can never disagree about the format.
//!
//! ```text
//! <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...
//! ```
//!
//! Message text is tokenized on its own with special-token strings treated as plain text, so a
//! user who types `<|end|>` cannot end a turn. The loss mask covers the assistant's tokens and its
//! `<|end|>` only (assistant messages with OpenAI's `"weight": 0` stay in the context untrained).

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{self, Tokenizer};

/// [`ChatTemplate::render_prompt`] and [`ChatTemplate::render`] as a Jinja template, for the
/// `chat_template` of an exported `tokenizer_config.json` and GGUF file: what
/// `transformers`' `apply_chat_template` and llama.cpp render from it are the same special tokens
/// and texts (tests/interop.rs checks the ids). It checks the roles as [`validate`] does.
pub fn jinja_template() -> String {
    let opener = format!(
        "{{'system': '{}', 'user': '{}', 'assistant': '{}'}}",
        tokenizer::SYSTEM,
        tokenizer::USER,
        tokenizer::ASSISTANT
    );
    [
        format!("{{{{- '{}' -}}}}", tokenizer::BOS),
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}".to_string(),
        "{%- if messages | length <= offset -%}{{- raise_exception('the conversation has no user message') -}}{%- endif -%}"
            .to_string(),
        "{%- for message in messages -%}".to_string(),
        "{%- set want = 'system' if loop.index0 < offset else ('user' if (loop.index0 - offset) % 2 == 0 else 'assistant') -%}"
            .to_string(),
        "{%- if message['role'] != want -%}{{- raise_exception('roles alternate user/assistant after an optional system message') -}}{%- endif -%}"
            .to_string(),
        format!("{{{{- {opener}[message['role']] + message['content'] + '{}' -}}}}", tokenizer::END),
        "{%- endfor -%}".to_string(),
        "{%- if add_generation_prompt and messages[-1]['role'] != 'user' -%}{{- raise_exception('a prompt for an answer must end with a user message') -}}{%- endif -%}".to_string(),
        format!("{{%- if add_generation_prompt -%}}{{{{- '{}' -}}}}{{%- endif -%}}", tokenizer::ASSISTANT),
    ]
    .concat()
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Parses a role name, naming the accepted ones in the error.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "system" => Ok(Self::System),
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            other => bail!("unknown role {other:?} (expected \"system\", \"user\" or \"assistant\")"),
        }
    }
}

/// One message of a conversation (the OpenAI shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// OpenAI's fine-tuning `weight`: an assistant message with weight 0 stays in the context
    /// but is not trained on (e.g. the wrong first answer of a correction dialogue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            weight: None,
        }
    }

    /// Whether SFT trains on this message.
    pub fn trained(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0)
    }
}

/// Checks the shape of a conversation: an optional system message first, then user and
/// assistant turns alternating, starting with the user.
pub fn validate(messages: &[Message]) -> Result<()> {
    let body = match messages.first() {
        Some(m) if m.role == Role::System => &messages[1..],
        _ => messages,
    };
    ensure!(!body.is_empty(), "the conversation has no user message");
    for (i, m) in body.iter().enumerate() {
        let want = if i % 2 == 0 { Role::User } else { Role::Assistant };
        ensure!(
            m.role == want,
            "message {} has role {:?} where {:?} was expected (roles alternate user/assistant after an optional system message)",
            i + messages.len() - body.len() + 1,
            m.role,
            want
        );
    }
    Ok(())
}

/// A rendered conversation: token ids and, for each, whether training predicts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    /// `true` where the token is an assistant token or an assistant's closing `<|end|>`.
    pub mask: Vec<bool>,
}

/// The conversation without its oldest exchanges, dropping as few as `fits` allows: system
/// messages and the last user turn always stay, and a user turn leaves together with the answers
/// after it. Returns the kept messages and how many user turns were dropped, or `None` when even
/// the last user turn alone does not fit; when it returns some, its last call of `fits` was on
/// them. The one place that shortens a conversation to fit a
/// context (prompts for generation, reward-model and DPO data).
pub fn drop_oldest_turns(
    messages: &[Message],
    mut fits: impl FnMut(&[Message]) -> Result<bool>,
) -> Result<Option<(Vec<Message>, usize)>> {
    let system: Vec<Message> = messages.iter().filter(|m| m.role == Role::System).cloned().collect();
    let turns: Vec<&Message> = messages.iter().filter(|m| m.role != Role::System).collect();
    let starts: Vec<usize> = (0..turns.len()).filter(|&i| turns[i].role == Role::User).collect();
    let candidate = |dropped: usize| -> Vec<Message> {
        if dropped == 0 {
            messages.to_vec()
        } else {
            system
                .iter()
                .cloned()
                .chain(turns[starts[dropped]..].iter().map(|m| (*m).clone()))
                .collect()
        }
    };
    if starts.is_empty() {
        return Ok(None);
    }
    // Keeping fewer turns never makes a conversation longer, so the fewest turns to drop can be
    // found by bisection: a huge history costs a few renders, not one per exchange.
    let first = candidate(0);
    if fits(&first)? {
        return Ok(Some((first, 0)));
    }
    let (mut bad, mut good, mut last) = (0, starts.len(), 0);
    while good - bad > 1 {
        let mid = (bad + good) / 2;
        last = mid;
        if fits(&candidate(mid))? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    if good == starts.len() {
        return Ok(None);
    }
    let kept = candidate(good);
    // The last call of `fits` is always on the conversation returned (callers keep its renders).
    if last != good {
        fits(&kept)?;
    }
    Ok(Some((kept, good)))
}

/// A prompt for generation that fits the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FittedPrompt {
    pub ids: Vec<u32>,
    /// Oldest exchanges left out so the prompt fits.
    pub dropped_turns: usize,
}

/// The special-token ids of the chat format, looked up once from a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatTemplate {
    pub bos: u32,
    pub system: u32,
    pub user: u32,
    pub assistant: u32,
    pub end: u32,
    /// The most bytes one token decodes to: a text of `b` bytes is at least `b / max_token_bytes`
    /// tokens, which lets [`ChatTemplate::fit_prompt`] skip hopeless renders of a huge history.
    pub max_token_bytes: usize,
}

impl ChatTemplate {
    /// The template for a tokenizer; an error if it lacks a chat token (e.g. GPT-2's).
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            tok.special_id(t).with_context(|| {
                format!("the tokenizer has no {t} token: chat needs a tokenizer trained by `talaria tokenizer train`, which reserves the chat tokens")
            })
        };
        Ok(Self {
            bos: id(tokenizer::BOS)?,
            system: id(tokenizer::SYSTEM)?,
            user: id(tokenizer::USER)?,
            assistant: id(tokenizer::ASSISTANT)?,
            end: id(tokenizer::END)?,
            max_token_bytes: tok.token_byte_lengths().into_iter().max().unwrap_or(1).max(1) as usize,
        })
    }

    fn opener(&self, role: Role) -> u32 {
        match role {
            Role::System => self.system,
            Role::User => self.user,
            Role::Assistant => self.assistant,
        }
    }

    /// Renders a whole conversation for training, with its loss mask.
    pub fn render(&self, tok: &Tokenizer, messages: &[Message]) -> Result<Rendered> {
        validate(messages)?;
        let mut ids = vec![self.bos];
        let mut mask = vec![false];
        for m in messages {
            let trained = m.trained();
            ids.push(self.opener(m.role));
            mask.push(false);
            let text = tok.encode(&m.content)?;
            mask.extend(std::iter::repeat_n(trained, text.len()));
            ids.extend(text);
            ids.push(self.end);
            mask.push(trained);
        }
        Ok(Rendered { ids, mask })
    }

    /// Renders the history so far (ending with a user message) followed by the assistant
    /// opener: the prompt from which the model writes its answer, up to `<|end|>`.
    pub fn render_prompt(&self, tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        validate(messages)?;
        ensure!(
            messages.last().is_some_and(|m| m.role == Role::User),
            "a prompt for an answer must end with a user message"
        );
        let mut ids = self.render(tok, messages)?.ids;
        ids.push(self.assistant);
        Ok(ids)
    }

    /// The prompt for `messages` (ending with a user message) within a context of `ctx` tokens,
    /// leaving room for `reserve` new ones: the oldest exchanges are dropped as needed
    /// ([`drop_oldest_turns`]); an error when the last user turn alone is too long.
    pub fn fit_prompt(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        ctx: usize,
        reserve: usize,
    ) -> Result<FittedPrompt> {
        let room = ctx.saturating_sub(reserve.max(1));
        // The size of the last candidate tried: the last user turn alone when nothing fits.
        let mut last = 0;
        let fitted = drop_oldest_turns(messages, |ms| {
            // Every message costs its opener and end tokens, and its text at least this much.
            let bytes: usize = ms.iter().map(|m| m.content.len()).sum();
            last = 2 * ms.len() + bytes.div_ceil(self.max_token_bytes);
            if last > room {
                return Ok(false);
            }
            last = self.render_prompt(tok, ms)?.len();
            Ok(last <= room)
        })?;
        match fitted {
            Some((ms, dropped_turns)) => Ok(FittedPrompt {
                ids: self.render_prompt(tok, &ms)?,
                dropped_turns,
            }),
            None => {
                validate(messages)?;
                bail!("the message is too long: at least {last} tokens, and the model's context is {ctx} tokens")
            }
        }
    }

    /// Tokens that end an assistant answer.
    pub fn stop_tokens(&self, tok: &Tokenizer) -> Vec<u32> {
        let mut v = vec![self.end];
        v.extend(tok.special_id(tokenizer::EOT));
        v
    }

    /// Renders `messages` for training, keeping the longest prefix that fits in `max_tokens`
    /// and ends after an assistant turn. `None` when even the first exchange does not fit.
    /// Returns the number of messages kept too, so callers can count truncations.
    pub fn render_truncated(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        max_tokens: usize,
    ) -> Result<Option<(Rendered, usize)>> {
        let full = self.render(tok, messages)?;
        if full.ids.len() <= max_tokens {
            return Ok(Some((full, messages.len())));
        }
        let mut keep = messages.len();
        while keep > 0 {
            keep -= 1;
            if keep == 0 || messages[keep - 1].role != Role::Assistant {
                continue;
            }
            let r = self.render(tok, &messages[..keep])?;
            if r.ids.len() <= max_tokens {
                return Ok(Some((r, keep)));
            }
        }
        Ok(None)
    }
}
