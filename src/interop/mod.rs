//! Models in and out of Talaria: `talaria import hf` (a Hugging Face GPT-2 directory or Hub id),
//! `talaria export hf` ([`hf`]: a chat-ready `transformers` directory) and `talaria export gguf`
//! ([`gguf`]: a file for llama.cpp and Ollama).
//!
//! Talaria's checkpoint already uses the GPT-2 layout of `transformers`, so import is mostly
//! validation (config keys, tensor names and shapes, tied head).

pub mod gguf;
pub mod hf;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};
use serde_json::Value;

pub use hf::{ExportSummary, export_hf};

use crate::checkpoint::{self, CheckpointWriter, Meta};
use crate::data::download;
use crate::model::{Gpt, GptConfig};
use crate::tokenizer::{self, Tokenizer};

/// Maps the tensor names of any GPT-2 safetensors file to Talaria's (`transformers`'
/// `GPT2LMHeadModel` names): the bare `GPT2Model` names (`h.0.attn...`, `wte.weight`, as on the
/// Hub's `gpt2` repository) gain the `transformer.` prefix; attention-mask buffers are dropped.
fn canonical_names(raw: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    raw.into_iter()
        .filter(|(name, _)| !(name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")))
        .map(|(name, t)| {
            let canonical = if name.starts_with("transformer.") || name == "lm_head.weight" {
                name
            } else {
                format!("transformer.{name}")
            };
            (canonical, t)
        })
        .collect()
}

/// Reads the weights of a Hugging Face model directory: `model.safetensors`, or the shards named
/// by `model.safetensors.index.json`.
fn read_hf_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return checkpoint::load_safetensors(&single, DType::F32, device);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let mut all = HashMap::new();
        for f in shard_files(&index)? {
            all.extend(checkpoint::load_safetensors(&dir.join(f), DType::F32, device)?);
        }
        return Ok(all);
    }
    if dir.join("pytorch_model.bin").exists() {
        bail!(
            "{} has only pytorch_model.bin; Talaria reads safetensors. Convert it with \
             `GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`",
            dir.display()
        );
    }
    bail!("{}: no model.safetensors found", dir.display())
}

/// A summary of an imported model, for the CLI to print.
pub struct ImportSummary {
    pub config: GptConfig,
    pub num_params: usize,
    pub has_tokenizer: bool,
    /// Whether the tokenizer has Talaria's chat tokens (otherwise chat and serve treat the model
    /// as a plain completion model).
    pub chat: bool,
    /// The directory the files were read from (the Hugging Face cache's snapshot for a Hub id).
    pub source_dir: PathBuf,
}

/// Whether `s` has the shape of a Hub model id: `name` or `owner/name`, of letters, digits and
/// `-_.`.
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Imports `source` into a Talaria checkpoint at `out`: an existing directory, else a Hub model id
/// (`gpt2`, `openai-community/gpt2-medium`) at `revision`, fetched by [`fetch_hub_model`].
pub fn import(source: &str, revision: &str, out: &Path) -> Result<ImportSummary> {
    let path = Path::new(source);
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else if path.exists() {
        bail!("{source} is a file: give the model's directory (config.json, model.safetensors, tokenizer.json)");
    } else if is_hub_id(source) {
        fetch_hub_model(source, revision)?
    } else {
        bail!(
            "{source} is neither a directory nor a Hugging Face Hub model id (such as gpt2 or openai-community/gpt2-medium)"
        );
    };
    import_hf(&dir, out)
}

/// The files of Hub model `id` that [`import_hf`] reads, from the Hugging Face cache (`HF_HOME`,
/// else `~/.cache/huggingface`) or downloaded into it through `hf-hub`; returns the directory of
/// the cached snapshot. Offline it reads a complete cached copy and otherwise fails in seconds
/// with a message that says what to do.
pub fn fetch_hub_model(id: &str, revision: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let cached = cache.repo(repo.clone());
    // Weights: one file, or an index whose every shard is cached.
    let weights_cached = cached.get(checkpoint::WEIGHTS_FILE).is_some()
        || cached.get("model.safetensors.index.json").is_some_and(|index| {
            shard_files(&index).is_ok_and(|shards| shards.iter().all(|f| cached.get(f).is_some()))
        });
    if let Some(config) = cached.get("config.json")
        && weights_cached
        && (cached.get(checkpoint::TOKENIZER_FILE).is_some()
            || (cached.get("vocab.json").is_some() && cached.get("merges.txt").is_some()))
    {
        return Ok(config.parent().expect("a cached file has a directory").to_path_buf());
    }
    let endpoint = download::endpoint_or_env(None);
    download::check_reachable(
        &endpoint,
        &format!(
            "`talaria import hf {id}` downloads the model once into the Hugging Face cache ({}) and reads it from \
             there afterwards; on this machine, fetch the repository's config.json, model.safetensors and \
             tokenizer.json by other means and pass their directory instead",
            cache.path().display()
        ),
    )?;
    let api = ApiBuilder::from_cache(cache)
        .with_endpoint(endpoint.clone())
        .with_progress(true)
        .with_retries(1)
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let remote = api.repo(repo);
    let info = remote
        .info()
        .with_context(|| format!("looking up model {id} (revision {revision}) at {endpoint}"))?;
    let listed: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    ensure!(
        listed.contains("config.json"),
        "model {id} has no config.json: not a transformers model"
    );
    let get = |f: &str| {
        remote
            .get(f)
            .with_context(|| format!("downloading {f} of model {id} from {endpoint}"))
    };
    let config = get("config.json")?;
    if listed.contains(checkpoint::WEIGHTS_FILE) {
        get(checkpoint::WEIGHTS_FILE)?;
    } else if listed.contains("model.safetensors.index.json") {
        let index = get("model.safetensors.index.json")?;
        for shard in shard_files(&index)? {
            get(&shard)?;
        }
    } else if listed.contains("pytorch_model.bin") {
        bail!(
            "model {id} has only pytorch_model.bin; Talaria reads safetensors (pickled PyTorch files can run code \
             when loaded). Convert it with `GPT2LMHeadModel.from_pretrained(\"{id}\").save_pretrained(DIR, \
             safe_serialization=True)` and import DIR"
        );
    } else {
        let mut names: Vec<&str> = listed.into_iter().collect();
        names.sort_unstable();
        bail!("model {id} has no model.safetensors (its files: {names:?})");
    }
    if listed.contains(checkpoint::TOKENIZER_FILE) {
        get(checkpoint::TOKENIZER_FILE)?;
    } else if listed.contains("vocab.json") && listed.contains("merges.txt") {
        get("vocab.json")?;
        get("merges.txt")?;
    }
    Ok(config.parent().expect("a cached file has a directory").to_path_buf())
}

/// The shard files named by a `model.safetensors.index.json`, each once, sorted.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map object", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
    files.sort_unstable();
    files.dedup();
    Ok(files)
}

/// The tokenizer of a Hugging Face directory and its `tokenizer.json` text: the directory's
/// `tokenizer.json` as it is, else one built from GPT-2's `vocab.json` and `merges.txt`; `None`
/// when it has neither.
fn read_hf_tokenizer(dir: &Path) -> Result<Option<(String, Tokenizer)>> {
    let tok_path = dir.join(checkpoint::TOKENIZER_FILE);
    if tok_path.exists() {
        let text = fs::read_to_string(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
        let tok =
            Tokenizer::from_json(&text).with_context(|| format!("{}: not a usable tokenizer", tok_path.display()))?;
        return Ok(Some((text, tok)));
    }
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if vocab.exists() && merges.exists() {
        let tok = tokenizer::import_gpt2(&vocab, &merges)?;
        return Ok(Some((tok.to_json()?, tok)));
    }
    Ok(None)
}

/// Imports a Hugging Face GPT-2 directory (config.json + model.safetensors, tokenizer.json if
/// present) into a Talaria checkpoint at `out`.
pub fn import_hf(hf_dir: &Path, out: &Path) -> Result<ImportSummary> {
    if !hf_dir.is_dir() {
        bail!("{} is not a directory", hf_dir.display());
    }
    let config = GptConfig::load(&hf_dir.join("config.json"))?;
    // Import converts files on the CPU; a later command moves the weights to its --device.
    let device = Device::Cpu;
    let weights = canonical_names(read_hf_weights(hf_dir, &device)?);
    let model = Gpt::from_weights(&config, &weights).with_context(|| format!("importing {}", hf_dir.display()))?;
    let tokenizer = read_hf_tokenizer(hf_dir)?;
    let chat = tokenizer
        .as_ref()
        .is_some_and(|(_, t)| crate::chat::ChatTemplate::new(t).is_ok());
    let tokenizer_json = tokenizer.map(|(json, _)| json);
    let meta = Meta {
        stage: "import".into(),
        parent: Some(hf_dir.display().to_string()),
        ..Meta::default()
    };
    CheckpointWriter {
        config: &config,
        weights: &model.weights(),
        tokenizer_json: tokenizer_json.as_deref(),
        meta: &meta,
        optimizer: None,
    }
    .save(out)?;
    Ok(ImportSummary {
        num_params: config.num_params(),
        has_tokenizer: tokenizer_json.is_some(),
        chat,
        config,
        source_dir: hf_dir.to_path_buf(),
    })
}
