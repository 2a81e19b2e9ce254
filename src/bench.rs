//! `talaria bench`: training and decoding throughput on a preset, with achieved GFLOP/s against
//! the measured peak of one large matmul, and the process's peak resident memory. The same
//! figures are printed by `bench/pytorch_reference.py`, so the two can be compared side by side.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;

use crate::engine::{Engine, EngineConfig, Request};
use crate::model::{Gpt, GptConfig, init_weights};
use crate::train::optim::{AdamW, AdamWConfig, global_norm};
use crate::train::params::ParamSet;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchKind {
    /// Forward, backward, gradient clipping and an AdamW step on a batch of random tokens.
    Train,
    /// Greedy decoding with the batched engine: `batch` sequences (ragged prompts) decoded together.
    Decode,
}

/// A benchmark run: the model preset, the batch shape and how many timed steps.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub kind: BenchKind,
    pub preset: String,
    /// Timed training steps, or decoded tokens.
    pub steps: usize,
    /// Training batch size (sequences of the full context), or sequences decoded together.
    pub batch: usize,
    /// Decode: prompt length before the timed tokens (sequence `i` of a batch adds `i % 4`).
    pub prompt_len: usize,
}

/// The measured figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub peak_matmul_gflops: f64,
    pub peak_rss_mib: f64,
    /// Median seconds per training step or per decoded token.
    pub median_step_s: f64,
}

impl BenchReport {
    pub fn to_json(&self, cfg: &BenchConfig) -> serde_json::Value {
        json!({
            "impl": "talaria",
            "kind": match cfg.kind { BenchKind::Train => "train", BenchKind::Decode => "decode" },
            "preset": cfg.preset,
            "threads": candle_core::utils::get_num_threads(),
            "batch": cfg.batch,
            "tokens_per_s": self.tokens_per_s,
            "gflops": self.gflops,
            "peak_matmul_gflops": self.peak_matmul_gflops,
            "peak_rss_mib": self.peak_rss_mib,
            "median_step_s": self.median_step_s,
        })
    }
}

/// Forward FLOPs per token of the matmuls (2 per multiply-add): the blocks, the LM head, and
/// attention over `attended` keys (scores and weighted sum).
pub fn forward_flops_per_token(cfg: &GptConfig, attended: usize) -> f64 {
    let (c, l, v) = (cfg.n_embd as f64, cfg.n_layer as f64, cfg.vocab_size as f64);
    2.0 * (l * 12.0 * c * c + c * v) + l * 4.0 * c * attended as f64
}

/// Peak resident memory of this process so far (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib / 1024.0)
}

/// GFLOP/s of the best of several 1024x1024x1024 f32 matmuls: the ceiling this machine's matmul
/// library reaches with the current thread count.
pub fn peak_matmul_gflops(device: &Device) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the benchmark on the CPU in f32.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    ensure!(cfg.steps > 0, "--steps must be positive");
    let model_cfg = GptConfig::preset(&cfg.preset)?;
    let device = Device::Cpu;
    let peak = peak_matmul_gflops(&device)?;
    let weights = init_weights(&model_cfg, 0, DType::F32, &device)?;
    let (tokens_per_s, gflops, median_step_s) = match cfg.kind {
        BenchKind::Train => {
            let params = ParamSet::from_weights(&model_cfg, &weights)?;
            drop(weights);
            let model = params.model()?;
            let mut opt = AdamW::new(params.vars(), AdamWConfig::default())?;
            let (b, t) = (cfg.batch, model_cfg.n_positions);
            let mut rng = StdRng::seed_from_u64(0);
            let mut times = Vec::with_capacity(cfg.steps);
            // One untimed step first: it allocates the optimizer's moments and warms caches.
            for step in 0..=cfg.steps {
                let data: Vec<u32> = (0..b * (t + 1))
                    .map(|_| rng.random_range(0..model_cfg.vocab_size as u32))
                    .collect();
                let all = Tensor::from_vec(data, (b, t + 1), &device)?;
                let (x, y) = (all.narrow(1, 0, t)?, all.narrow(1, 1, t)?);
                let start = Instant::now();
                let loss = model.lm_loss(&x, &y, None)?;
                let grads = params.grads(&loss.backward()?)?;
                let norm = global_norm(&grads)?;
                let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
                opt.step(&grads, 3e-4, scale)?;
                if step > 0 {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            let step_s = median(times);
            let tokens = (b * t) as f64;
            let flops = 3.0 * forward_flops_per_token(&model_cfg, t) * tokens;
            (tokens / step_s, flops / step_s / 1e9, step_s)
        }
        BenchKind::Decode => {
            let model = Gpt::from_weights(&model_cfg, &weights)?;
            ensure!(cfg.batch > 0, "--batch must be positive");
            ensure!(
                cfg.prompt_len + 3 + cfg.steps < model_cfg.n_positions,
                "prompt ({}) plus decoded tokens ({}) must fit the context of {}",
                cfg.prompt_len + 3,
                cfg.steps,
                model_cfg.n_positions
            );
            let mut engine = Engine::new(
                &model,
                None,
                EngineConfig {
                    max_batch: cfg.batch,
                    token_budget: crate::model::infer::MAX_ROWS.max(cfg.batch),
                },
            )?;
            for i in 0..cfg.batch {
                let prompt: Vec<u32> = (0..cfg.prompt_len + i % 4)
                    .map(|j| ((i * 31 + j) * 7919 % model_cfg.vocab_size) as u32)
                    .collect();
                engine.admit(Request::greedy(prompt, cfg.steps + 1, vec![]))?;
            }
            // The prompts' prefill gives every sequence its first token; each later step is one
            // decode step of the whole batch.
            while engine.prefilling() > 0 {
                engine.step()?;
            }
            let mut times = Vec::with_capacity(cfg.steps);
            for _ in 0..cfg.steps {
                let start = Instant::now();
                engine.step()?;
                times.push(start.elapsed().as_secs_f64());
            }
            let total: f64 = times.iter().sum();
            let tokens_per_s = (cfg.steps * cfg.batch) as f64 / total;
            let mean_attended = cfg.prompt_len + cfg.steps / 2;
            let gflops = forward_flops_per_token(&model_cfg, mean_attended) * tokens_per_s / 1e9;
            (tokens_per_s, gflops, median(times))
        }
    };
    Ok(BenchReport {
        tokens_per_s,
        gflops,
        peak_matmul_gflops: peak,
        peak_rss_mib: peak_rss_mib()?,
        median_step_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_the_matmuls() {
        let cfg = GptConfig::preset("bench").unwrap();
        // 6 layers of 12 C^2 multiply-adds plus the 384 x 8192 head, no attention.
        let want = 2.0 * (6.0 * 12.0 * 384.0 * 384.0 + 384.0 * 8192.0);
        assert_eq!(forward_flops_per_token(&cfg, 0), want);
        assert!(peak_rss_mib().unwrap() > 0.0);
    }

    #[test]
    fn tiny_runs_report_positive_figures() {
        for (kind, steps) in [(BenchKind::Train, 1), (BenchKind::Decode, 4)] {
            let cfg = BenchConfig {
                kind,
                preset: "test".into(),
                steps,
                batch: 2,
                prompt_len: 3,
            };
            let r = run(&cfg).unwrap();
            assert!(r.tokens_per_s > 0.0 && r.gflops > 0.0, "{r:?}");
            assert!(r.to_json(&cfg)["tokens_per_s"].as_f64().unwrap() > 0.0);
        }
    }
}
