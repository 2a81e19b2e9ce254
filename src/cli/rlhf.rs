//! `talaria ppo` and `talaria dpo`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use talaria::train::dpo::{self, DpoConfig};
use talaria::train::ppo::{self, PpoConfig, RewardSpec};

use super::{DeviceArg, TrainArgs, print_outcome, progress};

#[derive(Args)]
pub(crate) struct DpoArgs {
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
pub(crate) struct PpoArgs {
    /// The SFT checkpoint: actor and frozen reference.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    /// The precision of the update's matrix products: f32, or bf16 for mixed precision.
    #[arg(long, default_value = "f32", value_parser = super::parse_train_dtype)]
    dtype: candle_core::DType,
    /// A reward-model checkpoint, `verifier` for the default world's rule-based reward, or `gold` for
    /// its gold labeller.
    #[arg(long)]
    reward: String,
    /// The model the KL penalty keeps the actor near (default: --policy).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// A reward model whose scores of the policy's samples on --eval-prompts are logged at each
    /// evaluation, beside the gold score and the exact KL (default: --reward when it is a model).
    #[arg(long)]
    monitor: Option<PathBuf>,
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
    /// Weight of the exact per-token KL to the reference over the whole vocabulary as a term of the
    /// actor's loss (0: off; it holds the logits of every answer token, so suits small vocabularies).
    #[arg(long, default_value_t = 0.0)]
    kl_loss_coef: f64,
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
    /// Tokens per PPO-ptx window: the sequence length pretraining used (default: the context).
    #[arg(long)]
    ptx_seq_len: Option<usize>,
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

impl DpoArgs {
    pub(crate) fn run(self) -> Result<()> {
        let cfg = DpoConfig {
            policy: self.policy,
            data: self.data,
            val_data: self.val_data,
            val_fraction: self.val_fraction,
            beta: self.beta,
            nll_coef: self.nll_coef,
            batch_size: self.batch_size,
            train: self.train.config()?,
        };
        print_outcome("dpo", &dpo::dpo(&cfg)?);
        Ok(())
    }
}

impl PpoArgs {
    pub(crate) fn run(self) -> Result<()> {
        let reward = if self.reward == "verifier" {
            RewardSpec::Verifier
        } else if self.reward == "gold" {
            RewardSpec::Gold
        } else {
            RewardSpec::Model(self.reward.into())
        };
        let cfg = PpoConfig {
            device: self.device.device()?,
            dtype: self.dtype,
            policy: self.policy,
            reference: self.reference,
            reward,
            monitor: self.monitor,
            prompts: self.prompts,
            eval_prompts: self.eval_prompts,
            out: self.out,
            steps: self.steps,
            prompts_per_step: self.prompts_per_step,
            samples_per_prompt: self.samples_per_prompt,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            lr: self.lr,
            critic_lr: self.critic_lr,
            warmup: self.warmup,
            ppo_epochs: self.ppo_epochs,
            minibatch: self.minibatch,
            clip: self.clip,
            value_clip: self.value_clip,
            gamma: self.gamma,
            lambda: self.lambda,
            kl_coef: self.kl_coef,
            kl_target: self.kl_target,
            kl_horizon: self.kl_horizon,
            kl_loss_coef: self.kl_loss_coef,
            reward_clip: self.reward_clip,
            prompt_baseline: self.prompt_baseline,
            no_end_penalty: self.no_end_penalty,
            ptx_data: self.ptx_data,
            ptx_coef: self.ptx_coef,
            ptx_seq_len: self.ptx_seq_len.unwrap_or(usize::MAX),
            grad_clip: self.grad_clip,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            resume: self.resume,
            stop_at: self.stop_at,
            progress: progress(),
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
        if o.interrupted && talaria::train::trainer::interrupt_flag().load(std::sync::atomic::Ordering::SeqCst) {
            // Stopped by Ctrl-C: a script must not carry on as if the stage had finished.
            std::process::exit(130);
        }
        Ok(())
    }
}
