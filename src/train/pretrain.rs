//! Pretraining: next-token prediction on token shards (the unsupervised stage of GPT-1/2/3),
//! with validation loss and tokenizer-independent bits per byte.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::checkpoint::{self, Checkpoint};
use crate::data::shards::{LoaderPosition, Split, TokenLoader};
use crate::engine::{self, EngineConfig, Request, Sampling, SamplingParams};
use crate::model::ops::target_logprobs;
use crate::model::{Gpt, GptConfig, init_weights};
use crate::tokenizer::Tokenizer;
use crate::train::ParamSet;
use crate::train::trainer::{self, EvalReport, Init, Objective, TrainConfig, TrainOutcome};

/// `talaria pretrain` settings.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// A directory written by `talaria data prepare` (shards, tokenizer.json).
    pub data: PathBuf,
    /// A model preset (`talaria::model::PRESETS`); its vocabulary comes from the tokenizer.
    pub model: String,
    /// The tokenizer, when the data directory has none.
    pub tokenizer: Option<PathBuf>,
    /// Start from this checkpoint's weights instead of a fresh initialisation.
    pub init: Option<PathBuf>,
    pub batch_size: usize,
    /// Training sequence length (default: the model's context).
    pub seq_len: Option<usize>,
    /// Validation batches per evaluation.
    pub val_batches: usize,
    /// Sampled continuations shown at each evaluation.
    pub samples: usize,
    pub train: TrainConfig,
}

struct Pretrain {
    train: TokenLoader,
    val: TokenLoader,
    batch: usize,
    val_batches: usize,
    samples: usize,
    token_bytes: Vec<u32>,
    tokenizer: Option<Tokenizer>,
    device: Device,
}

/// Sum of next-token negative log-likelihoods (nats) per position `[B, T]` (no gradient needed).
fn token_nll(model: &Gpt, x: &Tensor, y: &Tensor) -> Result<Vec<f32>> {
    let picked = target_logprobs(&model.forward(x)?, y)?;
    Ok(picked.neg()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl Objective for Pretrain {
    type Batch = (Tensor, Tensor);

    fn stage(&self) -> &'static str {
        "pretrain"
    }

    fn next(&mut self) -> Result<(Tensor, Tensor)> {
        self.train.next_batch(self.batch, &self.device)
    }

    fn loss(&self, (x, y): &(Tensor, Tensor), model: &Gpt, _params: &ParamSet) -> Result<(Tensor, usize)> {
        Ok((model.lm_loss(x, y, None)?, x.elem_count()))
    }

    fn evaluate(&mut self, model: &Gpt, _params: &ParamSet) -> Result<EvalReport> {
        let windows = (self.val_batches * self.batch).min(self.val.num_windows());
        let (mut nats, mut count, mut bytes) = (0f64, 0usize, 0u64);
        for chunk in (0..windows).collect::<Vec<_>>().chunks(self.batch) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&w| self.val.window(w)).collect();
            let t = seqs[0].len() - 1;
            let xs: Vec<u32> = seqs.iter().flat_map(|s| s[..t].to_vec()).collect();
            let ys: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
            let x = Tensor::from_vec(xs, (seqs.len(), t), &self.device)?;
            let y = Tensor::from_vec(ys.clone(), (seqs.len(), t), &self.device)?;
            let nll = token_nll(model, &x, &y)?;
            nats += nll.iter().map(|&v| v as f64).sum::<f64>();
            count += nll.len();
            bytes += ys
                .iter()
                .map(|&id| self.token_bytes.get(id as usize).copied().unwrap_or(0) as u64)
                .sum::<u64>();
        }
        let val_loss = nats / count.max(1) as f64;
        let mut values = vec![("val_loss", val_loss)];
        if bytes > 0 {
            values.push(("val_bpb", nats / std::f64::consts::LN_2 / bytes as f64));
        }
        let mut samples = vec![];
        if let Some(tok) = &self.tokenizer {
            let prompts: Vec<Vec<u32>> = (0..self.samples.min(self.val.num_windows()))
                .map(|i| self.val.window(i).into_iter().take(8).collect())
                .collect();
            let requests = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let params = SamplingParams {
                        temperature: 0.8,
                        top_k: Some(50),
                        top_p: None,
                    };
                    Request::greedy(p.clone(), 32, vec![]).with_samples(vec![Sampling { params, seed: i as u64 }])
                })
                .collect();
            let done = engine::generate_batch(&model.detached(), Some(tok), requests, EngineConfig::default(), |_| {})?;
            for (p, c) in prompts.iter().zip(done) {
                samples.push(format!("{} >>> {}", tok.decode(p)?, c[0].text));
            }
        }
        Ok(EvalReport { values, samples })
    }

    fn state(&self) -> Value {
        json!({"train_position": self.train.position()})
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let pos: LoaderPosition =
            serde_json::from_value(state["train_position"].clone()).context("checkpoint lacks the data position")?;
        self.train.restore(pos)
    }
}

/// Runs pretraining; the model ends up in `train.out/checkpoint`.
pub fn pretrain(cfg: &PretrainConfig) -> Result<TrainOutcome> {
    ensure!(cfg.batch_size >= 1, "--batch-size must be at least 1");
    let tok_path = match &cfg.tokenizer {
        Some(p) => p.clone(),
        None => cfg.data.join(checkpoint::TOKENIZER_FILE),
    };
    let tokenizer_json = if tok_path.exists() {
        Some(std::fs::read_to_string(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?)
    } else if cfg.tokenizer.is_some() {
        bail!("tokenizer {} does not exist", tok_path.display());
    } else {
        None
    };
    let tokenizer = tokenizer_json.as_deref().map(Tokenizer::from_json).transpose()?;

    let (config, weights, parent) = match &cfg.init {
        Some(init) => {
            let ck = Checkpoint::load(init, DType::F32, &cfg.train.device)?;
            (ck.config, ck.weights, Some(init.display().to_string()))
        }
        None => {
            let mut c = GptConfig::preset(&cfg.model)?;
            if let Some(t) = &tokenizer {
                c.vocab_size = t.vocab_size();
                let eot = t.special_id(crate::tokenizer::EOT);
                c.eos_token_id = eot;
                c.bos_token_id = eot;
            }
            let w = init_weights(&c, cfg.train.seed, DType::F32, &cfg.train.device)?;
            (c, w, None)
        }
    };
    let seq_len = cfg.seq_len.unwrap_or(config.n_positions);
    ensure!(
        seq_len <= config.n_positions,
        "--seq-len {seq_len} exceeds the model's context of {} tokens",
        config.n_positions
    );
    let train = TokenLoader::open(&cfg.data, Split::Train, seq_len, cfg.train.seed)?;
    let val = TokenLoader::open(&cfg.data, Split::Val, seq_len, cfg.train.seed)?;
    ensure!(
        train.vocab_size() <= config.vocab_size,
        "the shards in {} use a vocabulary of {} tokens but the model has {}",
        cfg.data.display(),
        train.vocab_size(),
        config.vocab_size
    );
    let token_bytes = tokenizer
        .as_ref()
        .map(Tokenizer::token_byte_lengths)
        .unwrap_or_default();
    let mut objective = Pretrain {
        train,
        val,
        batch: cfg.batch_size,
        val_batches: cfg.val_batches.max(1),
        samples: cfg.samples,
        token_bytes,
        tokenizer,
        device: cfg.train.device.clone(),
    };
    let init = Init {
        params: ParamSet::from_weights(&config, &weights)?,
        tokenizer_json,
        parent,
    };
    trainer::train(&cfg.train, init, &mut objective)
}
