//! The one training loop every stage runs: gradient accumulation, global-norm clipping, AdamW
//! with a warmup + cosine schedule, metrics, periodic evaluation, atomic checkpoints with the
//! optimizer and data position, exact resume, and a checkpoint on Ctrl-C.
//!
//! A stage plugs in as an [`Objective`]: it supplies the loss of the next micro-batch, its
//! evaluation, and the state its data needs to resume.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::checkpoint::{CHECKPOINT_DIR, Checkpoint, CheckpointWriter, Meta};
use crate::model::Gpt;
use crate::train::metrics::MetricsLog;
use crate::train::{AdamW, AdamWConfig, LrSchedule, ParamSet, accumulate, clip_scale, global_norm};

/// What every stage's loop needs to know.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Run directory: `checkpoint/`, `metrics.jsonl`, plots.
    pub out: PathBuf,
    /// Optimizer steps (the schedule's length). With `time_budget` and no explicit steps the
    /// loop calibrates this from the speed of its first steps.
    pub steps: Option<u64>,
    pub time_budget: Option<Duration>,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub eval_every: u64,
    pub save_every: u64,
    pub seed: u64,
    /// Continue the checkpoint in `out` instead of starting fresh.
    pub resume: bool,
    /// Stop (with a checkpoint) once this many steps are done; continue later with `resume`.
    pub stop_at: Option<u64>,
    /// Show a progress bar (off in tests).
    pub progress: bool,
}

impl TrainConfig {
    /// Rejects absurd settings, naming the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.steps.is_some() || self.time_budget.is_some(),
            "give --steps or --time-budget"
        );
        if let Some(s) = self.steps {
            ensure!(s > 0, "--steps must be positive");
        }
        ensure!(
            self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0,
            "--lr must be in (0, 1), got {}",
            self.lr
        );
        ensure!(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "--min-lr must be between 0 and --lr, got {}",
            self.min_lr
        );
        ensure!(self.grad_accum >= 1, "--grad-accum must be at least 1");
        ensure!(
            self.eval_every >= 1 && self.save_every >= 1,
            "--eval-every and --save-every must be at least 1"
        );
        if let Some(c) = self.grad_clip {
            ensure!(c.is_finite() && c > 0.0, "--grad-clip must be positive, got {c}");
        }
        let a = &self.adamw;
        ensure!(
            (0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2) && a.eps > 0.0,
            "AdamW betas must be in [0, 1) and eps positive"
        );
        ensure!(
            a.weight_decay.is_finite() && a.weight_decay >= 0.0,
            "--weight-decay must be non-negative, got {}",
            a.weight_decay
        );
        Ok(())
    }
}

/// What an evaluation produced: named values for `metrics.jsonl` and text samples to show.
#[derive(Debug, Default)]
pub struct EvalReport {
    pub values: Vec<(&'static str, f64)>,
    pub samples: Vec<String>,
}

/// One training stage's data and loss.
pub trait Objective {
    /// `pretrain`, `sft`, `reward`, ...: the `stage` of metrics and checkpoints.
    fn stage(&self) -> &'static str;
    /// The loss of the next micro-batch (a scalar to backpropagate) and the tokens it covers.
    /// `params` holds the model's variables and any heads the stage trains.
    fn loss(&mut self, model: &Gpt, params: &ParamSet) -> Result<(Tensor, usize)>;
    /// Held-out evaluation.
    fn evaluate(&mut self, model: &Gpt, params: &ParamSet) -> Result<EvalReport>;
    /// The data position and anything else needed to resume exactly.
    fn state(&self) -> Value;
    fn restore(&mut self, state: &Value) -> Result<()>;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss of the last step.
    pub last_loss: f64,
    /// The last evaluation's values.
    pub last_eval: Vec<(String, f64)>,
    /// Stopped early by Ctrl-C or `stop_at`, resumable.
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    pub wall_s: f64,
}

/// The starting point of a run that is not resumed.
pub struct Init {
    pub params: ParamSet,
    pub tokenizer_json: Option<String>,
    pub parent: Option<String>,
}

/// Set by Ctrl-C; every training loop checks it between steps and saves before exiting.
pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        // A second handler cannot be installed in one process (tests run several loops); the
        // first one serves them all.
        let _ = ctrlc::set_handler(move || g.store(true, Ordering::SeqCst));
        f
    })
    .clone()
}

/// Runs `objective` from `init` (or from the checkpoint in `cfg.out` when resuming).
pub fn train(cfg: &TrainConfig, init: Init, objective: &mut dyn Objective) -> Result<TrainOutcome> {
    cfg.validate()?;
    let stage = objective.stage();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let ckpt_dir = cfg.out.join(CHECKPOINT_DIR);
    let device = Device::Cpu;

    let (params, tokenizer_json, parent, mut step, mut tokens, mut total, elapsed_before, opt_state) = if cfg.resume {
        ensure!(
            ckpt_dir.join("config.json").exists(),
            "--resume: {} has no checkpoint to resume",
            cfg.out.display()
        );
        let ck = Checkpoint::load(&ckpt_dir, DType::F32, &device)?;
        ensure!(
            ck.meta.stage == stage,
            "--resume: {} holds a {} checkpoint, not {stage}",
            ckpt_dir.display(),
            ck.meta.stage
        );
        ensure!(
            ck.config == *init.params.config(),
            "--resume: the checkpoint in {} is a different model shape from the one requested",
            ckpt_dir.display()
        );
        let st = &ck.meta.state;
        objective
            .restore(&st["objective"])
            .context("restoring the data position")?;
        let opt = Checkpoint::load_optimizer(&ckpt_dir, &device)?
            .with_context(|| format!("--resume: {} has no optimizer state", ckpt_dir.display()))?;
        (
            ParamSet::with_heads(&ck.config, &ck.weights, &init.params.head_names())?,
            ck.tokenizer_json,
            ck.meta.parent,
            ck.meta.step,
            ck.meta.tokens,
            st["schedule_steps"].as_u64(),
            st["elapsed_s"].as_f64().unwrap_or(0.0),
            Some(opt),
        )
    } else {
        if ckpt_dir.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                cfg.out.display()
            );
        }
        (
            init.params,
            init.tokenizer_json,
            init.parent,
            0,
            0,
            cfg.steps,
            0.0,
            None,
        )
    };
    let mut opt = AdamW::new(params.vars(), cfg.adamw)?;
    if let Some(state) = &opt_state {
        opt.load_state(state)?;
    }
    let model = params.model()?;
    let mut metrics = MetricsLog::open(&cfg.out, stage, step)?;
    let flag = interrupt_flag();
    flag.store(false, Ordering::SeqCst);

    let started = Instant::now();
    let elapsed = |t: &Instant| elapsed_before + t.elapsed().as_secs_f64();
    let calibrate_at = step + 3;
    let pb = if cfg.progress {
        ProgressBar::new(total.unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(stage);
    pb.set_position(step);

    let save = |step: u64, tokens: u64, total: Option<u64>, opt: &AdamW, objective: &dyn Objective, el: f64| {
        let meta = Meta {
            stage: stage.to_string(),
            step,
            tokens,
            seed: Some(cfg.seed),
            parent: parent.clone(),
            state: json!({"objective": objective.state(), "schedule_steps": total, "elapsed_s": el}),
            talaria_version: String::new(),
        };
        CheckpointWriter {
            config: params.config(),
            weights: &params.weights(),
            tokenizer_json: tokenizer_json.as_deref(),
            meta: &meta,
            optimizer: Some(&opt.state()?),
        }
        .save(&ckpt_dir)
    };

    let mut last_loss = f64::NAN;
    let mut last_eval: Vec<(String, f64)> = vec![];
    let mut interrupted = false;
    let mut window = (Instant::now(), 0u64);
    loop {
        if let Some(t) = total
            && step >= t
        {
            break;
        }
        if let Some(budget) = cfg.time_budget
            && elapsed(&started) >= budget.as_secs_f64()
        {
            break;
        }
        if cfg.stop_at.is_some_and(|s| step >= s) || flag.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let schedule = LrSchedule {
            max_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup,
            total: total.unwrap_or(u64::MAX),
        };
        let lr = schedule.at(step);
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut step_tokens = 0;
        for _ in 0..cfg.grad_accum {
            let (loss, n) = objective.loss(&model, &params)?;
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            ensure!(
                l.is_finite(),
                "{stage} loss became {l} at step {step}: lower --lr or check the data"
            );
            loss_sum += l;
            step_tokens += n as u64;
            let grads = params.grads(&loss.backward()?)?;
            accumulate(&mut sum, grads)?;
        }
        let grads = sum.expect("grad_accum >= 1");
        let inv_accum = 1.0 / cfg.grad_accum as f64;
        let norm = global_norm(&grads)? * inv_accum;
        let clip = cfg.grad_clip.map_or(1.0, |max| clip_scale(norm, max));
        opt.step(&grads, lr, inv_accum * clip)?;
        step += 1;
        tokens += step_tokens;
        last_loss = loss_sum * inv_accum;

        if total.is_none() && step == calibrate_at {
            let per_step = elapsed(&started) / step as f64;
            let budget = cfg.time_budget.expect("validated").as_secs_f64();
            total = Some(step.max((budget / per_step) as u64));
            pb.set_length(total.unwrap_or(0));
        }
        window.1 += step_tokens;
        let tps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        if window.0.elapsed() > Duration::from_secs(10) {
            window = (Instant::now(), 0);
        }
        metrics.log(
            stage,
            step,
            tokens,
            &[
                ("loss", last_loss),
                ("lr", lr),
                ("grad_norm", norm),
                ("tokens_per_s", tps),
            ],
        )?;
        pb.set_position(step);
        pb.set_message(format!("loss {last_loss:.4} | {tps:.0} tok/s"));

        let done = total.is_some_and(|t| step >= t);
        if step % cfg.eval_every == 0 || done {
            let report = objective.evaluate(&model, &params)?;
            let line: Vec<String> = report.values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            pb.suspend(|| {
                eprintln!("{stage} step {step}: loss {last_loss:.4} | {}", line.join(" | "));
                for s in &report.samples {
                    eprintln!("  sample: {}", s.replace('\n', "\\n"));
                }
            });
            metrics.log(stage, step, tokens, &report.values)?;
            last_eval = report.values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        }
        if step % cfg.save_every == 0 && !done {
            save(step, tokens, total, &opt, &*objective, elapsed(&started))?;
        }
    }
    pb.finish_and_clear();
    save(step, tokens, total, &opt, &*objective, elapsed(&started))?;
    plot_loss(&cfg.out, stage)?;
    if interrupted {
        eprintln!(
            "{stage}: stopped at step {step}; checkpoint saved in {} (continue with --resume)",
            ckpt_dir.display()
        );
    }
    Ok(TrainOutcome {
        steps: step,
        tokens,
        last_loss,
        last_eval,
        interrupted,
        checkpoint: ckpt_dir,
        wall_s: elapsed(&started),
    })
}

/// Draws `RUN/loss.png`: training and validation loss per step (skipped, with a note, when no
/// font is available for the labels).
fn plot_loss(out: &std::path::Path, stage: &str) -> Result<()> {
    use crate::eval::report::{line_plot, series};
    let metrics = out.join(crate::train::metrics::METRICS_FILE);
    let s = vec![
        ("train", series(&metrics, stage, "loss")?),
        ("validation", series(&metrics, stage, "val_loss")?),
    ];
    if !line_plot(&out.join("loss.png"), &format!("{stage} loss"), "step", &s)? {
        eprintln!("{stage}: no loss.png (no TTF font found for the plot labels)");
    }
    Ok(())
}
