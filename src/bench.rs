//! `talaria bench`: training and decoding throughput on a preset, with achieved GFLOP/s against
//! the measured peak of one large matmul, and the process's peak resident memory (the same
//! figures `bench/pytorch_reference.py` prints, so the two compare side by side); and serving
//! throughput and latency under concurrent streaming clients; and the all-reduce that data
//! parallelism runs each step.

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
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
    /// Decode: a checkpoint's model instead of the preset with random weights (the speed
    /// depends on the shape only; this lets a run be timed beside another tool on one file).
    pub ckpt: Option<std::path::PathBuf>,
    /// Decode: the precision the decoding kernels read the weights in.
    pub dtype: crate::model::WeightDtype,
    /// Decode: the KV cache's element type.
    pub kv_dtype: crate::model::KvDtype,
    /// Where the model runs (`--device`).
    pub device: Device,
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
            "ckpt": cfg.ckpt.as_ref().map(|p| p.display().to_string()),
            "dtype": cfg.dtype.to_string(),
            "kv_dtype": cfg.kv_dtype.to_string(),
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

/// Runs the benchmark in f32 on `cfg.device`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    ensure!(cfg.steps > 0, "--steps must be positive");
    let device = cfg.device.clone();
    let (model_cfg, weights) = match &cfg.ckpt {
        Some(path) => {
            ensure!(
                cfg.kind == BenchKind::Decode,
                "--ckpt times decoding (and serving), not training"
            );
            let ck = crate::checkpoint::Checkpoint::load(path, DType::F32, &device)?;
            (ck.config, ck.weights)
        }
        None => {
            let c = GptConfig::preset(&cfg.preset)?;
            let w = init_weights(&c, 0, DType::F32, &device)?;
            (c, w)
        }
    };
    let peak = peak_matmul_gflops(&device)?;
    let (tokens_per_s, gflops, median_step_s) = match cfg.kind {
        BenchKind::Train => {
            let params = ParamSet::from_weights(&model_cfg, &weights)?;
            drop(weights);
            let mut model = params.model()?;
            // --dtype bf16: mixed-precision training, as `bench/pytorch_reference.py --dtype bf16`.
            match cfg.dtype {
                crate::model::WeightDtype::F32 => {}
                crate::model::WeightDtype::Bf16 => model.set_matmul_dtype(DType::BF16),
                other => bail!("bench train takes --dtype f32 or bf16 (mixed precision), not {other}"),
            }
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
                // A GPU runs asynchronously: each step is timed from an idle device to an idle device.
                device.synchronize()?;
                let start = Instant::now();
                let loss = model.lm_loss(&x, &y, None)?;
                let grads = params.grads(&loss.backward()?)?;
                let norm = global_norm(&grads)?;
                let scale = if norm > 1.0 { 1.0 / norm } else { 1.0 };
                opt.step(&grads, 3e-4, scale)?;
                device.synchronize()?;
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
            let mut model = Gpt::from_weights(&model_cfg, &weights)?;
            model.set_decode_dtype(cfg.dtype);
            model.set_kv_dtype(cfg.kv_dtype);
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
                    capacity: None,
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

// ---------------------------------------------------------------------------------------------
// All-reduce

/// What `talaria bench allreduce` measured: the sum of a gradient-sized buffer over all ranks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AllReduceReport {
    /// `mpi`, `nccl`, or `none (one process)`.
    pub engine: &'static str,
    pub ranks: usize,
    pub bytes: usize,
    /// Median seconds per all-reduce.
    pub median_s: f64,
    /// Bytes per second of the buffer (algorithm bandwidth), and NCCL's bus bandwidth, which
    /// scales it by 2 (N - 1) / N so that it compares across rank counts.
    pub algo_gb_per_s: f64,
    pub bus_gb_per_s: f64,
    /// Largest difference from the sum worked out on the host (0 when the engine is right).
    pub max_abs_error: f64,
}

/// Sums `megabytes` of f32 on `device` over every rank of the world, `rounds` times: rank r holds
/// `(r + 1) * (i % 7)` at element i, so the result must be `N (N + 1) / 2 * (i % 7)` exactly.
pub fn allreduce_bench(device: &Device, megabytes: f64, rounds: usize) -> Result<AllReduceReport> {
    ensure!(megabytes > 0.0 && rounds > 0, "--mb and --steps must be positive");
    let world = crate::train::collective::world();
    let (rank, ranks) = (world.rank(), world.size());
    let n = ((megabytes * (1 << 20) as f64) / 4.0).max(1.0) as usize;
    let pattern: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mine = (Tensor::from_slice(&pattern, n, device)? * (rank + 1) as f64)?;
    let (mut times, mut last, mut engine) = (vec![], None, "");
    for _ in 0..rounds {
        world.barrier();
        let t = Instant::now();
        let (out, e) = crate::train::collective::sum_over_ranks(world, vec![mine.clone()])?;
        // Reading one element waits for the device's queue, so the time includes the transfer.
        out[0].get(n - 1)?.to_scalar::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
        (last, engine) = (out.into_iter().next(), e);
    }
    let got = last.context("no round ran")?.to_vec1::<f32>()?;
    let scale = (ranks * (ranks + 1) / 2) as f32;
    let max_abs_error = got
        .iter()
        .zip(&pattern)
        .map(|(g, p)| f64::from((g - scale * p).abs()))
        .fold(0.0, f64::max);
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    let bytes = 4 * n;
    let algo = bytes as f64 / median_s / 1e9;
    Ok(AllReduceReport {
        engine,
        ranks,
        bytes,
        median_s,
        algo_gb_per_s: algo,
        bus_gb_per_s: algo * 2.0 * (ranks as f64 - 1.0) / ranks as f64,
        max_abs_error,
    })
}

// ---------------------------------------------------------------------------------------------
// Serving

/// `talaria bench serve`: concurrent streaming clients against an in-process server.
#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    /// A chat checkpoint to serve; without one, a model of `preset` with random weights and a
    /// byte-level tokenizer trained on the default world's text.
    pub ckpt: Option<std::path::PathBuf>,
    pub preset: String,
    /// Concurrency levels, each run in turn.
    pub clients: Vec<usize>,
    /// Streamed requests each client sends back to back.
    pub requests_per_client: usize,
    pub max_tokens: usize,
    pub scheduler: crate::serve::scheduler::SchedulerConfig,
    /// Where the model runs (`--device`).
    pub device: Device,
}

/// The figures of one concurrency level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeLevel {
    pub clients: usize,
    pub requests: usize,
    pub tokens: usize,
    pub wall_s: f64,
    /// Generated tokens per second over all clients.
    pub tokens_per_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    /// Time between two streamed pieces of one answer.
    pub itl_p50_s: f64,
    pub itl_p95_s: f64,
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((p / 100.0) * (xs.len() - 1) as f64).round() as usize]
}

/// What a client saw of one streamed answer: time to the first piece, the gaps between pieces,
/// and the tokens the server reported.
type Streamed = (f64, Vec<f64>, usize);

/// One streamed chat completion.
fn stream_one(url: &str, body: &serde_json::Value) -> Result<Streamed> {
    use std::io::BufRead;
    let start = Instant::now();
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let (mut first, mut last, mut gaps, mut tokens) = (None, None::<Instant>, vec![], 0);
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(u) = v.get("usage").and_then(|u| u["completion_tokens"].as_u64()) {
            tokens = u as usize;
        }
        let piece = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !piece.is_empty() {
            let now = Instant::now();
            match last {
                None => first = Some((now - start).as_secs_f64()),
                Some(t) => gaps.push((now - t).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Ok((first.unwrap_or(f64::NAN), gaps, tokens))
}

/// Serves the model in this process and drives it with each number of concurrent clients.
pub fn serve_bench(cfg: &ServeBenchConfig) -> Result<Vec<ServeLevel>> {
    ensure!(
        !cfg.clients.is_empty() && cfg.clients.iter().all(|&c| c > 0),
        "--clients needs positive numbers"
    );
    ensure!(cfg.requests_per_client > 0, "--requests must be positive");
    let bot = match &cfg.ckpt {
        Some(p) => crate::engine::Chatbot::load(p, &cfg.device)?,
        None => random_chatbot(&cfg.preset, &cfg.device)?,
    };
    let dir = std::env::temp_dir().join(format!("talaria-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = crate::serve::feedback::FeedbackStore::open(&dir.join("feedback.sqlite"))?;
    let app = crate::serve::router(
        bot,
        "bench".into(),
        String::new(),
        store,
        cfg.scheduler,
        &crate::serve::Access::default(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    rt.spawn(async move { axum::serve(listener, app).await });
    // One client's requests, back to back.
    let run_client = |c: usize, requests: usize| -> Result<Vec<Streamed>> {
        (0..requests)
            .map(|r| {
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Client {c} asks question {r}: what is {} plus {}?", c * 7, r * 3)}],
                    "max_tokens": cfg.max_tokens,
                    "temperature": 1.0,
                    "seed": c * 1000 + r,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "ignore_eos": true,
                });
                stream_one(&url, &body)
            })
            .collect()
    };
    // Warm-up, not measured: a full batch once, so every KV slot's memory is touched.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.scheduler.max_batch)
            .map(|c| scope.spawn(move || run_client(c, 1)))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("client thread").map(|_| ()))
    })?;
    let mut out = vec![];
    for &clients in &cfg.clients {
        let start = Instant::now();
        let results: Vec<Result<Vec<Streamed>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|c| scope.spawn(move || run_client(c, cfg.requests_per_client)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("client thread")).collect()
        });
        let wall = start.elapsed().as_secs_f64();
        let (mut ttft, mut itl, mut tokens, mut requests) = (vec![], vec![], 0, 0);
        for r in results {
            for (first, gaps, n) in r? {
                ttft.push(first);
                itl.extend(gaps);
                tokens += n;
                requests += 1;
            }
        }
        out.push(ServeLevel {
            clients,
            requests,
            tokens,
            wall_s: wall,
            tokens_per_s: tokens as f64 / wall,
            ttft_p50_s: percentile(&mut ttft, 50.0),
            ttft_p95_s: percentile(&mut ttft, 95.0),
            itl_p50_s: percentile(&mut itl, 50.0),
            itl_p95_s: percentile(&mut itl, 95.0),
        });
    }
    rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// A chat model of `preset` with random weights and a tokenizer of its vocabulary size trained on
/// a small default world: what the serving benchmark measures when no checkpoint is given.
fn random_chatbot(preset: &str, device: &Device) -> Result<crate::engine::Chatbot> {
    let mut model_cfg = GptConfig::preset(preset)?;
    let dir = std::env::temp_dir().join(format!("talaria-bench-world-{}", std::process::id()));
    crate::data::synth::generate(&crate::data::synth::SynthConfig {
        out: dir.clone(),
        seed: 0,
        scale: 0.3,
    })?;
    let tcfg = crate::tokenizer::TrainConfig {
        vocab_size: model_cfg.vocab_size,
        min_frequency: 2,
        show_progress: false,
    };
    let (tok, _) = crate::data::bpe::train_from_files(
        &[dir.join("pretrain.txt")],
        &crate::data::readers::ReadOptions::default(),
        &tcfg,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    model_cfg.vocab_size = tok.vocab_size();
    let weights = init_weights(&model_cfg, 0, DType::F32, device)?;
    crate::engine::Chatbot::new(Gpt::from_weights(&model_cfg, &weights)?, tok)
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
                ckpt: None,
                dtype: crate::model::WeightDtype::F32,
                kv_dtype: crate::model::KvDtype::F32,
                device: Device::Cpu,
            };
            let r = run(&cfg).unwrap();
            assert!(r.tokens_per_s > 0.0 && r.gflops > 0.0, "{r:?}");
            assert!(r.to_json(&cfg)["tokens_per_s"].as_f64().unwrap() > 0.0);
        }
    }
}
