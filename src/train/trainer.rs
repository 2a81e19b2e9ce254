//! The one training loop every stage runs: gradient accumulation, global-norm clipping, AdamW
//! with a warmup + cosine schedule, metrics, periodic evaluation, atomic checkpoints with the
//! optimizer and data position, exact resume, and a checkpoint on Ctrl-C.
//!
//! A stage plugs in as an [`Objective`]: it draws the next micro-batch, computes its loss, and
//! supplies its evaluation and the state its data needs to resume. With `side_by_side`, a step's
//! micro-batches run at once on a CPU, each its own graph on its share of the threads: the kernels
//! of a small model leave threads idle that another micro-batch can use, and since every kernel
//! reduces in a fixed order, the result does not depend on how they are grouped.
//!
//! Under MPI (src/train/collective.rs) each of N ranks computes every N-th micro-batch of the one
//! data stream and skips the others (llm.c's loader interleaves the same way), the gradients are
//! summed over the ranks, and every rank takes the same optimizer step: the run is the
//! single-process run with N times the accumulation steps. Rank 0 alone writes files and prints.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::checkpoint::{CHECKPOINT_DIR, Checkpoint, CheckpointWriter, Meta};
use crate::metrics::MetricsLog;
use crate::model::Gpt;
use crate::train::collective::{self, Collective};
use crate::train::{AdamW, AdamWConfig, LrSchedule, ParamSet, accumulate, clip_scale, global_norm};

/// What every stage's loop needs to know.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Run directory: `checkpoint/`, `metrics.jsonl`, plots.
    pub out: PathBuf,
    /// Where the model, its batches and the optimizer state live (`--device`).
    pub device: Device,
    /// The precision of the forward pass's matrix products: F32, or BF16 for mixed precision
    /// (weights, optimizer state, loss and checkpoints stay f32; `--dtype`).
    pub dtype: DType,
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
    /// Micro-batches per optimizer step on each rank.
    pub grad_accum: usize,
    /// On a CPU, run a step's micro-batches at once, each on its share of the threads (a small
    /// model's kernels cannot keep every thread busy; each graph in flight holds its activations).
    pub side_by_side: bool,
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
        ensure_matmul_dtype(self.dtype)?;
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

/// Rejects a `--dtype` of the training commands other than f32 and bf16 (mixed precision).
pub fn ensure_matmul_dtype(dtype: DType) -> Result<()> {
    ensure!(
        matches!(dtype, DType::F32 | DType::BF16),
        "--dtype must be f32 or bf16, got {dtype:?}"
    );
    Ok(())
}

/// What an evaluation produced: named values for `metrics.jsonl` and text samples to show.
#[derive(Debug, Default)]
pub struct EvalReport {
    pub values: Vec<(&'static str, f64)>,
    pub samples: Vec<String>,
}

/// One training stage's data and loss.
pub trait Objective: Sync {
    /// A micro-batch drawn from the data stream, computed on apart from it.
    type Batch: Send + Sync;
    /// `pretrain`, `sft`, `reward`, ...: the `stage` of metrics and checkpoints.
    fn stage(&self) -> &'static str;
    /// Draws the next micro-batch.
    fn next(&mut self) -> Result<Self::Batch>;
    /// The loss of a micro-batch (a scalar to backpropagate) and the tokens it covers. `params`
    /// holds the model's variables and any heads the stage trains.
    fn loss(&self, batch: &Self::Batch, model: &Gpt, params: &ParamSet) -> Result<(Tensor, usize)>;
    /// Moves past the next micro-batch without computing on it: another rank's share.
    fn skip(&mut self) -> Result<()> {
        self.next().map(drop)
    }
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

/// Set by the first Ctrl-C; every training loop checks it between steps and saves before exiting, and
/// the speedrun stops after the stage in progress. A second Ctrl-C ends the process at once.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        // A second handler cannot be installed in one process (tests run several loops); the
        // first one serves them all.
        let _ = ctrlc::set_handler(move || {
            if g.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: exiting now");
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping after a checkpoint (Ctrl-C again to exit at once)");
        });
        f
    })
    .clone()
}

/// Pools for `wanted` micro-batches at once: as many as the calling pool has threads (at most
/// `wanted`), the threads shared out between them, so that the micro-batches together use what one
/// batch would. Made once per shape and kept.
fn side_pools(wanted: usize) -> &'static [rayon::ThreadPool] {
    type Shapes = Vec<((usize, usize), &'static [rayon::ThreadPool])>;
    static MADE: Mutex<Shapes> = Mutex::new(Vec::new());
    let threads = rayon::current_num_threads();
    let k = wanted.min(threads).max(1);
    let shape = (k, threads / k);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, pools)) = made.iter().find(|(s, _)| *s == shape) {
        return pools;
    }
    let pools: Vec<rayon::ThreadPool> = (0..k)
        .filter_map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(shape.1)
                .thread_name(move |t| format!("micro-batch-{i}.{t}"))
                .build()
                .ok()
        })
        .collect();
    let pools: &'static [rayon::ThreadPool] = Vec::leak(pools);
    made.push((shape, pools));
    pools
}

/// Runs `objective` from `init` (or from the checkpoint in `cfg.out` when resuming): the loop
/// nanoGPT's train.py has, step by step.
pub fn train<O: Objective>(cfg: &TrainConfig, init: Init, objective: &mut O) -> Result<TrainOutcome> {
    cfg.validate()?;
    let mut run = Run::start(cfg, init, objective)?;
    let interrupted = loop {
        match run.stop_reason()? {
            Some(Stop::Done) => break false,
            Some(Stop::Interrupted) => break true,
            None => {}
        }
        run.step(objective)?;
        run.calibrate_time_budget()?;
        run.log()?;
        if run.eval_due() {
            run.evaluate(objective)?;
        }
        if run.save_due() {
            run.save(objective)?;
        }
    };
    run.finish(objective, interrupted)
}

/// Why a loop stops.
enum Stop {
    /// The schedule (or the time budget) is done.
    Done,
    /// Ctrl-C or `stop_at`: the run can be resumed.
    Interrupted,
}

/// A training run in progress: the model and optimizer, where it is, and how it reports.
struct Run<'c> {
    cfg: &'c TrainConfig,
    stage: &'static str,
    /// The ranks this run is spread over (one, without MPI).
    world: &'static dyn Collective,
    ckpt_dir: PathBuf,
    params: ParamSet,
    model: Gpt,
    opt: AdamW,
    tokenizer_json: Option<String>,
    parent: Option<String>,
    step: u64,
    tokens: u64,
    /// The schedule's length (`None` until a time budget is calibrated).
    total: Option<u64>,
    /// Wall time of the earlier sessions of a resumed run, and when this one started.
    elapsed_before: f64,
    started: Instant,
    calibrate_at: u64,
    /// Rank 0's metrics log (other ranks write nothing).
    metrics: Option<MetricsLog>,
    flag: Arc<AtomicBool>,
    pb: ProgressBar,
    /// The last step's learning rate, gradient norm, loss and tokens.
    lr: f64,
    grad_norm: f64,
    last_loss: f64,
    step_tokens: u64,
    /// Seconds the last step spent summing gradients over the ranks (logged under MPI).
    allreduce_s: f64,
    last_eval: Vec<(String, f64)>,
    /// Tokens since `window.0`, for the tokens/s figure.
    window: (Instant, u64),
}

impl<'c> Run<'c> {
    /// A fresh run from `init`, or the checkpoint in `cfg.out` with its optimizer and data position.
    fn start<O: Objective>(cfg: &'c TrainConfig, init: Init, objective: &mut O) -> Result<Self> {
        let stage = objective.stage();
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
        let ckpt_dir = cfg.out.join(CHECKPOINT_DIR);
        let device = cfg.device.clone();
        let world = collective::world();
        let (params, tokenizer_json, parent, step, tokens, total, elapsed_before, opt_state) = if cfg.resume {
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
            let saved_ranks = st["world_size"].as_u64().unwrap_or(1);
            if saved_ranks != world.size() as u64 && world.rank() == 0 {
                // The data position is one place in the one stream every rank reads, so it holds
                // for any number of ranks; only the global batch changes.
                eprintln!(
                    "{stage}: resuming a run saved on {saved_ranks} rank(s) on {}: the data continues where it \
                     stopped, with a global batch of {} x the per-rank batch",
                    world.size(),
                    world.size() * cfg.grad_accum
                );
            }
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
        collective::broadcast_vars(world, params.vars())?;
        let mut opt = AdamW::new(params.vars(), cfg.adamw)?;
        if let Some(state) = &opt_state {
            opt.load_state(state)?;
        }
        let mut model = params.model()?;
        model.set_matmul_dtype(cfg.dtype);
        let metrics = match world.rank() {
            0 => Some(MetricsLog::open(&cfg.out, stage, step)?),
            _ => None,
        };
        let flag = interrupt_flag();
        flag.store(false, Ordering::SeqCst);
        let pb = if cfg.progress && world.rank() == 0 {
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
        Ok(Self {
            cfg,
            stage,
            world,
            ckpt_dir,
            params,
            model,
            opt,
            tokenizer_json,
            parent,
            step,
            tokens,
            total,
            elapsed_before,
            started: Instant::now(),
            calibrate_at: step + 3,
            metrics,
            flag,
            pb,
            lr: 0.0,
            grad_norm: 0.0,
            last_loss: f64::NAN,
            step_tokens: 0,
            allreduce_s: 0.0,
            last_eval: vec![],
            window: (Instant::now(), 0),
        })
    }

    /// Wall seconds over every session of the run.
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Whether to stop before the next step, agreed by all ranks: any rank's time budget or
    /// Ctrl-C stops them all.
    fn stop_reason(&self) -> Result<Option<Stop>> {
        let done = self.total.is_some_and(|t| self.step >= t)
            || self.cfg.time_budget.is_some_and(|b| self.elapsed() >= b.as_secs_f64());
        let interrupted = self.cfg.stop_at.is_some_and(|s| self.step >= s) || self.flag.load(Ordering::SeqCst);
        let mut votes = [f64::from(u8::from(done)), f64::from(u8::from(interrupted))];
        self.world.all_reduce_f64(&mut votes)?;
        Ok(if votes[0] > 0.0 {
            Some(Stop::Done)
        } else if votes[1] > 0.0 {
            Some(Stop::Interrupted)
        } else {
            None
        })
    }

    /// One optimizer step: the gradients of `grad_accum` micro-batches per rank summed over the
    /// ranks, the global norm clipped, AdamW at the scheduled learning rate.
    fn step<O: Objective>(&mut self, objective: &mut O) -> Result<()> {
        let cfg = self.cfg;
        let schedule = LrSchedule {
            max_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup: cfg.warmup,
            total: self.total.unwrap_or(u64::MAX),
        };
        self.lr = schedule.at(self.step);
        let (rank, ranks) = (self.world.rank(), self.world.size());
        let micro_batches = cfg.grad_accum * ranks;
        let mut mine = Vec::with_capacity(cfg.grad_accum);
        for j in 0..micro_batches {
            if j % ranks == rank {
                mine.push(objective.next()?);
            } else {
                objective.skip()?;
            }
        }
        let pools = if cfg.side_by_side && self.model.device().is_cpu() && mine.len() > 1 {
            side_pools(mine.len())
        } else {
            &[]
        };
        let mut sum: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut step_tokens = 0;
        let compute = |b: &O::Batch| -> Result<(f64, usize, Vec<Tensor>)> {
            let (loss, n) = objective.loss(b, &self.model, &self.params)?;
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((l, n, self.params.grads(&loss.backward()?)?))
        };
        for group in mine.chunks(pools.len().max(1)) {
            let done: Vec<Result<(f64, usize, Vec<Tensor>)>> = if group.len() == 1 {
                vec![compute(&group[0])]
            } else {
                std::thread::scope(|s| {
                    let running: Vec<_> = group
                        .iter()
                        .zip(pools)
                        .map(|(b, pool)| s.spawn(|| pool.install(|| compute(b))))
                        .collect();
                    running
                        .into_iter()
                        .map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(anyhow::anyhow!("a micro-batch's thread panicked")))
                        })
                        .collect()
                })
            };
            // Summed in the stream's order, whichever finished first.
            for d in done {
                let (l, n, grads) = d?;
                ensure!(
                    l.is_finite(),
                    "{} loss became {l} at step {}: lower --lr or check the data",
                    self.stage,
                    self.step
                );
                loss_sum += l;
                step_tokens += n as u64;
                accumulate(&mut sum, grads)?;
            }
        }
        let mut grads = sum.expect("grad_accum >= 1");
        if ranks > 1 {
            let t = Instant::now();
            grads = collective::all_reduce_tensors(self.world, grads)?;
            self.allreduce_s = t.elapsed().as_secs_f64();
            let mut totals = [loss_sum, step_tokens as f64];
            self.world.all_reduce_f64(&mut totals)?;
            (loss_sum, step_tokens) = (totals[0], totals[1] as u64);
        }
        let inv_accum = 1.0 / micro_batches as f64;
        self.grad_norm = global_norm(&grads)? * inv_accum;
        let clip = cfg.grad_clip.map_or(1.0, |max| clip_scale(self.grad_norm, max));
        self.opt.step(&grads, self.lr, inv_accum * clip)?;
        self.step += 1;
        self.tokens += step_tokens;
        self.step_tokens = step_tokens;
        self.last_loss = loss_sum * inv_accum;
        Ok(())
    }

    /// With a time budget, fixes the schedule's length from the speed of the first steps (rank
    /// 0's, for every rank).
    fn calibrate_time_budget(&mut self) -> Result<()> {
        if self.total.is_none() && self.step == self.calibrate_at {
            let per_step = self.elapsed() / self.step as f64;
            let budget = self.cfg.time_budget.expect("validated").as_secs_f64();
            let mut total = self.step.max((budget / per_step) as u64).to_le_bytes().to_vec();
            self.world.broadcast_bytes(&mut total)?;
            let total = u64::from_le_bytes(total.try_into().map_err(|_| anyhow::anyhow!("bad schedule length"))?);
            self.total = Some(total);
            self.pb.set_length(total);
        }
        Ok(())
    }

    /// The step's loss, learning rate, gradient norm and throughput to `metrics.jsonl` and the bar.
    fn log(&mut self) -> Result<()> {
        self.window.1 += self.step_tokens;
        let tps = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        if self.window.0.elapsed() > Duration::from_secs(10) {
            self.window = (Instant::now(), 0);
        }
        if let Some(metrics) = &mut self.metrics {
            let mut values = vec![
                ("loss", self.last_loss),
                ("lr", self.lr),
                ("grad_norm", self.grad_norm),
                ("tokens_per_s", tps),
            ];
            if self.world.size() > 1 {
                values.push(("allreduce_s", self.allreduce_s));
            }
            metrics.log(self.stage, self.step, self.tokens, &values)?;
        }
        self.pb.set_position(self.step);
        self.pb
            .set_message(format!("loss {:.4} | {tps:.0} tok/s", self.last_loss));
        Ok(())
    }

    fn done(&self) -> bool {
        self.total.is_some_and(|t| self.step >= t)
    }

    fn eval_due(&self) -> bool {
        self.step.is_multiple_of(self.cfg.eval_every) || self.done()
    }

    fn save_due(&self) -> bool {
        self.step.is_multiple_of(self.cfg.save_every) && !self.done()
    }

    /// The objective's held-out evaluation, printed and logged. Every rank evaluates, so that
    /// whatever state evaluation touches stays the same on all of them; rank 0 reports.
    fn evaluate<O: Objective>(&mut self, objective: &mut O) -> Result<()> {
        let report = objective.evaluate(&self.model, &self.params)?;
        self.last_eval = report.values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let Some(metrics) = &mut self.metrics else {
            return Ok(());
        };
        let line: Vec<String> = report.values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        let (stage, step, loss) = (self.stage, self.step, self.last_loss);
        self.pb.suspend(|| {
            eprintln!("{stage} step {step}: loss {loss:.4} | {}", line.join(" | "));
            for s in &report.samples {
                eprintln!("  sample: {}", s.replace('\n', "\\n"));
            }
        });
        metrics.log(stage, step, self.tokens, &report.values)?;
        Ok(())
    }

    /// Writes the checkpoint (rank 0): weights, optimizer state, data position, schedule and the
    /// number of ranks. Every rank's data position must be rank 0's: one stream, one position.
    fn save<O: Objective>(&self, objective: &O) -> Result<()> {
        let position = objective.state();
        collective::ensure_same(self.world, position.to_string().as_bytes(), "the data position")?;
        if self.world.rank() != 0 {
            return Ok(());
        }
        let meta = Meta {
            stage: self.stage.to_string(),
            step: self.step,
            tokens: self.tokens,
            seed: Some(self.cfg.seed),
            parent: self.parent.clone(),
            state: json!({
                "objective": position,
                "schedule_steps": self.total,
                "elapsed_s": self.elapsed(),
                "world_size": self.world.size(),
            }),
            talaria_version: String::new(),
        };
        CheckpointWriter {
            config: self.params.config(),
            weights: &self.params.weights(),
            tokenizer_json: self.tokenizer_json.as_deref(),
            meta: &meta,
            optimizer: Some(&self.opt.state()?),
        }
        .save(&self.ckpt_dir)
    }

    /// The last checkpoint, the loss plot, and what the run reports.
    fn finish<O: Objective>(self, objective: &O, interrupted: bool) -> Result<TrainOutcome> {
        self.pb.finish_and_clear();
        self.save(objective)?;
        if self.world.rank() == 0 {
            plot_loss(&self.cfg.out, self.stage)?;
        }
        if interrupted && self.world.rank() == 0 {
            eprintln!(
                "{}: stopped at step {}; checkpoint saved in {} (continue with --resume)",
                self.stage,
                self.step,
                self.ckpt_dir.display()
            );
        }
        Ok(TrainOutcome {
            steps: self.step,
            tokens: self.tokens,
            last_loss: self.last_loss,
            last_eval: self.last_eval.clone(),
            interrupted,
            wall_s: self.elapsed(),
            checkpoint: self.ckpt_dir,
        })
    }
}

/// Draws `RUN/loss.png`: training and validation loss per step (skipped, with a note, when no
/// font is available for the labels).
fn plot_loss(out: &std::path::Path, stage: &str) -> Result<()> {
    use crate::metrics::{line_plot, series};
    let metrics = out.join(crate::metrics::METRICS_FILE);
    let s = vec![
        ("train", series(&metrics, stage, "loss")?),
        ("validation", series(&metrics, stage, "val_loss")?),
    ];
    if !line_plot(&out.join("loss.png"), &format!("{stage} loss"), "step", &s)? {
        eprintln!("{stage}: no loss.png (no TTF font found for the plot labels)");
    }
    Ok(())
}
