//! `data prepare`: corpus files + tokenizer -> a data directory of train/val token shards.
//!
//! The directory holds `train_NNNN.bin` and `val_NNNN.bin` ([`crate::data::shards`] format), a
//! copy of the tokenizer as `tokenizer.json`, and `meta.json` ([`DataMeta`], written last, so a
//! directory with `meta.json` is complete). Every document is followed by the end-of-text id.
//!
//! The split is by document: exactly `round(n * val_fraction)` documents (at least one and at most
//! `n - 1` when `val_fraction > 0`), chosen by a seeded shuffle, go to val. With a single document
//! and `val_fraction > 0`, that document's text is cut at the line break nearest to
//! `(1 - val_fraction)` of its bytes: the head is train, the tail val.
//!
//! The inputs are read twice (count, then tokenize), so memory stays bounded by one batch of
//! documents plus one shard, whatever the corpus size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::readers::{ReadOptions, ReadStats, for_each_document};
use crate::data::shards::{Split, write_shard};
use crate::tokenizer::Tokenizer;

/// Name of the metadata file of a data directory.
pub const META_FILE: &str = "meta.json";
/// Name of the tokenizer copy in a data directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Default cap on the tokens of one shard.
pub const DEFAULT_SHARD_TOKENS: usize = 50_000_000;

/// Settings of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    /// Share of documents held out for validation, in `[0, 1)`.
    pub val_fraction: f64,
    pub seed: u64,
    pub read: ReadOptions,
    /// Most tokens in one shard file.
    pub shard_tokens: usize,
    pub show_progress: bool,
}

impl PrepareConfig {
    /// Defaults for everything but the paths.
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, out: PathBuf) -> Self {
        Self {
            inputs,
            tokenizer,
            out,
            val_fraction: 0.1,
            seed: 0,
            read: ReadOptions::default(),
            shard_tokens: DEFAULT_SHARD_TOKENS,
            show_progress: false,
        }
    }
}

/// Size of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStats {
    pub documents: u64,
    /// Tokens, end-of-text tokens included.
    pub tokens: u64,
    /// UTF-8 bytes of the documents' text (for bits per byte).
    pub bytes: u64,
    pub shards: u64,
}

/// Both splits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splits {
    pub train: SplitStats,
    pub val: SplitStats,
}

/// `meta.json`: what the pretraining stage needs to know about a data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataMeta {
    pub vocab_size: usize,
    pub eot_id: u32,
    /// SHA-256 (hex) of the `tokenizer.json` bytes.
    pub tokenizer_sha256: String,
    pub seed: u64,
    pub val_fraction: f64,
    pub splits: Splits,
    /// The input files, as given.
    pub inputs: Vec<String>,
    /// True when a single document was cut into a train head and a val tail.
    pub split_single_document: bool,
    pub skipped_bad: u64,
    pub skipped_empty: u64,
}

impl DataMeta {
    pub fn split(&self, split: Split) -> &SplitStats {
        match split {
            Split::Train => &self.splits.train,
            Split::Val => &self.splits.val,
        }
    }
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub meta: DataMeta,
    pub shards: Vec<PathBuf>,
    pub seconds: f64,
}

/// Reads `meta.json` of a prepared data directory.
pub fn read_meta(dir: &Path) -> Result<DataMeta> {
    let p = dir.join(META_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (is {} a prepared data directory?)",
            p.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid data metadata", p.display()))
}

/// Number of documents that go to val out of `n`.
pub fn val_count(n: u64, val_fraction: f64) -> u64 {
    if val_fraction <= 0.0 || n < 2 {
        return 0;
    }
    ((n as f64 * val_fraction).round() as u64).clamp(1, n - 1)
}

/// Where to cut a single document so the tail holds about `val_fraction` of its bytes: just after
/// the nearest line break, or at a character boundary when there is no usable line break.
fn single_document_cut(text: &str, val_fraction: f64) -> Option<usize> {
    let target = ((text.len() as f64) * (1.0 - val_fraction)) as usize;
    let breaks = text.match_indices('\n').map(|(i, _)| i + 1).filter(|&i| i < text.len());
    let cut = breaks.min_by_key(|&i| i.abs_diff(target)).unwrap_or_else(|| {
        (target..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len())
    });
    (cut > 0 && cut < text.len()).then_some(cut)
}

/// Accumulates one split's tokens and writes full shards as they fill.
struct SplitWriter {
    split: Split,
    dir: PathBuf,
    vocab_size: usize,
    cap: usize,
    buf: Vec<u32>,
    stats: SplitStats,
    written: Vec<PathBuf>,
}

impl SplitWriter {
    fn new(split: Split, dir: &Path, vocab_size: usize, cap: usize) -> Self {
        Self {
            split,
            dir: dir.to_path_buf(),
            vocab_size,
            cap,
            buf: Vec::new(),
            stats: SplitStats::default(),
            written: Vec::new(),
        }
    }

    fn push(&mut self, text_bytes: usize, ids: &[u32], eot: u32) -> Result<()> {
        self.stats.documents += 1;
        self.stats.bytes += text_bytes as u64;
        self.stats.tokens += ids.len() as u64 + 1;
        self.buf.extend_from_slice(ids);
        self.buf.push(eot);
        while self.buf.len() >= self.cap {
            let rest = self.buf.split_off(self.cap);
            self.flush()?;
            self.buf = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let p = self
            .dir
            .join(format!("{}_{:04}.bin", self.split.prefix(), self.written.len()));
        write_shard(&p, &self.buf, self.vocab_size)?;
        self.buf.clear();
        self.written.push(p);
        Ok(())
    }

    fn finish(mut self) -> Result<(SplitStats, Vec<PathBuf>)> {
        if !self.buf.is_empty() {
            self.flush()?;
        }
        self.stats.shards = self.written.len() as u64;
        Ok((self.stats, self.written))
    }
}

fn bar(show: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

/// Documents tokenized together (in parallel) at most.
const BATCH_DOCS: usize = 4096;
/// Bytes of text tokenized together at most.
const BATCH_BYTES: usize = 8 << 20;

/// Tokenizes the inputs into a data directory; see the module documentation.
pub fn prepare(cfg: &PrepareConfig) -> Result<PrepareSummary> {
    let start = Instant::now();
    ensure!(!cfg.inputs.is_empty(), "no input files");
    ensure!(
        (0.0..1.0).contains(&cfg.val_fraction),
        "--val-fraction must be in [0, 1), got {}",
        cfg.val_fraction
    );
    ensure!(cfg.shard_tokens > 0, "shard size must be positive");
    let tok_bytes =
        std::fs::read(&cfg.tokenizer).with_context(|| format!("reading tokenizer {}", cfg.tokenizer.display()))?;
    let tok_text = String::from_utf8(tok_bytes.clone())
        .with_context(|| format!("{}: tokenizer.json is not UTF-8", cfg.tokenizer.display()))?;
    let tok =
        Tokenizer::from_json(&tok_text).with_context(|| format!("loading tokenizer {}", cfg.tokenizer.display()))?;
    let eot = tok
        .eot_id()
        .with_context(|| format!("{}: cannot separate documents", cfg.tokenizer.display()))?;
    let vocab_size = tok.vocab_size();

    // Pass 1: validate every input and count documents, before anything is written.
    let mut counted = ReadStats::default();
    let mut per_file = Vec::with_capacity(cfg.inputs.len());
    let scan = bar(cfg.show_progress, 0, "scanning");
    for p in &cfg.inputs {
        let s = for_each_document(p, &cfg.read, &mut |d| {
            scan.inc(d.len() as u64);
            Ok(())
        })?;
        counted.add(&s);
        per_file.push(s);
    }
    scan.finish_and_clear();
    let n = counted.documents;
    let single = n == 1 && cfg.val_fraction > 0.0;
    let n_val = val_count(n, cfg.val_fraction);
    let mut is_val = vec![false; n as usize];
    {
        let mut order: Vec<u64> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed));
        for &i in &order[..n_val as usize] {
            is_val[i as usize] = true;
        }
    }

    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    for entry in std::fs::read_dir(&cfg.out).with_context(|| format!("listing {}", cfg.out.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name == META_FILE || ((name.starts_with("train_") || name.starts_with("val_")) && name.ends_with(".bin")) {
            bail!(
                "{} already holds prepared data ({name}); choose another --out or remove it",
                cfg.out.display()
            );
        }
    }

    // Pass 2: tokenize in parallel batches and write shards in corpus order.
    let mut train = SplitWriter::new(Split::Train, &cfg.out, vocab_size, cfg.shard_tokens);
    let mut val = SplitWriter::new(Split::Val, &cfg.out, vocab_size, cfg.shard_tokens);
    let pb = bar(cfg.show_progress, counted.bytes, "tokenizing");
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut index = 0usize;
    let mut flush = |batch: &mut Vec<String>, train: &mut SplitWriter, val: &mut SplitWriter| -> Result<()> {
        let mut texts: Vec<&str> = Vec::with_capacity(batch.len() + 1);
        let mut dest: Vec<Split> = Vec::with_capacity(batch.len() + 1);
        for d in batch.iter() {
            if single {
                let cut = single_document_cut(d, cfg.val_fraction).with_context(|| {
                    "the input is a single document too short to split into train and val; add documents or use --val-fraction 0"
                })?;
                texts.extend([&d[..cut], &d[cut..]]);
                dest.extend([Split::Train, Split::Val]);
            } else {
                texts.push(d);
                dest.push(if is_val[index] { Split::Val } else { Split::Train });
            }
            index += 1;
        }
        let ids = tok.encode_batch(&texts)?;
        for ((t, ids), split) in texts.iter().zip(&ids).zip(&dest) {
            match split {
                Split::Train => train.push(t.len(), ids, eot)?,
                Split::Val => val.push(t.len(), ids, eot)?,
            }
        }
        pb.inc(texts.iter().map(|t| t.len() as u64).sum());
        batch.clear();
        Ok(())
    };
    for (p, want) in cfg.inputs.iter().zip(&per_file) {
        let got = for_each_document(p, &cfg.read, &mut |d| {
            batch_bytes += d.len();
            batch.push(d);
            if batch.len() >= BATCH_DOCS || batch_bytes >= BATCH_BYTES {
                flush(&mut batch, &mut train, &mut val)?;
                batch_bytes = 0;
            }
            Ok(())
        })?;
        ensure!(&got == want, "{} changed while it was being prepared", p.display());
    }
    flush(&mut batch, &mut train, &mut val)?;
    pb.finish_and_clear();
    let (train_stats, mut shards) = train.finish()?;
    let (val_stats, val_shards) = val.finish()?;
    shards.extend(val_shards);

    std::fs::write(cfg.out.join(TOKENIZER_FILE), &tok_bytes)
        .with_context(|| format!("writing {}", cfg.out.join(TOKENIZER_FILE).display()))?;
    let meta = DataMeta {
        vocab_size,
        eot_id: eot,
        tokenizer_sha256: sha256_hex(&tok_bytes),
        seed: cfg.seed,
        val_fraction: cfg.val_fraction,
        splits: Splits {
            train: train_stats,
            val: val_stats,
        },
        inputs: cfg.inputs.iter().map(|p| p.display().to_string()).collect(),
        split_single_document: single,
        skipped_bad: counted.skipped_bad,
        skipped_empty: counted.skipped_empty,
    };
    let meta_path = cfg.out.join(META_FILE);
    let tmp = cfg.out.join(format!("{META_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&meta)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &meta_path).with_context(|| format!("writing {}", meta_path.display()))?;
    Ok(PrepareSummary {
        meta,
        shards,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
