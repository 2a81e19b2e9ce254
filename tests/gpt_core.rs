//! The GPT core: parity with Hugging Face `transformers`, checkpoint round trips, gradients,
//! generation through the engine, and clear errors on bad input.
//!
//! The fixture in tests/fixtures/gpt2_tiny was written by tests/fixtures/make_gpt2_fixture.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use talaria::checkpoint::{Checkpoint, CheckpointWriter, Meta};
use talaria::engine::{self, Completion, EngineConfig, FinishReason, Request};
use talaria::interop;
use talaria::model::{Gpt, GptConfig, init_weights};

mod common;
use common::max_abs_diff;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_tiny")
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_tiny_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn imported(dir: &Path) -> Checkpoint {
    let out = dir.join("ckpt");
    interop::import_hf(&fixture_dir(), &out).unwrap();
    Checkpoint::load(&out, DType::F32, &Device::Cpu).unwrap()
}

/// One greedy sequence through the engine.
fn run1(model: &Gpt, prompt: &[u32], n: usize, stops: Vec<u32>) -> anyhow::Result<Completion> {
    let req = Request::greedy(prompt.to_vec(), n, stops);
    Ok(
        engine::generate_batch(model, None, vec![req], EngineConfig::default(), |_| {})?
            .remove(0)
            .remove(0),
    )
}

fn greedy(model: &Gpt, prompt: &[u32], n: usize) -> Vec<u32> {
    run1(model, prompt, n, vec![]).unwrap().tokens
}

#[test]
fn imported_hf_model_matches_transformers_logits_and_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = imported(tmp.path());
    let model = ck.model().unwrap();
    assert_eq!(ck.meta.stage, "import");
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model
            .forward(&input)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut worst = 0f32;
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            worst = worst.max((g - w).abs());
        }
        assert!(worst < 1e-4, "max |logit - transformers| = {worst}");
        assert_eq!(greedy(&model, &prompt, 24), ids(&case["greedy_ids"]));
    }
}

#[test]
fn cli_generate_ids_matches_transformers_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let bin = env!("CARGO_BIN_EXE_talaria");
    let st = Command::new(bin)
        .args(["import", "hf"])
        .arg(fixture_dir())
        .arg("--out")
        .arg(&ckpt)
        .status()
        .unwrap();
    assert!(st.success());
    let case = &reference()["cases"][0];
    let prompt: Vec<String> = ids(&case["prompt_ids"]).iter().map(u32::to_string).collect();
    let out = Command::new(bin)
        .args(["generate"])
        .arg(&ckpt)
        .args([
            "--prompt-ids",
            &prompt.join(","),
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--ignore-eos",
            "--ids",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(got, ids(&case["greedy_ids"]));
}

#[test]
fn generation_stops_at_the_configured_end_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = imported(tmp.path());
    let model = ck.model().unwrap();
    let prompt = ids(&reference()["cases"][0]["prompt_ids"]);
    // Make the first greedy token the end token: generation must stop before emitting it.
    let first = greedy(&model, &prompt, 1)[0];
    let g = run1(&model, &prompt, 10, vec![first]).unwrap();
    assert!(g.tokens.is_empty());
    assert_eq!(g.finish, FinishReason::StopToken(first));
}

#[test]
fn export_then_reimport_round_trips_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = imported(tmp.path());
    let hf = tmp.path().join("hf");
    interop::export_hf(&tmp.path().join("ckpt"), &hf).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    interop::import_hf(&hf, &tmp.path().join("again")).unwrap();
    let again = Checkpoint::load(&tmp.path().join("again"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.config, ck.config);
    assert_eq!(again.weights.len(), ck.weights.len());
    for (name, t) in &ck.weights {
        assert_eq!(max_abs_diff(t, &again.weights[name]), 0.0, "{name}");
    }
}

/// Runs tests/fixtures/check_hf_export.py, which loads an exported directory in `transformers`
/// and compares logits, when Python has `transformers`; otherwise says why it is skipped.
#[test]
fn exported_model_loads_in_transformers_with_the_same_logits() {
    let has_tf = Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_tf {
        common::skip(
            "torch",
            "python3 with torch and transformers is not installed (pip install torch transformers)",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    imported(tmp.path());
    let hf = tmp.path().join("hf");
    interop::export_hf(&tmp.path().join("ckpt"), &hf).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_hf_export.py");
    let out = Command::new("python3").arg(script).arg(&hf).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small random model whose tensors are candle `Var`s, as in training.
fn trainable(cfg: &GptConfig, dtype: DType) -> (Gpt, HashMap<String, Var>) {
    let w = init_weights(cfg, 7, dtype, &Device::Cpu).unwrap();
    let vars: HashMap<String, Var> = w.into_iter().map(|(k, t)| (k, Var::from_tensor(&t).unwrap())).collect();
    let tensors: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    (Gpt::from_weights(cfg, &tensors).unwrap(), vars)
}

fn batch(cfg: &GptConfig, b: usize, t: usize, seed: u32) -> (Tensor, Tensor) {
    let n = b * (t + 1);
    let data: Vec<u32> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed).wrapping_mul(40503) % cfg.vocab_size as u32)
        .collect();
    let all = Tensor::from_vec(data, (b, t + 1), &Device::Cpu).unwrap();
    (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap())
}

/// On both training paths: the fused CPU kernels (f32 on the CPU) and the composed candle ops that
/// every other device and dtype takes (a GPU's path, run here in f64).
#[test]
fn every_parameter_receives_a_gradient_from_the_lm_loss() {
    let cfg = GptConfig::preset("test").unwrap();
    for dtype in [DType::F32, DType::F64] {
        let (model, vars) = trainable(&cfg, dtype);
        let (x, y) = batch(&cfg, 2, 16, 1);
        let loss = model.lm_loss(&x, &y, None).unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(vars.len(), talaria::model::parameter_shapes(&cfg).len());
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name} received no gradient ({dtype:?})"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm} ({dtype:?})"
            );
        }
    }
}

/// Mixed precision (bf16 products, f32 everything else): the f32 loss to bf16's accuracy, and every
/// parameter's gradient in f32 and pointing where the f32 gradient points.
#[test]
fn mixed_precision_keeps_the_loss_and_every_gradient() {
    let cfg = GptConfig::preset("test").unwrap();
    let (model, vars) = trainable(&cfg, DType::F32);
    let (x, y) = batch(&cfg, 2, 16, 3);
    let full = model.lm_loss(&x, &y, None).unwrap();
    let tensors: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let mut mixed_model = Gpt::from_weights(&cfg, &tensors).unwrap();
    mixed_model.set_matmul_dtype(DType::BF16);
    let mixed = mixed_model.lm_loss(&x, &y, None).unwrap();
    assert_eq!(mixed.dtype(), DType::F32);
    let (a, b) = (full.to_scalar::<f32>().unwrap(), mixed.to_scalar::<f32>().unwrap());
    assert!(
        a != b,
        "the bf16 products changed nothing: mixed precision is not in effect"
    );
    assert!((a - b).abs() < 1e-2 * a, "loss {a} in f32 vs {b} in mixed precision");
    let (gf, gm) = (full.backward().unwrap(), mixed.backward().unwrap());
    for (name, v) in &vars {
        let f = gf.get(v.as_tensor()).unwrap();
        let m = gm
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient in mixed precision"));
        assert_eq!(m.dtype(), DType::F32, "{name}");
        let dot = (f * m).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let cosine = dot / (norm(f) * norm(m)).max(1e-30);
        assert!(
            cosine > 0.99,
            "{name}: gradient cosine {cosine} between f32 and mixed precision"
        );
    }
}

/// Checks autograd's gradient `grads` of `loss` against central differences (step 1e-5, so f64
/// parameters; relative error under 1e-4) at the first, the `len / split`-th and the last element of
/// each named parameter, restoring every value after; returns how many elements it checked.
fn assert_matches_finite_differences(
    vars: &HashMap<String, Var>,
    grads: &candle_core::backprop::GradStore,
    names: &[&str],
    split: usize,
    loss: impl Fn() -> f64,
) -> usize {
    let h = 1e-5;
    let mut checked = 0;
    for name in names {
        let var = &vars[*name];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, orig.len() / split, orig.len() - 1] {
            let at = |d: f64| {
                let mut p = orig.clone();
                p[idx] += d;
                var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            at(0.0);
            let err = (fd - g[idx]).abs() / (fd.abs() + g[idx].abs()).max(1e-6);
            assert!(
                err < 1e-4,
                "{name}[{idx}]: finite difference {fd} vs autograd {}",
                g[idx]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn loss_gradient_matches_finite_differences() {
    // f64 so that central differences are accurate to ~1e-8.
    let cfg = GptConfig {
        n_positions: 8,
        vocab_size: 40,
        ..GptConfig::preset("test").unwrap()
    };
    let (model, vars) = trainable(&cfg, DType::F64);
    let (x, y) = batch(&cfg, 2, 8, 3);
    let w = Tensor::from_vec(
        (0..16).map(|i| (i % 3) as f64).collect::<Vec<_>>(),
        (2, 8),
        &Device::Cpu,
    )
    .unwrap();
    let loss = || model.lm_loss(&x, &y, Some(&w)).unwrap().to_scalar::<f64>().unwrap();
    let grads = model.lm_loss(&x, &y, Some(&w)).unwrap().backward().unwrap();
    let names = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_proj.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ];
    let checked = assert_matches_finite_differences(&vars, &grads, &names, 3, loss);
    assert_eq!(checked, 24);
}

/// PPO's exact-KL loss term (`talaria ppo --kl-loss-coef`): its value is the mean over answer tokens
/// of the per-answer exact KL that the evaluation reports, and its gradient matches finite differences.
#[test]
fn exact_kl_loss_matches_the_reported_kl_and_finite_differences() {
    use talaria::train::answers::{answer_dists, answer_logprobs_and_dists, exact_kl, grouped_batch, token_kl};
    use talaria::train::rl::masked_mean;
    let cfg = GptConfig {
        n_positions: 16,
        vocab_size: 40,
        ..GptConfig::preset("test").unwrap()
    };
    let (policy, vars) = trainable(&cfg, DType::F64);
    let other = init_weights(&cfg, 8, DType::F64, &Device::Cpu).unwrap();
    let reference = Gpt::from_weights(&cfg, &other).unwrap();
    let (p1, p2): (Vec<u32>, Vec<u32>) = ((1..5).collect(), vec![7, 3, 9]);
    let groups = [
        (&p1[..], vec![&[5u32, 6, 7][..], &[8u32][..]]),
        (&p2[..], vec![&[2u32, 11, 30, 4][..]]),
    ];
    let b = grouped_batch(&groups, 0, &Device::Cpu).unwrap();
    let lq = answer_dists(&reference, &b).unwrap();
    let loss = |m: &Gpt| {
        let (_, lp) = answer_logprobs_and_dists(m, &b, 1.0).unwrap();
        masked_mean(&token_kl(&lp, &lq, &b).unwrap(), &b.mask.to_dtype(DType::F64).unwrap()).unwrap()
    };
    let value = loss(&policy).to_scalar::<f64>().unwrap();
    let reported: f64 = exact_kl(&policy, &reference, &b).unwrap().iter().sum();
    assert!(value > 0.0, "KL between two different models is {value}");
    assert!(
        (value - reported / 8.0).abs() < 1e-9,
        "loss {value} vs the reported KL {reported} over 8 answer tokens"
    );
    let grads = loss(&policy).backward().unwrap();
    let names = [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.ln_f.weight",
    ];
    let checked =
        assert_matches_finite_differences(&vars, &grads, &names, 2, || loss(&policy).to_scalar::<f64>().unwrap());
    assert_eq!(checked, 9);
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let cfg = GptConfig::preset("test").unwrap();
    let model = Gpt::from_weights(&cfg, &init_weights(&cfg, 1, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let g = run1(&model, &[1, 2, 3], 1000, vec![]).unwrap();
    assert_eq!(g.finish, FinishReason::Context);
    assert_eq!(g.tokens.len() + 3, cfg.n_positions);
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn copy_fixture(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(f), to.join(f)).unwrap();
    }
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    let missing = tmp.path().join("missing");
    copy_fixture(&missing);
    std::fs::remove_file(missing.join("model.safetensors")).unwrap();
    assert!(err_of(interop::import_hf(&missing, &out)).contains("no model.safetensors"));

    let truncated = tmp.path().join("truncated");
    copy_fixture(&truncated);
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(interop::import_hf(&truncated, &out));
    assert!(
        e.contains("not a valid safetensors file") && e.contains("model.safetensors"),
        "{e}"
    );

    let act = tmp.path().join("act");
    copy_fixture(&act);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(act.join("config.json")).unwrap()).unwrap();
    cfg["activation_function"] = "quick_gelu".into();
    std::fs::write(act.join("config.json"), cfg.to_string()).unwrap();
    let e = err_of(interop::import_hf(&act, &out));
    assert!(
        e.contains("unsupported activation_function \"quick_gelu\"") && e.contains("config.json"),
        "{e}"
    );

    let heads = tmp.path().join("heads");
    copy_fixture(&heads);
    cfg["activation_function"] = "gelu_new".into();
    cfg["n_head"] = 5.into();
    std::fs::write(heads.join("config.json"), cfg.to_string()).unwrap();
    assert!(err_of(interop::import_hf(&heads, &out)).contains("n_embd (24) must be divisible by n_head (5)"));

    let shape = tmp.path().join("shape");
    copy_fixture(&shape);
    cfg["n_head"] = 3.into();
    cfg["n_positions"] = 64.into();
    std::fs::write(shape.join("config.json"), cfg.to_string()).unwrap();
    let e = err_of(interop::import_hf(&shape, &out));
    assert!(e.contains("transformer.wpe.weight") && e.contains("[48, 24]"), "{e}");

    assert!(!out.exists(), "no checkpoint may be written from bad input");
    assert!(err_of(Checkpoint::load(&tmp.path().join("nowhere"), DType::F32, &Device::Cpu)).contains("does not exist"));
}

#[test]
fn prompts_beyond_the_context_or_vocabulary_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = imported(tmp.path()).model().unwrap();
    let long = vec![1u32; 49];
    let e = err_of(run1(&model, &long, 4, vec![]));
    assert!(e.contains("49 tokens exceeds the model's context of 48"), "{e}");
    let e = err_of(run1(&model, &[1, 96], 4, vec![]));
    assert!(e.contains("token id 96 is outside the vocabulary"), "{e}");
    assert!(err_of(run1(&model, &[], 4, vec![])).contains("prompt is empty"));
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["generate", "/definitely/not/here", "--prompt-ids", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn checkpoints_are_replaced_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = GptConfig::preset("test").unwrap();
    let w = init_weights(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let dir = tmp.path().join("ck");
    let meta = Meta {
        stage: "pretrain".into(),
        step: 5,
        ..Meta::default()
    };
    let writer = CheckpointWriter {
        config: &cfg,
        weights: &w,
        tokenizer_json: None,
        meta: &meta,
        optimizer: None,
    };
    writer.save(&dir).unwrap();
    // A failing writer leaves the previous checkpoint untouched and no temporary litter.
    let e = talaria::checkpoint::write_dir_atomically(&dir, |_| anyhow::bail!("disk full"));
    assert!(e.is_err());
    let back = Checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.meta.step, 5);
    let meta2 = Meta {
        step: 9,
        ..meta.clone()
    };
    CheckpointWriter { meta: &meta2, ..writer }.save(&dir).unwrap();
    assert_eq!(Checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap().meta.step, 9);
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ck")]);
}

/// GPT-2 small's shapes with the real GPT-2 tokenizer: runs tests/fixtures/check_gpt2_parity.py,
/// which compares `talaria generate` greedy tokens with `transformers`, when Python has
/// `transformers` and ../shared/data is present; otherwise says why it is skipped.
#[test]
fn gpt2_shaped_checkpoint_generates_the_same_greedy_tokens_as_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("../shared/data/tokenizer/gpt2_vocab.json").exists() {
        common::skip("data", "../shared/data/tokenizer is absent");
        return;
    }
    let has_tf = Command::new("python3")
        .args(["-c", "import torch, transformers, tokenizers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_tf {
        common::skip(
            "torch",
            "python3 with torch, transformers and tokenizers is not installed",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg(root.join("tests/fixtures/check_gpt2_parity.py"))
        .arg(env!("CARGO_BIN_EXE_talaria"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
