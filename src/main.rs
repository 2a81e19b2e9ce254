//! The `talaria` command line: argument parsing only; every stage lives in the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use talaria::checkpoint::Checkpoint;
use talaria::engine::{self, Chatbot, GenerateOptions, Sampler, SamplingParams, TextStream};
use talaria::interop;
use talaria::serve;
use talaria::terminal::{self, ChatOptions};
use talaria::tokenizer::Tokenizer;
use talaria::train::AdamWConfig;
use talaria::train::pretrain::{self, PretrainConfig};
use talaria::train::sft::{self, SftConfig};
use talaria::train::trainer::{TrainConfig, TrainOutcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "talaria",
    version,
    about = "From raw text to a chat assistant: the whole ChatGPT recipe in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a model from another format into a Talaria checkpoint.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Export a Talaria checkpoint to another format.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Pretrain a GPT by next-token prediction on token shards.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on demonstrations (conversations).
    Sft(SftArgs),
    /// Chat with a model in the terminal (or answer once with --prompt).
    Chat(ChatArgs),
    /// Serve the OpenAI-compatible API, the chat web page and feedback collection.
    Serve(ServeArgs),
    /// Work with the human-feedback database the server fills.
    #[command(subcommand)]
    Feedback(FeedbackCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// Chat checkpoint (or run directory).
    ckpt: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// SQLite database for the feedback people give on the page (created if absent).
    #[arg(long, default_value = "feedback.sqlite")]
    db: PathBuf,
}

#[derive(Subcommand)]
enum FeedbackCmd {
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
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors [+ tokenizer.json]).
    Hf {
        hf_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// A directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.
    Hf {
        ckpt: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct SamplingArgs {
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
struct GenerateArgs {
    /// Checkpoint directory.
    ckpt: PathBuf,
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
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Optimizer, schedule and checkpointing flags shared by every training stage.
#[derive(Args)]
struct TrainArgs {
    /// Run directory (checkpoint/, metrics.jsonl, plots).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, required_unless_present = "time_budget")]
    steps: Option<u64>,
    /// Train for this long instead (e.g. 90s, 10m, 1h); the schedule is fitted to the budget.
    #[arg(long, value_parser = parse_duration)]
    time_budget: Option<std::time::Duration>,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Decoupled weight decay, on matrices and embeddings only.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this value (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    #[arg(long, default_value_t = 500)]
    save_every: u64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Continue the run in --out from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop with a checkpoint after this step (continue later with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            out: self.out.clone(),
            steps: self.steps,
            time_budget: self.time_budget,
            lr: self.lr,
            min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            warmup: self.warmup,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            grad_accum: self.grad_accum,
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
            resume: self.resume,
            stop_at: self.stop_at,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// Parses `90s`, `10m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 90s, 10m or 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("duration must be positive, got {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Args)]
struct PretrainArgs {
    /// A directory written by `talaria data prepare`.
    #[arg(long)]
    data: PathBuf,
    /// Model preset: test, tiny, cpu, bench, gpt1, gpt2, gpt2-medium, gpt2-large, gpt2-xl.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Tokenizer (default: DATA/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Start from this checkpoint instead of a fresh model.
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Sequence length (default: the model's context).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 20)]
    val_batches: usize,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct SftArgs {
    /// The pretrained checkpoint (or run directory).
    #[arg(long)]
    init: PathBuf,
    /// Demonstration files: OpenAI messages, Alpaca, self-instruct or OpenAssistant JSONL (.gz ok).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Held-out demonstrations (default: --val-fraction of --data).
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Packed row length (default: the model's context).
    #[arg(long)]
    seq_len: Option<usize>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct ChatArgs {
    /// Chat checkpoint (or run directory).
    ckpt: PathBuf,
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
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import(ImportCmd::Hf { hf_dir, out }) => {
            let s = interop::import_hf(&hf_dir, &out)?;
            println!(
                "imported {} ({:.2}M parameters, {} layers, context {}, vocab {}{}) -> {}",
                hf_dir.display(),
                s.num_params as f64 / 1e6,
                s.config.n_layer,
                s.config.n_positions,
                s.config.vocab_size,
                if s.has_tokenizer {
                    ", with tokenizer"
                } else {
                    ", no tokenizer: token ids only"
                },
                out.display()
            );
            Ok(())
        }
        Command::Export(ExportCmd::Hf { ckpt, out }) => {
            interop::export_hf(&ckpt, &out)?;
            println!(
                "exported {} -> {} (load with GPT2LMHeadModel.from_pretrained)",
                ckpt.display(),
                out.display()
            );
            Ok(())
        }
        Command::Generate(a) => generate(a),
        Command::Sft(a) => {
            let cfg = SftConfig {
                init: a.init,
                data: a.data,
                val_data: a.val_data,
                val_fraction: a.val_fraction,
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                train: a.train.config(),
            };
            print_outcome("sft", &sft::sft(&cfg)?);
            Ok(())
        }
        Command::Chat(a) => chat(a),
        Command::Serve(a) => serve::serve(&serve::ServeConfig {
            ckpt: a.ckpt,
            host: a.host,
            port: a.port,
            db: a.db,
        }),
        Command::Feedback(FeedbackCmd::Export { db, sft, prefs }) => {
            let s = serve::feedback::export(&db, sft.as_deref(), prefs.as_deref())?;
            println!(
                "exported {} demonstrations; {} comparisons, {} rankings and {} pairs from thumbs ({} thumbs unpaired)",
                s.demonstrations, s.comparisons, s.rankings, s.thumbs_pairs, s.thumbs_unpaired
            );
            Ok(())
        }
        Command::Pretrain(a) => {
            let cfg = PretrainConfig {
                data: a.data,
                model: a.model,
                tokenizer: a.tokenizer,
                init: a.init,
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                val_batches: a.val_batches,
                samples: 2,
                train: a.train.config(),
            };
            let out = pretrain::pretrain(&cfg)?;
            print_outcome("pretrain", &out);
            Ok(())
        }
    }
}

fn print_outcome(stage: &str, o: &TrainOutcome) {
    let evals: Vec<String> = o.last_eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    println!(
        "{stage}: {} steps, {} tokens, {:.1}s, final loss {:.4}{}{} -> {}",
        o.steps,
        o.tokens,
        o.wall_s,
        o.last_loss,
        if evals.is_empty() {
            String::new()
        } else {
            format!(", {}", evals.join(", "))
        },
        if o.interrupted {
            " (stopped early; resume with --resume)"
        } else {
            ""
        },
        o.checkpoint.display()
    );
}

fn chat(a: ChatArgs) -> Result<()> {
    let bot = Chatbot::load(&a.ckpt)?;
    let opts = ChatOptions {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: (a.top_k > 0).then_some(a.top_k),
            top_p: a.top_p,
        },
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
        system: a.system,
        interactive: a.prompt.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin()),
    };
    let mut out = std::io::stdout().lock();
    match a.prompt {
        Some(p) => terminal::run(&bot, opts, &mut std::io::Cursor::new(format!("{p}\n")), &mut out),
        None => terminal::run(&bot, opts, &mut std::io::stdin().lock(), &mut out),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let ck = Checkpoint::load(&a.ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let tokenizer = ck.tokenizer_json.as_deref().map(Tokenizer::from_json).transpose()?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            let Some(tok) = &tokenizer else {
                bail!(
                    "{} has no tokenizer.json: give the prompt as --prompt-ids",
                    a.ckpt.display()
                );
            };
            tok.encode(text)?
        }
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give a prompt with --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let stop_tokens = match (a.ignore_eos, ck.config.eos_token_id) {
        (false, Some(eos)) => vec![eos],
        _ => vec![],
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_tokens,
    };
    let mut sampler = Sampler::new(a.sampling.params(), a.sampling.seed)?;
    let stream_text = !a.ids && tokenizer.is_some();
    let mut stream = tokenizer.as_ref().map(TextStream::new);
    let mut out = std::io::stdout().lock();
    if stream_text {
        write!(
            out,
            "{}",
            a.prompt
                .as_deref()
                .map_or_else(|| tokenizer.as_ref().unwrap().decode(&prompt), |p| Ok(p.to_string()))?
        )?;
        out.flush()?;
    }
    let mut stream_err = None;
    let result = engine::generate(&model, &prompt, &opts, &mut sampler, |id| {
        let Some(s) = stream.as_mut().filter(|_| stream_text) else {
            return true;
        };
        let written = s.push(id).and_then(|piece| {
            write!(out, "{piece}")?;
            Ok(out.flush()?)
        });
        match written {
            Ok(()) => true,
            Err(e) => {
                stream_err = Some(e);
                false
            }
        }
    })
    .context("generation failed")?;
    if let Some(e) = stream_err {
        return Err(e.context("writing the generated text"));
    }
    if stream_text {
        writeln!(out)?;
    } else {
        let ids: Vec<String> = result.tokens.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
    }
    if result.finish == engine::FinishReason::Context {
        eprintln!(
            "note: stopped at the model's context length ({} tokens)",
            ck.config.n_positions
        );
    }
    Ok(())
}
