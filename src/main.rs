//! The `talaria` command line: argument parsing only; every stage lives in the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use talaria::bench::{BenchConfig, BenchKind};
use talaria::checkpoint::Checkpoint;
use talaria::data::download::{self, DownloadConfig};
use talaria::data::prepare::{self, PrepareConfig};
use talaria::data::readers::{ReadOptions, ReadStats};
use talaria::data::synth::{self, SynthConfig};
use talaria::engine::{self, Chatbot, GenerateOptions, Sampler, SamplingParams, TextStream};
use talaria::eval::report;
use talaria::interop;
use talaria::serve;
use talaria::speedrun;
use talaria::terminal::{self, ChatOptions};
use talaria::tokenizer::{self, Tokenizer, TrainConfig as TokenizerTrainConfig};
use talaria::train::AdamWConfig;
use talaria::train::comparisons::{self, LabelConfig};
use talaria::train::dpo::{self, DpoConfig};
use talaria::train::ppo::{self, PpoConfig, RewardSpec};
use talaria::train::pretrain::{self, PretrainConfig};
use talaria::train::reward::{self, RewardConfig};
use talaria::train::sft::{self, SftConfig};
use talaria::train::trainer::{TrainConfig, TrainOutcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`; libmimalloc-sys names no
/// constant for it). -1 keeps freed memory mapped instead of returning it to the OS: a training
/// step frees and reallocates the same large activation buffers every step, and re-faulting
/// them in cost ~15% of a step (`perf`: the kernel's `clear_page`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

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
    /// Train, import, run and measure byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Make training data: the default world, token shards, Hub downloads.
    #[command(subcommand)]
    Data(DataCmd),
    /// Pretrain a GPT by next-token prediction on token shards.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on demonstrations (conversations).
    Sft(SftArgs),
    /// Chat with a model in the terminal (or answer once with --prompt).
    Chat(ChatArgs),
    /// Train a reward model on preference pairs or rankings.
    Reward(RewardArgs),
    /// RLHF: optimise the SFT model against a reward with PPO and a KL penalty.
    Ppo(PpoArgs),
    /// Direct preference optimisation of the SFT model on preference pairs.
    Dpo(DpoArgs),
    /// Run the whole recipe end to end on the built-in default world.
    Speedrun(SpeedrunArgs),
    /// Evaluate a checkpoint or a speedrun directory.
    Eval(EvalArgs),
    /// Write report.md and plots for a run directory evaluated by `talaria eval`.
    Report { run: PathBuf },
    /// Serve the OpenAI-compatible API, the chat web page and feedback collection.
    Serve(ServeArgs),
    /// Work with the human-feedback database the server fills.
    #[command(subcommand)]
    Feedback(FeedbackCmd),
    /// Measure training or decoding throughput (compare with bench/pytorch_reference.py).
    Bench(BenchArgs),
}

#[derive(Args)]
struct ReadArgs {
    /// Line that separates documents in .txt files ("" = blank lines, i.e. paragraphs).
    #[arg(long, default_value = tokenizer::EOT)]
    separator: String,
    /// JSON field holding the text in .jsonl / .jsonl.gz files.
    #[arg(long, default_value = "text")]
    field: String,
    /// Column holding the text in .parquet files.
    #[arg(long, default_value = "text")]
    column: String,
    /// Skip bad records (invalid UTF-8, not JSON, missing field, null) and count them, instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

impl ReadArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions {
            separator: self.separator.clone(),
            field: self.field.clone(),
            column: self.column.clone(),
            skip_bad: self.skip_bad,
        }
    }
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE (special tokens at ids 0-5, digits split one by one).
    Train {
        /// Corpus files: .txt, .txt.gz, .jsonl, .jsonl.gz, .parquet.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Vocabulary size, special and byte tokens included.
        #[arg(long)]
        vocab_size: usize,
        /// Pairs seen fewer times are never merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Build GPT-2's tokenizer from vocab.json and merges.txt.
    ImportGpt2 {
        #[arg(long)]
        vocab: PathBuf,
        #[arg(long)]
        merges: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode text (--text, or all of standard input).
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: Option<String>,
        /// Print one line of space-separated ids instead of one `id<TAB>vocab entry<TAB>"text"` line per token.
        #[arg(long)]
        ids: bool,
    },
    /// Decode ids (--ids, or standard input; separated by spaces, commas or newlines) to text.
    Decode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        ids: Option<String>,
    },
    /// Measure encoding throughput on the lines of text files.
    Bench {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Runs of each kind; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Write the built-in default world: pretraining text, demonstrations, preferences, RL and eval prompts.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size relative to the default (1.0: ~3 MB of text, ~7k demonstrations, ~5k preference pairs).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        scale: f64,
    },
    /// Tokenize corpus files into train/val token shards plus meta.json.
    Prepare {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Share of documents held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Seed of the train/val split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most tokens per shard file.
        #[arg(long, default_value_t = prepare::DEFAULT_SHARD_TOKENS)]
        shard_tokens: usize,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Rank a model's own answers with the default world's simulated labeller: comparison data for
    /// `talaria reward` (prompts need "answer" and "skill", like the default world's label_prompts.jsonl).
    Label {
        /// The model whose answers are ranked (usually the SFT checkpoint).
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        prompts: PathBuf,
        /// Output JSONL of rankings, best answer first.
        #[arg(long)]
        out: PathBuf,
        /// Answers per prompt: the greedy answer, then samples.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Temperature of the sampled answers.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Download a dataset's data files from the Hugging Face Hub (needs internet).
    Download {
        /// Dataset id, e.g. roneneldan/TinyStories.
        dataset: String,
        /// Only the files of this split.
        #[arg(long)]
        split: Option<String>,
        #[arg(long, default_value = "data/hub")]
        out: PathBuf,
        #[arg(long, default_value = "main")]
        revision: String,
    },
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchWhat {
    /// Forward, backward and an AdamW step on batches of random tokens.
    Train,
    /// Batch-1 greedy decoding with the KV cache.
    Decode,
}

#[derive(Args)]
struct BenchArgs {
    what: BenchWhat,
    /// Model preset (see the presets in src/model/config.rs).
    #[arg(long, default_value = "bench")]
    preset: String,
    /// Timed training steps, or decoded tokens.
    #[arg(long)]
    steps: Option<usize>,
    /// Training batch size, in sequences of the full context.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print one JSON object with the figures on the last line.
    #[arg(long)]
    json: bool,
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

#[derive(Args)]
struct RewardArgs {
    /// The SFT checkpoint (or run directory) the reward model starts from.
    #[arg(long)]
    init: PathBuf,
    /// Preference files: {prompt, chosen, rejected}, {prompt, ranked}, HH-RLHF or OpenAssistant JSONL.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Held-out preferences (default: --val-fraction of --data).
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Answers per micro-batch (a prompt's answers are never split).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct DpoArgs {
    /// The SFT checkpoint: starting policy and frozen reference.
    #[arg(long)]
    policy: PathBuf,
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Weight of the chosen answers' negative log-likelihood added to the DPO loss (RPO; 0 is plain DPO).
    #[arg(long, default_value_t = 0.0)]
    nll_coef: f64,
    /// Preference pairs per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct PpoArgs {
    /// The SFT checkpoint: actor and frozen reference.
    #[arg(long)]
    policy: PathBuf,
    /// A reward-model checkpoint, or `verifier` for the default world's rule-based reward.
    #[arg(long)]
    reward: String,
    /// Prompts (JSONL: {"messages": [...]}, {"prompt": "..."} or a JSON string per line).
    #[arg(long)]
    prompts: PathBuf,
    /// Held-out prompts with reference answers, scored greedily by the verifier at each evaluation.
    #[arg(long)]
    eval_prompts: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 100)]
    steps: u64,
    #[arg(long, default_value_t = 16)]
    prompts_per_step: usize,
    #[arg(long, default_value_t = 2)]
    samples_per_prompt: usize,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long, default_value_t = 5e-5)]
    critic_lr: f64,
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    #[arg(long, default_value_t = 2)]
    ppo_epochs: usize,
    /// Sequences per PPO minibatch: one optimizer step, its gradient accumulated over chunks of 32.
    #[arg(long, default_value_t = 16)]
    minibatch: usize,
    #[arg(long, default_value_t = 0.2)]
    clip: f64,
    #[arg(long, default_value_t = 0.2)]
    value_clip: f64,
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    lambda: f64,
    /// Per-token KL penalty coefficient (initial value with --kl-target).
    #[arg(long, default_value_t = 0.02)]
    kl_coef: f64,
    /// Adapt the KL coefficient toward this KL per answer.
    #[arg(long)]
    kl_target: Option<f64>,
    #[arg(long, default_value_t = 10000.0)]
    kl_horizon: f64,
    #[arg(long, default_value_t = 5.0)]
    reward_clip: f64,
    /// Subtract each prompt's mean score from its answers' scores (a per-prompt baseline; needs
    /// --samples-per-prompt above 1).
    #[arg(long)]
    prompt_baseline: bool,
    /// Reward (normalised units) for an answer that never ends.
    #[arg(long, default_value_t = -2.0, allow_negative_numbers = true)]
    no_end_penalty: f64,
    /// PPO-ptx: mix the LM loss on this pretraining data directory into the actor's loss.
    #[arg(long)]
    ptx_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    ptx_coef: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value_t = 10)]
    eval_every: u64,
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    stop_at: Option<u64>,
}

#[derive(Args)]
struct SpeedrunArgs {
    /// cpu (about 20 minutes on two cores) or tiny (a few minutes, a smoke test).
    #[arg(long, default_value = "cpu")]
    preset: String,
    #[arg(long, default_value = "runs/speedrun")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalArgs {
    /// A speedrun directory (evaluates base, SFT, PPO/DPO and the reward model, writes eval.json),
    /// or a single checkpoint with --prompts / --mmlu / --gsm8k.
    target: PathBuf,
    /// Held-out prompts with reference answers (default-world format) for a single chat checkpoint.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Few-shot prompt a base model in plain text instead of the chat template.
    #[arg(long)]
    few_shot: bool,
    /// MMLU-format multiple-choice file (e.g. ../shared/data/eval/mmlu_test.jsonl).
    #[arg(long)]
    mmlu: Option<PathBuf>,
    /// Few-shot examples for MMLU (MMLU-format dev file).
    #[arg(long)]
    mmlu_dev: Option<PathBuf>,
    /// GSM8K-format maths file.
    #[arg(long)]
    gsm8k: Option<PathBuf>,
    /// Few-shot examples for GSM8K.
    #[arg(long)]
    gsm8k_train: Option<PathBuf>,
    /// Evaluate at most this many items of each benchmark file.
    #[arg(long)]
    limit: Option<usize>,
    /// With --prompts: another chat checkpoint to compare against (win-rate by the verifier, and by --reward).
    #[arg(long, requires = "prompts")]
    against: Option<PathBuf>,
    /// A reward model: its pairwise accuracy on --prefs; with --prompts, how often it ranks the reference answer
    /// above the model's wrong ones, and its verdicts on --against.
    #[arg(long)]
    reward: Option<PathBuf>,
    /// Preference file for --reward.
    #[arg(long)]
    prefs: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    // SAFETY: sets a process-wide allocator option; mimalloc allows this at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    // The work runs on the kernels' thread pool, except the server's, whose async runtime must not
    // hold a worker: it gives its generation thread to the pool itself.
    let result = match cli.command {
        Command::Serve(_) => run(cli),
        _ => talaria::model::fused::on_pool(|| run(cli)),
    };
    if let Err(e) = result {
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
        Command::Speedrun(a) => {
            let cfg = speedrun::SpeedrunConfig {
                preset: speedrun::preset(&a.preset)?,
                out: a.out,
                seed: a.seed,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let o = speedrun::speedrun(&cfg)?;
            println!("report: {}", o.report.display());
            println!("chat with the result: talaria chat {}", o.chat_checkpoint.display());
            Ok(())
        }
        Command::Eval(a) => eval_cmd(a),
        Command::Report { run } => {
            println!("{}", report::write_report(&run)?.display());
            Ok(())
        }
        Command::Reward(a) => {
            let cfg = RewardConfig {
                init: a.init,
                data: a.data,
                val_data: a.val_data,
                val_fraction: a.val_fraction,
                batch_size: a.batch_size,
                train: a.train.config(),
            };
            print_outcome("reward", &reward::train_reward_model(&cfg)?);
            Ok(())
        }
        Command::Dpo(a) => {
            let cfg = DpoConfig {
                policy: a.policy,
                data: a.data,
                val_data: a.val_data,
                val_fraction: a.val_fraction,
                beta: a.beta,
                nll_coef: a.nll_coef,
                batch_size: a.batch_size,
                train: a.train.config(),
            };
            print_outcome("dpo", &dpo::dpo(&cfg)?);
            Ok(())
        }
        Command::Ppo(a) => {
            let reward = if a.reward == "verifier" {
                RewardSpec::Verifier
            } else {
                RewardSpec::Model(a.reward.into())
            };
            let cfg = PpoConfig {
                policy: a.policy,
                reward,
                prompts: a.prompts,
                eval_prompts: a.eval_prompts,
                out: a.out,
                steps: a.steps,
                prompts_per_step: a.prompts_per_step,
                samples_per_prompt: a.samples_per_prompt,
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                lr: a.lr,
                critic_lr: a.critic_lr,
                warmup: a.warmup,
                ppo_epochs: a.ppo_epochs,
                minibatch: a.minibatch,
                clip: a.clip,
                value_clip: a.value_clip,
                gamma: a.gamma,
                lambda: a.lambda,
                kl_coef: a.kl_coef,
                kl_target: a.kl_target,
                kl_horizon: a.kl_horizon,
                reward_clip: a.reward_clip,
                prompt_baseline: a.prompt_baseline,
                no_end_penalty: a.no_end_penalty,
                ptx_data: a.ptx_data,
                ptx_coef: a.ptx_coef,
                grad_clip: a.grad_clip,
                seed: a.seed,
                eval_every: a.eval_every,
                save_every: a.save_every,
                resume: a.resume,
                stop_at: a.stop_at,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let o = ppo::ppo(&cfg)?;
            let last: Vec<String> = o.last.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!(
                "ppo: {} steps, {:.1}s, {}{} -> {}",
                o.steps,
                o.wall_s,
                last.join(", "),
                if o.interrupted {
                    " (stopped early; resume with --resume)"
                } else {
                    ""
                },
                o.checkpoint.display()
            );
            Ok(())
        }
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
        Command::Tokenizer(c) => tokenizer_cmd(c),
        Command::Data(c) => data_cmd(c),
        Command::Bench(a) => bench(a),
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

fn eval_cmd(a: EvalArgs) -> Result<()> {
    use talaria::eval::{benchmarks, tasks};
    if a.target.join("world").join("eval_prompts.jsonl").exists() && a.prompts.is_none() {
        let e = speedrun::evaluate_run(&a.target, &a.target.join("world"), a.seed, a.max_new_tokens)?;
        for s in &e.stages {
            println!("{:<5} accuracy {:.1}%", s.name, s.macro_accuracy * 100.0);
        }
        println!("wrote {}", a.target.join("eval.json").display());
        return Ok(());
    }
    ensure!(
        a.reward.is_none() || a.prefs.is_some() || a.prompts.is_some(),
        "--reward needs --prefs (its pairwise accuracy) or --prompts (its verdicts on the model's own answers)"
    );
    let ck = Checkpoint::load(&a.target, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let tok = Tokenizer::from_json(
        ck.tokenizer_json
            .as_deref()
            .context("the checkpoint has no tokenizer.json")?,
    )?;
    let rm = a
        .reward
        .as_deref()
        .map(talaria::train::reward::RewardModel::load)
        .transpose()?;
    if let Some(p) = &a.prompts {
        let prompts = talaria::data::prompts::read_prompts(p)?;
        let template = talaria::chat::ChatTemplate::new(&tok)?;
        // Both models of an --against comparison are prompted the same way.
        let answer = |m: &talaria::model::Gpt| {
            if a.few_shot {
                tasks::few_shot_accuracy(m, &tok, &prompts, 3, a.seed, a.max_new_tokens)
            } else {
                tasks::chat_accuracy(m, &tok, &template, &prompts, a.max_new_tokens)
            }
        };
        let r = answer(&model)?;
        for (skill, t) in &r.by_skill {
            println!(
                "{skill:<14} {:>5.1}%  ({}/{})",
                t.accuracy() * 100.0,
                t.correct,
                t.total
            );
        }
        println!("macro accuracy {:.1}%", r.macro_accuracy() * 100.0);
        if let (Some(rm), Some(rm_path)) = (&rm, &a.reward) {
            rm.ensure_tokenizer_of(rm_path, &a.target, ck.tokenizer_json.as_deref())?;
            let v = tasks::reward_on_mistakes(&prompts, &r.answers, rm)?;
            if let Some(acc) = v.accuracy() {
                println!(
                    "reward model scores the reference answer above this model's wrong answer on {:.1}% of {} prompts",
                    acc * 100.0,
                    v.mistakes()
                );
                for (skill, (right, n)) in &v.by_skill {
                    println!("  {skill:<14} {:>5.1}%  (of {n})", right / *n as f64 * 100.0);
                }
            }
        }
        if let Some(other) = &a.against {
            let ck_b = Checkpoint::load(other, DType::F32, &Device::Cpu)?;
            ensure!(
                ck_b.tokenizer_json == ck.tokenizer_json,
                "--against {} uses a different tokenizer from {}",
                other.display(),
                a.target.display()
            );
            let rb = answer(&ck_b.model()?)?;
            let w = tasks::win_rate(&prompts, &r.answers, &rb.answers, rm.as_ref())?;
            println!(
                "against {}: macro accuracy {:.1}%",
                other.display(),
                rb.macro_accuracy() * 100.0
            );
            println!(
                "win-rate: {} by the verifier, {} by the reward model",
                report::pct(w.by_verifier),
                report::pct(w.by_reward_model)
            );
            if rm.is_some() {
                println!(
                    "reward model agrees with the verifier on {} of the {} prompts where one answer is right and the other wrong",
                    report::pct(w.rm_agreement),
                    w.separated
                );
            }
        }
    }
    if let Some(p) = &a.mmlu {
        let test = benchmarks::read_mmlu(p, a.limit)?;
        let dev = a
            .mmlu_dev
            .as_deref()
            .map(|d| benchmarks::read_mmlu(d, None))
            .transpose()?
            .unwrap_or_default();
        let acc = benchmarks::mmlu_accuracy(&model, &tok, &test, &dev, 5)?;
        println!(
            "MMLU-format accuracy on {} questions: {:.1}% (chance 25%)",
            test.len(),
            acc * 100.0
        );
    }
    if let Some(p) = &a.gsm8k {
        let test = benchmarks::read_gsm8k(p, a.limit)?;
        let train = a
            .gsm8k_train
            .as_deref()
            .map(|d| benchmarks::read_gsm8k(d, Some(8)))
            .transpose()?
            .unwrap_or_default();
        let acc = benchmarks::gsm8k_accuracy(&model, &tok, &test, &train, 2, a.max_new_tokens)?;
        println!(
            "GSM8K-format exact match on {} problems: {:.1}%",
            test.len(),
            acc * 100.0
        );
    }
    if let (Some(rm), Some(p)) = (&rm, &a.prefs) {
        let m = talaria::train::reward::evaluate_reward_model(rm, std::slice::from_ref(p), 16)?;
        println!(
            "reward model: pairwise accuracy {:.1}% on {} pairs, mean margin {:.3}, reward/length correlation {:.3}",
            m.accuracy * 100.0,
            m.pairs,
            m.margin,
            m.length_corr
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let (kind, steps) = match a.what {
        BenchWhat::Train => (BenchKind::Train, a.steps.unwrap_or(5)),
        BenchWhat::Decode => (BenchKind::Decode, a.steps.unwrap_or(200)),
    };
    let cfg = BenchConfig {
        kind,
        preset: a.preset,
        steps,
        batch: a.batch,
        prompt_len: 16,
    };
    let r = talaria::bench::run(&cfg)?;
    println!("tokens/s            {:.1}", r.tokens_per_s);
    println!(
        "achieved GFLOP/s    {:.1} ({:.0}% of the {:.1} GFLOP/s of one 1024^3 matmul)",
        r.gflops,
        100.0 * r.gflops / r.peak_matmul_gflops,
        r.peak_matmul_gflops
    );
    println!("peak RSS            {:.0} MiB", r.peak_rss_mib);
    println!("median step         {:.2} ms", 1e3 * r.median_step_s);
    if a.json {
        println!("{}", r.to_json(&cfg));
    }
    Ok(())
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

fn tokenizer_cmd(c: TokenizerCmd) -> Result<()> {
    match c {
        TokenizerCmd::Train {
            input,
            vocab_size,
            min_frequency,
            out,
            read,
        } => {
            let cfg = TokenizerTrainConfig {
                vocab_size,
                min_frequency,
                show_progress: std::io::stderr().is_terminal(),
            };
            let (tok, s) = tokenizer::train_from_files(&input, &read.options(), &cfg)?;
            tok.save(&out)?;
            println!(
                "trained on {} documents, {:.2} MB in {:.1}s: vocab {} (asked {vocab_size}), {:.2} bytes/token on the training text{} -> {}",
                s.train.documents,
                s.train.bytes as f64 / 1e6,
                s.train.seconds,
                s.train.vocab_size,
                s.bytes_per_token(),
                skipped_note(&s.read),
                out.display()
            );
            Ok(())
        }
        TokenizerCmd::ImportGpt2 { vocab, merges, out } => {
            let tok = tokenizer::import_gpt2(&vocab, &merges)?;
            tok.save(&out)?;
            println!(
                "imported GPT-2 tokenizer: vocab {}, {} = {} -> {}",
                tok.vocab_size(),
                tokenizer::EOT,
                tok.eot_id()?,
                out.display()
            );
            Ok(())
        }
        TokenizerCmd::Encode { tokenizer, text, ids } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let text = match text {
                Some(t) => t,
                None => read_stdin()?,
            };
            let toks = tok.encode(&text)?;
            let mut out = std::io::stdout().lock();
            if ids {
                let s: Vec<String> = toks.iter().map(u32::to_string).collect();
                writeln!(out, "{}", s.join(" "))?;
            } else {
                for &id in &toks {
                    let token = tok.id_to_token(id).unwrap_or_default();
                    writeln!(out, "{id}\t{token}\t{:?}", tok.decode(&[id])?)?;
                }
            }
            eprintln!(
                "{} tokens, {} bytes, {:.2} bytes/token",
                toks.len(),
                text.len(),
                text.len() as f64 / toks.len().max(1) as f64
            );
            Ok(())
        }
        TokenizerCmd::Decode { tokenizer, ids } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let text = match ids {
                Some(t) => t,
                None => read_stdin()?,
            };
            let ids = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u32>().with_context(|| format!("{s:?} is not a token id")))
                .collect::<Result<Vec<_>>>()?;
            let mut out = std::io::stdout().lock();
            write!(out, "{}", tok.decode(&ids)?)?;
            out.flush()?;
            Ok(())
        }
        TokenizerCmd::Bench {
            tokenizer,
            input,
            repeats,
        } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let b = tokenizer::bench_encode_lines(&tok, &input, repeats)?;
            println!(
                "{} lines, {:.2} MB, {} tokens ({:.2} bytes/token): encode_batch {:.2} MB/s ({} threads), encode one by one {:.2} MB/s (1 thread); best of {repeats}",
                b.texts,
                b.bytes as f64 / 1e6,
                b.tokens,
                b.bytes as f64 / b.tokens.max(1) as f64,
                b.batch_mb_per_s,
                rayon::current_num_threads(),
                b.serial_mb_per_s
            );
            Ok(())
        }
    }
}

fn data_cmd(c: DataCmd) -> Result<()> {
    match c {
        DataCmd::Synth { out, seed, scale } => {
            let start = std::time::Instant::now();
            let s = synth::generate(&SynthConfig {
                out: out.clone(),
                seed,
                scale,
            })?;
            for (name, f) in &s.files {
                println!("{name:>22}  {:>7} records  {:>10} bytes", f.records, f.bytes);
            }
            println!(
                "default world (seed {seed}, scale {scale}, {} skills) -> {} in {:.2}s",
                s.skills.len(),
                out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        DataCmd::Label {
            policy,
            prompts,
            out,
            samples,
            temperature,
            max_new_tokens,
            seed,
        } => {
            let start = std::time::Instant::now();
            let s = comparisons::label(&LabelConfig {
                policy,
                prompts,
                out: out.clone(),
                samples,
                temperature,
                max_new_tokens,
                seed,
                progress: true,
            })?;
            println!(
                "{} rankings ({} pairs) from {} prompts, {} without a difference; {:.1}% of the greedy answers and {:.1}% of the samples were correct; -> {} in {:.1}s",
                s.rankings,
                s.pairs,
                s.prompts,
                s.no_signal,
                100.0 * s.greedy_accuracy,
                100.0 * s.sample_accuracy,
                out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        DataCmd::Prepare {
            input,
            tokenizer,
            out,
            val_fraction,
            seed,
            shard_tokens,
            read,
        } => {
            let cfg = PrepareConfig {
                val_fraction,
                seed,
                read: read.options(),
                shard_tokens,
                show_progress: std::io::stderr().is_terminal(),
                ..PrepareConfig::new(input, tokenizer, out.clone())
            };
            let s = prepare::prepare(&cfg)?;
            let m = &s.meta;
            let bytes = m.splits.train.bytes + m.splits.val.bytes;
            let tokens = m.splits.train.tokens + m.splits.val.tokens;
            for (name, st) in [("train", &m.splits.train), ("val", &m.splits.val)] {
                println!(
                    "{name:5}: {} documents, {} tokens, {:.2} MB in {} shard(s)",
                    st.documents,
                    st.tokens,
                    st.bytes as f64 / 1e6,
                    st.shards
                );
            }
            println!(
                "prepared {:.2} MB -> {tokens} tokens in {:.1}s ({:.2} MB/s, {:.2} bytes/token){}{} -> {}",
                bytes as f64 / 1e6,
                s.seconds,
                bytes as f64 / 1e6 / s.seconds.max(1e-9),
                bytes as f64 / tokens.max(1) as f64,
                if m.split_single_document {
                    "; the single document was cut into a train head and a val tail"
                } else {
                    ""
                },
                skipped_note(&ReadStats {
                    skipped_bad: m.skipped_bad,
                    skipped_empty: m.skipped_empty,
                    ..Default::default()
                }),
                out.display()
            );
            Ok(())
        }
        DataCmd::Download {
            dataset,
            split,
            out,
            revision,
        } => {
            let s = download::download(&DownloadConfig {
                dataset,
                split,
                out,
                revision,
                endpoint: None,
                cache_dir: None,
            })?;
            for f in &s.files {
                println!("{}", f.display());
            }
            println!("downloaded {} files, {:.2} MB", s.files.len(), s.bytes as f64 / 1e6);
            Ok(())
        }
    }
}

fn skipped_note(r: &ReadStats) -> String {
    let mut parts = Vec::new();
    if r.skipped_bad > 0 {
        parts.push(format!("{} bad records skipped", r.skipped_bad));
    }
    if r.skipped_empty > 0 {
        parts.push(format!("{} empty documents skipped", r.skipped_empty));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input (UTF-8 text)")?;
    Ok(s)
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
