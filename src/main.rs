//! The `talaria` command line: argument parsing only; every stage lives in the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use talaria::checkpoint::Checkpoint;
use talaria::data::download::{self, DownloadConfig};
use talaria::data::prepare::{self, PrepareConfig};
use talaria::data::readers::{ReadOptions, ReadStats};
use talaria::engine::{self, GenerateOptions, Sampler, SamplingParams, TextStream};
use talaria::interop;
use talaria::tokenizer::{self, Tokenizer, TrainConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Train, import, run and measure byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Turn corpora into token shards, or fetch datasets from the Hugging Face Hub.
    #[command(subcommand)]
    Data(DataCmd),
}

#[derive(Args)]
struct ReadArgs {
    /// Line that separates documents in .txt files ("" = blank lines, i.e. paragraphs).
    #[arg(long, default_value = tokenizer::EOT)]
    separator: String,
    /// JSON field holding the text in .jsonl / .jsonl.gz files.
    #[arg(long, default_value = "text")]
    field: String,
    /// Column holding the text in .parquet files.
    #[arg(long, default_value = "text")]
    column: String,
    /// Skip bad records (invalid UTF-8, not JSON, missing field, null) and count them, instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

impl ReadArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions {
            separator: self.separator.clone(),
            field: self.field.clone(),
            column: self.column.clone(),
            skip_bad: self.skip_bad,
        }
    }
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE (special tokens at ids 0-5, digits split one by one).
    Train {
        /// Corpus files: .txt, .txt.gz, .jsonl, .jsonl.gz, .parquet.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Vocabulary size, special and byte tokens included.
        #[arg(long)]
        vocab_size: usize,
        /// Pairs seen fewer times are never merged.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Build GPT-2's tokenizer from vocab.json and merges.txt.
    ImportGpt2 {
        #[arg(long)]
        vocab: PathBuf,
        #[arg(long)]
        merges: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode text (--text, or all of standard input).
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: Option<String>,
        /// Print one line of space-separated ids instead of one `id<TAB>vocab entry<TAB>"text"` line per token.
        #[arg(long)]
        ids: bool,
    },
    /// Decode ids (--ids, or standard input; separated by spaces, commas or newlines) to text.
    Decode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        ids: Option<String>,
    },
    /// Measure encoding throughput on the lines of text files.
    Bench {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Runs of each kind; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Tokenize corpus files into train/val token shards plus meta.json.
    Prepare {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Share of documents held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Seed of the train/val split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most tokens per shard file.
        #[arg(long, default_value_t = prepare::DEFAULT_SHARD_TOKENS)]
        shard_tokens: usize,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Download a dataset's data files from the Hugging Face Hub (needs internet).
    Download {
        /// Dataset id, e.g. roneneldan/TinyStories.
        dataset: String,
        /// Only the files of this split.
        #[arg(long)]
        split: Option<String>,
        #[arg(long, default_value = "data/hub")]
        out: PathBuf,
        #[arg(long, default_value = "main")]
        revision: String,
    },
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
        Command::Tokenizer(c) => tokenizer_cmd(c),
        Command::Data(c) => data_cmd(c),
    }
}

fn tokenizer_cmd(c: TokenizerCmd) -> Result<()> {
    match c {
        TokenizerCmd::Train {
            input,
            vocab_size,
            min_frequency,
            out,
            read,
        } => {
            let cfg = TrainConfig {
                vocab_size,
                min_frequency,
                show_progress: std::io::stderr().is_terminal(),
            };
            let (tok, s) = tokenizer::train_from_files(&input, &read.options(), &cfg)?;
            tok.save(&out)?;
            println!(
                "trained on {} documents, {:.2} MB in {:.1}s: vocab {} (asked {vocab_size}), {:.2} bytes/token on the training text{} -> {}",
                s.train.documents,
                s.train.bytes as f64 / 1e6,
                s.train.seconds,
                s.train.vocab_size,
                s.bytes_per_token(),
                skipped_note(&s.read),
                out.display()
            );
            Ok(())
        }
        TokenizerCmd::ImportGpt2 { vocab, merges, out } => {
            let tok = tokenizer::import_gpt2(&vocab, &merges)?;
            tok.save(&out)?;
            println!(
                "imported GPT-2 tokenizer: vocab {}, {} = {} -> {}",
                tok.vocab_size(),
                tokenizer::EOT,
                tok.eot_id()?,
                out.display()
            );
            Ok(())
        }
        TokenizerCmd::Encode { tokenizer, text, ids } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let text = match text {
                Some(t) => t,
                None => read_stdin()?,
            };
            let toks = tok.encode(&text)?;
            let mut out = std::io::stdout().lock();
            if ids {
                let s: Vec<String> = toks.iter().map(u32::to_string).collect();
                writeln!(out, "{}", s.join(" "))?;
            } else {
                for &id in &toks {
                    let token = tok.id_to_token(id).unwrap_or_default();
                    writeln!(out, "{id}\t{token}\t{:?}", tok.decode(&[id])?)?;
                }
            }
            eprintln!(
                "{} tokens, {} bytes, {:.2} bytes/token",
                toks.len(),
                text.len(),
                text.len() as f64 / toks.len().max(1) as f64
            );
            Ok(())
        }
        TokenizerCmd::Decode { tokenizer, ids } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let text = match ids {
                Some(t) => t,
                None => read_stdin()?,
            };
            let ids = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u32>().with_context(|| format!("{s:?} is not a token id")))
                .collect::<Result<Vec<_>>>()?;
            let mut out = std::io::stdout().lock();
            write!(out, "{}", tok.decode(&ids)?)?;
            out.flush()?;
            Ok(())
        }
        TokenizerCmd::Bench {
            tokenizer,
            input,
            repeats,
        } => {
            let tok = Tokenizer::from_file(&tokenizer)?;
            let b = tokenizer::bench_encode_lines(&tok, &input, repeats)?;
            println!(
                "{} lines, {:.2} MB, {} tokens ({:.2} bytes/token): encode_batch {:.2} MB/s ({} threads), encode one by one {:.2} MB/s (1 thread); best of {repeats}",
                b.texts,
                b.bytes as f64 / 1e6,
                b.tokens,
                b.bytes as f64 / b.tokens.max(1) as f64,
                b.batch_mb_per_s,
                rayon::current_num_threads(),
                b.serial_mb_per_s
            );
            Ok(())
        }
    }
}

fn data_cmd(c: DataCmd) -> Result<()> {
    match c {
        DataCmd::Prepare {
            input,
            tokenizer,
            out,
            val_fraction,
            seed,
            shard_tokens,
            read,
        } => {
            let cfg = PrepareConfig {
                val_fraction,
                seed,
                read: read.options(),
                shard_tokens,
                show_progress: std::io::stderr().is_terminal(),
                ..PrepareConfig::new(input, tokenizer, out.clone())
            };
            let s = prepare::prepare(&cfg)?;
            let m = &s.meta;
            let bytes = m.splits.train.bytes + m.splits.val.bytes;
            let tokens = m.splits.train.tokens + m.splits.val.tokens;
            for (name, st) in [("train", &m.splits.train), ("val", &m.splits.val)] {
                println!(
                    "{name:5}: {} documents, {} tokens, {:.2} MB in {} shard(s)",
                    st.documents,
                    st.tokens,
                    st.bytes as f64 / 1e6,
                    st.shards
                );
            }
            println!(
                "prepared {:.2} MB -> {tokens} tokens in {:.1}s ({:.2} MB/s, {:.2} bytes/token){}{} -> {}",
                bytes as f64 / 1e6,
                s.seconds,
                bytes as f64 / 1e6 / s.seconds.max(1e-9),
                bytes as f64 / tokens.max(1) as f64,
                if m.split_single_document {
                    "; the single document was cut into a train head and a val tail"
                } else {
                    ""
                },
                skipped_note(&ReadStats {
                    skipped_bad: m.skipped_bad,
                    skipped_empty: m.skipped_empty,
                    ..Default::default()
                }),
                out.display()
            );
            Ok(())
        }
        DataCmd::Download {
            dataset,
            split,
            out,
            revision,
        } => {
            let s = download::download(&DownloadConfig {
                dataset,
                split,
                out,
                revision,
                endpoint: None,
                cache_dir: None,
            })?;
            for f in &s.files {
                println!("{}", f.display());
            }
            println!("downloaded {} files, {:.2} MB", s.files.len(), s.bytes as f64 / 1e6);
            Ok(())
        }
    }
}

fn skipped_note(r: &ReadStats) -> String {
    let mut parts = Vec::new();
    if r.skipped_bad > 0 {
        parts.push(format!("{} bad records skipped", r.skipped_bad));
    }
    if r.skipped_empty > 0 {
        parts.push(format!("{} empty documents skipped", r.skipped_empty));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input (UTF-8 text)")?;
    Ok(s)
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
