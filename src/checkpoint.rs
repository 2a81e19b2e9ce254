//! The checkpoint directory, the one format every stage reads and writes:
//!
//! - `config.json`: the model config with Hugging Face GPT-2 keys;
//! - `model.safetensors`: the weights under Hugging Face GPT-2 names;
//! - `tokenizer.json`: when the model has a tokenizer;
//! - `talaria.json`: stage, step, data position, seed, parent checkpoint;
//! - `optimizer.safetensors`: optimizer state, for runs that resume.
//!
//! A checkpoint is written to a temporary sibling directory and renamed into place, so a crash
//! never leaves a half-written checkpoint under the final name.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Gpt, GptConfig};
use crate::tokenizer::Tokenizer;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const META_FILE: &str = "talaria.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A training run directory keeps its latest, resumable checkpoint here.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// The checkpoint a path names: the path itself, or the `checkpoint/` inside a run directory.
pub fn resolve(path: &Path) -> PathBuf {
    let inner = path.join(CHECKPOINT_DIR);
    if !path.join(CONFIG_FILE).exists() && inner.join(CONFIG_FILE).exists() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// `talaria.json`: where a checkpoint came from and how to resume from it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// The stage that wrote it: `import`, `pretrain`, `sft`, `reward`, `ppo`, `dpo`.
    pub stage: String,
    /// Optimizer steps taken in that stage.
    #[serde(default)]
    pub step: u64,
    /// Training tokens consumed in that stage.
    #[serde(default)]
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The checkpoint this one was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Stage-specific state needed for exact resume (data-loader position, RNG state, ...).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub state: Value,
    #[serde(default)]
    pub talaria_version: String,
}

/// Everything in a checkpoint directory, loaded.
pub struct Checkpoint {
    pub config: GptConfig,
    pub weights: HashMap<String, Tensor>,
    /// The contents of `tokenizer.json`, when present.
    pub tokenizer_json: Option<String>,
    pub meta: Meta,
}

impl Checkpoint {
    /// Loads a checkpoint directory (or a run directory's `checkpoint/`), converting weights to
    /// `dtype`. Missing or corrupt files are errors naming the file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dir = &resolve(path);
        if !dir.is_dir() {
            bail!("checkpoint {} does not exist or is not a directory", dir.display());
        }
        let config = GptConfig::load(&dir.join(CONFIG_FILE))?;
        let weights = load_safetensors(&dir.join(WEIGHTS_FILE), dtype, device)?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer_json = if tok_path.exists() {
            Some(fs::read_to_string(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?)
        } else {
            None
        };
        let meta_path = dir.join(META_FILE);
        let meta = if meta_path.exists() {
            let text = fs::read_to_string(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: invalid talaria.json", meta_path.display()))?
        } else {
            Meta {
                stage: "external".into(),
                ..Meta::default()
            }
        };
        Ok(Self {
            config,
            weights,
            tokenizer_json,
            meta,
        })
    }

    /// The checkpoint's `tokenizer.json` text and the tokenizer it describes; `path` names the checkpoint in the
    /// error when it has none.
    pub fn tokenizer(&self, path: &Path) -> Result<(String, Tokenizer)> {
        let json = self
            .tokenizer_json
            .clone()
            .with_context(|| format!("{} has no tokenizer.json", path.display()))?;
        let tok = Tokenizer::from_json(&json)?;
        Ok((json, tok))
    }

    /// Builds the model from the loaded weights.
    pub fn model(&self) -> Result<Gpt> {
        Gpt::from_weights(&self.config, &self.weights).context("checkpoint weights do not match its config.json")
    }

    /// Loads the optimizer state saved beside the weights, if any.
    pub fn load_optimizer(dir: &Path, device: &Device) -> Result<Option<HashMap<String, Tensor>>> {
        let p = dir.join(OPTIMIZER_FILE);
        if !p.exists() {
            return Ok(None);
        }
        Ok(Some(load_safetensors(&p, DType::F32, device)?))
    }
}

/// Reads a safetensors file, converting floating tensors to `dtype`, with the file named in errors.
pub fn load_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        bail!("missing weights file {}", path.display());
    }
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let raw = candle_core::safetensors::load_buffer(&data, device).with_context(|| {
        format!(
            "{}: not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    })?;
    raw.into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() && t.dtype() != dtype {
                t.to_dtype(dtype)?
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

/// Writes tensors as safetensors with the `{"format": "pt"}` metadata that `transformers` expects.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let contiguous: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(contiguous, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What to write into a checkpoint directory.
pub struct CheckpointWriter<'a> {
    pub config: &'a GptConfig,
    pub weights: &'a HashMap<String, Tensor>,
    pub tokenizer_json: Option<&'a str>,
    pub meta: &'a Meta,
    pub optimizer: Option<&'a HashMap<String, Tensor>>,
}

impl CheckpointWriter<'_> {
    /// Writes the checkpoint to `dir` atomically: into a temporary sibling first, then renamed.
    /// An existing checkpoint at `dir` is replaced only once the new one is complete.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut meta = self.meta.clone();
        meta.talaria_version = env!("CARGO_PKG_VERSION").to_string();
        let config = self.config.to_hf_json();
        write_dir_atomically(dir, |tmp| {
            write_file(
                &tmp.join(CONFIG_FILE),
                serde_json::to_string_pretty(&config)?.as_bytes(),
            )?;
            save_safetensors(&tmp.join(WEIGHTS_FILE), self.weights)?;
            if let Some(tok) = self.tokenizer_json {
                write_file(&tmp.join(TOKENIZER_FILE), tok.as_bytes())?;
            }
            write_file(&tmp.join(META_FILE), serde_json::to_string_pretty(&meta)?.as_bytes())?;
            if let Some(opt) = self.optimizer {
                save_safetensors(&tmp.join(OPTIMIZER_FILE), opt)?;
            }
            Ok(())
        })
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Fills a fresh temporary directory beside `dir` with `fill`, syncs it, then moves it to `dir`
/// (moving any previous `dir` aside first and deleting it after).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let tmp = parent.join(format!(".{}.tmp-{stamp}", name.to_string_lossy()));
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{}.old-{stamp}", name.to_string_lossy()));
        fs::rename(dir, &old).with_context(|| format!("moving the previous {} aside", dir.display()))?;
        fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    }
    if let Ok(d) = fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}
