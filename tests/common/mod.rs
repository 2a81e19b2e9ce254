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
        steps: Some(steps),
        time_budget: None,
        lr,
        min_lr: lr / 10.0,
        warmup: 5,
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        grad_accum: 1,
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
