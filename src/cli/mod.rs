//! The `talaria` command line: argument structs per group of subcommands and their conversion
//! into the library's config structs. Every stage's work lives in the library; a command here
//! parses, calls it and prints what it returned.
//!
//! - [`data`]: `tokenizer ...`, `data synth|prepare|label|download`;
//! - [`train`]: `pretrain`, `sft`, `reward` and the `speedrun` that chains every stage;
//! - [`rlhf`]: `ppo`, `dpo`;
//! - [`serve`]: `generate`, `chat`, `serve`, `feedback export`;
//! - [`eval`]: `eval`, `report`, `bench`;
//! - [`interop`]: `import`, `export`.

mod data;
mod eval;
mod interop;
mod rlhf;
mod serve;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use talaria::train::AdamWConfig;
use talaria::train::trainer::{TrainConfig, TrainOutcome};

#[derive(Parser)]
#[command(
    name = "talaria",
    version,
    about = "From raw text to a chat assistant: the whole ChatGPT recipe in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a model from another format into a Talaria checkpoint.
    #[command(subcommand)]
    Import(interop::ImportCmd),
    /// Export a Talaria checkpoint to another format.
    #[command(subcommand)]
    Export(interop::ExportCmd),
    /// Generate a continuation of a prompt.
    Generate(serve::GenerateArgs),
    /// Train, import, run and measure byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(data::TokenizerCmd),
    /// Make training data: the default world, token shards, comparisons, Hub downloads.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Pretrain a GPT by next-token prediction on token shards.
    Pretrain(train::PretrainArgs),
    /// Supervised fine-tuning on demonstrations (conversations).
    Sft(train::SftArgs),
    /// Chat with a model in the terminal (or answer once with --prompt).
    Chat(serve::ChatArgs),
    /// Train a reward model on preference pairs or rankings.
    Reward(train::RewardArgs),
    /// RLHF: optimise the SFT model against a reward with PPO and a KL penalty.
    Ppo(rlhf::PpoArgs),
    /// Direct preference optimisation of the SFT model on preference pairs.
    Dpo(rlhf::DpoArgs),
    /// Run the whole recipe end to end on the built-in default world.
    Speedrun(train::SpeedrunArgs),
    /// Evaluate a checkpoint or a speedrun directory.
    Eval(eval::EvalArgs),
    /// Write report.md and plots for a run directory evaluated by `talaria eval`.
    Report { run: PathBuf },
    /// Serve the OpenAI-compatible API, the chat web page and feedback collection.
    Serve(serve::ServeArgs),
    /// Work with the human-feedback database the server fills.
    #[command(subcommand)]
    Feedback(serve::FeedbackCmd),
    /// Measure training, decoding or serving throughput (compare with bench/pytorch_reference.py).
    Bench(eval::BenchArgs),
}

impl Cli {
    /// Whether the command serves HTTP: its async runtime (and the benchmark's client threads)
    /// must not hold one of the kernels' pool threads.
    pub fn is_server(&self) -> bool {
        match &self.command {
            Command::Serve(_) => true,
            Command::Bench(b) => b.serves(),
            _ => false,
        }
    }

    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let world = talaria::train::collective::world();
        let data_parallel = matches!(
            self.command,
            Command::Pretrain(_) | Command::Sft(_) | Command::Reward(_) | Command::Dpo(_) | Command::Ppo(_)
        ) || matches!(&self.command, Command::Bench(b) if b.collective());
        anyhow::ensure!(
            world.size() == 1 || data_parallel,
            "started as one of {} MPI ranks: only pretrain, sft, reward, dpo, ppo and bench allreduce run \
             data-parallel; run this command as one process (docs/scale-out.md)",
            world.size()
        );
        match self.command {
            Command::Import(c) => c.run(),
            Command::Export(c) => c.run(),
            Command::Generate(a) => a.run(),
            Command::Tokenizer(c) => c.run(),
            Command::Data(c) => c.run(),
            Command::Pretrain(a) => a.run(),
            Command::Sft(a) => a.run(),
            Command::Chat(a) => a.run(),
            Command::Reward(a) => a.run(),
            Command::Ppo(a) => a.run(),
            Command::Dpo(a) => a.run(),
            Command::Speedrun(a) => a.run(),
            Command::Eval(a) => a.run(),
            Command::Report { run } => {
                println!("{}", talaria::eval::report::write_report(&run)?.display());
                Ok(())
            }
            Command::Serve(a) => a.run(),
            Command::Feedback(c) => c.run(),
            Command::Bench(a) => a.run(),
        }
    }
}

/// Whether progress bars should be drawn (standard error is a terminal).
fn progress() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// `--device`, on every command that runs a model.
#[derive(Args, Clone)]
pub(crate) struct DeviceArg {
    /// Where the model runs: cpu, cuda (GPU 0) or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl DeviceArg {
    /// The device; plain `cuda` under an MPI launcher is this rank's GPU on its machine (its local
    /// rank), so that `mpirun -np 8 talaria pretrain --device cuda` uses eight GPUs.
    pub(crate) fn device(&self) -> Result<candle_core::Device> {
        let world = talaria::train::collective::world();
        match talaria::train::collective::local_rank() {
            Some(local) if world.size() > 1 && self.device.trim() == "cuda" => {
                talaria::model::parse_device(&format!("cuda:{local}"))
            }
            _ => talaria::model::parse_device(&self.device),
        }
    }
}

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Run directory (checkpoint/, metrics.jsonl, plots).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    /// The precision of the matrix products: f32, or bf16 for mixed precision (f32 weights,
    /// optimizer state, loss and checkpoints).
    #[arg(long, default_value = "f32", value_parser = parse_train_dtype)]
    dtype: candle_core::DType,
    /// Optimizer steps.
    #[arg(long, required_unless_present = "time_budget")]
    steps: Option<u64>,
    /// Train for this long instead (e.g. 90s, 10m, 1h); the schedule is fitted to the budget.
    #[arg(long, value_parser = parse_duration)]
    time_budget: Option<std::time::Duration>,
    /// Micro-batches per optimizer step (per rank under mpirun: the global batch is ranks x
    /// batch x accumulation steps).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// On a CPU, run the --grad-accum micro-batches at once, each on its share of the threads:
    /// faster for small models, whose kernels cannot keep every thread busy; each holds its own
    /// activations. The results are the same either way.
    #[arg(long)]
    side_by_side: bool,
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
    pub(crate) fn config(&self) -> Result<TrainConfig> {
        Ok(TrainConfig {
            out: self.out.clone(),
            device: self.device.device()?,
            dtype: self.dtype,
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
            side_by_side: self.side_by_side,
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
            resume: self.resume,
            stop_at: self.stop_at,
            progress: progress(),
        })
    }
}

/// Parses `90s`, `10m`, `1h` or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
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

pub(crate) fn print_outcome(stage: &str, o: &TrainOutcome) {
    if !talaria::train::collective::is_main() {
        return;
    }
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
    if o.interrupted && talaria::train::trainer::interrupt_flag().load(std::sync::atomic::Ordering::SeqCst) {
        // Stopped by Ctrl-C: a script must not carry on as if the stage had finished.
        std::process::exit(130);
    }
}

/// `--dtype` of the training commands.
pub(crate) fn parse_train_dtype(s: &str) -> std::result::Result<candle_core::DType, String> {
    match s {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        _ => Err(format!("expected f32 or bf16, got {s}")),
    }
}
