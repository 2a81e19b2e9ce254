//! `talaria import` and `talaria export`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use talaria::interop;

#[derive(Subcommand)]
pub(crate) enum ImportCmd {
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors [+ tokenizer.json]).
    Hf {
        hf_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum ExportCmd {
    /// A directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.
    Hf {
        ckpt: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

impl ImportCmd {
    pub(crate) fn run(self) -> Result<()> {
        let ImportCmd::Hf { hf_dir, out } = self;
        let s = interop::import_hf(&hf_dir, &out)?;
        println!(
            "imported {} ({:.2}M parameters, {} layers, context {}, vocab {}{}) -> {}",
            hf_dir.display(),
            s.num_params as f64 / 1e6,
            s.config.n_layer,
            s.config.n_positions,
            s.config.vocab_size,
            if s.has_tokenizer {
                ", with tokenizer"
            } else {
                ", no tokenizer: token ids only"
            },
            out.display()
        );
        Ok(())
    }
}

impl ExportCmd {
    pub(crate) fn run(self) -> Result<()> {
        let ExportCmd::Hf { ckpt, out } = self;
        interop::export_hf(&ckpt, &out)?;
        println!(
            "exported {} -> {} (load with GPT2LMHeadModel.from_pretrained)",
            ckpt.display(),
            out.display()
        );
        Ok(())
    }
}
