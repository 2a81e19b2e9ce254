//! `talaria pretrain`, `sft`, `reward` and `speedrun`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use talaria::speedrun;
use talaria::train::pretrain::{self, PretrainConfig};
use talaria::train::reward::{self, RewardConfig};
use talaria::train::sft::{self, SftConfig};

use super::{TrainArgs, print_outcome, progress};

#[derive(Args)]
pub(crate) struct PretrainArgs {
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
pub(crate) struct SftArgs {
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
pub(crate) struct RewardArgs {
    /// The SFT checkpoint (or run directory) the reward model starts from, or a reward model to train further.
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
pub(crate) struct SpeedrunArgs {
    /// cpu (about 20 minutes on two cores), tiny (a few minutes, a smoke test) or gpu (GPT-2 small's
    /// shape in mixed precision, with --device cuda).
    #[arg(long, default_value = "cpu")]
    preset: String,
    #[command(flatten)]
    device: super::DeviceArg,
    #[arg(long, default_value = "runs/speedrun")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// RLHF rounds; from the second on, the labeller ranks the last PPO policy's answers, the reward model
    /// trains further on them and PPO continues from that policy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    rl_rounds: u64,
}

impl PretrainArgs {
    pub(crate) fn run(self) -> Result<()> {
        let cfg = PretrainConfig {
            data: self.data,
            model: self.model,
            tokenizer: self.tokenizer,
            init: self.init,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            val_batches: self.val_batches,
            samples: 2,
            train: self.train.config()?,
        };
        print_outcome("pretrain", &pretrain::pretrain(&cfg)?);
        Ok(())
    }
}

impl SftArgs {
    pub(crate) fn run(self) -> Result<()> {
        let cfg = SftConfig {
            init: self.init,
            data: self.data,
            val_data: self.val_data,
            val_fraction: self.val_fraction,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            train: self.train.config()?,
        };
        print_outcome("sft", &sft::sft(&cfg)?);
        Ok(())
    }
}

impl RewardArgs {
    pub(crate) fn run(self) -> Result<()> {
        let cfg = RewardConfig {
            init: self.init,
            data: self.data,
            val_data: self.val_data,
            val_fraction: self.val_fraction,
            batch_size: self.batch_size,
            train: self.train.config()?,
        };
        print_outcome("reward", &reward::train_reward_model(&cfg)?);
        Ok(())
    }
}

impl SpeedrunArgs {
    pub(crate) fn run(self) -> Result<()> {
        let cfg = speedrun::SpeedrunConfig {
            preset: speedrun::preset(&self.preset)?,
            out: self.out,
            seed: self.seed,
            rl_rounds: self.rl_rounds as usize,
            progress: progress(),
            device: self.device.device()?,
        };
        let o = speedrun::speedrun(&cfg)?;
        println!("report: {}", o.report.display());
        println!("chat with the result: talaria chat {}", o.chat_checkpoint.display());
        Ok(())
    }
}
