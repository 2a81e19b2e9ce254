//! The checkpoint directory, the one format every stage reads and writes:
//!
//! - `config.json`: the model config with Hugging Face GPT-2 keys;
//! - `model.safetensors`: the weights under Hugging Face GPT-2 names;
//! - `tokenizer.json`: when the model has a tokenizer;
//! - `talaria.json`: stage, step, data position, seed, parent checkpoint;
//! - `optimizer.safetensors`: optimizer state, for runs that resume.
//!
//! A checkpoint is written whole into a temporary sibling directory, every file and the directory synced
//! to disk, and then exchanged with the previous one in a single atomic rename (Linux's `renameat2` with
//! `RENAME_EXCHANGE`), so at every instant the final name holds a complete checkpoint, old or new, and a
//! crash or a full disk loses at most the save in progress. Where the filesystem cannot exchange, the old
//! directory is moved aside for the instant of the second rename, and a load that finds only the aside copy
//! puts it back. A companion checkpoint (PPO's critic) is saved inside the main one, so both move together.

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
        recover(&path.join(CHECKPOINT_DIR))?;
        recover(path)?;
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

/// Writes tensors as safetensors with the `{"format": "pt"}` metadata that `transformers` expects, synced
/// to disk.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let contiguous: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(contiguous, Some(meta)).with_context(|| format!("serialising {}", path.display()))?;
    write_file(path, &bytes)
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
    /// Writes the checkpoint to `dir` atomically (see the module docs): an existing checkpoint at `dir`
    /// is replaced only once the new one is complete and on disk.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(dir, &[])
    }

    /// The same, with companion checkpoints in subdirectories of `dir` (`(name, writer)`), all replaced
    /// in the one atomic step.
    pub fn save_with(&self, dir: &Path, companions: &[(&str, &CheckpointWriter)]) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            self.write_into(tmp)?;
            for (name, w) in companions {
                let sub = tmp.join(name);
                fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
                w.write_into(&sub)?;
                sync_dir(&sub)?;
            }
            Ok(())
        })
    }

    fn write_into(&self, dir: &Path) -> Result<()> {
        let mut meta = self.meta.clone();
        meta.talaria_version = env!("CARGO_PKG_VERSION").to_string();
        let config = self.config.to_hf_json();
        write_file(
            &dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        save_safetensors(&dir.join(WEIGHTS_FILE), self.weights)?;
        if let Some(tok) = self.tokenizer_json {
            write_file(&dir.join(TOKENIZER_FILE), tok.as_bytes())?;
        }
        write_file(&dir.join(META_FILE), serde_json::to_string_pretty(&meta)?.as_bytes())?;
        if let Some(opt) = self.optimizer {
            save_safetensors(&dir.join(OPTIMIZER_FILE), opt)?;
        }
        Ok(())
    }
}

/// Writes `bytes` to a new file at `path` and syncs it to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Syncs a directory's entries (the names of the files in it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Swaps two paths in one atomic step, where the OS and filesystem can; `Ok(false)` where they cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 reads them and touches no memory of ours.
    // (std has no exchange; `libc` exposes the system call, which has been in Linux since 3.15.)
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP) => Ok(false),
        _ => Err(err).with_context(|| format!("exchanging {} and {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> Result<bool> {
    Ok(false)
}

/// The aside copies (`.NAME.old-*`) a save on a filesystem without exchange leaves for an instant.
fn aside_copies(dir: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return vec![];
    };
    let prefix = format!(".{}.old-", name.to_string_lossy());
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return vec![];
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Puts back the previous checkpoint when a save was interrupted between its two renames (filesystems
/// without exchange only): `dir` is missing and its aside copy is complete.
pub fn recover(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(old) = aside_copies(dir).pop() {
        fs::rename(&old, dir).with_context(|| format!("restoring {} from {}", dir.display(), old.display()))?;
        eprintln!("restored {} from the interrupted save's copy", dir.display());
    }
    Ok(())
}

/// Fills a fresh temporary directory beside `dir` with `fill`, syncs it, then puts it at `dir` in one
/// atomic step (exchanging it with any previous `dir`, which is then deleted). Leftovers of saves that
/// were killed are removed first.
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
    recover(dir)?;
    let tmp_prefix = format!(".{}.tmp-", name.to_string_lossy());
    if let Ok(entries) = fs::read_dir(&parent) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&tmp_prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    for old in aside_copies(dir) {
        let _ = fs::remove_dir_all(old);
    }
    let tmp = parent.join(format!("{tmp_prefix}{stamp}"));
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_dir(&tmp)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("saving {} (any previous one there is intact)", dir.display()));
    }
    if !dir.exists() {
        fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    } else if exchange(&tmp, dir)? {
        sync_dir(&parent)?;
        fs::remove_dir_all(&tmp).with_context(|| format!("removing the previous {}", tmp.display()))?;
    } else {
        let old = parent.join(format!(".{}.old-{stamp}", name.to_string_lossy()));
        fs::rename(dir, &old).with_context(|| format!("moving the previous {} aside", dir.display()))?;
        fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&parent)?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    sync_dir(&parent)
}
