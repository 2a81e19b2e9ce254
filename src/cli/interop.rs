//! `talaria import` and `talaria export`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use talaria::interop::{self, gguf, hf::ExportKind};

#[derive(Subcommand)]
pub(crate) enum ImportCmd {
    /// A Hugging Face GPT-2: a directory (config.json, model.safetensors, tokenizer.json or
    /// vocab.json + merges.txt) or a Hub model id such as gpt2 or openai-community/gpt2-medium
    /// (downloaded once into the Hugging Face cache, HF_HOME).
    Hf {
        /// Directory or Hub model id.
        source: String,
        /// The Hub revision (branch, tag or commit) of a Hub id.
        #[arg(long, default_value = "main")]
        revision: String,
        /// The Talaria checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum ExportCmd {
    /// A directory that `transformers` loads as it is: a chat model with its chat template, or a
    /// reward model as GPT2ForSequenceClassification; with a model card.
    Hf {
        /// Checkpoint (or run directory).
        ckpt: PathBuf,
        /// The directory to write (replaced atomically if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// One GGUF file for llama.cpp and Ollama (llama.cpp's gpt2 architecture).
    Gguf {
        /// Checkpoint (or run directory) of a language model.
        ckpt: PathBuf,
        /// The .gguf file to write.
        #[arg(long)]
        out: PathBuf,
        /// Precision of the weight matrices: f32, f16 or q8_0.
        #[arg(long, default_value = "f32")]
        dtype: gguf::GgufDtype,
    },
}

impl ImportCmd {
    pub(crate) fn run(self) -> Result<()> {
        let ImportCmd::Hf { source, revision, out } = self;
        let s = interop::import(&source, &revision, &out)?;
        println!(
            "imported {} ({:.2}M parameters, {} layers, context {}, vocab {}{}) -> {}",
            s.source_dir.display(),
            s.num_params as f64 / 1e6,
            s.config.n_layer,
            s.config.n_positions,
            s.config.vocab_size,
            match (s.has_tokenizer, s.chat) {
                (true, true) => ", with a chat tokenizer",
                (true, false) =>
                    ", with a tokenizer without chat tokens: chat and serve treat it as a plain completion model",
                (false, _) => ", no tokenizer: token ids only",
            },
            out.display()
        );
        Ok(())
    }
}

impl ExportCmd {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            ExportCmd::Hf { ckpt, out } => {
                let s = interop::export_hf(&ckpt, &out)?;
                let how = match (s.kind, s.chat) {
                    (ExportKind::RewardModel, _) => "GPT2ForSequenceClassification.from_pretrained",
                    (_, true) => "AutoModelForCausalLM and AutoTokenizer (with its chat template)",
                    _ => "AutoModelForCausalLM.from_pretrained",
                };
                println!(
                    "exported {} -> {} ({}; load with {how})",
                    ckpt.display(),
                    out.display(),
                    s.files.join(", ")
                );
            }
            ExportCmd::Gguf { ckpt, out, dtype } => {
                let s = gguf::export_gguf(&ckpt, &out, dtype)?;
                println!(
                    "exported {} -> {} ({} tensors, {:.1} MB, {dtype:?}{}{})",
                    ckpt.display(),
                    out.display(),
                    s.tensors,
                    s.bytes as f64 / 1e6,
                    if s.chat_template {
                        ", with the chat template"
                    } else {
                        ""
                    },
                    if s.f16_fallbacks.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; {} matrices in f16, their rows not a multiple of 32: {}",
                            s.f16_fallbacks.len(),
                            s.f16_fallbacks.join(", ")
                        )
                    }
                );
            }
        }
        Ok(())
    }
}
