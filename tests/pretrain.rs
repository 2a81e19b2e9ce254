//! Pretraining: loss parity with PyTorch, exact resume, and clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use talaria::checkpoint::{self, Checkpoint};
use talaria::metrics::read_metrics;
use talaria::model::{Gpt, GptConfig};
use talaria::train::pretrain::{PretrainConfig, pretrain};
use talaria::train::trainer::{self, EvalReport, Init, Objective, TrainConfig};
use talaria::train::{AdamWConfig, ParamSet};

mod common;
use common::max_abs_diff;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pretrain_parity")
        .join(name)
}

/// Feeds the fixture's batches in order: the PyTorch reference saw exactly these.
struct FixedBatches {
    batches: Vec<Vec<Vec<u32>>>,
    next: usize,
}

impl Objective for FixedBatches {
    type Batch = usize;
    fn stage(&self) -> &'static str {
        "pretrain"
    }
    fn next(&mut self) -> Result<usize> {
        self.next += 1;
        Ok(self.next - 1)
    }
    fn loss(&self, &i: &usize, model: &Gpt, _params: &ParamSet) -> Result<(Tensor, usize)> {
        let b = &self.batches[i];
        let t = b[0].len() - 1;
        let xs: Vec<u32> = b.iter().flat_map(|s| s[..t].to_vec()).collect();
        let ys: Vec<u32> = b.iter().flat_map(|s| s[1..].to_vec()).collect();
        let x = Tensor::from_vec(xs, (b.len(), t), &Device::Cpu)?;
        let y = Tensor::from_vec(ys, (b.len(), t), &Device::Cpu)?;
        Ok((model.lm_loss(&x, &y, None)?, b.len() * t))
    }
    fn evaluate(&mut self, _model: &Gpt, _params: &ParamSet) -> Result<EvalReport> {
        Ok(EvalReport::default())
    }
    fn state(&self) -> Value {
        Value::from(self.next)
    }
    fn restore(&mut self, state: &Value) -> Result<()> {
        self.next = state.as_u64().unwrap() as usize;
        Ok(())
    }
}

fn train_config(out: &Path, steps: u64) -> TrainConfig {
    common::train_cfg(out, steps, 3e-3)
}

fn losses(run: &Path) -> Vec<f64> {
    read_metrics(&run.join("metrics.jsonl"), Some("pretrain"))
        .unwrap()
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .collect()
}

#[test]
fn training_loop_matches_pytorch_losses_step_by_step() {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let config = GptConfig::load(&fixture("config.json")).unwrap();
    let weights = checkpoint::load_safetensors(&fixture("init.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let params = ParamSet::from_weights(&config, &weights).unwrap();
    let batches: Vec<Vec<Vec<u32>>> = serde_json::from_value(reference["batches"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(reference["losses"].clone()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let betas = reference["betas"].as_array().unwrap();
    let cfg = TrainConfig {
        lr: reference["lr"].as_f64().unwrap(),
        min_lr: reference["min_lr"].as_f64().unwrap(),
        warmup: reference["warmup"].as_u64().unwrap(),
        adamw: AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: reference["eps"].as_f64().unwrap(),
            weight_decay: reference["weight_decay"].as_f64().unwrap(),
        },
        grad_clip: reference["grad_clip"].as_f64(),
        grad_accum: reference["grad_accum"].as_u64().unwrap() as usize,
        ..train_config(tmp.path(), reference["steps"].as_u64().unwrap())
    };
    let init = Init {
        params,
        tokenizer_json: None,
        parent: None,
    };
    trainer::train(&cfg, init, &mut FixedBatches { batches, next: 0 }).unwrap();
    let got = losses(tmp.path());
    assert_eq!(got.len(), want.len());
    assert!(
        want[0] - want[want.len() - 1] > 0.3,
        "the reference run must learn something"
    );
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        worst = worst.max(rel);
        assert!(
            rel < 1e-4,
            "step {}: talaria {g} vs pytorch {w} (relative {rel:e})",
            i + 1
        );
    }
    eprintln!(
        "{} steps, worst relative loss difference to PyTorch: {worst:.2e}",
        got.len()
    );
}

/// Token shards with learnable structure: counting sequences with noise, vocabulary 64.
fn pretrain_config(data: &Path, out: &Path, steps: u64) -> PretrainConfig {
    PretrainConfig {
        data: data.to_path_buf(),
        model: "test".into(),
        tokenizer: None,
        init: None,
        batch_size: 4,
        seq_len: Some(32),
        val_batches: 2,
        samples: 0,
        train: TrainConfig {
            eval_every: 4,
            save_every: 3,
            ..train_config(out, steps)
        },
    }
}

#[test]
fn resumed_run_gives_exactly_the_losses_of_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 20_000);
    let whole = tmp.path().join("whole");
    let outcome = pretrain(&pretrain_config(&data, &whole, 12)).unwrap();
    assert!(!outcome.interrupted);
    if Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() {
        let png = std::fs::read(whole.join("loss.png")).expect("the run draws its loss curve");
        assert_eq!(&png[1..4], b"PNG");
    }
    let split = tmp.path().join("split");
    let mut cfg = pretrain_config(&data, &split, 12);
    cfg.train.stop_at = Some(5);
    assert!(pretrain(&cfg).unwrap().interrupted);
    let ck = Checkpoint::load(&split, DType::F32, &Device::Cpu).unwrap();
    assert_eq!((ck.meta.stage.as_str(), ck.meta.step), ("pretrain", 5));
    cfg.train.stop_at = None;
    cfg.train.resume = true;
    let resumed = pretrain(&cfg).unwrap();
    assert_eq!(resumed.steps, 12);
    let (a, b) = (losses(&whole), losses(&split));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "resumed losses differ from the uninterrupted run");
    // The model learns the counting structure: validation loss falls clearly.
    let val: Vec<f64> = read_metrics(&whole.join("metrics.jsonl"), Some("pretrain"))
        .unwrap()
        .iter()
        .filter_map(|r| r["val_loss"].as_f64())
        .collect();
    assert_eq!(val.len(), 3);
    assert!(val[2] < val[0] - 0.4, "{val:?}");
    // Final weights are identical too.
    assert_same_weights(&whole, &split);
}

/// Every tensor of the two runs' checkpoints bit for bit the same.
fn assert_same_weights(a: &Path, b: &Path) {
    let wa = Checkpoint::load(a, DType::F32, &Device::Cpu).unwrap().weights;
    let wb = Checkpoint::load(b, DType::F32, &Device::Cpu).unwrap().weights;
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert_eq!(max_abs_diff(t, &wb[name]), 0.0, "{name}");
    }
}

/// With `--grad-accum 2` on two threads, the trainer runs the two micro-batches side by side, each
/// on a pool of one thread; the run equals the one that computes them one after the other on one
/// thread, loss for loss and weight for weight.
#[test]
fn micro_batches_side_by_side_give_the_sequential_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 20_000);
    let run_on = |threads: usize, name: &str| {
        let out = tmp.path().join(name);
        let mut cfg = pretrain_config(&data, &out, 6);
        cfg.train.grad_accum = 2;
        cfg.train.side_by_side = true;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| pretrain(&cfg)).unwrap();
        out
    };
    let (side_by_side, one_by_one) = (run_on(2, "two"), run_on(1, "one"));
    let (a, b) = (losses(&side_by_side), losses(&one_by_one));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "micro-batches side by side changed the losses");
    assert_same_weights(&side_by_side, &one_by_one);
}

/// Mixed precision (bf16 products) trains as f32 does, to bf16's accuracy, and checkpoints f32.
#[test]
fn mixed_precision_pretraining_follows_the_f32_losses_and_saves_f32_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 20_000);
    let (full, mixed) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    pretrain(&pretrain_config(&data, &full, 12)).unwrap();
    let mut cfg = pretrain_config(&data, &mixed, 12);
    cfg.train.dtype = DType::BF16;
    pretrain(&cfg).unwrap();
    let (a, b) = (losses(&full), losses(&mixed));
    assert_eq!(a.len(), 12);
    assert_ne!(
        a, b,
        "the bf16 products changed nothing: mixed precision is not in effect"
    );
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() < 2e-2 * x,
            "step {}: loss {x} in f32 vs {y} in mixed precision",
            i + 1
        );
    }
    assert!(b[11] < b[0] - 0.5, "mixed precision did not learn: {b:?}");
    let ck = Checkpoint::load(&mixed.join("checkpoint"), DType::F32, &Device::Cpu).unwrap();
    let raw = std::fs::read(mixed.join("checkpoint/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::F32));
    assert_eq!(ck.weights.len(), st.len());
    let mut bad = cfg.clone();
    bad.train.dtype = DType::F16;
    bad.train.out = tmp.path().join("f16");
    assert!(err(&bad).contains("--dtype must be f32 or bf16"));
}

fn err(cfg: &PretrainConfig) -> String {
    match pretrain(cfg) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_pretraining_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("run");
    assert!(err(&pretrain_config(&data, &out, 2)).contains("does not exist"));
    common::write_token_shards(&data, 5_000);

    let mut long = pretrain_config(&data, &out, 2);
    long.seq_len = Some(65);
    assert!(err(&long).contains("--seq-len 65 exceeds the model's context of 64"));

    let mut lr = pretrain_config(&data, &out, 2);
    lr.train.lr = -1.0;
    assert!(err(&lr).contains("--lr must be in (0, 1)"));

    // A run exists: a fresh start must not overwrite it, and a resume with another shape fails.
    pretrain(&pretrain_config(&data, &out, 2)).unwrap();
    assert!(err(&pretrain_config(&data, &out, 2)).contains("pass --resume"));
    let mut other = pretrain_config(&data, &out, 4);
    other.model = "tiny".into();
    other.train.resume = true;
    assert!(err(&other).contains("different model shape"));

    let shard = data.join("val_0000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let e = err(&pretrain_config(&data, &tmp.path().join("run2"), 2));
    assert!(e.contains("val_0000.bin") && e.contains("truncated or corrupt"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    assert!(err(&pretrain_config(&data, &tmp.path().join("run3"), 2)).contains("no val_*.bin shards"));
}

#[test]
fn cli_pretrains_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 5_000);
    let run = tmp.path().join("run");
    let bin = env!("CARGO_BIN_EXE_talaria");
    let args = |extra: &[&str]| {
        let mut c = Command::new(bin);
        c.args(["pretrain", "--data"])
            .arg(&data)
            .args(["--model", "test", "--out"])
            .arg(&run);
        c.args([
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-every",
            "3",
        ])
        .args(extra);
        c.output().unwrap()
    };
    let out = args(&["--stop-at", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped early"));
    let out = args(&["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pretrain: 6 steps") && stdout.contains("val_loss"),
        "{stdout}"
    );
    assert_eq!(losses(&run).len(), 6);
    let out = args(&["--lr", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lr must be in (0, 1)"));
    let out = args(&["--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device tpu: expected cpu, cuda or cuda:N"));
    if !cfg!(feature = "cuda") {
        let out = args(&["--device", "cuda:0"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("built without CUDA"),
            "{stderr}"
        );
    }
}
