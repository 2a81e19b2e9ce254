//! Generation: prefill the prompt into the KV cache, decode one token at a time, sample, and
//! stream each token to a callback as soon as it exists.

use anyhow::{Result, bail, ensure};
use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::model::{Gpt, last_logits};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::plain(0.0)
    }

    /// Sampling from the whole distribution at `temperature` (no top-k or top-p cut), as RL needs:
    /// its loss scores the same distribution the answers were drawn from.
    pub fn plain(temperature: f64) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
        }
    }

    /// Rejects values that have no meaning, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            bail!("temperature must be between 0 and 100, got {}", self.temperature);
        }
        if self.top_k == Some(0) {
            bail!("top_k must be at least 1");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("top_p must be in (0, 1], got {p}");
        }
        Ok(())
    }
}

/// A seeded sampler: the same seed and logits give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p;
                    cum >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u: f64 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return cand[i].0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (it is not included in the output).
    Stop,
    /// `max_new_tokens` were produced.
    Length,
    /// Prompt and answer fill the model's context.
    Context,
    /// The token callback asked to stop (a client went away, a stop string matched).
    Cancelled,
}

/// The generated tokens and why generation ended.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Limits of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end generation (usually the end-of-text or end-of-turn token).
    pub stop_tokens: Vec<u32>,
}

fn check_prompt(model: &Gpt, prompt: &[u32]) -> Result<()> {
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one token");
    model.check_input(prompt, 0)
}

/// Generates a continuation of `prompt` with the KV cache. `on_token` sees each new token as it
/// is produced and returns `false` to stop early.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    check_prompt(model, prompt)?;
    let ctx = model.config().n_positions;
    let mut cache = model.new_cache(1, ctx)?;
    let device = model.device();
    let mut tokens = Vec::new();
    let mut logits = model.forward(&Tensor::new(prompt, device)?.unsqueeze(0)?, Some(&mut cache))?;
    loop {
        if tokens.len() >= opts.max_new_tokens {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Length,
            });
        }
        let row = last_logits(&logits)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&row);
        if opts.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        tokens.push(next);
        if !on_token(next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Cancelled,
            });
        }
        if prompt.len() + tokens.len() >= ctx {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Context,
            });
        }
        logits = model.forward(&Tensor::new(&[next], device)?.unsqueeze(0)?, Some(&mut cache))?;
    }
}

/// The same as [`generate`] but recomputing the whole sequence at every step, without a cache:
/// the reference the cached path is tested against.
pub fn generate_uncached(
    model: &Gpt,
    prompt: &[u32],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
) -> Result<Generation> {
    check_prompt(model, prompt)?;
    let ctx = model.config().n_positions;
    let mut seq = prompt.to_vec();
    let mut tokens = Vec::new();
    loop {
        if tokens.len() >= opts.max_new_tokens {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Length,
            });
        }
        let logits = model.forward(&Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?, None)?;
        let row = last_logits(&logits)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&row);
        if opts.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        tokens.push(next);
        seq.push(next);
        if seq.len() >= ctx {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Context,
            });
        }
    }
}

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters: a
/// multi-byte character split across tokens is held back until it is complete.
pub struct TextStream<'a> {
    tokenizer: &'a crate::tokenizer::Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a crate::tokenizer::Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token and returns the newly completed text, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 5.0,
                top_k: Some(1),
                top_p: None,
            },
            7,
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: Some(0.7),
            },
            1,
        )
        .unwrap();
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 400 && seen[0] > 1200, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, 2f32.ln()]; // p = [1/3, 2/3]
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed).unwrap();
            (0..3000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 3000.0;
        assert!((ones - 2.0 / 3.0).abs() < 0.03, "{ones}");
    }

    #[test]
    fn invalid_params_are_named() {
        for (p, want) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    temperature: f64::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
        ] {
            let e = Sampler::new(p, 0).err().unwrap().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}

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
    pub tokenizer: crate::tokenizer::Tokenizer,
    pub template: crate::chat::ChatTemplate,
}

impl Chatbot {
    /// Loads a chat model from a checkpoint (which must carry a tokenizer with the chat tokens).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let ck = crate::checkpoint::Checkpoint::load(path, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let json = ck.tokenizer_json.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no tokenizer.json: chat needs a model trained with Talaria's tokenizer",
                path.display()
            )
        })?;
        let tokenizer = crate::tokenizer::Tokenizer::from_json(json)?;
        let template = crate::chat::ChatTemplate::new(&tokenizer)?;
        Ok(Self {
            model: ck.model()?,
            tokenizer,
            template,
        })
    }

    /// The prompt for `messages`, dropping the oldest exchanges (never the system message or
    /// the last user message) until the prompt leaves room for `reserve` new tokens.
    pub fn prompt_for(&self, messages: &[crate::chat::Message], reserve: usize) -> Result<(Vec<u32>, usize)> {
        use crate::chat::Role;
        let ctx = self.model.config().n_positions;
        let sys = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
        let mut dropped = 0;
        let mut msgs = messages.to_vec();
        loop {
            let ids = self.template.render_prompt(&self.tokenizer, &msgs)?;
            if ids.len() + reserve.max(1) <= ctx {
                return Ok((ids, dropped));
            }
            if msgs.len() - sys <= 1 {
                bail!(
                    "the message is too long: {} tokens, and the model's context is {ctx} tokens",
                    ids.len()
                );
            }
            msgs.drain(sys..sys + 2);
            dropped += 1;
        }
    }

    /// Answers the conversation (which ends with a user message), streaming text pieces to
    /// `on_text` (which returns `false` to stop).
    pub fn answer(
        &self,
        messages: &[crate::chat::Message],
        params: &SamplingParams,
        seed: u64,
        max_new_tokens: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let (prompt, dropped_turns) = self.prompt_for(messages, max_new_tokens.min(64))?;
        let opts = GenerateOptions {
            max_new_tokens,
            stop_tokens: self.template.stop_tokens(&self.tokenizer),
        };
        let mut sampler = Sampler::new(params.clone(), seed)?;
        let mut stream = TextStream::new(&self.tokenizer);
        let mut err = None;
        let g = generate(&self.model, &prompt, &opts, &mut sampler, |id| match stream.push(id) {
            Ok(piece) => piece.is_empty() || on_text(&piece),
            Err(e) => {
                err = Some(e);
                false
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        Ok(Answer {
            text: self.tokenizer.decode(&g.tokens)?,
            tokens: g.tokens,
            finish: g.finish,
            prompt_tokens: prompt.len(),
            dropped_turns,
        })
    }
}
