//! `talaria export gguf`: one GGUF file with llama.cpp's `gpt2` architecture, that llama.cpp's
//! tools and Ollama load: the hyper-parameters, the byte-level BPE vocabulary with its merges and
//! token types, the special tokens and the chat template, and the weights in f32, f16 or q8_0.
//! The file is written by candle's GGUF writer (`candle_core::quantized::gguf_file`), which also
//! does the f16 and q8_0 conversions.

use std::collections::HashMap;
use std::fs;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::hf::SpecialRoles;
use crate::checkpoint::{self, Checkpoint};
use crate::model::config::Activation;
use crate::tokenizer::Tokenizer;

/// The precision of the weight matrices in a GGUF file (vectors stay f32, as llama.cpp keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    /// llama.cpp's 8-bit blocks: 32 weights and one f16 scale. Matrices whose rows are not a
    /// multiple of 32 long are written in f16 instead (as llama.cpp's own quantizer does).
    Q8_0,
}

impl std::str::FromStr for GgufDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => bail!("unknown GGUF dtype {other:?} (expected f32, f16 or q8_0)"),
        }
    }
}

impl GgufDtype {
    /// `general.file_type`, llama.cpp's `llama_ftype`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub tensors: usize,
    /// Matrices written in f16 although q8_0 was asked for (rows not a multiple of 32).
    pub f16_fallbacks: Vec<String>,
    pub bytes: u64,
    pub chat_template: bool,
}

/// A tokenizer.json's vocabulary as llama.cpp wants it: tokens in id order, their types, merges.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    /// llama.cpp's name of the pre-tokenizer (`tokenizer.ggml.pre`).
    pre: &'static str,
}

/// The pre-tokenizer of a tokenizer.json in llama.cpp's names: GPT-2's byte-level regex
/// (`gpt-2`), or digits split one by one before it (`starcoder`, whose llama.cpp regexes are
/// `\p{N}` then GPT-2's: what Talaria's trained tokenizers do).
fn pre_tokenizer(tj: &Value) -> Result<&'static str> {
    let byte_level = |p: &Value| p["type"] == "ByteLevel" && p["use_regex"] != false && p["add_prefix_space"] != true;
    ensure!(
        tj["normalizer"].is_null(),
        "the tokenizer has a normalizer, which llama.cpp's BPE tokenizer does not apply"
    );
    let pre = &tj["pre_tokenizer"];
    if byte_level(pre) {
        return Ok("gpt-2");
    }
    if pre["type"] == "Sequence"
        && let Some([digits, last]) = pre["pretokenizers"].as_array().map(Vec::as_slice)
        && digits["type"] == "Digits"
        && digits["individual_digits"] == true
        && byte_level(last)
    {
        return Ok("starcoder");
    }
    bail!(
        "the tokenizer's pre-tokenizer ({pre}) has no llama.cpp equivalent: GGUF export supports GPT-2's byte-level BPE, alone or after single-digit splitting"
    )
}

/// Reads the vocabulary, merges and token types from a tokenizer.json, padded with unused tokens
/// to `vocab_size` (the embedding's rows).
fn vocab(json: &str, vocab_size: usize) -> Result<Vocab> {
    let tj: Value = serde_json::from_str(json).context("tokenizer.json is not valid JSON")?;
    ensure!(
        tj["model"]["type"] == "BPE",
        "GGUF export needs a BPE tokenizer, this one is {}",
        tj["model"]["type"]
    );
    let pre = pre_tokenizer(&tj)?;
    let mut by_id: HashMap<u32, (String, i32)> = HashMap::new();
    let vocab_map = tj["model"]["vocab"]
        .as_object()
        .context("tokenizer.json has no model.vocab object")?;
    for (text, id) in vocab_map {
        let id = id
            .as_u64()
            .with_context(|| format!("vocab entry {text:?} has no integer id"))? as u32;
        by_id.insert(id, (text.clone(), TOKEN_NORMAL));
    }
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) else {
            bail!("an added token without id or content: {t}");
        };
        let kind = if t["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        by_id.insert(id as u32, (text.to_string(), kind));
    }
    let n = by_id.keys().max().map_or(0, |m| *m as usize + 1);
    ensure!(
        n <= vocab_size,
        "the tokenizer has ids up to {} but the model's vocabulary is {vocab_size}",
        n - 1
    );
    let (mut tokens, mut types) = (Vec::with_capacity(vocab_size), Vec::with_capacity(vocab_size));
    for id in 0..vocab_size as u32 {
        let (text, kind) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("<|unused_{id}|>"), TOKEN_UNUSED));
        tokens.push(text);
        types.push(kind);
    }
    let merges = tj["model"]["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges list")?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => bail!("a merge that is neither \"a b\" nor [\"a\", \"b\"]: {other}"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Vocab {
        tokens,
        types,
        merges,
        pre,
    })
}

/// llama.cpp's name for a Talaria (Hugging Face GPT-2) tensor, and whether its matrix is stored
/// transposed (GPT-2's `Conv1D` keeps `[in, out]`, llama.cpp's matrices are `[out, in]` rows).
fn gguf_name(name: &str) -> Result<(String, bool)> {
    let fixed = match name {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.wpe.weight" => Some("position_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok((f.to_string(), false));
    }
    let rest = name
        .strip_prefix("transformer.h.")
        .with_context(|| format!("tensor {name} has no GGUF name"))?;
    let (layer, part) = rest
        .split_once('.')
        .with_context(|| format!("tensor {name} has no GGUF name"))?;
    let (gguf, transposed) = match part {
        "ln_1.weight" => ("attn_norm.weight", false),
        "ln_1.bias" => ("attn_norm.bias", false),
        "attn.c_attn.weight" => ("attn_qkv.weight", true),
        "attn.c_attn.bias" => ("attn_qkv.bias", false),
        "attn.c_proj.weight" => ("attn_output.weight", true),
        "attn.c_proj.bias" => ("attn_output.bias", false),
        "ln_2.weight" => ("ffn_norm.weight", false),
        "ln_2.bias" => ("ffn_norm.bias", false),
        "mlp.c_fc.weight" => ("ffn_up.weight", true),
        "mlp.c_fc.bias" => ("ffn_up.bias", false),
        "mlp.c_proj.weight" => ("ffn_down.weight", true),
        "mlp.c_proj.bias" => ("ffn_down.bias", false),
        _ => bail!("tensor {name} has no GGUF name"),
    };
    Ok((format!("blk.{layer}.{gguf}"), transposed))
}

/// Writes the language model at `ckpt` as a GGUF file at `out` (atomically: a temporary file
/// renamed into place), its matrices in `dtype`.
pub fn export_gguf(ckpt: &Path, out: &Path, dtype: GgufDtype) -> Result<GgufSummary> {
    // Export converts files: the weights are read on the CPU, whatever trained them.
    let ck = Checkpoint::load(ckpt, DType::F32, &Device::Cpu)?;
    let c = &ck.config;
    ensure!(
        !ck.weights.contains_key(crate::train::reward::SCORE_HEAD),
        "{} is a reward model: llama.cpp's gpt2 architecture has no score head (export it with `talaria export hf`)",
        ckpt.display()
    );
    ensure!(
        c.activation == Activation::GeluTanh,
        "llama.cpp's gpt2 architecture uses the tanh approximation of GELU; this model uses the exact one"
    );
    let json = ck.tokenizer_json.as_deref().with_context(|| {
        format!(
            "{} has no tokenizer.json: a GGUF file carries its tokenizer",
            ckpt.display()
        )
    })?;
    let tok = Tokenizer::from_json(json)?;
    let roles = SpecialRoles::of(&tok, c)?;
    let v = vocab(json, c.vocab_size)?;

    let name = checkpoint::resolve(ckpt)
        .canonicalize()
        .ok()
        .and_then(|p| {
            let p = if p.ends_with(checkpoint::CHECKPOINT_DIR) {
                p.parent()?.to_path_buf()
            } else {
                p
            };
            Some(p.file_name()?.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "talaria".into());
    let strings = |xs: &[String]| G::Array(xs.iter().cloned().map(G::String).collect());
    let mut meta: Vec<(&str, G)> = vec![
        ("general.architecture", G::String("gpt2".into())),
        ("general.name", G::String(name)),
        ("general.file_type", G::U32(dtype.file_type())),
        ("general.quantization_version", G::U32(2)),
        ("gpt2.context_length", G::U32(c.n_positions as u32)),
        ("gpt2.embedding_length", G::U32(c.n_embd as u32)),
        ("gpt2.feed_forward_length", G::U32(4 * c.n_embd as u32)),
        ("gpt2.block_count", G::U32(c.n_layer as u32)),
        ("gpt2.attention.head_count", G::U32(c.n_head as u32)),
        ("gpt2.attention.layer_norm_epsilon", G::F32(c.layer_norm_epsilon as f32)),
        ("tokenizer.ggml.model", G::String("gpt2".into())),
        ("tokenizer.ggml.pre", G::String(v.pre.into())),
        ("tokenizer.ggml.tokens", strings(&v.tokens)),
        (
            "tokenizer.ggml.token_type",
            G::Array(v.types.iter().map(|&t| G::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&v.merges)),
        ("tokenizer.ggml.bos_token_id", G::U32(roles.bos.id)),
        ("tokenizer.ggml.eos_token_id", G::U32(roles.eos.id)),
        ("tokenizer.ggml.add_bos_token", G::Bool(false)),
        ("tokenizer.ggml.add_eos_token", G::Bool(false)),
    ];
    if let Some(p) = &roles.pad {
        meta.push(("tokenizer.ggml.padding_token_id", G::U32(p.id)));
    }
    if roles.chat {
        meta.push(("tokenizer.ggml.eot_token_id", G::U32(roles.eos.id)));
        meta.push(("tokenizer.chat_template", G::String(crate::chat::jinja_template())));
    }

    let model = ck.model()?;
    let mut named: Vec<(String, Tensor, bool)> = model
        .weights()
        .into_iter()
        .map(|(n, t)| {
            let (g, transposed) = gguf_name(&n)?;
            Ok((g, t, transposed))
        })
        .collect::<Result<_>>()?;
    named.sort_by_key(|a| gguf_order(&a.0));
    let mut f16_fallbacks = vec![];
    let mut tensors = Vec::with_capacity(named.len());
    for (gname, t, transposed) in named {
        let t = if transposed { t.t()?.contiguous()? } else { t };
        let want = match (t.rank(), dtype) {
            (1, _) | (_, GgufDtype::F32) => GgmlDType::F32,
            (_, GgufDtype::F16) => GgmlDType::F16,
            (_, GgufDtype::Q8_0) if t.dim(t.rank() - 1)? % GgmlDType::Q8_0.block_size() == 0 => GgmlDType::Q8_0,
            (_, GgufDtype::Q8_0) => {
                f16_fallbacks.push(gname.clone());
                GgmlDType::F16
            }
        };
        let q = QTensor::quantize(&t, want).with_context(|| format!("converting {gname} to {want:?}"))?;
        tensors.push((gname, q));
    }

    let tmp = out.with_extension("gguf.partial");
    let written = (|| -> Result<()> {
        let mut w = BufWriter::new(fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", out.display())));
    }
    fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(GgufSummary {
        tensors: tensors.len(),
        f16_fallbacks,
        bytes: fs::metadata(out)?.len(),
        chat_template: roles.chat,
    })
}

/// Sort key that lists tensors as llama.cpp's converter does: embeddings, then the blocks in
/// order, then the final norm.
fn gguf_order(name: &str) -> (usize, usize, String) {
    match name.strip_prefix("blk.") {
        Some(rest) => {
            let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
            (1, layer.parse().unwrap_or(usize::MAX), part.to_string())
        }
        None if name.starts_with("output") => (2, 0, name.to_string()),
        None => (0, 0, name.to_string()),
    }
}
