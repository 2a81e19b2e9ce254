//! `talaria eval`, `talaria report` and `talaria bench`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use talaria::bench::{BenchConfig, BenchKind, ServeBenchConfig};
use talaria::eval::checkpoint::{CheckpointEvalConfig, evaluate_checkpoint};
use talaria::eval::report;
use talaria::eval::run::evaluate_run;
use talaria::serve::scheduler::SchedulerConfig;

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BenchWhat {
    /// Forward, backward and an AdamW step on batches of random tokens.
    Train,
    /// Greedy decoding with the batched engine and its KV cache (`--batch` sequences together).
    Decode,
    /// Concurrent streaming clients against an in-process server: aggregate tokens/s, time to
    /// first token and inter-token latency per concurrency level.
    Serve,
    /// The gradient all-reduce of data parallelism: time and bandwidth of summing `--mb` MiB over
    /// every rank (run it under mpirun; with `--device cuda` in a `--features nccl` build, NCCL),
    /// checked against the sum worked out on the host.
    Allreduce,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    what: BenchWhat,
    #[command(flatten)]
    device: super::DeviceArg,
    /// Model preset (see the presets in src/model/config.rs).
    #[arg(long, default_value = "bench")]
    preset: String,
    /// Timed training steps, or decode steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Training batch size in sequences of the full context (default 8), or sequences decoded
    /// together (default 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Print one JSON object with the figures on the last line.
    #[arg(long)]
    json: bool,
    /// Decode: the precision the decoding kernels read the weights in (f32, f16, bf16 or q8);
    /// train: f32, or bf16 for mixed precision.
    #[arg(long, default_value = "f32")]
    dtype: talaria::model::WeightDtype,
    /// Decode: the KV cache's element type (f32 or f16).
    #[arg(long, default_value = "f32")]
    kv_dtype: talaria::model::KvDtype,
    /// Decode and serve: a checkpoint's model (default: the preset with random weights).
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Serve: concurrency levels, run in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    clients: Vec<usize>,
    /// Serve: streamed requests per client.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Serve: tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Serve: the server's --max-batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Allreduce: MiB of f32 summed per round.
    #[arg(long, default_value_t = 16.0)]
    mb: f64,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// A speedrun directory (evaluates base, SFT, PPO/DPO and the reward model, writes eval.json),
    /// or a single checkpoint with --prompts / --mmlu / --gsm8k.
    target: PathBuf,
    #[command(flatten)]
    device: super::DeviceArg,
    /// A single checkpoint's answers decoded with weights in this precision (f32, f16, bf16, q8).
    #[arg(long, default_value = "f32")]
    dtype: talaria::model::WeightDtype,
    /// Held-out prompts with reference answers (default-world format) for a single chat checkpoint.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// With --prompts: write every answer and the gold labeller's reading of it (strict, content, flaws,
    /// score) to this file, one JSON line per prompt.
    #[arg(long, requires = "prompts")]
    answers: Option<PathBuf>,
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

impl EvalArgs {
    pub(crate) fn run(self) -> Result<()> {
        let world = self.target.join("world");
        if world.join("eval_prompts.jsonl").exists() && self.prompts.is_none() {
            anyhow::ensure!(
                self.dtype == talaria::model::WeightDtype::F32,
                "--dtype applies to a single checkpoint (with --prompts, --mmlu or --gsm8k), not a whole run"
            );
            let e = evaluate_run(
                &self.target,
                &world,
                self.seed,
                self.max_new_tokens,
                &self.device.device()?,
            )?;
            for s in &e.stages {
                println!("{:<5} accuracy {:.1}%", s.name, s.macro_accuracy * 100.0);
            }
            println!("wrote {}", self.target.join("eval.json").display());
            return Ok(());
        }
        let cfg = CheckpointEvalConfig {
            device: self.device.device()?,
            target: self.target.clone(),
            prompts: self.prompts,
            answers: self.answers,
            few_shot: self.few_shot,
            mmlu: self.mmlu,
            mmlu_dev: self.mmlu_dev,
            gsm8k: self.gsm8k,
            gsm8k_train: self.gsm8k_train,
            limit: self.limit,
            against: self.against.clone(),
            reward: self.reward,
            prefs: self.prefs,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            dtype: self.dtype,
        };
        let e = evaluate_checkpoint(&cfg)?;
        if let Some(r) = &e.skills {
            for (skill, t) in &r.by_skill {
                println!(
                    "{skill:<14} {:>5.1}%  ({}/{})",
                    t.accuracy() * 100.0,
                    t.correct,
                    t.total
                );
            }
            println!("macro accuracy {:.1}%", r.macro_accuracy() * 100.0);
        }
        if let Some(b) = &e.behaviour {
            let content: Vec<String> = b
                .per_skill_content
                .iter()
                .map(|(skill, c)| format!("{skill} {:.1}%", c * 100.0))
                .collect();
            println!(
                "gold labeller: strict {:.1}%, content {:.1}% (macro), mean gold score {:.2}; pads {:.1}%, explains unasked {:.1}%, ignores the format {:.1}% of the prompts that state one",
                b.strict * 100.0,
                b.content * 100.0,
                b.gold,
                b.flaws.padded * 100.0,
                b.flaws.explained * 100.0,
                b.flaws.ignored_constraint * 100.0
            );
            println!("content per skill: {}", content.join(", "));
        }
        if let Some(v) = &e.mistakes
            && let Some(acc) = v.accuracy()
        {
            println!(
                "reward model scores the reference answer above this model's wrong answer on {:.1}% of {} prompts",
                acc * 100.0,
                v.mistakes()
            );
            for (skill, (right, n)) in &v.by_skill {
                println!("  {skill:<14} {:>5.1}%  (of {n})", right / *n as f64 * 100.0);
            }
        }
        if let (Some((rb, w)), Some(other)) = (&e.against, &self.against) {
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
            if let Some(changes) = &e.content_vs_against {
                let cells: Vec<String> = changes.iter().map(|(skill, c)| format!("{skill} {c}")).collect();
                println!(
                    "content against it, answers turned right / wrong (McNemar's exact p): {}",
                    cells.join("; ")
                );
            }
            if w.by_reward_model.is_some() {
                println!(
                    "reward model agrees with the verifier on {} of the {} prompts where one answer is right and the other wrong",
                    report::pct(w.rm_agreement),
                    w.separated
                );
            }
        }
        if let Some((n, acc)) = e.mmlu {
            println!(
                "MMLU-format accuracy on {n} questions: {:.1}% (chance 25%)",
                acc * 100.0
            );
        }
        if let Some((n, acc)) = e.gsm8k {
            println!("GSM8K-format exact match on {n} problems: {:.1}%", acc * 100.0);
        }
        if let Some(m) = &e.reward {
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
}

impl BenchArgs {
    /// Whether this is the serving benchmark, which runs a server (see `Cli::is_server`).
    pub(crate) fn serves(&self) -> bool {
        matches!(self.what, BenchWhat::Serve)
    }

    /// Whether this is the all-reduce benchmark, which runs on every rank of an MPI job.
    pub(crate) fn collective(&self) -> bool {
        matches!(self.what, BenchWhat::Allreduce)
    }

    pub(crate) fn run(self) -> Result<()> {
        let (kind, steps, batch) = match self.what {
            BenchWhat::Train => (BenchKind::Train, self.steps.unwrap_or(5), self.batch.unwrap_or(8)),
            BenchWhat::Decode => (BenchKind::Decode, self.steps.unwrap_or(200), self.batch.unwrap_or(1)),
            BenchWhat::Serve => return self.serve(),
            BenchWhat::Allreduce => return self.allreduce(),
        };
        let cfg = BenchConfig {
            device: self.device.device()?,
            kind,
            preset: self.preset,
            steps,
            batch,
            prompt_len: 16,
            ckpt: self.ckpt.clone(),
            dtype: self.dtype,
            kv_dtype: self.kv_dtype,
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
        if self.ckpt.is_none() {
            // What data parallelism sums each step (docs/scale-out.md).
            let n = talaria::model::GptConfig::preset(&cfg.preset)?.num_params();
            println!(
                "parameters          {n} ({:.1} MB of f32 gradients)",
                4.0 * n as f64 / 1e6
            );
        }
        if self.json {
            println!("{}", r.to_json(&cfg));
        }
        Ok(())
    }

    fn allreduce(self) -> Result<()> {
        let r = talaria::bench::allreduce_bench(&self.device.device()?, self.mb, self.steps.unwrap_or(10))?;
        if !talaria::train::collective::is_main() {
            return Ok(());
        }
        println!("engine              {}", r.engine);
        println!("ranks               {}", r.ranks);
        println!("buffer              {:.1} MiB", r.bytes as f64 / (1 << 20) as f64);
        println!("median all-reduce   {:.3} ms", 1e3 * r.median_s);
        println!("algorithm bandwidth {:.2} GB/s", r.algo_gb_per_s);
        println!("bus bandwidth       {:.2} GB/s", r.bus_gb_per_s);
        println!("max abs error       {:e}", r.max_abs_error);
        if self.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        anyhow::ensure!(
            r.max_abs_error == 0.0,
            "the {} all-reduce is wrong: {} away from the sum worked out on the host",
            r.engine,
            r.max_abs_error
        );
        Ok(())
    }

    fn serve(self) -> Result<()> {
        let cfg = ServeBenchConfig {
            device: self.device.device()?,
            ckpt: self.ckpt.clone(),
            preset: self.preset.clone(),
            clients: self.clients.clone(),
            requests_per_client: self.requests,
            max_tokens: self.max_tokens,
            scheduler: SchedulerConfig {
                max_batch: self.max_batch,
                ..SchedulerConfig::standard()
            },
        };
        let levels = talaria::bench::serve_bench(&cfg)?;
        let model = self.ckpt.as_ref().map_or_else(
            || format!("preset {} (random weights)", self.preset),
            |p| p.display().to_string(),
        );
        println!(
            "{model}, --max-batch {}, {} tokens per answer, {} streamed requests per client",
            self.max_batch, self.max_tokens, self.requests
        );
        println!("clients  tokens/s  x1-client  TTFT p50/p95 (s)  inter-token p50/p95 (ms)");
        let base = levels[0].tokens_per_s;
        for l in &levels {
            println!(
                "{:>7}  {:>8.0}  {:>9.2}  {:>7.3} / {:<7.3}  {:>7.1} / {:.1}",
                l.clients,
                l.tokens_per_s,
                l.tokens_per_s / base,
                l.ttft_p50_s,
                l.ttft_p95_s,
                1e3 * l.itl_p50_s,
                1e3 * l.itl_p95_s
            );
        }
        if self.json {
            println!(
                "{}",
                serde_json::json!({"impl": "talaria", "kind": "serve", "model": model, "levels": levels})
            );
        }
        Ok(())
    }
}
