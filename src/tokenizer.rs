//! Tokenizers: byte-level BPE on top of Hugging Face `tokenizers`: training with Talaria's special
//! tokens reserved and digits split one by one, GPT-2 import, and safe encoding of user text.
//!
//! A trained vocabulary is laid out as: ids 0..=5 the [`SPECIAL_TOKENS`], then the 256 byte tokens,
//! then the merges in the order they were learned. The files are ordinary `tokenizer.json`, so
//! Python `tokenizers`/`transformers` load them too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Trainer,
};

/// End of text: separates documents in pretraining data.
pub const EOT: &str = "<|endoftext|>";
/// Beginning of a conversation.
pub const BOS: &str = "<|bos|>";
/// Starts the system message of a conversation.
pub const SYSTEM: &str = "<|system|>";
/// Starts a user turn.
pub const USER: &str = "<|user|>";
/// Starts an assistant turn.
pub const ASSISTANT: &str = "<|assistant|>";
/// Ends a turn.
pub const END: &str = "<|end|>";
/// All special tokens, in the order of their ids in a trained tokenizer (0..=5).
pub const SPECIAL_TOKENS: [&str; 6] = [EOT, BOS, SYSTEM, USER, ASSISTANT, END];

/// Size of the pieces a long text is cut into by [`Tokenizer::encode`].
pub const PARALLEL_PIECE_BYTES: usize = 1 << 18;

/// Whether cutting a text at [`safe_cuts`] and encoding the pieces separately gives exactly the
/// ids of the whole text: true for GPT-2's byte-level pre-tokenizer (regex split, no prefix
/// space), alone or after a digit split, with no normalizer and no non-special added tokens. Its
/// pattern never lets a pre-token cross a line break that has a visible character on each side.
fn is_cuttable(inner: &tokenizers::Tokenizer) -> bool {
    let byte_level =
        |p: &PreTokenizerWrapper| matches!(p, PreTokenizerWrapper::ByteLevel(b) if b.use_regex && !b.add_prefix_space);
    let pre_ok = match inner.get_pre_tokenizer() {
        Some(p @ PreTokenizerWrapper::ByteLevel(_)) => byte_level(p),
        Some(PreTokenizerWrapper::Sequence(seq)) => match seq.as_ref() {
            [PreTokenizerWrapper::Digits(_), last] => byte_level(last),
            _ => false,
        },
        _ => false,
    };
    pre_ok && inner.get_normalizer().is_none() && inner.get_added_tokens_decoder().values().all(|t| t.special)
}

/// Keeps the last `max` ids of a sequence that must fit a context of `max` tokens (a prompt's
/// nearest text, an answer's end), dropping the oldest.
pub fn keep_last(ids: &mut Vec<u32>, max: usize) {
    if ids.len() > max {
        ids.drain(..ids.len() - max);
    }
}

/// Byte positions `0 = c0 < c1 < ... < cn = text.len()` cutting `text` into pieces of about
/// `piece` bytes, each cut just after a `\n` that has a visible ASCII character on both sides.
pub fn safe_cuts(text: &str, piece: usize) -> Vec<usize> {
    let b = text.as_bytes();
    let mut cuts = vec![0];
    let mut from = piece.max(1);
    while from < b.len() {
        let found = (from..b.len().saturating_sub(1))
            .find(|&i| b[i] == b'\n' && b[i - 1].is_ascii_graphic() && b[i + 1].is_ascii_graphic());
        match found {
            Some(i) => {
                cuts.push(i + 1);
                from = i + 1 + piece.max(1);
            }
            None => break,
        }
    }
    cuts.push(b.len());
    cuts
}

/// Fewest texts one thread takes at a time in [`Tokenizer::encode_batch`].
pub const BATCH_MIN_RUN: usize = 64;

/// Number of byte tokens every byte-level vocabulary starts from.
pub const BYTE_TOKENS: usize = 256;

/// A loaded tokenizer.
///
/// [`Tokenizer::encode`] treats its input as plain text: a special-token string typed by a user
/// (say `<|end|>`) is encoded as ordinary bytes, never as the special id. Special ids are only ever
/// inserted by code, through [`Tokenizer::special_id`].
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Whether long texts may be cut at line breaks and encoded in parallel ([`is_cuttable`]).
    cuttable: bool,
    /// Ids of the added tokens, whose text is their content ([`Tokenizer::token_bytes`]).
    added: std::collections::HashSet<u32>,
}

impl Tokenizer {
    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        // `tokenizers` 0.22 unwraps inside some sections' deserializers (its decoders/mod.rs), so a
        // corrupted file can panic there (found by tests/fuzz.rs): that panic becomes an error.
        let parsed = std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow!("invalid tokenizer.json: {why}")
        })?;
        let inner = parsed.map_err(|e| anyhow!("invalid tokenizer.json: {e}"))?;
        Ok(Self::wrap(inner))
    }

    /// Reads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
        Self::from_json(&json).with_context(|| format!("loading tokenizer {}", path.display()))
    }

    fn wrap(mut inner: tokenizers::Tokenizer) -> Self {
        // Added tokens marked special are not matched inside the text given to `encode`: user text
        // that spells a special token must not become that token. (The flag is not serialized.)
        inner.set_encode_special_tokens(true);
        let cuttable = is_cuttable(&inner);
        let added = inner.get_added_tokens_decoder().into_keys().collect();
        Self { inner, cuttable, added }
    }

    /// The `tokenizer.json` text of this tokenizer.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow!("serializing the tokenizer: {e}"))
    }

    /// Writes `tokenizer.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()?).with_context(|| format!("writing {}", path.display()))
    }

    /// Token ids of plain `text`; special-token strings in it are encoded as ordinary text. Texts
    /// longer than [`PARALLEL_PIECE_BYTES`] are encoded in pieces on all cores where the
    /// tokenizer allows it (byte-level BPE: pieces end at safe line breaks, see [`safe_cuts`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.cuttable && text.len() > 2 * PARALLEL_PIECE_BYTES {
            let cuts = safe_cuts(text, PARALLEL_PIECE_BYTES);
            if cuts.len() > 2 {
                use rayon::prelude::*;
                let pieces = cuts
                    .par_windows(2)
                    .map(|w| self.encode_whole(&text[w[0]..w[1]]))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(pieces.concat());
            }
        }
        self.encode_whole(text)
    }

    /// Token ids of `text` in one call of the underlying tokenizer.
    fn encode_whole(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] of many texts, in parallel on all cores. Texts are handed to threads
    /// in runs of at least [`BATCH_MIN_RUN`], so that short texts (lines) do not drown in
    /// scheduling overhead.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        texts
            .par_iter()
            .with_min_len(BATCH_MIN_RUN)
            .map(|t| self.encode(t))
            .collect()
    }

    /// The text of `ids` (special tokens included, so decoding is lossless). Ids the tokenizer does
    /// not know (a model's padded vocabulary) decode to nothing, as in `tokenizers`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a special token such as [`EOT`], if this tokenizer has it.
    pub fn special_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// The id of [`EOT`]; an error for a tokenizer without one.
    pub fn eot_id(&self) -> Result<u32> {
        self.special_id(EOT)
            .ok_or_else(|| anyhow!("the tokenizer has no end-of-text token {EOT}"))
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes token `id` stands for: a special token's text, else its byte-level vocabulary
    /// entry mapped back to bytes (a token may hold part of a UTF-8 character, so this is not
    /// always text; `decode` of the one token would show a replacement character).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let entry = self.inner.id_to_token(id)?;
        if self.added.contains(&id) {
            return Some(entry.into_bytes());
        }
        let byte_of = byte_level_bytes();
        let mut bytes = Vec::with_capacity(entry.len());
        for c in entry.chars() {
            match byte_of.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend_from_slice(c.to_string().as_bytes()),
            }
        }
        Some(bytes)
    }
}

/// GPT-2's byte-level alphabet read backwards: the byte each character of a vocabulary entry
/// stands for (`bytes_to_unicode` in OpenAI's encoder.py, inverted). Written here because the
/// `tokenizers` crate keeps its copy private.
fn byte_level_bytes() -> &'static HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let mut shifted = 0;
        (0..256u32)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    shifted += 1;
                    255 + shifted
                };
                (char::from_u32(c).expect("below the surrogates"), b as u8)
            })
            .collect()
    })
}

/// The pre-tokenizer of trained tokenizers: each digit on its own, then GPT-2's byte-level split.
fn talaria_pre_tokenizer() -> PreTokenizerWrapper {
    PreTokenizerWrapper::Sequence(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ]))
}

/// Settings of BPE training.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Final vocabulary size, special and byte tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
    /// Progress bars for the merge phase.
    pub show_progress: bool,
}

/// What training saw and produced.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub documents: u64,
    pub bytes: u64,
    pub vocab_size: usize,
    pub seconds: f64,
}

/// Fails when `vocab_size` cannot hold the special and byte tokens.
pub fn check_vocab_size(vocab_size: usize) -> Result<()> {
    let min = SPECIAL_TOKENS.len() + BYTE_TOKENS;
    ensure!(
        vocab_size >= min,
        "vocab size {vocab_size} is too small: a byte-level BPE needs at least {min} ids ({} special tokens + {BYTE_TOKENS} byte tokens)",
        SPECIAL_TOKENS.len()
    );
    Ok(())
}

/// Trains a byte-level BPE on a stream of documents; only word counts are kept in memory, and
/// pre-tokenization runs in parallel on all cores. An `Err` in the stream (a reader's) stops
/// training before the merge phase and is returned.
pub fn train_bpe<I>(cfg: &TrainConfig, docs: I) -> Result<(Tokenizer, TrainSummary)>
where
    I: Iterator<Item = Result<String>> + Send,
{
    check_vocab_size(cfg.vocab_size)?;
    let start = Instant::now();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .show_progress(cfg.show_progress)
        .special_tokens(SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pre = talaria_pre_tokenizer();
    let (mut documents, mut bytes) = (0u64, 0u64);
    let mut failed = None;
    let counted = docs.map_while(|d| d.map_err(|e| failed = Some(e)).ok()).inspect(|d| {
        documents += 1;
        bytes += d.len() as u64;
    });
    trainer
        .feed(counted, |d| pre_tokenize(&pre, d).map_err(Into::into))
        .map_err(|e| anyhow!("counting words: {e}"))?;
    if let Some(e) = failed {
        return Err(e);
    }
    ensure!(bytes > 0, "no training text: every input was empty");
    let mut model = BPE::default();
    let special = trainer
        .train(&mut model)
        .map_err(|e| anyhow!("BPE training failed: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(talaria_pre_tokenizer()));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner.add_special_tokens(&special);
    let tok = Tokenizer::wrap(inner);
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        ensure!(
            tok.special_id(s) == Some(i as u32),
            "internal error: special token {s} did not get id {i}"
        );
    }
    let summary = TrainSummary {
        documents,
        bytes,
        vocab_size: tok.vocab_size(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((tok, summary))
}

fn pre_tokenize(pre: &PreTokenizerWrapper, text: &str) -> Result<Vec<String>> {
    let mut p = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut p)
        .map_err(|e| anyhow!("pre-tokenization failed: {e}"))?;
    Ok(p.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_owned())
        .collect())
}

/// Builds GPT-2's tokenizer from OpenAI/Hugging Face `vocab.json` and `merges.txt` (with or
/// without the `#version` first line), with `<|endoftext|>` as its special token.
pub fn import_gpt2(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let vtext = std::fs::read_to_string(vocab_path).with_context(|| format!("reading {}", vocab_path.display()))?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&vtext).with_context(|| {
        format!(
            "{}: not a GPT-2 vocab.json (a JSON object of token -> id)",
            vocab_path.display()
        )
    })?;
    ensure!(
        vocab.contains_key(EOT),
        "{} has no {EOT} entry (GPT-2's end-of-text token)",
        vocab_path.display()
    );
    let mtext = std::fs::read_to_string(merges_path).with_context(|| format!("reading {}", merges_path.display()))?;
    let mut merges = Vec::new();
    for (i, line) in mtext.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        let where_ = || format!("{}:{}", merges_path.display(), i + 1);
        ensure!(
            parts.len() == 2,
            "{}: a merge is two tokens separated by one space, got {line:?}",
            where_()
        );
        let merged = format!("{}{}", parts[0], parts[1]);
        for t in [parts[0], parts[1], merged.as_str()] {
            ensure!(
                vocab.contains_key(t),
                "{}: token {t:?} is not in {}",
                where_(),
                vocab_path.display()
            );
        }
        merges.push((parts[0].to_string(), parts[1].to_string()));
    }
    ensure!(!merges.is_empty(), "{}: no merges", merges_path.display());
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<ahash::AHashMap<_, _>>(), merges)
        .build()
        .map_err(|e| anyhow!("building the BPE model: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner.add_special_tokens(&[AddedToken::from(EOT, true)]);
    Ok(Tokenizer::wrap(inner))
}

/// Encoding speed of one run over a set of texts.
#[derive(Debug, Clone)]
pub struct EncodeBench {
    pub texts: usize,
    pub bytes: u64,
    pub tokens: u64,
    /// Best of the repeats, [`Tokenizer::encode_batch`] on all cores.
    pub batch_mb_per_s: f64,
    /// Best of the repeats, [`Tokenizer::encode`] one text after another on one thread.
    pub serial_mb_per_s: f64,
}

/// Times encoding `texts` `repeats` times each way and keeps the best run.
pub fn bench_encode(tok: &Tokenizer, texts: &[&str], repeats: usize) -> Result<EncodeBench> {
    ensure!(repeats > 0, "repeats must be positive");
    let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    ensure!(bytes > 0, "nothing to encode");
    let mb = bytes as f64 / 1e6;
    let (mut batch, mut serial, mut tokens) = (0f64, 0f64, 0u64);
    for _ in 0..repeats {
        let t = Instant::now();
        let out = tok.encode_batch(texts)?;
        batch = batch.max(mb / t.elapsed().as_secs_f64());
        tokens = out.iter().map(|v| v.len() as u64).sum();
        let t = Instant::now();
        let mut n = 0u64;
        for s in texts {
            n += tok.encode(s)?.len() as u64;
        }
        serial = serial.max(mb / t.elapsed().as_secs_f64());
        ensure!(
            n == tokens,
            "serial and batch encodings differ ({n} vs {tokens} tokens)"
        );
    }
    Ok(EncodeBench {
        texts: texts.len(),
        bytes,
        tokens,
        batch_mb_per_s: batch,
        serial_mb_per_s: serial,
    })
}

/// [`bench_encode`] on the lines of UTF-8 text files, each line with its line break.
pub fn bench_encode_lines(tok: &Tokenizer, paths: &[PathBuf], repeats: usize) -> Result<EncodeBench> {
    let mut text = String::new();
    for p in paths {
        text.push_str(&std::fs::read_to_string(p).with_context(|| format!("reading {} (UTF-8 text)", p.display()))?);
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    bench_encode(tok, &lines, repeats)
}

impl Tokenizer {
    /// The number of text bytes each token id stands for (0 for special tokens), so losses can
    /// be reported in bits per byte, independent of the tokenizer. Byte-level BPE maps every
    /// byte to one character of its vocabulary strings, so a token's length in characters is
    /// its length in bytes.
    pub fn token_byte_lengths(&self) -> Vec<u32> {
        let mut lengths = vec![0u32; self.inner.get_vocab_size(true)];
        let specials: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        for (tok, id) in self.inner.get_vocab(true) {
            if let Some(slot) = lengths.get_mut(id as usize)
                && !specials.contains(&id)
            {
                *slot = tok.chars().count() as u32;
            }
        }
        lengths
    }
}
