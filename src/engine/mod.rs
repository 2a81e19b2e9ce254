//! Generation, for every caller: `talaria generate` and `chat`, the server, PPO's rollouts,
//! labelling and evaluation all decode through the batched [`Engine`].
//!
//! - [`batch`]: the engine itself: KV slots, packed prefill and decode steps, per-sequence
//!   sampling, stop tokens and strings, finish reasons, log-probabilities; [`generate_batch`] for
//!   offline work and [`generate_streaming`] for one request at a time.
//! - [`sampling`]: greedy, temperature, top-k and top-p sampling with a seeded stream per sequence.
//! - [`stream`]: token ids to text pieces, stop strings cut out of them, and pieces written to a terminal.
//! - [`chatbot`]: a chat model with its tokenizer and template, and the one way a conversation
//!   becomes a request.

pub mod batch;
pub mod chatbot;
pub mod sampling;
pub mod stream;

pub use batch::{
    Completion, Engine, EngineConfig, Event, FinishReason, Request, RequestId, Sampling, TokenLogprob, generate_batch,
    generate_streaming,
};
pub use chatbot::{Answer, Chatbot, NO_CHAT_TEMPLATE, chat_answers, chat_samples};
pub use sampling::{Sampler, SamplingParams, argmax};
pub use stream::{StopMatcher, TextStream, WriteSink};
