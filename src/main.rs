//! The `talaria` command line: argument parsing only; every stage lives in the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use talaria::bench::{BenchConfig, BenchKind};
use talaria::checkpoint::Checkpoint;
use talaria::engine::{self, GenerateOptions, Sampler, SamplingParams, TextStream};
use talaria::interop;
use talaria::tokenizer::Tokenizer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`; libmimalloc-sys names no
/// constant for it). -1 keeps freed memory mapped instead of returning it to the OS: a training
/// step frees and reallocates the same large activation buffers every step, and re-faulting
/// them in cost ~15% of a step (`perf`: the kernel's `clear_page`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(
    name = "talaria",
    version,
    about = "From raw text to a chat assistant: the whole ChatGPT recipe in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Import a model from another format into a Talaria checkpoint.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Export a Talaria checkpoint to another format.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Measure training or decoding throughput (compare with bench/pytorch_reference.py).
    Bench(BenchArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchWhat {
    /// Forward, backward and an AdamW step on batches of random tokens.
    Train,
    /// Batch-1 greedy decoding with the KV cache.
    Decode,
}

#[derive(Args)]
struct BenchArgs {
    what: BenchWhat,
    /// Model preset (see the presets in src/model/config.rs).
    #[arg(long, default_value = "bench")]
    preset: String,
    /// Timed training steps, or decoded tokens.
    #[arg(long)]
    steps: Option<usize>,
    /// Training batch size, in sequences of the full context.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print one JSON object with the figures on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors [+ tokenizer.json]).
    Hf {
        hf_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// A directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.
    Hf {
        ckpt: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory.
    ckpt: PathBuf,
    /// The prompt as text (needs a checkpoint with a tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 5,17,404.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print only the generated token ids, space-separated, on one line.
    #[arg(long)]
    ids: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn main() {
    // SAFETY: sets a process-wide allocator option; mimalloc allows this at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import(ImportCmd::Hf { hf_dir, out }) => {
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
        Command::Export(ExportCmd::Hf { ckpt, out }) => {
            interop::export_hf(&ckpt, &out)?;
            println!(
                "exported {} -> {} (load with GPT2LMHeadModel.from_pretrained)",
                ckpt.display(),
                out.display()
            );
            Ok(())
        }
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench(a),
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    let (kind, steps) = match a.what {
        BenchWhat::Train => (BenchKind::Train, a.steps.unwrap_or(5)),
        BenchWhat::Decode => (BenchKind::Decode, a.steps.unwrap_or(200)),
    };
    let cfg = BenchConfig {
        kind,
        preset: a.preset,
        steps,
        batch: a.batch,
        prompt_len: 16,
    };
    let r = talaria::bench::run(&cfg)?;
    println!("tokens/s            {:.1}", r.tokens_per_s);
    println!(
        "achieved GFLOP/s    {:.1} ({:.0}% of the {:.1} GFLOP/s of one 1024^3 matmul)",
        r.gflops,
        100.0 * r.gflops / r.peak_matmul_gflops,
        r.peak_matmul_gflops
    );
    println!("peak RSS            {:.0} MiB", r.peak_rss_mib);
    println!("median step         {:.2} ms", 1e3 * r.median_step_s);
    if a.json {
        println!("{}", r.to_json(&cfg));
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let ck = Checkpoint::load(&a.ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let tokenizer = ck.tokenizer_json.as_deref().map(Tokenizer::from_json).transpose()?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => {
            let Some(tok) = &tokenizer else {
                bail!(
                    "{} has no tokenizer.json: give the prompt as --prompt-ids",
                    a.ckpt.display()
                );
            };
            tok.encode(text)?
        }
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give a prompt with --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let stop_tokens = match (a.ignore_eos, ck.config.eos_token_id) {
        (false, Some(eos)) => vec![eos],
        _ => vec![],
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        stop_tokens,
    };
    let mut sampler = Sampler::new(a.sampling.params(), a.sampling.seed)?;
    let stream_text = !a.ids && tokenizer.is_some();
    let mut stream = tokenizer.as_ref().map(TextStream::new);
    let mut out = std::io::stdout().lock();
    if stream_text {
        write!(
            out,
            "{}",
            a.prompt
                .as_deref()
                .map_or_else(|| tokenizer.as_ref().unwrap().decode(&prompt), |p| Ok(p.to_string()))?
        )?;
        out.flush()?;
    }
    let mut stream_err = None;
    let result = engine::generate(&model, &prompt, &opts, &mut sampler, |id| {
        let Some(s) = stream.as_mut().filter(|_| stream_text) else {
            return true;
        };
        let written = s.push(id).and_then(|piece| {
            write!(out, "{piece}")?;
            Ok(out.flush()?)
        });
        match written {
            Ok(()) => true,
            Err(e) => {
                stream_err = Some(e);
                false
            }
        }
    })
    .context("generation failed")?;
    if let Some(e) = stream_err {
        return Err(e.context("writing the generated text"));
    }
    if stream_text {
        writeln!(out)?;
    } else {
        let ids: Vec<String> = result.tokens.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
    }
    if result.finish == engine::FinishReason::Context {
        eprintln!(
            "note: stopped at the model's context length ({} tokens)",
            ck.config.n_positions
        );
    }
    Ok(())
}
