//! RLHF with PPO (InstructGPT): the SFT model (actor) answers prompts with the KV-cache engine,
//! a reward model (or the default world's gold labeller or verifier) scores the answers, a
//! per-token KL penalty keeps the actor near the frozen SFT model (reference), and a critic
//! initialised from the reward model estimates values for GAE. Both are updated with clipped PPO
//! losses.
//!
//! The reward source can be the learned reward model or the gold labeller (the truth), so the gap
//! between two runs measures what the reward model leaves on the table.
//!
//! Under MPI (src/train/collective.rs) rank r answers the step's prompts r, r + N, ..., scores and
//! passes over its own answers, and takes its share of every minibatch; reward statistics,
//! advantage whitening, the KL and the gradients are computed over all ranks, so every rank takes
//! the optimizer steps of the one-process run.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::chat::ChatTemplate;
use crate::checkpoint::{self, CHECKPOINT_DIR, Checkpoint, CheckpointWriter, Meta};
use crate::data::prompts::{PromptRecord, read_prompts};
use crate::data::shards::{LoaderPosition, Split, TokenLoader};
use crate::data::synth::{gold, verify};
use crate::engine::{self, EngineConfig, FinishReason, Request, Sampling, SamplingParams};
use crate::metrics::MetricsLog;
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;
use crate::train::answers::{
    Batch, answer_logprobs, answer_logprobs_and_dists, answer_rows, exact_kl, grouped_batch, last_token_scores,
    token_kl,
};
use crate::train::collective::{self, Collective};
use crate::train::order::EpochOrder;
use crate::train::reward::{RewardModel, SCORE_HEAD};
use crate::train::rl::{self, KlController, RunningStats};
use crate::train::{AdamW, AdamWConfig, LrSchedule, ParamSet, accumulate, clip_scale, global_norm};

/// Where rewards come from.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSpec {
    /// A reward-model checkpoint (`talaria reward`).
    Model(PathBuf),
    /// The default world's rule-based verifier: 1 for an exactly correct answer, partial credit below
    /// 0.5 for a near miss (prompts need `answer` and `skill`). It reads single questions only: on a
    /// challenge or a question about a stranger it would punish the right reply, so use `Gold` there.
    Verifier,
    /// The default world's gold labeller: content, then format, concision and manners
    /// ([`crate::data::synth::gold`]; prompts need `answer` and `skill`).
    Gold,
}

/// The critic's checkpoint, inside the actor's.
pub const CRITIC_DIR: &str = "critic";

/// Held-out prompts the periodic probe answers: enough for a steady mean, few enough that probing
/// costs a fraction of a step.
const PROBE_PROMPTS: usize = 128;

/// At most `n` of `all`, evenly spaced (the prompt files group by skill, so this keeps every skill).
fn evenly<T>(all: Vec<T>, n: usize) -> Vec<T> {
    if all.len() <= n {
        return all;
    }
    let len = all.len();
    let mut picked = vec![false; len];
    for i in 0..n {
        picked[i * len / n] = true;
    }
    all.into_iter()
        .zip(picked)
        .filter(|(_, k)| *k)
        .map(|(x, _)| x)
        .collect()
}

/// `talaria ppo` settings. The defaults are those published PPO implementations converge on: clip and
/// value clip 0.2, gamma 1, GAE lambda 0.95, rewards clipped to 5 and normalised, a per-token KL penalty.
#[derive(Debug, Clone)]
pub struct PpoConfig {
    /// The actor's starting point; also the frozen reference unless `reference` is given.
    pub policy: PathBuf,
    /// Where the actor, critic, reference and reward model run (`--device`).
    pub device: Device,
    /// The precision of the actor's and critic's matrix products in the update: F32, or BF16 for
    /// mixed precision (`--dtype`; rollouts and the other passes stay f32).
    pub dtype: DType,
    /// The model the KL penalty keeps the actor near (default: `policy`).
    pub reference: Option<PathBuf>,
    pub reward: RewardSpec,
    /// A reward model that only watches: its score of the policy's samples on `eval_prompts` is logged
    /// beside the gold score and the exact KL at each evaluation (for Gao et al.'s picture).
    pub monitor: Option<PathBuf>,
    pub prompts: PathBuf,
    /// Held-out prompts with reference answers: greedy verifier accuracy at each evaluation.
    pub eval_prompts: Option<PathBuf>,
    pub out: PathBuf,
    pub steps: u64,
    pub prompts_per_step: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature, used in the rollout and in the loss alike.
    pub temperature: f64,
    pub lr: f64,
    pub critic_lr: f64,
    pub warmup: u64,
    pub ppo_epochs: usize,
    /// Sequences per PPO minibatch: one optimizer step, its gradient accumulated over chunks of 32.
    pub minibatch: usize,
    pub clip: f64,
    pub value_clip: f64,
    pub gamma: f64,
    pub lambda: f64,
    pub kl_coef: f64,
    /// Target KL per answer for the adaptive controller (`None`: fixed coefficient).
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
    /// Weight of the exact per-token KL(policy || reference) over the whole vocabulary, averaged over
    /// the answer tokens, as a term of the actor's loss (0: off). Unlike the sampled penalty in the
    /// reward, its gradient pulls every token's distribution back toward the reference without the
    /// policy gradient's noise, so tokens the reward cannot judge drift less.
    pub kl_loss_coef: f64,
    /// Normalised rewards are clipped to this magnitude.
    pub reward_clip: f64,
    /// Subtract the mean score of each prompt's answers before normalising (needs several samples per prompt).
    pub prompt_baseline: bool,
    /// Reward (in normalised units) of an answer that never emits the end token.
    pub no_end_penalty: f64,
    /// PPO-ptx (InstructGPT's fix for regressions on what RLHF does not reward): a pretraining data
    /// directory whose LM loss, over as many tokens as the rollouts of each chunk hold, is mixed
    /// into the actor's loss.
    pub ptx_data: Option<PathBuf>,
    pub ptx_coef: f64,
    /// Tokens per PPO-ptx window: the length pretraining trained on, since positions beyond it
    /// were never trained on plain text.
    pub ptx_seq_len: usize,
    pub grad_clip: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub save_every: u64,
    pub resume: bool,
    pub stop_at: Option<u64>,
    pub progress: bool,
}

impl PpoConfig {
    fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "--steps must be positive");
        crate::train::trainer::ensure_matmul_dtype(self.dtype)?;
        ensure!(
            self.prompts_per_step > 0 && self.samples_per_prompt > 0,
            "--prompts-per-step and --samples-per-prompt must be positive"
        );
        ensure!(self.max_new_tokens > 0, "--max-new-tokens must be positive");
        ensure!(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "--temperature must be positive for PPO"
        );
        for (name, v) in [("--lr", self.lr), ("--critic-lr", self.critic_lr)] {
            ensure!(v > 0.0 && v < 1.0, "{name} must be in (0, 1), got {v}");
        }
        ensure!(
            self.ppo_epochs > 0 && self.minibatch > 0,
            "--ppo-epochs and --minibatch must be positive"
        );
        ensure!(self.clip > 0.0 && self.value_clip > 0.0, "clip ranges must be positive");
        ensure!(
            (0.0..=1.0).contains(&self.gamma) && (0.0..=1.0).contains(&self.lambda),
            "gamma and lambda must be in [0, 1]"
        );
        ensure!(
            self.kl_coef >= 0.0 && self.kl_coef.is_finite(),
            "--kl-coef must be non-negative"
        );
        ensure!(
            self.kl_loss_coef >= 0.0 && self.kl_loss_coef.is_finite(),
            "--kl-loss-coef must be non-negative"
        );
        if let Some(t) = self.kl_target {
            ensure!(t > 0.0, "--kl-target must be positive");
        }
        ensure!(self.reward_clip > 0.0, "--reward-clip must be positive");
        ensure!(
            !self.prompt_baseline || self.samples_per_prompt > 1,
            "--prompt-baseline needs --samples-per-prompt above 1"
        );
        ensure!(self.grad_clip > 0.0, "--grad-clip must be positive");
        ensure!(
            self.eval_every > 0 && self.save_every > 0,
            "--eval-every and --save-every must be positive"
        );
        Ok(())
    }
}

/// One sampled answer and everything PPO needs about it.
struct Rollout {
    /// Which prompt of the step this answers.
    group: usize,
    seq: Vec<u32>,
    prompt_len: usize,
    ended: bool,
    score: f64,
    /// Log-probabilities of the answer tokens when sampled (the policy before this step's update).
    logp_old: Vec<f64>,
    /// Entropy of the sampling distribution at each answer token.
    entropy: Vec<f64>,
    logp_ref: Vec<f64>,
    /// The reference's next-token log-distribution at each answer token, `[answer_len * V]` at
    /// temperature 1 (kept only for the exact-KL loss).
    ref_dist: Vec<f32>,
    values: Vec<f64>,
    adv: Vec<f64>,
    ret: Vec<f64>,
}

impl Rollout {
    fn answer_len(&self) -> usize {
        self.seq.len() - self.prompt_len
    }

    /// A sequence to score (no log-probabilities, values or advantages yet).
    fn scored(group: usize, seq: Vec<u32>, prompt_len: usize, ended: bool) -> Self {
        Self {
            group,
            seq,
            prompt_len,
            ended,
            score: 0.0,
            logp_old: vec![],
            entropy: vec![],
            logp_ref: vec![],
            ref_dist: vec![],
            values: vec![],
            adv: vec![],
            ret: vec![],
        }
    }
}

/// Critic values `[N, A]` before each answer token.
fn answer_values(critic: &Gpt, head: &Tensor, b: &Batch) -> Result<Tensor> {
    let rows = answer_rows(critic, b)?;
    Ok(rows.matmul(&head.t()?)?.squeeze(1)?.reshape((b.n, b.a))?)
}

/// The rollouts as one batch, one row per prompt: the prompt once, then each of its answers
/// (`refs` holds a prompt's rollouts next to each other).
fn batch_of(refs: &[&Rollout], pad: u32, device: &Device) -> Result<Batch> {
    let mut groups: Vec<(&[u32], Vec<&[u32]>)> = vec![];
    let mut last_group = None;
    for r in refs {
        let (prompt, answer) = r.seq.split_at(r.prompt_len);
        if last_group != Some(r.group) {
            groups.push((prompt, vec![]));
            last_group = Some(r.group);
        }
        groups.last_mut().expect("pushed above").1.push(answer);
    }
    grouped_batch(&groups, pad, device)
}

/// The answer tokens' log-probabilities at the run's temperature, and with the exact-KL loss term the
/// whole next-token log-distributions at temperature 1 (see [`answer_logprobs_and_dists`]).
fn logprobs_for(cfg: &PpoConfig, model: &Gpt, batch: &Batch) -> Result<(Tensor, Option<Tensor>)> {
    if cfg.kl_loss_coef > 0.0 {
        let (lp, d) = answer_logprobs_and_dists(model, batch, cfg.temperature)?;
        Ok((lp, Some(d)))
    } else {
        Ok((answer_logprobs(model, batch, cfg.temperature)?, None))
    }
}

/// The reference's stored log-distributions of `refs`' answers laid out as [`batch_of`]'s answer
/// positions, `[N * A, V]` (padding positions zero, removed by the batch's mask).
fn reference_dists(refs: &[&Rollout], a: usize, v: usize, device: &Device) -> Result<Tensor> {
    let mut flat = vec![0f32; refs.len() * a * v];
    for (i, r) in refs.iter().enumerate() {
        ensure!(
            r.ref_dist.len() == r.answer_len() * v,
            "reference distributions missing for an answer"
        );
        flat[i * a * v..i * a * v + r.ref_dist.len()].copy_from_slice(&r.ref_dist);
    }
    Ok(Tensor::from_vec(flat, (refs.len() * a, v), device)?)
}

fn rows_of(t: &Tensor, lens: &[usize]) -> Result<Vec<Vec<f64>>> {
    let all = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(all.into_iter().zip(lens).map(|(row, &n)| row[..n].to_vec()).collect())
}

fn to_tensor(rows: &[&[f64]], a: usize, device: &Device) -> Result<Tensor> {
    let mut flat = vec![0f32; rows.len() * a];
    for (i, r) in rows.iter().enumerate() {
        for (k, v) in r.iter().enumerate() {
            flat[i * a + k] = *v as f32;
        }
    }
    Ok(Tensor::from_vec(flat, (rows.len(), a), device)?)
}

/// Sequences per forward/backward pass; larger minibatches accumulate gradients over such chunks.
const MICRO_BATCH: usize = 32;

/// The reward model's score of every rollout, a prompt's answers in one row. An answer that ended
/// is scored as the reward model was trained, closed by `end` (`<|end|>`) whichever stop token the
/// policy sampled.
fn reward_scores(rm: &RewardModel, rollouts: &[Rollout], end: u32, device: &Device) -> Result<Vec<f64>> {
    let mut out = vec![0.0; rollouts.len()];
    for chunk in by_prompt(&(0..rollouts.len()).collect::<Vec<_>>(), rollouts) {
        let answers: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| {
                let r = &rollouts[i];
                let mut a = r.seq[r.prompt_len..].to_vec();
                if let (true, Some(last)) = (r.ended, a.last_mut()) {
                    *last = end;
                }
                a
            })
            .collect();
        let mut groups: Vec<(&[u32], Vec<&[u32]>)> = vec![];
        let mut last_group = None;
        for (&i, a) in chunk.iter().zip(&answers) {
            let r = &rollouts[i];
            if last_group != Some(r.group) {
                groups.push((&r.seq[..r.prompt_len], vec![]));
                last_group = Some(r.group);
            }
            groups.last_mut().expect("pushed above").1.push(a);
        }
        let b = grouped_batch(&groups, rm.pad(), device)?;
        let scores = last_token_scores(&rm.gpt, &rm.head, &b)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        for (&i, sc) in chunk.iter().zip(scores) {
            out[i] = sc;
        }
    }
    Ok(out)
}

/// The rollouts `idx` in chunks of whole prompts (each prompt computed once for all its answers),
/// at most [`MICRO_BATCH`] answers a chunk unless one prompt alone has more. The sum of a
/// minibatch's chunk losses does not depend on how it is chunked.
fn by_prompt(idx: &[usize], rollouts: &[Rollout]) -> Vec<Vec<usize>> {
    let mut sorted = idx.to_vec();
    sorted.sort_by_key(|&i| (rollouts[i].group, i));
    let mut chunks: Vec<Vec<usize>> = vec![];
    let mut at = 0;
    while at < sorted.len() {
        let g = rollouts[sorted[at]].group;
        let end = sorted[at..]
            .iter()
            .position(|&i| rollouts[i].group != g)
            .map_or(sorted.len(), |e| at + e);
        match chunks.last_mut() {
            Some(c) if c.len() + (end - at) <= MICRO_BATCH => c.extend_from_slice(&sorted[at..end]),
            _ => chunks.push(sorted[at..end].to_vec()),
        }
        at = end;
    }
    chunks
}

/// What a finished (or interrupted) PPO run reports.
#[derive(Debug, Clone)]
pub struct PpoOutcome {
    pub steps: u64,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    pub last: Vec<(String, f64)>,
    pub wall_s: f64,
}

/// Greedy verifier accuracy on prompts with reference answers (all prompts pooled).
pub fn verifier_accuracy(
    model: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[PromptRecord],
    max_new: usize,
) -> Result<f64> {
    let scored: Vec<&PromptRecord> = prompts
        .iter()
        .filter(|p| p.answer.is_some() && p.skill.is_some())
        .collect();
    let convs: Vec<&[crate::chat::Message]> = scored.iter().map(|p| p.messages.as_slice()).collect();
    let answers = engine::chat_answers(model, tok, template, &convs, max_new)?;
    let correct = scored
        .iter()
        .zip(&answers)
        .filter(|(p, (text, ended))| {
            *ended
                && verify::is_correct(
                    p.answer.as_deref().unwrap_or(""),
                    p.skill.as_deref().unwrap_or(""),
                    text,
                )
        })
        .count();
    Ok(correct as f64 / scored.len().max(1) as f64)
}

/// The models of a PPO run: the frozen reference, the actor and critic being trained (with
/// untracked views of them for the no-gradient work), and the reward source.
struct Models {
    tok_json: String,
    tok: Tokenizer,
    template: ChatTemplate,
    reference: Gpt,
    actor: ParamSet,
    actor_model: Gpt,
    /// The actor's weights untracked, sharing their storage: rollouts and evaluation see every
    /// update, take the inference kernels and build no graph.
    rollout_model: Gpt,
    critic: ParamSet,
    critic_model: Gpt,
    critic_view: Gpt,
    value_head: Tensor,
    reward_model: Option<RewardModel>,
    /// The reward model whose scores of held-out samples are logged (the reward model itself, when it
    /// drives the run, unless another is given).
    monitor: Option<RewardModel>,
}

/// Everything a resumed run restores besides the weights and optimizers.
struct Progress {
    step: u64,
    tokens: u64,
    order: EpochOrder,
    kl: KlController,
    stats: RunningStats,
    first_len: Option<f64>,
    ptx: Option<TokenLoader>,
}

/// What every rank knows of each of the step's answers, in the one-process order (by prompt).
struct Shared {
    group: usize,
    answer_len: usize,
    score: f64,
    ended: bool,
    /// Its index in this rank's `rollouts`, when this rank sampled it.
    local: Option<usize>,
}

/// One step's sampled answers (this rank's), and for each the index of its prompt record and its
/// decoded text.
struct StepBatch {
    rollouts: Vec<Rollout>,
    /// Every rank's answers, filled in by scoring.
    shared: Vec<Shared>,
    records: Vec<(usize, String)>,
    /// Whether each answer is right by the verifier (for the training-accuracy metric).
    correct: Vec<bool>,
    mean_kl: f64,
    times: [f64; 4],
}

/// What a step's PPO epochs measured.
struct UpdateStats {
    lr: f64,
    seconds: f64,
    policy_loss: f64,
    /// Mean PPO-ptx language-model loss (None without PPO-ptx).
    ptx_loss: Option<f64>,
    /// Mean exact per-token KL of the actor's loss term (None when it is off).
    kl_loss: Option<f64>,
    value_loss: f64,
    clip_frac: f64,
}

/// A PPO run in progress.
struct Ppo<'c> {
    cfg: &'c PpoConfig,
    /// The ranks this run is spread over (one, without MPI).
    world: &'static dyn Collective,
    device: Device,
    m: Models,
    actor_opt: AdamW,
    critic_opt: AdamW,
    at: Progress,
    prompts: Vec<PromptRecord>,
    eval_prompts: Option<Vec<PromptRecord>>,
    ckpt_dir: PathBuf,
    /// Rank 0's metrics log (other ranks write nothing).
    metrics: Option<MetricsLog>,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pb: ProgressBar,
    started: Instant,
    last: Vec<(String, f64)>,
}

/// Runs PPO; the tuned actor ends up in `out/checkpoint`, the critic in `out/critic`.
pub fn ppo(cfg: &PpoConfig) -> Result<PpoOutcome> {
    cfg.validate()?;
    let mut run = Ppo::start(cfg)?;
    if run.at.step == 0 && run.world.rank() == 0 {
        // The starting point of the KL / reward curves: the policy before any update.
        let probe = run.probe()?;
        run.log(0, &probe)?;
    }
    let interrupted = loop {
        if run.at.step >= cfg.steps {
            break false;
        }
        if run.interrupted()? {
            break true;
        }
        let mut batch = run.rollouts()?;
        run.score(&mut batch)?;
        run.reference_and_values(&mut batch)?;
        run.advantages(&mut batch)?;
        let update = run.update(&batch)?;
        run.report(&batch, &update)?;
        if run.at.step.is_multiple_of(cfg.save_every) && run.at.step < cfg.steps {
            run.save()?;
        }
    };
    run.finish(interrupted)
}

impl<'c> Ppo<'c> {
    /// Loads the SFT model (reference and, unless resuming, actor), the reward source and the
    /// critic (from the reward model, or from SFT with a zero head for the verifier), or the saved
    /// actor, critic, optimizers and position of a run to resume.
    fn start(cfg: &'c PpoConfig) -> Result<Self> {
        let device = cfg.device.clone();
        let world = collective::world();
        ensure!(
            world.size() == 1 || cfg.ptx_data.is_none(),
            "--ptx-data runs on one process only: its batches follow each rank's chunks of a minibatch"
        );
        ensure!(
            cfg.prompts_per_step >= world.size(),
            "--prompts-per-step {} is fewer than the {} ranks: every rank answers at least one prompt a step",
            cfg.prompts_per_step,
            world.size()
        );
        let sft = Checkpoint::load(&cfg.policy, DType::F32, &device)?;
        let (tok_json, tok) = sft.tokenizer(&cfg.policy)?;
        let template = ChatTemplate::new(&tok)?;
        let reference = sft.model()?;
        let prompts = read_prompts(&cfg.prompts)?;
        let eval_prompts = cfg
            .eval_prompts
            .as_deref()
            .map(|p| read_prompts(p).map(|all| evenly(all, PROBE_PROMPTS)))
            .transpose()?;
        let reward_model = match &cfg.reward {
            RewardSpec::Model(p) => {
                let rm = RewardModel::load(p, &device)?;
                rm.ensure_tokenizer_of(p, &cfg.policy, Some(&tok_json))?;
                Some(rm)
            }
            RewardSpec::Verifier | RewardSpec::Gold => {
                if let Some(bad) = prompts.iter().position(|p| p.answer.is_none() || p.skill.is_none()) {
                    bail!(
                        "--reward verifier and gold need prompts with \"answer\" and \"skill\"; {} record {} has none",
                        cfg.prompts.display(),
                        bad + 1
                    );
                }
                None
            }
        };
        let reference = match &cfg.reference {
            Some(r) => {
                let ck = Checkpoint::load(r, DType::F32, &device)?;
                ensure!(
                    ck.config == sft.config && ck.tokenizer_json.as_deref() == Some(tok_json.as_str()),
                    "--reference {} is not the same model and tokenizer as {}",
                    r.display(),
                    cfg.policy.display()
                );
                ck.model()?
            }
            None => reference,
        };
        let monitor = cfg
            .monitor
            .as_deref()
            .map(|p| -> Result<RewardModel> {
                let rm = RewardModel::load(p, &device)?;
                rm.ensure_tokenizer_of(p, &cfg.policy, Some(&tok_json))?;
                Ok(rm)
            })
            .transpose()?;
        let ckpt_dir = cfg.out.join(CHECKPOINT_DIR);
        let critic_dir = ckpt_dir.join(CRITIC_DIR);
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
        if !cfg.resume && ckpt_dir.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                cfg.out.display()
            );
        }
        // Actor from SFT (or the saved actor), critic from the reward model (or the saved critic).
        let (actor_ck, critic_ck) = if cfg.resume {
            ensure!(
                ckpt_dir.join(checkpoint::CONFIG_FILE).exists(),
                "--resume: {} has no checkpoint",
                cfg.out.display()
            );
            let (actor, critic) = (
                Checkpoint::load(&ckpt_dir, DType::F32, &device)?,
                Checkpoint::load(&critic_dir, DType::F32, &device)
                    .with_context(|| format!("--resume: {} lacks its critic", ckpt_dir.display()))?,
            );
            ensure!(
                actor.meta.step == critic.meta.step,
                "--resume: the actor in {} is at step {} but its critic at step {}: the checkpoint is inconsistent",
                ckpt_dir.display(),
                actor.meta.step,
                critic.meta.step
            );
            (actor, Some(critic))
        } else {
            (Checkpoint::load(&cfg.policy, DType::F32, &device)?, None)
        };
        ensure!(
            actor_ck.config == sft.config,
            "--resume: the saved actor is a different model from {}",
            cfg.policy.display()
        );
        let actor = ParamSet::from_weights(&actor_ck.config, &actor_ck.weights)?;
        let mut actor_model = actor.model()?;
        actor_model.set_matmul_dtype(cfg.dtype);
        let rollout_model = actor_model.detached();
        let adam = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut actor_opt = AdamW::new(actor.vars(), adam)?;
        let critic_weights = match (&critic_ck, &reward_model) {
            (Some(c), _) => c.weights.clone(),
            (None, Some(rm)) => {
                let mut w = rm.gpt.weights();
                w.insert(SCORE_HEAD.into(), rm.head.clone());
                w
            }
            // With the verifier as reward, the critic starts from the SFT model with a zero head.
            (None, None) => {
                let mut w = sft.weights.clone();
                w.insert(
                    SCORE_HEAD.into(),
                    Tensor::zeros((1, sft.config.n_embd), DType::F32, &device)?,
                );
                w
            }
        };
        let critic_cfg = critic_ck.as_ref().map_or_else(
            || {
                reward_model
                    .as_ref()
                    .map_or(sft.config.clone(), |rm| rm.gpt.config().clone())
            },
            |c| c.config.clone(),
        );
        let critic = ParamSet::with_heads(&critic_cfg, &critic_weights, &[SCORE_HEAD])?;
        let mut critic_opt = AdamW::new(critic.vars(), adam)?;
        let mut critic_model = critic.model()?;
        critic_model.set_matmul_dtype(cfg.dtype);
        let value_head = critic.get(SCORE_HEAD).expect("head present").clone();
        let critic_view = critic_model.detached();

        let mut at = Progress {
            step: 0,
            tokens: 0,
            order: EpochOrder::new(cfg.seed, prompts.len(), 0, 0),
            kl: KlController {
                coef: cfg.kl_coef,
                target: cfg.kl_target,
                horizon: cfg.kl_horizon,
            },
            stats: RunningStats::default(),
            first_len: None,
            ptx: cfg
                .ptx_data
                .as_deref()
                .map(|d| TokenLoader::open(d, Split::Train, cfg.ptx_seq_len.min(sft.config.n_positions), cfg.seed))
                .transpose()?,
        };
        if cfg.resume {
            let st = &actor_ck.meta.state;
            ensure!(
                actor_ck.meta.stage == "ppo",
                "--resume: {} is a {} checkpoint",
                ckpt_dir.display(),
                actor_ck.meta.stage
            );
            at.step = actor_ck.meta.step;
            at.order.restore(&st["prompt_order"])?;
            at.kl.coef = st["kl_coef"].as_f64().context("saved state lacks kl_coef")?;
            at.stats = serde_json::from_value(st["reward_stats"].clone()).context("saved state lacks reward_stats")?;
            at.first_len = st["first_answer_len"].as_f64();
            at.tokens = actor_ck.meta.tokens;
            if let (Some(l), Some(pos)) = (at.ptx.as_mut(), st.get("ptx_position")) {
                let pos: LoaderPosition = serde_json::from_value(pos.clone())?;
                l.restore(pos)?;
            }
            actor_opt.load_state(
                &Checkpoint::load_optimizer(&ckpt_dir, &device)?.context("--resume: no actor optimizer state")?,
            )?;
            critic_opt.load_state(
                &Checkpoint::load_optimizer(&critic_dir, &device)?.context("--resume: no critic optimizer state")?,
            )?;
        }
        collective::broadcast_vars(world, actor.vars())?;
        collective::broadcast_vars(world, critic.vars())?;
        let metrics = match world.rank() {
            0 => Some(MetricsLog::open(&cfg.out, "ppo", at.step)?),
            _ => None,
        };
        let flag = crate::train::trainer::interrupt_flag();
        flag.store(false, Ordering::SeqCst);
        let pb = if cfg.progress && world.rank() == 0 {
            ProgressBar::new(cfg.steps)
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(
            ProgressStyle::with_template("ppo [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid")
                .progress_chars("=> "),
        );
        pb.set_position(at.step);
        Ok(Self {
            cfg,
            world,
            device,
            m: Models {
                tok_json,
                tok,
                template,
                reference,
                actor,
                actor_model,
                rollout_model,
                critic,
                critic_model,
                critic_view,
                value_head,
                reward_model,
                monitor,
            },
            actor_opt,
            critic_opt,
            at,
            prompts,
            eval_prompts,
            ckpt_dir,
            metrics,
            flag,
            pb,
            started: Instant::now(),
            last: vec![],
        })
    }

    /// Step 1: the next prompts, each answered `samples_per_prompt` times by the batched engine, with
    /// the log-probability of every sampled token (the old policy's) and its entropy.
    fn rollouts(&mut self) -> Result<StepBatch> {
        let cfg = self.cfg;
        let t = Instant::now();
        let ctx = self.m.reference.config().n_positions;
        let stop_tokens = self.m.template.stop_tokens(&self.m.tok);
        let mut recs = Vec::with_capacity(cfg.prompts_per_step);
        let mut requests = Vec::with_capacity(cfg.prompts_per_step);
        let mut groups = Vec::with_capacity(cfg.prompts_per_step);
        let (rank, ranks) = (self.world.rank(), self.world.size());
        for p in 0..cfg.prompts_per_step {
            let rec = self.at.order.next();
            if p % ranks != rank {
                continue;
            }
            let prompt_ids = self
                .m
                .template
                .render_prompt(&self.m.tok, &self.prompts[rec].messages)?;
            if prompt_ids.len() + 2 > ctx {
                bail!(
                    "a prompt of {} tokens leaves no room for an answer in the context of {ctx}",
                    prompt_ids.len()
                );
            }
            let samples = (0..cfg.samples_per_prompt)
                .map(|k| Sampling {
                    params: SamplingParams::plain(cfg.temperature),
                    seed: cfg.seed
                        ^ self.at.step.wrapping_mul(1_000_003)
                        ^ ((p * cfg.samples_per_prompt + k) as u64).wrapping_mul(7919),
                })
                .collect();
            let mut r = Request::greedy(prompt_ids, cfg.max_new_tokens, stop_tokens.clone()).with_samples(samples);
            r.sampled_stats = true;
            requests.push(r);
            recs.push(rec);
            groups.push(p);
        }
        let prompt_ids: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let n = requests.len() * cfg.samples_per_prompt;
        let engine_cfg = EngineConfig {
            max_batch: n.max(1),
            token_budget: crate::model::infer::MAX_ROWS.max(n),
            capacity: None,
        };
        let done = engine::generate_batch(&self.m.rollout_model, Some(&self.m.tok), requests, engine_cfg, |_| {})?;
        let mut rollouts = vec![];
        let mut records = vec![];
        for (p, completions) in done.into_iter().enumerate() {
            for c in completions {
                let mut seq = prompt_ids[p].clone();
                seq.extend(&c.tokens);
                // The loss scores exactly what was sampled, the stop token included.
                if let FinishReason::StopToken(t) = c.finish {
                    seq.push(t);
                }
                if seq.len() == prompt_ids[p].len() {
                    // An empty, unended answer (context already full): nothing to learn from.
                    continue;
                }
                let sampled = c.sampled.unwrap_or_default();
                records.push((recs[p], c.text));
                rollouts.push(Rollout {
                    group: groups[p],
                    seq,
                    prompt_len: prompt_ids[p].len(),
                    ended: c.finish.ended(),
                    score: 0.0,
                    logp_old: sampled.iter().map(|s| s.0 as f64).collect(),
                    entropy: sampled.iter().map(|s| s.1 as f64).collect(),
                    logp_ref: vec![],
                    ref_dist: vec![],
                    values: vec![],
                    adv: vec![],
                    ret: vec![],
                });
            }
        }
        let mut sampled = [rollouts.len() as f64];
        self.world.all_reduce_f64(&mut sampled)?;
        ensure!(sampled[0] > 0.0, "no rollouts could be sampled");
        let correct = records
            .iter()
            .map(|(i, text)| {
                let rec: &PromptRecord = &self.prompts[*i];
                matches!((&rec.answer, &rec.skill), (Some(a), Some(s)) if verify::is_correct(a, s, text))
            })
            .collect();
        Ok(StepBatch {
            rollouts,
            shared: vec![],
            records,
            correct,
            mean_kl: 0.0,
            times: [t.elapsed().as_secs_f64(), 0.0, 0.0, 0.0],
        })
    }

    /// Step 2: each answer's score by the reward model or the verifier, into the running reward
    /// statistics.
    fn score(&mut self, b: &mut StepBatch) -> Result<()> {
        let t = Instant::now();
        let scores: Vec<f64> = match (&self.m.reward_model, &self.cfg.reward) {
            (Some(rm), _) => reward_scores(rm, &b.rollouts, self.m.template.end, &self.device)?,
            (None, spec) => b
                .records
                .iter()
                .zip(&b.rollouts)
                .map(|((i, text), r)| {
                    let rec = &self.prompts[*i];
                    let (answer, skill) = (rec.answer.as_deref().unwrap_or(""), rec.skill.as_deref().unwrap_or(""));
                    match spec {
                        RewardSpec::Gold => gold::judge(&rec.messages, answer, skill, text, r.ended).score,
                        _ => verify::reward(answer, skill, text),
                    }
                })
                .collect(),
        };
        for (r, s) in b.rollouts.iter_mut().zip(&scores) {
            r.score = *s;
        }
        b.shared = self.share(&b.rollouts)?;
        for s in b.shared.iter().filter(|s| s.ended) {
            self.at.stats.push(s.score);
        }
        b.times[1] = t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Every rank's answers (prompt, length, score, whether it ended) in the one-process order: by
    /// prompt, a prompt's answers in sampling order (each prompt is answered on one rank).
    fn share(&self, rollouts: &[Rollout]) -> Result<Vec<Shared>> {
        let mine: Vec<f64> = rollouts
            .iter()
            .flat_map(|r| {
                [
                    r.group as f64,
                    r.answer_len() as f64,
                    r.score,
                    f64::from(u8::from(r.ended)),
                ]
            })
            .collect();
        let mut shared = vec![];
        for (rank, theirs) in self.world.all_gather_f64(&mine)?.iter().enumerate() {
            for (j, f) in theirs.chunks_exact(4).enumerate() {
                shared.push(Shared {
                    group: f[0] as usize,
                    answer_len: f[1] as usize,
                    score: f[2],
                    ended: f[3] > 0.0,
                    local: (rank == self.world.rank()).then_some(j),
                });
            }
        }
        shared.sort_by_key(|s| s.group);
        Ok(shared)
    }

    /// `values` to `metrics.jsonl` (rank 0).
    fn log(&mut self, step: u64, values: &[(&'static str, f64)]) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.log("ppo", step, self.at.tokens, values),
            None => Ok(()),
        }
    }

    /// Whether a Ctrl-C (on any rank) or `--stop-at` stops the run before the next step.
    fn interrupted(&self) -> Result<bool> {
        let stop = self.cfg.stop_at.is_some_and(|s| self.at.step >= s) || self.flag.load(Ordering::SeqCst);
        let mut votes = [f64::from(u8::from(stop))];
        self.world.all_reduce_f64(&mut votes)?;
        Ok(votes[0] > 0.0)
    }

    /// Step 3: the reference model's log-probabilities and the critic's values at every answer token,
    /// a prompt's answers together.
    fn reference_and_values(&self, b: &mut StepBatch) -> Result<()> {
        let t = Instant::now();
        let pad = self.m.template.end;
        let head = self.m.value_head.detach();
        for chunk in by_prompt(&(0..b.rollouts.len()).collect::<Vec<_>>(), &b.rollouts) {
            let refs: Vec<&Rollout> = chunk.iter().map(|&i| &b.rollouts[i]).collect();
            let batch = batch_of(&refs, pad, &self.device)?;
            let lens: Vec<usize> = refs.iter().map(|r| r.answer_len()).collect();
            let (reference_lp, dists) = logprobs_for(self.cfg, &self.m.reference, &batch)?;
            let reference_lp = rows_of(&reference_lp, &lens)?;
            let values = rows_of(&answer_values(&self.m.critic_view, &head, &batch)?, &lens)?;
            let dists = dists
                .map(|d| d.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()?;
            for (k, ((&i, rl), values)) in chunk.iter().zip(reference_lp).zip(values).enumerate() {
                let r = &mut b.rollouts[i];
                if let Some(d) = &dists {
                    let vocab = d.len() / (batch.n * batch.a);
                    r.ref_dist = d[k * batch.a * vocab..(k * batch.a + r.answer_len()) * vocab].to_vec();
                }
                r.logp_ref = rl;
                r.values = values;
            }
        }
        b.times[2] = t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Step 4: per-token rewards (the KL penalty to the reference on every token, the normalised score,
    /// centred on its prompt's answers with `prompt_baseline`, on the last), GAE advantages and
    /// returns, and the advantages whitened over the whole step.
    fn advantages(&self, b: &mut StepBatch) -> Result<()> {
        let cfg = self.cfg;
        let stats = &self.at.stats;
        let baseline_free: Option<Vec<f64>> = cfg.prompt_baseline.then(|| {
            let scores: Vec<f64> = b.rollouts.iter().map(|r| r.score).collect();
            let groups: Vec<usize> = b.rollouts.iter().map(|r| r.group).collect();
            let ended: Vec<bool> = b.rollouts.iter().map(|r| r.ended).collect();
            rl::group_centred(&scores, &groups, &ended)
        });
        let mut kl_sum = 0.0;
        for (i, r) in b.rollouts.iter_mut().enumerate() {
            let kls: Vec<f64> = r
                .logp_old
                .iter()
                .zip(&r.logp_ref)
                .map(|(a, b)| rl::kl_k1(*a, *b))
                .collect();
            kl_sum += kls.iter().sum::<f64>();
            let mut rewards: Vec<f64> = kls.iter().map(|k| -self.at.kl.coef * k).collect();
            let final_reward = if !r.ended {
                cfg.no_end_penalty
            } else if let Some(centred) = &baseline_free {
                (centred[i] / stats.std()).clamp(-cfg.reward_clip, cfg.reward_clip)
            } else {
                stats.normalise(r.score, cfg.reward_clip)
            };
            *rewards.last_mut().expect("non-empty answer") += final_reward;
            let (adv, ret) = rl::gae(&rewards, &r.values, cfg.gamma, cfg.lambda);
            r.adv = adv;
            r.ret = ret;
        }
        let mut all_adv: Vec<f64> = b.rollouts.iter().flat_map(|r| r.adv.clone()).collect();
        rl::whiten_with(&mut all_adv, |sums| self.world.all_reduce_f64(sums))?;
        let mut at = 0;
        for r in b.rollouts.iter_mut() {
            let n = r.adv.len();
            r.adv = all_adv[at..at + n].to_vec();
            at += n;
        }
        let mut kl = [kl_sum];
        self.world.all_reduce_f64(&mut kl)?;
        b.mean_kl = kl[0] / b.shared.len() as f64;
        Ok(())
    }

    /// Step 5: pPO epochs over shuffled minibatches: for each, one AdamW step of the actor on the
    /// clipped policy loss (plus PPO-ptx) and one of the critic on the clipped value loss, their
    /// gradients accumulated over chunks of whole prompts.
    fn update(&mut self, b: &StepBatch) -> Result<UpdateStats> {
        let cfg = self.cfg;
        let t = Instant::now();
        let device = self.device.clone();
        let pad = self.m.template.end;
        let schedule = |lr: f64| LrSchedule {
            max_lr: lr,
            min_lr: lr,
            warmup: cfg.warmup,
            total: cfg.steps,
        };
        let step = self.at.step;
        let rollouts = &b.rollouts;
        let n_roll = b.shared.len();
        let (mut pl_sum, mut vl_sum, mut clip_sum, mut updates) = (0.0, 0.0, 0.0, 0.0);
        let (mut ptx_sum, mut kl_loss_sum) = (0.0, 0.0);
        let mut mb_order = EpochOrder::new(cfg.seed ^ step, n_roll, 0, 0);
        let (lr, critic_lr) = (schedule(cfg.lr).at(step), schedule(cfg.critic_lr).at(step));
        for _ in 0..cfg.ppo_epochs {
            let idx: Vec<usize> = (0..n_roll).map(|_| mb_order.next()).collect();
            for mb in idx.chunks(cfg.minibatch) {
                // Each chunk's losses are weighted by its share of the minibatch's answer tokens
                // (over all ranks); this rank computes the chunks of the answers it sampled.
                let mb_tokens: usize = mb.iter().map(|&i| b.shared[i].answer_len).sum();
                let mine: Vec<usize> = mb.iter().filter_map(|&i| b.shared[i].local).collect();
                let (mut actor_grads, mut critic_grads) = (None, None);
                let mut clip_mb = 0.0;
                for chunk in by_prompt(&mine, rollouts) {
                    let refs: Vec<&Rollout> = chunk.iter().map(|&i| &rollouts[i]).collect();
                    let share = refs.iter().map(|r| r.answer_len()).sum::<usize>() as f64 / mb_tokens as f64;
                    let batch = batch_of(&refs, pad, &device)?;
                    let rows = |f: fn(&Rollout) -> &[f64]| {
                        to_tensor(&refs.iter().map(|r| f(r)).collect::<Vec<_>>(), batch.a, &device)
                    };
                    let (old, adv) = (rows(|r| &r.logp_old)?, rows(|r| &r.adv)?);
                    let (ret, vold) = (rows(|r| &r.ret)?, rows(|r| &r.values)?);
                    // Actor.
                    let (logp, dists) = logprobs_for(cfg, &self.m.actor_model, &batch)?;
                    let (mut loss, clip_frac) = rl::policy_loss(&logp, &old, &adv, &batch.mask, cfg.clip)?;
                    pl_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
                    if let Some(lp) = dists {
                        let lq = reference_dists(&refs, batch.a, lp.dim(1)?, &device)?;
                        let kl = rl::masked_mean(&token_kl(&lp, &lq, &batch)?, &batch.mask)?;
                        kl_loss_sum += kl.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
                        loss = (loss + (kl * cfg.kl_loss_coef)?)?;
                    }
                    if let Some(loader) = self.at.ptx.as_mut() {
                        let tokens: usize = refs.iter().map(|r| r.seq.len()).sum();
                        let (x, y) = loader.next_batch(tokens.div_ceil(loader.seq_len()).max(1), &device)?;
                        let lm = self.m.actor_model.lm_loss(&x, &y, None)?;
                        ptx_sum += lm.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
                        loss = (loss + (lm * cfg.ptx_coef)?)?;
                    }
                    let loss = (loss * share)?;
                    accumulate(&mut actor_grads, self.m.actor.grads(&loss.backward()?)?)?;
                    // Critic.
                    let values = answer_values(&self.m.critic_model, &self.m.value_head, &batch)?;
                    let vloss = (rl::value_loss(&values, &vold, &ret, &batch.mask, cfg.value_clip)? * share)?;
                    vl_sum += vloss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    accumulate(&mut critic_grads, self.m.critic.grads(&vloss.backward()?)?)?;
                    clip_mb += clip_frac * share;
                }
                for (opt, params, grads, lr) in [
                    (&mut self.actor_opt, &self.m.actor, actor_grads, lr),
                    (&mut self.critic_opt, &self.m.critic, critic_grads, critic_lr),
                ] {
                    // A rank with no answer in this minibatch adds zeros.
                    let grads = match grads {
                        Some(g) => g,
                        None => params
                            .vars()
                            .iter()
                            .map(|(_, v)| v.as_tensor().zeros_like())
                            .collect::<candle_core::Result<_>>()?,
                    };
                    let grads = collective::all_reduce_tensors(self.world, grads)?;
                    opt.step(&grads, lr, clip_scale(global_norm(&grads)?, cfg.grad_clip))?;
                }
                clip_sum += clip_mb;
                updates += 1.0;
            }
        }
        let mut sums = [pl_sum, vl_sum, clip_sum, ptx_sum, kl_loss_sum];
        self.world.all_reduce_f64(&mut sums)?;
        let [pl_sum, vl_sum, clip_sum, ptx_sum, kl_loss_sum] = sums;
        self.at.kl.update(b.mean_kl, n_roll);
        self.at.step += 1;
        self.at.tokens += b.shared.iter().map(|s| s.answer_len as u64).sum::<u64>();
        Ok(UpdateStats {
            lr,
            seconds: t.elapsed().as_secs_f64(),
            policy_loss: pl_sum / updates,
            ptx_loss: self.at.ptx.is_some().then_some(ptx_sum / updates),
            kl_loss: (cfg.kl_loss_coef > 0.0).then_some(kl_loss_sum / updates),
            value_loss: vl_sum / updates,
            clip_frac: clip_sum / updates,
        })
    }

    /// The step's figures to `metrics.jsonl` and the progress bar, warnings about the known
    /// failures, and the held-out verifier accuracy at evaluation steps.
    fn report(&mut self, b: &StepBatch, u: &UpdateStats) -> Result<()> {
        let (cfg, step) = (self.cfg, self.at.step);
        let shared = &b.shared;
        let n_roll = shared.len() as f64;
        let mean_kl = b.mean_kl;
        let mean_len = shared.iter().map(|s| s.answer_len as f64).sum::<f64>() / n_roll;
        // Mean entropy per answer token of the distributions the answers were sampled from, and
        // the verifier's accuracy, over every rank's answers.
        let mut sums = [
            b.rollouts.iter().flat_map(|r| &r.entropy).sum::<f64>(),
            b.rollouts.iter().map(|r| r.entropy.len()).sum::<usize>() as f64,
            b.correct.iter().filter(|c| **c).count() as f64,
            b.correct.len() as f64,
            f64::from(u8::from(
                b.records.iter().any(|(i, _)| self.prompts[*i].answer.is_some()),
            )),
        ];
        self.world.all_reduce_f64(&mut sums)?;
        let entropy = sums[0] / sums[1].max(1.0);
        let accuracy = sums[2] / sums[3].max(1.0);
        let ended = shared.iter().filter(|s| s.ended).count() as f64 / n_roll;
        let first = *self.at.first_len.get_or_insert(mean_len);
        let mean_score = shared.iter().map(|s| s.score).sum::<f64>() / n_roll;
        if self.world.rank() != 0 {
            return Ok(());
        }
        let pb = self.pb.clone();
        if mean_kl < -1e-3 {
            pb.suspend(|| eprintln!("ppo step {step}: warning: negative KL estimate {mean_kl:.4} (too few samples or a sampling/loss temperature mismatch)"));
        }
        if mean_len > 1.5 * first + 4.0 && mean_len > 0.75 * cfg.max_new_tokens as f64 {
            pb.suspend(|| eprintln!("ppo step {step}: warning: answers grew from {first:.1} to {mean_len:.1} tokens (length or repetition hacking?)"));
        }
        if ended < 0.5 {
            pb.suspend(|| {
                eprintln!(
                    "ppo step {step}: warning: only {:.0}% of answers end properly",
                    ended * 100.0
                )
            });
        }
        let mut values = vec![
            ("reward", mean_score),
            ("kl", mean_kl),
            ("kl_coef", self.at.kl.coef),
            ("entropy", entropy),
            ("clip_frac", u.clip_frac),
            ("value_loss", u.value_loss),
            ("policy_loss", u.policy_loss),
            ("answer_len", mean_len),
            ("ended", ended),
            ("lr", u.lr),
            ("rollout_s", b.times[0]),
            ("score_s", b.times[1]),
            ("passes_s", b.times[2]),
            ("update_s", u.seconds),
        ];
        if let Some(ptx) = u.ptx_loss {
            values.push(("ptx_loss", ptx));
        }
        if let Some(kl) = u.kl_loss {
            values.push(("kl_loss", kl));
        }
        if sums[4] > 0.0 {
            values.push(("train_accuracy", accuracy));
        }
        self.log(step, &values)?;
        pb.set_position(step);
        pb.set_message(format!("reward {mean_score:.3} kl {mean_kl:.3}"));
        if step.is_multiple_of(cfg.eval_every) || step == cfg.steps {
            let probe = self.probe()?;
            self.log(step, &probe)?;
            values.extend(probe);
            let line: Vec<String> = values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            pb.suspend(|| eprintln!("ppo step {step}: {}", line.join(" | ")));
        }
        self.last = values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Ok(())
    }

    /// On the held-out prompts (when given): the greedy verifier accuracy, and on one sample per prompt at
    /// temperature 1 the mean gold score, the monitoring reward model's mean score and the exact KL to the
    /// reference per answer (Gao et al. plot the two scores against its square root).
    fn probe(&self) -> Result<Vec<(&'static str, f64)>> {
        let Some(ev) = &self.eval_prompts else {
            return Ok(vec![]);
        };
        let (cfg, m) = (self.cfg, &self.m);
        let mut out = vec![(
            "eval_accuracy",
            verifier_accuracy(&m.rollout_model, &m.tok, &m.template, ev, cfg.max_new_tokens)?,
        )];
        let stops = m.template.stop_tokens(&m.tok);
        let requests = ev
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prompt = m.template.render_prompt(&m.tok, &p.messages)?;
                let sampling = Sampling {
                    params: SamplingParams::plain(1.0),
                    seed: cfg.seed ^ 0x5eed ^ (i as u64).wrapping_mul(7919),
                };
                Ok(Request::greedy(prompt, cfg.max_new_tokens, stops.clone()).with_samples(vec![sampling]))
            })
            .collect::<Result<Vec<_>>>()?;
        let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let done = engine::generate_batch(
            &m.rollout_model,
            Some(&m.tok),
            requests,
            EngineConfig::default(),
            |_| {},
        )?;
        let mut answers = Vec::with_capacity(done.len());
        let mut gold_sum = 0.0;
        let mut scored = 0usize;
        for (p, c) in ev.iter().zip(done) {
            let c = &c[0];
            if let (Some(a), Some(sk)) = (&p.answer, &p.skill) {
                gold_sum += gold::judge(&p.messages, a, sk, &c.text, c.finish.ended()).score;
                scored += 1;
            }
            let mut toks = c.tokens.clone();
            if let FinishReason::StopToken(t) = c.finish {
                toks.push(t);
            }
            answers.push((toks, c.finish.ended()));
        }
        if scored > 0 {
            out.push(("eval_gold", gold_sum / scored as f64));
        }
        // One row per sampled answer after its prompt.
        let rows = || -> Vec<Rollout> {
            prompts
                .iter()
                .zip(&answers)
                .enumerate()
                .filter(|(_, (_, (a, _)))| !a.is_empty())
                .map(|(g, (p, (a, ended)))| {
                    let mut seq = p.clone();
                    seq.extend(a);
                    Rollout::scored(g, seq, p.len(), *ended)
                })
                .collect()
        };
        if let Some(rm) = m.monitor.as_ref().or(m.reward_model.as_ref()) {
            let scores = reward_scores(rm, &rows(), m.template.end, &self.device)?;
            out.push(("eval_rm", scores.iter().sum::<f64>() / scores.len().max(1) as f64));
        }
        let rs = rows();
        let mut kl = vec![];
        for chunk in by_prompt(&(0..rs.len()).collect::<Vec<_>>(), &rs) {
            let refs: Vec<&Rollout> = chunk.iter().map(|&i| &rs[i]).collect();
            let b = batch_of(&refs, m.template.end, &self.device)?;
            kl.extend(exact_kl(&m.rollout_model, &m.reference, &b)?);
        }
        let mean_kl = kl.iter().sum::<f64>() / kl.len().max(1) as f64;
        out.push(("eval_kl", mean_kl));
        out.push(("eval_sqrt_kl", mean_kl.max(0.0).sqrt()));
        Ok(out)
    }

    /// Checkpoints the critic, then the actor, with their optimizers and the run's position.
    fn save(&self) -> Result<()> {
        let cfg = self.cfg;
        let at = &self.at;
        let state = json!({
            "prompt_order": at.order.state(),
            "kl_coef": at.kl.coef,
            "reward_stats": at.stats,
            "first_answer_len": at.first_len,
            "ptx_position": at.ptx.as_ref().map(|l| l.position()),
            "world_size": self.world.size(),
        });
        collective::ensure_same(self.world, state.to_string().as_bytes(), "the run's position")?;
        if self.world.rank() != 0 {
            return Ok(());
        }
        let meta = Meta {
            stage: "ppo".into(),
            step: at.step,
            tokens: at.tokens,
            seed: Some(cfg.seed),
            parent: Some(cfg.policy.display().to_string()),
            state,
            ..Meta::default()
        };
        // The critic is saved inside the actor's checkpoint, so the two are replaced in one atomic step.
        let cmeta = Meta {
            stage: "ppo-critic".into(),
            ..meta.clone()
        };
        let critic = CheckpointWriter {
            config: self.m.critic.config(),
            weights: &self.m.critic.weights(),
            tokenizer_json: Some(&self.m.tok_json),
            meta: &cmeta,
            optimizer: Some(&self.critic_opt.state()?),
        };
        CheckpointWriter {
            config: self.m.actor.config(),
            weights: &self.m.actor.weights(),
            tokenizer_json: Some(&self.m.tok_json),
            meta: &meta,
            optimizer: Some(&self.actor_opt.state()?),
        }
        .save_with(&self.ckpt_dir, &[(CRITIC_DIR, &critic)])
    }

    /// The last checkpoint and what the run reports.
    fn finish(self, interrupted: bool) -> Result<PpoOutcome> {
        self.pb.finish_and_clear();
        self.save()?;
        if interrupted && self.world.rank() == 0 {
            eprintln!(
                "ppo: stopped at step {}; checkpoint saved in {} (continue with --resume)",
                self.at.step,
                self.ckpt_dir.display()
            );
        }
        Ok(PpoOutcome {
            steps: self.at.step,
            interrupted,
            last: self.last,
            wall_s: self.started.elapsed().as_secs_f64(),
            checkpoint: self.ckpt_dir,
        })
    }
}
