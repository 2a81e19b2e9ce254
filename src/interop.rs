//! Hugging Face interop: `talaria import hf` and `talaria export hf`.
//!
//! Talaria's checkpoint already uses the GPT-2 layout of `transformers`, so import is mostly
//! validation (config keys, tensor names and shapes, tied head) and export writes the directory
//! that `GPT2LMHeadModel.from_pretrained` loads.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::checkpoint::{self, Checkpoint, CheckpointWriter, Meta};
use crate::model::{Gpt, GptConfig};

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
        let text = fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map object", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        files.sort_unstable();
        files.dedup();
        let mut all = HashMap::new();
        for f in files {
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
}

/// Imports a Hugging Face GPT-2 directory (config.json + model.safetensors, tokenizer.json if
/// present) into a Talaria checkpoint at `out`.
pub fn import_hf(hf_dir: &Path, out: &Path) -> Result<ImportSummary> {
    if !hf_dir.is_dir() {
        bail!("{} is not a directory", hf_dir.display());
    }
    let config = GptConfig::load(&hf_dir.join("config.json"))?;
    let device = Device::Cpu;
    let weights = canonical_names(read_hf_weights(hf_dir, &device)?);
    let model = Gpt::from_weights(&config, &weights).with_context(|| format!("importing {}", hf_dir.display()))?;
    let tok_path = hf_dir.join(checkpoint::TOKENIZER_FILE);
    let tokenizer_json = if tok_path.exists() {
        let text = fs::read_to_string(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
        crate::tokenizer::Tokenizer::from_json(&text)
            .with_context(|| format!("{}: not a usable tokenizer", tok_path.display()))?;
        Some(text)
    } else {
        None
    };
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
        config,
    })
}

/// Exports a Talaria checkpoint to a directory `transformers.GPT2LMHeadModel.from_pretrained`
/// loads, with the same logits.
pub fn export_hf(ckpt: &Path, out: &Path) -> Result<()> {
    let ck = Checkpoint::load(ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let weights = model.weights();
    checkpoint::write_dir_atomically(out, |tmp| {
        fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&ck.config.to_hf_json())?,
        )?;
        checkpoint::save_safetensors(&tmp.join("model.safetensors"), &weights)?;
        if let Some(tok) = &ck.tokenizer_json {
            fs::write(tmp.join(checkpoint::TOKENIZER_FILE), tok)?;
        }
        Ok(())
    })
}
