//! `talaria generate`, `talaria chat`, `talaria serve` and `talaria feedback export`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::{Args, Subcommand};

use talaria::checkpoint::Checkpoint;
use talaria::engine::{self, Chatbot, FinishReason, Request, Sampling, SamplingParams, WriteSink};
use talaria::serve;
use talaria::terminal::{self, ChatOptions};
use talaria::tokenizer::Tokenizer;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Chat checkpoint (or run directory).
    ckpt: PathBuf,
    #[command(flatten)]
    device: super::DeviceArg,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// SQLite database for the feedback people give on the page (created if absent).
    #[arg(long, default_value = "feedback.sqlite")]
    db: PathBuf,
    /// Sequences decoded together at most (each holds a KV cache slot of the full context).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Tokens through the model per step at most: the running sequences' next tokens, then
    /// chunks of new prompts.
    #[arg(long, default_value_t = talaria::model::infer::MAX_ROWS)]
    max_batch_tokens: usize,
    /// Requests waiting for a place in the batch; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// The precision generation reads the weights in: f32, f16, bf16 or q8 (log-probabilities are
    /// those of the model in that precision).
    #[arg(long, default_value = "f32")]
    dtype: talaria::model::WeightDtype,
    /// The element type of the KV cache: f32 or f16 (half the memory per sequence).
    #[arg(long, default_value = "f32")]
    kv_dtype: talaria::model::KvDtype,
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (without this flag
    /// or --api-key-file, the key is read from TALARIA_API_KEY when it is set).
    #[arg(long, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Allow this origin (e.g. https://example.org) to call the API from a browser (CORS).
    #[arg(long)]
    cors_origin: Option<String>,
    /// Seconds a request may take to start its response (408 beyond).
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Requests being handled at once (until their response starts; a stream then runs on in the
    /// batch, bounded by --max-batch and --queue); more get a 503.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

#[derive(Subcommand)]
pub(crate) enum FeedbackCmd {
    /// Write demonstrations for `talaria sft` and preferences for the reward stage.
    Export {
        #[arg(long)]
        db: PathBuf,
        /// Conversations JSONL (`{"messages": [...]}`) from the demonstrations.
        #[arg(long)]
        sft: Option<PathBuf>,
        /// Preferences JSONL: pairs from comparisons and thumbs, K-way rankings.
        #[arg(long)]
        prefs: Option<PathBuf>,
        /// Only judgements of answers by this model (its name in the API: the checkpoint's directory).
        #[arg(long)]
        model: Option<String>,
        /// Only judgements of answers by these weights: their SHA-256 (at least 8 leading hex digits),
        /// as `talaria serve` prints it at start-up.
        #[arg(long)]
        digest: Option<String>,
    },
}

#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// Checkpoint directory.
    ckpt: PathBuf,
    #[command(flatten)]
    device: super::DeviceArg,
    /// The prompt as text (needs a checkpoint with a tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 5,17,404.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print only the generated token ids, space-separated, on one line.
    #[arg(long)]
    ids: bool,
    /// The precision generation reads the weights in: f32, f16, bf16 or q8.
    #[arg(long, default_value = "f32")]
    dtype: talaria::model::WeightDtype,
    /// The element type of the KV cache: f32 or f16 (half the memory per sequence).
    #[arg(long, default_value = "f32")]
    kv_dtype: talaria::model::KvDtype,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// Chat checkpoint (or run directory).
    ckpt: PathBuf,
    #[command(flatten)]
    device: super::DeviceArg,
    /// Answer this message once and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The precision generation reads the weights in: f32, f16, bf16 or q8.
    #[arg(long, default_value = "f32")]
    dtype: talaria::model::WeightDtype,
    /// The element type of the KV cache: f32 or f16 (half the memory per sequence).
    #[arg(long, default_value = "f32")]
    kv_dtype: talaria::model::KvDtype,
}

impl ServeArgs {
    pub(crate) fn run(self) -> Result<()> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(f)) => {
                let text =
                    std::fs::read_to_string(f).with_context(|| format!("reading --api-key-file {}", f.display()))?;
                Some(text.lines().next().unwrap_or_default().trim().to_string())
            }
            (None, None) => std::env::var("TALARIA_API_KEY").ok(),
        };
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            bail!(
                "--request-timeout must be a positive number of seconds, got {}",
                self.request_timeout
            );
        }
        if api_key.as_deref().is_some_and(str::is_empty) {
            bail!("the API key is empty: give a non-empty --api-key, --api-key-file or TALARIA_API_KEY");
        }
        serve::serve(&serve::ServeConfig {
            device: self.device.device()?,
            ckpt: self.ckpt,
            host: self.host,
            port: self.port,
            db: self.db,
            scheduler: serve::scheduler::SchedulerConfig {
                max_batch: self.max_batch,
                token_budget: self.max_batch_tokens,
                queue: self.queue,
            },
            dtype: self.dtype,
            kv_dtype: self.kv_dtype,
            access: serve::Access {
                api_key,
                cors_origin: self.cors_origin,
                request_timeout: std::time::Duration::from_secs_f64(self.request_timeout),
                max_connections: self.max_connections,
            },
        })
    }
}

impl FeedbackCmd {
    pub(crate) fn run(self) -> Result<()> {
        let FeedbackCmd::Export {
            db,
            sft,
            prefs,
            model,
            digest,
        } = self;
        let filter = serve::feedback::SourceFilter { model, digest };
        let s = serve::feedback::export(&db, sft.as_deref(), prefs.as_deref(), &filter)?;
        println!(
            "exported {} demonstrations; {} comparisons, {} rankings and {} pairs from thumbs ({} thumbs unpaired)",
            s.demonstrations, s.comparisons, s.rankings, s.thumbs_pairs, s.thumbs_unpaired
        );
        Ok(())
    }
}

impl ChatArgs {
    pub(crate) fn run(self) -> Result<()> {
        let mut bot = Chatbot::load(&self.ckpt, &self.device.device()?)?;
        bot.set_dtypes(self.dtype, self.kv_dtype)?;
        let opts = ChatOptions {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: (self.top_k > 0).then_some(self.top_k),
                top_p: self.top_p,
            },
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            system: self.system,
            interactive: self.prompt.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin()),
        };
        let mut out = std::io::stdout().lock();
        match self.prompt {
            Some(p) => terminal::run(&bot, opts, &mut std::io::Cursor::new(format!("{p}\n")), &mut out),
            None => terminal::run(&bot, opts, &mut std::io::stdin().lock(), &mut out),
        }
    }
}

impl GenerateArgs {
    pub(crate) fn run(self) -> Result<()> {
        let ck = Checkpoint::load(&self.ckpt, DType::F32, &self.device.device()?)?;
        let mut model = ck.model()?;
        model.set_decode_dtype(self.dtype);
        model.set_kv_dtype(self.kv_dtype);
        let tokenizer = ck.tokenizer_json.as_deref().map(Tokenizer::from_json).transpose()?;
        let prompt = match (&self.prompt, &self.prompt_ids) {
            (Some(text), None) => {
                let Some(tok) = &tokenizer else {
                    bail!(
                        "{} has no tokenizer.json: give the prompt as --prompt-ids",
                        self.ckpt.display()
                    );
                };
                tok.encode(text)?
            }
            (None, Some(ids)) => ids.clone(),
            _ => bail!("give a prompt with --prompt TEXT or --prompt-ids 1,2,3"),
        };
        let stop_tokens = match (self.ignore_eos, ck.config.eos_token_id) {
            (false, Some(eos)) => vec![eos],
            _ => vec![],
        };
        let stream_text = !self.ids && tokenizer.is_some();
        let mut request =
            Request::greedy(prompt.clone(), self.max_new_tokens, stop_tokens).with_samples(vec![Sampling {
                params: self.sampling.params(),
                seed: self.sampling.seed,
            }]);
        request.stream = stream_text;
        let mut out = std::io::stdout().lock();
        if let (true, Some(tok)) = (stream_text, &tokenizer) {
            let shown = match &self.prompt {
                Some(p) => p.clone(),
                None => tok.decode(&prompt)?,
            };
            write!(out, "{shown}")?;
            out.flush()?;
        }
        let mut sink = WriteSink::new(&mut out);
        let done = engine::generate_streaming(&model, tokenizer.as_ref(), request, |e| sink.piece(e.text()))
            .context("generation failed")?;
        sink.finish().context("writing the generated text")?;
        let c = &done[0];
        if stream_text {
            writeln!(out)?;
        } else {
            let ids: Vec<String> = c.tokens.iter().map(u32::to_string).collect();
            writeln!(out, "{}", ids.join(" "))?;
        }
        if c.finish == FinishReason::Context {
            eprintln!(
                "note: stopped at the model's context length ({} tokens)",
                ck.config.n_positions
            );
        }
        Ok(())
    }
}
