//! Supervised fine-tuning: the pretrained model learns to answer from human demonstrations,
//! rendered by the one chat template, with the loss on the assistant's tokens only.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::chat::{ChatTemplate, Message, Role};
use crate::checkpoint::Checkpoint;
use crate::data::conversations::read_conversations;
use crate::engine::{self, EngineConfig, Request};
use crate::model::Gpt;
use crate::model::ops::target_logprobs;
use crate::tokenizer::Tokenizer;
use crate::train::ParamSet;
use crate::train::order::{EpochOrder, hold_out};
use crate::train::trainer::{self, EvalReport, Init, Objective, TrainConfig, TrainOutcome};

/// `talaria sft` settings.
#[derive(Debug, Clone)]
pub struct SftConfig {
    /// The pretrained checkpoint (it must carry a tokenizer with the chat tokens).
    pub init: PathBuf,
    /// Demonstration files (any format `data::conversations` reads).
    pub data: Vec<PathBuf>,
    /// Held-out demonstrations; when empty, `val_fraction` of `data` is held out.
    pub val_data: Vec<PathBuf>,
    pub val_fraction: f64,
    pub batch_size: usize,
    /// Rows are packed with whole conversations up to this many tokens (default: the context).
    pub seq_len: Option<usize>,
    pub train: TrainConfig,
}

/// One rendered conversation.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Demonstrations rendered and split, with what happened to each conversation.
#[derive(Debug, Default)]
pub struct SftData {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    /// Conversations shortened at a turn boundary to fit the context.
    pub truncated: usize,
    /// Conversations whose first exchange alone exceeds the context.
    pub too_long: usize,
    /// Records the readers skipped on purpose (deleted/synthetic OpenAssistant messages...).
    pub reader_skips: usize,
    /// The first user turns of two held-out conversations, answered at each evaluation.
    pub val_prompts: Vec<Vec<Message>>,
}

fn render_all(
    tok: &Tokenizer,
    template: &ChatTemplate,
    convs: &[Vec<Message>],
    max_tokens: usize,
    data: &mut SftData,
) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(convs.len());
    for c in convs {
        match template.render_truncated(tok, c, max_tokens)? {
            Some((r, kept)) => {
                if kept < c.len() {
                    data.truncated += 1;
                }
                out.push(Example {
                    ids: r.ids,
                    mask: r.mask,
                });
            }
            None => data.too_long += 1,
        }
    }
    Ok(out)
}

/// Reads, renders and splits demonstrations for rows of `max_tokens` tokens.
pub fn load_sft_data(
    tok: &Tokenizer,
    template: &ChatTemplate,
    files: &[PathBuf],
    val_files: &[PathBuf],
    val_fraction: f64,
    seed: u64,
    max_tokens: usize,
) -> Result<SftData> {
    let mut data = SftData::default();
    let read = |paths: &[PathBuf], data: &mut SftData| -> Result<Vec<Vec<Message>>> {
        let mut all = vec![];
        for p in paths {
            let c = read_conversations(p)?;
            data.reader_skips += c.skipped.len();
            all.extend(c.conversations);
        }
        Ok(all)
    };
    let mut train = read(files, &mut data)?;
    ensure!(!train.is_empty(), "no conversations in the SFT data");
    let val = if val_files.is_empty() {
        hold_out(&mut train, val_fraction, seed)?
    } else {
        read(val_files, &mut data)?
    };
    data.val_prompts = val
        .iter()
        .chain(&train)
        .filter_map(|c| first_user_turn(c))
        .take(2)
        .collect();
    data.train = render_all(tok, template, &train, max_tokens, &mut data)?;
    data.val = render_all(tok, template, &val, max_tokens, &mut data)?;
    ensure!(
        !data.train.is_empty(),
        "every SFT conversation is longer than {max_tokens} tokens"
    );
    Ok(data)
}

/// Packs examples into `rows` rows of `t + 1` tokens: whole conversations side by side, padding
/// (never trained on) at the end of a row. Returns inputs, targets and target weights, and how
/// many examples were used.
pub fn pack(
    examples: &[&Example],
    rows: usize,
    t: usize,
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let mut ids = vec![pad; rows * (t + 1)];
    let mut mask = vec![false; rows * (t + 1)];
    let mut used = 0;
    for r in 0..rows {
        let mut fill = 0;
        while used < examples.len() {
            let e = examples[used];
            if fill + e.ids.len() > t + 1 && fill > 0 {
                break;
            }
            let n = e.ids.len().min(t + 1 - fill);
            let o = r * (t + 1) + fill;
            ids[o..o + n].copy_from_slice(&e.ids[..n]);
            mask[o..o + n].copy_from_slice(&e.mask[..n]);
            fill += n;
            used += 1;
        }
    }
    let (mut x, mut y, mut w) = (vec![], vec![], vec![]);
    for r in 0..rows {
        let row = &ids[r * (t + 1)..(r + 1) * (t + 1)];
        x.extend_from_slice(&row[..t]);
        y.extend_from_slice(&row[1..]);
        w.extend(mask[r * (t + 1) + 1..(r + 1) * (t + 1)].iter().map(|&m| m as u8 as f32));
    }
    Ok((
        Tensor::from_vec(x, (rows, t), device)?,
        Tensor::from_vec(y, (rows, t), device)?,
        Tensor::from_vec(w, (rows, t), device)?,
        used,
    ))
}

/// Mean negative log-likelihood of the masked (assistant) tokens over a set of examples.
pub fn masked_loss(model: &Gpt, examples: &[Example], batch: usize, t: usize, pad: u32) -> Result<f64> {
    let refs: Vec<&Example> = examples.iter().collect();
    let (mut nats, mut count, mut at) = (0f64, 0f64, 0);
    while at < refs.len() {
        let (x, y, w, used) = pack(&refs[at..], batch, t, pad, model.device())?;
        at += used;
        let picked = target_logprobs(&model.forward(&x)?, &y)?;
        nats -= (picked * &w)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(nats / count.max(1.0))
}

struct Sft {
    data: SftData,
    cursor: EpochOrder,
    val_prompts: Vec<Vec<Message>>,
    batch: usize,
    t: usize,
    pad: u32,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    device: Device,
}

impl Sft {
    /// The next packed rows `(x, y, weights)`: enough upcoming examples to fill the batch; the
    /// cursor then moves past those used.
    fn next_rows(&mut self) -> Result<(Tensor, Tensor, Tensor)> {
        let mut peek = self.cursor.clone();
        let (need, mut tokens, mut upcoming) = (self.batch * (self.t + 1), 0, vec![]);
        while tokens < need {
            let e = &self.data.train[peek.next()];
            tokens += e.ids.len();
            upcoming.push(e);
        }
        let (x, y, w, used) = pack(&upcoming, self.batch, self.t, self.pad, &self.device)?;
        for _ in 0..used {
            self.cursor.next();
        }
        Ok((x, y, w))
    }
}

impl Objective for Sft {
    type Batch = (Tensor, Tensor, Tensor);

    fn stage(&self) -> &'static str {
        "sft"
    }

    fn next(&mut self) -> Result<(Tensor, Tensor, Tensor)> {
        self.next_rows()
    }

    fn loss(&self, (x, y, w): &(Tensor, Tensor, Tensor), model: &Gpt, _params: &ParamSet) -> Result<(Tensor, usize)> {
        Ok((model.lm_loss(x, y, Some(w))?, x.elem_count()))
    }

    fn evaluate(&mut self, model: &Gpt, _params: &ParamSet) -> Result<EvalReport> {
        let mut values = vec![];
        if !self.data.val.is_empty() {
            values.push((
                "val_loss",
                masked_loss(model, &self.data.val, self.batch, self.t, self.pad)?,
            ));
        }
        let stops = self.template.stop_tokens(&self.tokenizer);
        let requests = self
            .val_prompts
            .iter()
            .map(|msgs| {
                Ok(Request::greedy(
                    self.template.render_prompt(&self.tokenizer, msgs)?,
                    48,
                    stops.clone(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let done = engine::generate_batch(
            &model.detached(),
            Some(&self.tokenizer),
            requests,
            EngineConfig::default(),
            |_| {},
        )?;
        let mut samples = vec![];
        for (msgs, c) in self.val_prompts.iter().zip(done) {
            let ended = if c[0].finish.ended() { "" } else { " [no end token]" };
            let question = &msgs[msgs.len() - 1].content;
            samples.push(format!("{question} >>> {}{ended}", c[0].text));
        }
        Ok(EvalReport { values, samples })
    }

    fn state(&self) -> Value {
        self.cursor.state()
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        self.cursor.restore(state)
    }
}

/// Runs SFT; the chat model ends up in `train.out/checkpoint`.
pub fn sft(cfg: &SftConfig) -> Result<TrainOutcome> {
    ensure!(cfg.batch_size >= 1, "--batch-size must be at least 1");
    let ck = Checkpoint::load(&cfg.init, DType::F32, &cfg.train.device)?;
    let tok_json = ck.tokenizer_json.clone().with_context(|| {
        format!(
            "{} has no tokenizer.json; SFT needs the chat tokens",
            cfg.init.display()
        )
    })?;
    let tokenizer = Tokenizer::from_json(&tok_json)?;
    let template = ChatTemplate::new(&tokenizer)?;
    let t = cfg.seq_len.unwrap_or(ck.config.n_positions);
    ensure!(
        t <= ck.config.n_positions,
        "--seq-len {t} exceeds the model's context of {}",
        ck.config.n_positions
    );
    let data = load_sft_data(
        &tokenizer,
        &template,
        &cfg.data,
        &cfg.val_data,
        cfg.val_fraction,
        cfg.train.seed,
        t + 1,
    )?;
    let main_rank = crate::train::collective::is_main();
    if main_rank && data.truncated + data.too_long + data.reader_skips > 0 {
        eprintln!(
            "sft: {} conversations truncated at a turn boundary, {} longer than {} tokens left out, {} records skipped by the readers",
            data.truncated,
            data.too_long,
            t + 1,
            data.reader_skips
        );
    }
    if main_rank {
        eprintln!(
            "sft: {} training and {} held-out conversations",
            data.train.len(),
            data.val.len()
        );
    }
    let pad = tokenizer.special_id(crate::tokenizer::EOT).unwrap_or(template.end);
    let mut config = ck.config.clone();
    config.eos_token_id = Some(template.end);
    let cursor = EpochOrder::new(cfg.train.seed, data.train.len(), 0, 0);
    let val_prompts = data.val_prompts.clone();
    let mut objective = Sft {
        data,
        cursor,
        val_prompts,
        batch: cfg.batch_size,
        t,
        pad,
        tokenizer,
        template,
        device: cfg.train.device.clone(),
    };
    let init = Init {
        params: ParamSet::from_weights(&config, &ck.weights)?,
        tokenizer_json: Some(tok_json),
        parent: Some(cfg.init.display().to_string()),
    };
    trainer::train(&cfg.train, init, &mut objective)
}

/// A conversation up to its first user message: a prompt to answer.
pub fn first_user_turn(messages: &[Message]) -> Option<Vec<Message>> {
    let i = messages.iter().position(|m| m.role == Role::User)?;
    Some(messages[..=i].to_vec())
}
