//! `talaria tokenizer ...` and `talaria data ...`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use talaria::data::download::{self, DownloadConfig};
use talaria::data::prepare::{self, PrepareConfig};
use talaria::data::readers::{ReadOptions, ReadStats};
use talaria::data::synth::{self, SynthConfig};
use talaria::tokenizer::{self, Tokenizer, TrainConfig as TokenizerTrainConfig};
use talaria::train::comparisons::{self, LabelConfig};

use super::progress;

#[derive(Args)]
pub(crate) struct ReadArgs {
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
pub(crate) enum TokenizerCmd {
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
pub(crate) enum DataCmd {
    /// Write the built-in default world: pretraining text, demonstrations, preferences, RL and eval prompts.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size relative to the default (1.0: ~3 MB of text, ~7k demonstrations, ~5k preference pairs).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        scale: f64,
    },
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
    /// Rank a model's own answers with the default world's simulated labeller: comparison data for
    /// `talaria reward` (prompts need "answer" and "skill", like the default world's label_prompts.jsonl).
    Label {
        /// The model whose answers are ranked (usually the SFT checkpoint).
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        prompts: PathBuf,
        /// Output JSONL of rankings, best answer first.
        #[arg(long)]
        out: PathBuf,
        /// Answers per prompt: the greedy answer, then samples.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Temperature of the sampled answers.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The precision the policy's answers are decoded with: f32, f16, bf16 or q8.
        #[arg(long, default_value = "f32")]
        dtype: talaria::model::WeightDtype,
        #[command(flatten)]
        device: super::DeviceArg,
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

impl TokenizerCmd {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            TokenizerCmd::Train {
                input,
                vocab_size,
                min_frequency,
                out,
                read,
            } => {
                let cfg = TokenizerTrainConfig {
                    vocab_size,
                    min_frequency,
                    show_progress: progress(),
                };
                let (tok, s) = talaria::data::bpe::train_from_files(&input, &read.options(), &cfg)?;
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
}

impl DataCmd {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            DataCmd::Synth { out, seed, scale } => {
                let start = std::time::Instant::now();
                let s = synth::generate(&SynthConfig {
                    out: out.clone(),
                    seed,
                    scale,
                })?;
                for (name, f) in &s.files {
                    println!("{name:>22}  {:>7} records  {:>10} bytes", f.records, f.bytes);
                }
                println!(
                    "default world (seed {seed}, scale {scale}, {} skills) -> {} in {:.2}s",
                    s.skills.len(),
                    out.display(),
                    start.elapsed().as_secs_f64()
                );
                Ok(())
            }
            DataCmd::Label {
                policy,
                prompts,
                out,
                samples,
                temperature,
                max_new_tokens,
                seed,
                dtype,
                device,
            } => {
                let start = std::time::Instant::now();
                let s = comparisons::label(&LabelConfig {
                    policy,
                    prompts,
                    out: out.clone(),
                    samples,
                    temperature,
                    max_new_tokens,
                    seed,
                    progress: progress(),
                    dtype,
                    device: device.device()?,
                })?;
                println!(
                    "{} rankings ({} pairs) from {} prompts, {} without a difference; {:.1}% of the greedy answers and {:.1}% of the samples were correct; -> {} in {:.1}s",
                    s.rankings,
                    s.pairs,
                    s.prompts,
                    s.no_signal,
                    100.0 * s.greedy_accuracy,
                    100.0 * s.sample_accuracy,
                    out.display(),
                    start.elapsed().as_secs_f64()
                );
                Ok(())
            }
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
                    show_progress: progress(),
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
