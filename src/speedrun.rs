//! `talaria speedrun`: the whole recipe end to end on the built-in default world — synth →
//! tokenizer → data prepare → pretrain → SFT → label → reward model → PPO (on the reward model, then on the
//! gold labeller) → [label → reward model → PPO again, per extra RLHF round] → DPO → eval → report —
//! one line per stage. A finished stage is reused when its inputs and settings are unchanged (its key, a hash
//! of both, is stored beside it), and an interrupted training stage resumes from its checkpoint.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::data::prepare::{self, PrepareConfig};
use crate::data::readers::ReadOptions;
use crate::data::synth::{self, SynthConfig};
use crate::eval::report::{EvalSummary, SETTINGS_FILE, StageEval, pct, write_report};
use crate::eval::run::{DONE_FILE, evaluate_run};
use crate::tokenizer;
use crate::train::AdamWConfig;
use crate::train::comparisons::{self, LabelConfig};
use crate::train::dpo::{self, DpoConfig};
use crate::train::ppo::{self, PpoConfig, RewardSpec};
use crate::train::pretrain::{self, PretrainConfig};
use crate::train::reward::{self, RewardConfig};
use crate::train::sft::{self, SftConfig};
use crate::train::trainer::{TrainConfig, interrupt_flag};
use std::sync::atomic::Ordering;

/// The sizes and budgets of one speedrun.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedrunPreset {
    pub name: &'static str,
    pub synth_scale: f64,
    pub vocab_size: usize,
    pub model: &'static str,
    pub seq_len: usize,
    pub pretrain_steps: u64,
    pub pretrain_batch: usize,
    pub pretrain_lr: f64,
    pub sft_steps: u64,
    pub sft_batch: usize,
    pub sft_lr: f64,
    /// Answers the SFT model gives per labeller prompt (ranked into comparisons for the reward model).
    pub label_samples: usize,
    pub reward_steps: u64,
    pub reward_batch: usize,
    pub reward_lr: f64,
    /// PPO driven by the reward model: the RLHF stage, whose policy the run ends with.
    pub ppo: PpoPreset,
    /// PPO driven by the default world's gold labeller (the true reward), at settings tuned for it: the gap
    /// between the two runs is what the reward model leaves on the table.
    pub ppo_gold: PpoPreset,
    /// DPO on the labeller's rankings of the SFT model's answers (the stage after PPO).
    pub dpo_steps: u64,
    pub dpo_lr: f64,
    pub dpo_beta: f64,
    /// Weight of the chosen answers' NLL in the DPO loss (RPO).
    pub dpo_nll_coef: f64,
    pub max_new_tokens: usize,
    /// Micro-batches each step of the trainer stages splits its batch into; on a CPU they run side
    /// by side, each on its share of the threads (`--side-by-side`, src/train/trainer.rs), which a
    /// small model's kernels cannot keep busy alone.
    pub micro_batches: usize,
    /// Mixed precision (bf16 matrix products, f32 weights) in the training stages.
    pub bf16: bool,
}

impl SpeedrunPreset {
    /// The training stages' `--dtype`.
    fn train_dtype(&self) -> candle_core::DType {
        if self.bf16 {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }
    }
}

/// The settings of one PPO stage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PpoPreset {
    pub steps: u64,
    pub prompts: usize,
    /// Answers per prompt, each judged against its siblings (a per-prompt baseline when above 1).
    pub samples: usize,
    pub lr: f64,
    pub kl_coef: f64,
    /// Weight of the exact-KL term in the actor's loss (`talaria ppo --kl-loss-coef`); left out of
    /// the stage key when 0, so runs made before the term existed are reused.
    #[serde(skip_serializing_if = "is_zero")]
    pub kl_loss: f64,
    pub epochs: usize,
    /// Sampling temperature of the rollouts (and of the PPO loss).
    pub temperature: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Both PPO stages of the smoke test: a few steps, enough to exercise every part of the loop.
const TINY_PPO: PpoPreset = PpoPreset {
    steps: 3,
    prompts: 4,
    samples: 2,
    lr: 2e-5,
    kl_coef: 0.1,
    kl_loss: 0.0,
    epochs: 1,
    temperature: 1.0,
};

/// `cpu`: the README's main job, sized for 20 minutes on two laptop cores. `tiny`: a
/// three-minute smoke test of every stage. `gpu`: GPT-2 small's shape for one GPU.
pub fn preset(name: &str) -> Result<SpeedrunPreset> {
    match name {
        "cpu" => Ok(SpeedrunPreset {
            name: "cpu",
            synth_scale: 1.0,
            // Nearly character-level: reversing and spelling need to see letters (docs/default-world.md).
            vocab_size: 300,
            model: "cpu",
            seq_len: 128,
            pretrain_steps: 2400,
            pretrain_batch: 16,
            pretrain_lr: 3e-3,
            sft_steps: 800,
            sft_batch: 16,
            sft_lr: 1e-3,
            label_samples: 4,
            reward_steps: 500,
            reward_batch: 16,
            reward_lr: 5e-4,
            // Measured on this world (docs/tuning-history.md, "PPO on generator version 4"): the reward
            // model cannot check content, so what PPO changes beyond the labellers' habits is drift, and
            // drift costs content. A KL coefficient of 0.15 (against 0.05) keeps the exact KL near 0.3
            // per answer and halves the content lost; rollouts at temperature 1 reach a higher gold score
            // than at 0.7. PPO-ptx on the pretraining text pulled the policy away from SFT instead. On
            // generator version 5 KL 0.2 lost more `sort` content than 0.15 ("Formats in the RL prompts").
            ppo: PpoPreset {
                steps: 40,
                prompts: 16,
                samples: 8,
                lr: 2e-5,
                kl_coef: 0.15,
                kl_loss: 0.0,
                epochs: 2,
                temperature: 1.0,
            },
            // The gold labeller cannot be exploited, so its PPO keeps the weaker KL penalty and the
            // cooler rollouts that PPO on the true reward was tuned with on generator version 3
            // (docs/tuning-history.md, "PPO and DPO settings on generator version 3").
            ppo_gold: PpoPreset {
                steps: 40,
                prompts: 16,
                samples: 8,
                lr: 2e-5,
                kl_coef: 0.05,
                kl_loss: 0.0,
                epochs: 2,
                temperature: 0.7,
            },
            dpo_steps: 300,
            dpo_lr: 5e-5,
            dpo_beta: 0.1,
            dpo_nll_coef: 1.0,
            max_new_tokens: 40,
            micro_batches: 2,
            bf16: false,
        }),
        "tiny" => Ok(SpeedrunPreset {
            name: "tiny",
            synth_scale: 0.05,
            vocab_size: 512,
            model: "tiny",
            seq_len: 64,
            pretrain_steps: 120,
            pretrain_batch: 8,
            pretrain_lr: 3e-3,
            sft_steps: 60,
            sft_batch: 8,
            sft_lr: 1e-3,
            label_samples: 2,
            reward_steps: 30,
            reward_batch: 8,
            reward_lr: 5e-4,
            ppo: TINY_PPO,
            ppo_gold: TINY_PPO,
            dpo_steps: 10,
            dpo_lr: 5e-5,
            dpo_beta: 0.1,
            dpo_nll_coef: 1.0,
            max_new_tokens: 12,
            micro_batches: 1,
            bf16: false,
        }),
        // One GPU (`--device cuda`): GPT-2 small's shape on a default world four times the `cpu`
        // one's, in mixed precision, at nanoGPT's pretraining rate for that shape and the `cpu`
        // preset's KL settings. Meant for about ten minutes on one H100-class GPU; it has not run
        // on one yet (scripts/gpu_check.sh runs it where a GPU is lent).
        "gpu" => Ok(SpeedrunPreset {
            name: "gpu",
            synth_scale: 4.0,
            vocab_size: 300,
            model: "gpt2",
            seq_len: 256,
            pretrain_steps: 2000,
            pretrain_batch: 32,
            pretrain_lr: 6e-4,
            sft_steps: 800,
            sft_batch: 32,
            sft_lr: 1e-4,
            label_samples: 4,
            reward_steps: 500,
            reward_batch: 32,
            reward_lr: 5e-5,
            ppo: PpoPreset {
                steps: 40,
                prompts: 32,
                samples: 8,
                lr: 5e-6,
                kl_coef: 0.15,
                kl_loss: 0.0,
                epochs: 2,
                temperature: 1.0,
            },
            ppo_gold: PpoPreset {
                steps: 40,
                prompts: 32,
                samples: 8,
                lr: 5e-6,
                kl_coef: 0.05,
                kl_loss: 0.0,
                epochs: 2,
                temperature: 0.7,
            },
            dpo_steps: 300,
            dpo_lr: 1e-5,
            dpo_beta: 0.1,
            dpo_nll_coef: 1.0,
            max_new_tokens: 40,
            micro_batches: 1,
            bf16: true,
        }),
        other => bail!("unknown speedrun preset {other:?}; choose cpu, tiny or gpu"),
    }
}

/// `talaria speedrun` settings.
#[derive(Debug, Clone)]
pub struct SpeedrunConfig {
    pub preset: SpeedrunPreset,
    pub out: PathBuf,
    pub seed: u64,
    /// RLHF rounds: from the second on, the labeller ranks the last PPO policy's samples, the reward model
    /// trains further on them and PPO continues from that policy (InstructGPT's iterated collection).
    pub rl_rounds: usize,
    pub progress: bool,
    /// Where every stage runs (`--device`).
    pub device: candle_core::Device,
}

/// What a speedrun produced.
#[derive(Debug, Clone)]
pub struct SpeedrunOutcome {
    pub report: PathBuf,
    pub chat_checkpoint: PathBuf,
    pub eval: EvalSummary,
    pub wall_s: f64,
}

fn key_of(parts: &Value) -> String {
    let digest = Sha256::digest(parts.to_string().as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Stages in a run: synth, tokenizer, data, pretrain, SFT, label, reward, PPO, PPO on the gold labeller, then
/// label, reward and PPO again for each further RLHF round, DPO, eval, report.
pub fn stages(rl_rounds: usize) -> usize {
    12 + 3 * rl_rounds.saturating_sub(1)
}

const KEY_FILE: &str = ".stage-key";

/// A hex digest of a file's bytes, read in blocks.
fn file_digest(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// After the first Ctrl-C (the training stages have saved their checkpoint): stop the run, leaving the
/// stage unfinished so that the same command resumes it.
fn stop_if_interrupted(name: &str) -> Result<()> {
    if interrupt_flag().load(Ordering::SeqCst) {
        bail!("interrupted during the {name} stage; run the same command again to resume from its checkpoint");
    }
    Ok(())
}

/// Runs a stage unless a finished one with the same key exists. A partial run with the same
/// key is resumed (`f` gets `resume = true`); a stale one is removed first. `at` is the stage's position
/// out of `total`.
fn stage(
    (n, total): (usize, usize),
    name: &str,
    dir: &Path,
    key: &str,
    f: impl FnOnce(bool) -> Result<Value>,
) -> Result<(Value, f64)> {
    let done = dir.join(DONE_FILE);
    if let Ok(text) = std::fs::read_to_string(&done)
        && let Ok(v) = serde_json::from_str::<Value>(&text)
        && v["key"] == key
    {
        println!("[{n}/{total}] {name:<12} reused ({})", dir.display());
        return Ok((v["summary"].clone(), v["wall_s"].as_f64().unwrap_or(0.0)));
    }
    let pending = std::fs::read_to_string(dir.join(KEY_FILE)).ok();
    let resume = pending.as_deref() == Some(key) && dir.join("checkpoint").join("config.json").exists();
    if !resume && dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing the stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(KEY_FILE), key)?;
    let start = Instant::now();
    let summary = f(resume).with_context(|| format!("speedrun stage {name}"))?;
    stop_if_interrupted(name)?;
    let wall = start.elapsed().as_secs_f64();
    std::fs::write(
        &done,
        serde_json::to_string_pretty(&json!({"key": key, "wall_s": wall, "summary": summary}))?,
    )?;
    println!(
        "[{n}/{total}] {name:<12} done in {wall:.0}s{}",
        if resume { " (resumed)" } else { "" }
    );
    Ok((summary, wall))
}

fn train_cfg(out: &Path, steps: u64, lr: f64, cfg: &SpeedrunConfig, resume: bool) -> TrainConfig {
    TrainConfig {
        out: out.to_path_buf(),
        device: cfg.device.clone(),
        dtype: cfg.preset.train_dtype(),
        steps: Some(steps),
        time_budget: None,
        lr,
        min_lr: lr / 10.0,
        warmup: (steps / 20).clamp(1, 50),
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        grad_accum: cfg.preset.micro_batches,
        side_by_side: true,
        eval_every: (steps / 4).max(1),
        save_every: (steps / 4).max(1),
        seed: cfg.seed,
        resume,
        stop_at: None,
        progress: cfg.progress,
    }
}

/// Runs the whole recipe, one stage after the other; each stage's inputs are the outputs (and
/// keys) of the stages before it.
pub fn speedrun(cfg: &SpeedrunConfig) -> Result<SpeedrunOutcome> {
    ensure!(cfg.rl_rounds >= 1, "--rl-rounds must be at least 1");
    let started = Instant::now();
    let p = &cfg.preset;
    let run = Chain::start(cfg)?;
    let world = run.synth()?;
    let tokenizer = run.tokenizer(&world)?;
    let data = run.data(&world, &tokenizer)?;
    let base = run.pretrain(&data)?;
    let sft = run.sft(&world, &base)?;
    let rankings = run.label("label", &world, &sft)?;
    let rm = run.reward("reward", &world, &sft, &[&rankings], p.reward_steps)?;
    let mut ppo = run.ppo("ppo", &world, &sft, &sft, Some(&rm), None, &p.ppo)?;
    run.ppo("ppo-gold", &world, &sft, &sft, None, Some(&rm), &p.ppo_gold)?;
    let (mut rm, mut all_rankings) = (rm, vec![rankings.clone()]);
    for round in 2..=cfg.rl_rounds {
        let ranked = run.label(&format!("label-round{round}"), &world, &ppo)?;
        all_rankings.push(ranked);
        let refs: Vec<&Done> = all_rankings.iter().collect();
        rm = run.reward(&format!("reward-round{round}"), &world, &rm, &refs, p.reward_steps / 2)?;
        ppo = run.ppo(
            &format!("ppo-round{round}"),
            &world,
            &ppo,
            &sft,
            Some(&rm),
            None,
            &p.ppo,
        )?;
    }
    run.dpo(&sft, &rankings)?;
    let eval = run.evaluate(&world)?;
    let report = write_report(&cfg.out)?;
    println!("[{0}/{0}] report       {1}", run.total, report.display());
    let wall = started.elapsed();
    print_summary(&eval, wall);
    Ok(SpeedrunOutcome {
        report,
        chat_checkpoint: ppo.dir,
        eval,
        wall_s: wall.as_secs_f64(),
    })
}

/// A finished stage: its directory and its key (a hash of its settings and of its inputs' keys).
#[derive(Clone)]
struct Done {
    dir: PathBuf,
    key: String,
}

/// The speedrun's settings, and one method per stage.
struct Chain<'c> {
    cfg: &'c SpeedrunConfig,
    /// Stages started so far, and in all.
    at: Cell<usize>,
    total: usize,
}

impl<'c> Chain<'c> {
    /// Creates the run directory and writes the settings the report lists (`report::SETTINGS_FILE`).
    fn start(cfg: &'c SpeedrunConfig) -> Result<Self> {
        interrupt_flag();
        let out = &cfg.out;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let settings = serde_json::to_string_pretty(&json!({"seed": cfg.seed, "preset": cfg.preset}))?;
        let path = out.join(SETTINGS_FILE);
        std::fs::write(&path, settings).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            cfg,
            at: Cell::new(0),
            total: stages(cfg.rl_rounds),
        })
    }

    /// The next stage's position: (its number, the number of stages).
    fn next(&self) -> (usize, usize) {
        self.at.set(self.at.get() + 1);
        (self.at.get(), self.total)
    }

    fn p(&self) -> &SpeedrunPreset {
        &self.cfg.preset
    }

    fn train_cfg(&self, out: &Path, steps: u64, lr: f64, resume: bool) -> TrainConfig {
        train_cfg(out, steps, lr, self.cfg, resume)
    }

    /// Stage 1: the default world: corpus, demonstrations, preferences, prompt files.
    fn synth(&self) -> Result<Done> {
        let (p, seed) = (self.p(), self.cfg.seed);
        let dir = self.cfg.out.join("world");
        let key = key_of(&json!(["synth", seed, p.synth_scale, synth::GENERATOR_VERSION]));
        stage(self.next(), "synth", &dir, &key, |_| {
            let s = synth::generate(&SynthConfig {
                out: dir.clone(),
                seed,
                scale: p.synth_scale,
            })?;
            Ok(json!({"files": s.files.len(), "skills": s.skills.len()}))
        })?;
        Ok(Done { dir, key })
    }

    /// Stage 2: a byte-level BPE trained on the world's pretraining text. Its key is the text's digest, so
    /// the tokenizer, data and base model survive a change of the world that leaves the corpus alone.
    fn tokenizer(&self, world: &Done) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join("tokenizer");
        let corpus = file_digest(&world.dir.join("pretrain.txt"))?;
        let key = key_of(&json!(["tokenizer", corpus, p.vocab_size]));
        stage(self.next(), "tokenizer", &dir, &key, |_| {
            let tcfg = tokenizer::TrainConfig {
                vocab_size: p.vocab_size,
                min_frequency: 2,
                show_progress: false,
            };
            let corpus = [world.dir.join("pretrain.txt")];
            let (tok, s) = crate::data::bpe::train_from_files(&corpus, &ReadOptions::default(), &tcfg)?;
            tok.save(&dir.join("tokenizer.json"))?;
            Ok(json!({"vocab_size": s.train.vocab_size, "bytes_per_token": s.bytes_per_token()}))
        })?;
        Ok(Done { dir, key })
    }

    /// Stage 3: the pretraining text as train/validation token shards.
    fn data(&self, world: &Done, tokenizer: &Done) -> Result<Done> {
        let dir = self.cfg.out.join("data");
        let key = key_of(&json!(["data", tokenizer.key]));
        stage(self.next(), "data", &dir, &key, |_| {
            let mut pc = PrepareConfig::new(
                vec![world.dir.join("pretrain.txt")],
                tokenizer.dir.join("tokenizer.json"),
                dir.clone(),
            );
            pc.seed = self.cfg.seed;
            pc.show_progress = false;
            let s = prepare::prepare(&pc)?;
            Ok(json!({"train_tokens": s.meta.splits.train.tokens, "val_tokens": s.meta.splits.val.tokens}))
        })?;
        Ok(Done { dir, key })
    }

    /// Stage 4: the base model, by next-token prediction.
    fn pretrain(&self, data: &Done) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join("pretrain");
        let key = key_of(&json!([
            "pretrain",
            data.key,
            p.model,
            p.seq_len,
            p.pretrain_steps,
            p.pretrain_batch,
            p.micro_batches,
            p.pretrain_lr,
            self.cfg.seed
        ]));
        stage(self.next(), "pretrain", &dir, &key, |resume| {
            let o = pretrain::pretrain(&PretrainConfig {
                data: data.dir.clone(),
                model: p.model.into(),
                tokenizer: None,
                init: None,
                batch_size: p.pretrain_batch / p.micro_batches,
                seq_len: Some(p.seq_len),
                val_batches: 8,
                samples: 1,
                train: self.train_cfg(&dir, p.pretrain_steps, p.pretrain_lr, resume),
            })?;
            Ok(json!({"steps": o.steps, "last_eval": o.last_eval}))
        })?;
        Ok(Done { dir, key })
    }

    /// Stage 5: the chat model, fine-tuned on the world's demonstrations.
    fn sft(&self, world: &Done, base: &Done) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join("sft");
        let key = key_of(&json!([
            "sft",
            world.key,
            base.key,
            p.sft_steps,
            p.sft_batch,
            p.sft_lr,
            p.micro_batches
        ]));
        stage(self.next(), "sft", &dir, &key, |resume| {
            let o = sft::sft(&SftConfig {
                init: base.dir.clone(),
                data: vec![world.dir.join("sft_train.jsonl")],
                val_data: vec![world.dir.join("sft_val.jsonl")],
                val_fraction: 0.0,
                batch_size: p.sft_batch / p.micro_batches,
                seq_len: Some(p.seq_len),
                train: self.train_cfg(&dir, p.sft_steps, p.sft_lr, resume),
            })?;
            Ok(json!({"steps": o.steps, "last_eval": o.last_eval}))
        })?;
        Ok(Done { dir, key })
    }

    /// The policy (SFT, or the last PPO policy in a later round) answers the labeller's prompts several times
    /// (greedy, then sampled) and the gold labeller ranks the answers: comparisons of the policy's own
    /// outputs, as InstructGPT collected them. The result is the rankings file.
    fn label(&self, name: &str, world: &Done, policy: &Done) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join(name.replace('-', "_"));
        let rankings = dir.join("rankings.jsonl");
        let key = key_of(&json!([
            "label-gold",
            world.key,
            policy.key,
            p.label_samples,
            p.max_new_tokens,
            self.cfg.seed
        ]));
        stage(self.next(), name, &dir, &key, |_| {
            let s = comparisons::label(&LabelConfig {
                policy: policy.dir.clone(),
                prompts: world.dir.join("label_prompts.jsonl"),
                out: rankings.clone(),
                samples: p.label_samples,
                temperature: 1.0,
                max_new_tokens: p.max_new_tokens,
                seed: self.cfg.seed,
                progress: self.cfg.progress,
                dtype: crate::model::WeightDtype::F32,
                device: self.cfg.device.clone(),
            })?;
            Ok(serde_json::to_value(s)?)
        })?;
        Ok(Done { dir: rankings, key })
    }

    /// The reward model, from `init` (the SFT model, or the last reward model in a later round), on the
    /// world's pairs and rankings and every round's labelled comparisons so far.
    fn reward(&self, name: &str, world: &Done, init: &Done, rankings: &[&Done], steps: u64) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join(name.replace('-', "_"));
        let ranked: Vec<&str> = rankings.iter().map(|r| r.key.as_str()).collect();
        let key = key_of(&json!([
            "reward",
            init.key,
            ranked,
            steps,
            p.reward_batch,
            p.reward_lr,
            p.micro_batches
        ]));
        stage(self.next(), name, &dir, &key, |resume| {
            let mut data = vec![
                world.dir.join("prefs_train.jsonl"),
                world.dir.join("rankings_train.jsonl"),
            ];
            data.extend(rankings.iter().map(|r| r.dir.clone()));
            let o = reward::train_reward_model(&RewardConfig {
                init: init.dir.clone(),
                data,
                val_data: vec![world.dir.join("prefs_val.jsonl")],
                val_fraction: 0.0,
                batch_size: p.reward_batch / p.micro_batches,
                train: self.train_cfg(&dir, steps, p.reward_lr, resume),
            })?;
            Ok(json!({"steps": o.steps, "last_eval": o.last_eval}))
        })?;
        Ok(Done { dir, key })
    }

    /// PPO from `policy` with a KL penalty to `reference` (the SFT model), driven by the reward model `rm`
    /// (the RLHF stage) or, without one, by the gold labeller, at the settings `pp`. Held-out prompts are
    /// probed along the way for Gao et al.'s picture: the gold score and the reward model's (`rm`, or
    /// `monitor` when the gold labeller drives) against the exact KL to the reference.
    #[allow(clippy::too_many_arguments)]
    fn ppo(
        &self,
        name: &str,
        world: &Done,
        policy: &Done,
        reference: &Done,
        rm: Option<&Done>,
        monitor: Option<&Done>,
        pp: &PpoPreset,
    ) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join(name.replace('-', "_"));
        let (reward, k_reward) = match rm {
            Some(rm) => (RewardSpec::Model(rm.dir.clone()), rm.key.as_str()),
            None => (RewardSpec::Gold, "gold"),
        };
        let key = key_of(&json!([
            "ppo",
            world.key,
            policy.key,
            reference.key,
            k_reward,
            monitor.map(|m| &m.key),
            pp,
            p.max_new_tokens
        ]));
        stage(self.next(), name, &dir, &key, |resume| {
            let o = ppo::ppo(&PpoConfig {
                policy: policy.dir.clone(),
                device: self.cfg.device.clone(),
                dtype: p.train_dtype(),
                reference: (policy.key != reference.key).then(|| reference.dir.clone()),
                reward,
                monitor: monitor.map(|m| m.dir.clone()),
                prompts: world.dir.join("rl_prompts.jsonl"),
                eval_prompts: Some(world.dir.join("eval_seen_prompts.jsonl")),
                out: dir.clone(),
                steps: pp.steps,
                prompts_per_step: pp.prompts,
                samples_per_prompt: pp.samples,
                max_new_tokens: p.max_new_tokens,
                temperature: pp.temperature,
                lr: pp.lr,
                critic_lr: pp.lr * 5.0,
                warmup: (pp.steps / 10).max(1),
                ppo_epochs: pp.epochs,
                minibatch: pp.prompts * pp.samples,
                clip: 0.2,
                value_clip: 0.2,
                gamma: 1.0,
                lambda: 0.95,
                kl_coef: pp.kl_coef,
                kl_target: None,
                kl_horizon: 10_000.0,
                kl_loss_coef: pp.kl_loss,
                reward_clip: 5.0,
                prompt_baseline: pp.samples > 1,
                no_end_penalty: -2.0,
                // Off: see the `cpu` preset's PPO settings.
                ptx_data: None,
                ptx_coef: 0.0,
                ptx_seq_len: p.seq_len,
                grad_clip: 1.0,
                seed: self.cfg.seed,
                eval_every: (pp.steps / 5).max(1),
                save_every: (pp.steps / 4).max(1),
                resume,
                stop_at: None,
                progress: self.cfg.progress,
            })?;
            Ok(json!({"steps": o.steps, "last": o.last}))
        })?;
        Ok(Done { dir, key })
    }

    /// DPO, the lighter alternative to PPO: the same SFT model learns from the labeller's rankings
    /// of its own answers directly, with no reward model and no sampling. Evaluated beside PPO.
    fn dpo(&self, sft: &Done, rankings: &Done) -> Result<Done> {
        let p = self.p();
        let dir = self.cfg.out.join("dpo");
        let key = key_of(&json!([
            "dpo",
            p.micro_batches,
            sft.key,
            rankings.key,
            p.dpo_steps,
            p.dpo_lr,
            p.dpo_beta,
            p.dpo_nll_coef
        ]));
        stage(self.next(), "dpo", &dir, &key, |resume| {
            let o = dpo::dpo(&DpoConfig {
                policy: sft.dir.clone(),
                data: vec![rankings.dir.clone()],
                val_data: vec![],
                val_fraction: 0.05,
                beta: p.dpo_beta,
                nll_coef: p.dpo_nll_coef,
                batch_size: 8 / p.micro_batches,
                train: self.train_cfg(&dir, p.dpo_steps, p.dpo_lr, resume),
            })?;
            Ok(json!({"steps": o.steps, "last_eval": o.last_eval}))
        })?;
        Ok(Done { dir, key })
    }

    /// Every model on the held-out sets (`eval.json`).
    fn evaluate(&self, world: &Done) -> Result<EvalSummary> {
        let start = Instant::now();
        let (n, total) = self.next();
        let eval = evaluate_run(
            &self.cfg.out,
            &world.dir,
            self.cfg.seed,
            self.p().max_new_tokens,
            &self.cfg.device,
        )?;
        stop_if_interrupted("eval")?;
        println!(
            "[{n}/{total}] eval         done in {:.0}s",
            start.elapsed().as_secs_f64()
        );
        Ok(eval)
    }
}

fn print_summary(eval: &EvalSummary, wall: Duration) {
    let by_name: BTreeMap<&str, &StageEval> = eval.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let acc = |n: &str| pct(by_name.get(n).map(|s| s.macro_accuracy));
    let gold = |n: &str| {
        by_name
            .get(n)
            .and_then(|s| s.behaviour.as_ref())
            .map_or("–".into(), |b| format!("{:.2}", b.seen.gold))
    };
    println!(
        "held-out strict accuracy: base {} -> sft {} -> ppo {} (ppo on the gold labeller {}, dpo {}); mean gold score sft {} -> ppo {} (gold-driven {}); reward model accuracy {} on held-out pairs, {} on SFT's answers differing in behaviour; total {:.1} min",
        acc("base"),
        acc("sft"),
        acc("ppo"),
        acc("ppo_gold"),
        acc("dpo"),
        gold("sft"),
        gold("ppo"),
        gold("ppo_gold"),
        pct(eval.reward_accuracy),
        pct(eval.reward_on_policy_behaviour),
        wall.as_secs_f64() / 60.0
    );
}
