//! Helpers shared by the integration tests: tensor comparison, training configs, checkpoints.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use talaria::checkpoint::{CheckpointWriter, Meta};
use talaria::model::GptConfig;
use talaria::train::AdamWConfig;
use talaria::train::trainer::TrainConfig;

/// The largest element-wise |a - b| of two f32 tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A quiet training run of `steps` steps at peak `lr` (warmup 5, cosine to lr / 10, clipping at 1,
/// seed 1, no evaluation or checkpoint before the end, no progress bar); tests override fields.
pub fn train_cfg(out: &Path, steps: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        out: out.to_path_buf(),
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        steps: Some(steps),
        time_budget: None,
        lr,
        min_lr: lr / 10.0,
        warmup: 5,
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        grad_accum: 1,
        side_by_side: false,
        eval_every: 1000,
        save_every: 1000,
        seed: 1,
        resume: false,
        stop_at: None,
        progress: false,
    }
}

/// Writes a checkpoint of `cfg` with `weights` (and the tokenizer, when given) at `path`, as if
/// stage `stage` had written it.
pub fn save_checkpoint(
    path: &Path,
    cfg: &GptConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer_json: Option<&str>,
    stage: &str,
) {
    let meta = Meta {
        stage: stage.into(),
        ..Meta::default()
    };
    CheckpointWriter {
        config: cfg,
        weights,
        tokenizer_json,
        meta: &meta,
        optimizer: None,
    }
    .save(path)
    .unwrap();
}

/// Says visibly that a test cannot run here, and why. Where `TALARIA_REQUIRE` (a comma-separated
/// list that `.ci/run` sets to what it installed: `data`, `torch`, `browser`, `openai`) names
/// `needs`, the skip is a failure instead: the tool is meant to be there.
pub fn skip(needs: &str, why: &str) {
    let required = std::env::var("TALARIA_REQUIRE").unwrap_or_default();
    if required.split(',').any(|r| r.trim() == needs) {
        panic!("{why}, but TALARIA_REQUIRE includes {needs:?}");
    }
    // Written to the process's stderr directly: libtest captures `eprintln!` of a passing test, and a
    // skip must show in the test output.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// GPT-2's mapping of bytes to the printable characters that its `vocab.json` spells them with
/// (`bytes_to_unicode` in OpenAI's encoder.py).
pub fn gpt2_byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut out = vec!['\0'; 256];
    for (b, c) in bytes.into_iter().zip(chars) {
        out[b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Writes a GPT-2-style `vocab.json` and `merges.txt` into `dir`: the 256 bytes, `<|endoftext|>` (id
/// 256) and the merges `t h` (257) and `Ġ t` (258): a tokenizer without Talaria's chat tokens.
pub fn write_gpt2_style_vocab(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let chars = gpt2_byte_chars();
    let mut vocab: serde_json::Map<String, serde_json::Value> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    vocab.insert("<|endoftext|>".into(), serde_json::json!(256));
    vocab.insert("th".into(), serde_json::json!(257));
    vocab.insert("Ġt".into(), serde_json::json!(258));
    let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
    std::fs::write(&v, serde_json::Value::Object(vocab).to_string()).unwrap();
    std::fs::write(&m, "#version: 0.2\nt h\nĠ t\n").unwrap();
    (v, m)
}

/// A small random GPT-2 checkpoint at `dir/name` with the tokenizer of [`write_gpt2_style_vocab`]: a
/// plain completion model, as `talaria import hf gpt2` gives. Returns its path.
pub fn plain_completion_checkpoint(dir: &Path, name: &str) -> std::path::PathBuf {
    let (v, m) = write_gpt2_style_vocab(dir);
    let tok = talaria::tokenizer::import_gpt2(&v, &m).unwrap();
    let mut cfg = GptConfig::preset("test").unwrap();
    cfg.vocab_size = tok.vocab_size();
    cfg.bos_token_id = Some(256);
    cfg.eos_token_id = Some(256);
    let w = talaria::model::init_weights(&cfg, 3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let path = dir.join(name);
    save_checkpoint(&path, &cfg, &w, Some(&tok.to_json().unwrap()), "import");
    path
}

/// Token shards `train_0000.bin` (`n` tokens) and `val_0000.bin` (`n / 4`) in `dir`: runs of
/// consecutive ids over a 64-token vocabulary with random jumps, so that a model can learn them.
pub fn write_token_shards(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 12345u64;
    let mut rand = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut stream = |len: usize| -> Vec<u32> {
        let mut v = Vec::with_capacity(len);
        let mut x = rand() % 64;
        for _ in 0..len {
            x = if rand() % 5 == 0 { rand() % 64 } else { (x + 1) % 64 };
            v.push(x);
        }
        v
    };
    talaria::data::shards::write_shard(&dir.join("train_0000.bin"), &stream(n), 64).unwrap();
    talaria::data::shards::write_shard(&dir.join("val_0000.bin"), &stream(n / 4), 64).unwrap();
}

/// A small default world (seed 1, scale 0.05) in `dir` and a BPE tokenizer of `vocab_size` tokens
/// trained on its pretraining text.
pub fn small_world(dir: &Path, vocab_size: usize) -> talaria::tokenizer::Tokenizer {
    talaria::data::synth::generate(&talaria::data::synth::SynthConfig {
        out: dir.to_path_buf(),
        seed: 1,
        scale: 0.05,
    })
    .unwrap();
    let cfg = talaria::tokenizer::TrainConfig {
        vocab_size,
        min_frequency: 2,
        show_progress: false,
    };
    let read = talaria::data::readers::ReadOptions::default();
    talaria::data::bpe::train_from_files(&[dir.join("pretrain.txt")], &read, &cfg)
        .unwrap()
        .0
}
