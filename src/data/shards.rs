//! Token shards and the memory-mapped loader that turns them into training batches.
//!
//! A shard file is a 32-byte little-endian header followed by the token ids:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `TLRSHARD` |
//! | 8..12 | format version (1) |
//! | 12..16 | bytes per token: 2 (u16) or 4 (u32) |
//! | 16..24 | token count |
//! | 24..32 | vocabulary size of the tokenizer that wrote it |
//!
//! A prepared data directory holds `train_NNNN.bin` and `val_NNNN.bin` shards; documents inside a
//! shard are separated by the tokenizer's end-of-text token.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"TLRSHARD";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;

/// The parsed header of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub bytes_per_token: usize,
    pub num_tokens: usize,
    pub vocab_size: usize,
}

/// Which part of a prepared data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Writes `tokens` as one shard (u16 when the vocabulary fits, else u32), atomically.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    ensure!(vocab_size > 0, "vocab_size must be positive");
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        bail!("token id {bad} is outside the vocabulary (size {vocab_size})");
    }
    let bpt = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut buf = Vec::with_capacity(HEADER_BYTES + tokens.len() * bpt);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(bpt as u32).to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(vocab_size as u64).to_le_bytes());
    for &t in tokens {
        if bpt == 2 {
            buf.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            buf.extend_from_slice(&t.to_le_bytes());
        }
    }
    let tmp = path.with_extension("bin.tmp");
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&buf)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Parses and checks a shard header against the file's actual size.
pub fn parse_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<ShardHeader> {
    ensure!(
        bytes.len() >= HEADER_BYTES,
        "{}: too short to be a token shard ({} bytes)",
        path.display(),
        bytes.len()
    );
    ensure!(
        &bytes[..8] == MAGIC,
        "{}: not a Talaria token shard (bad magic)",
        path.display()
    );
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    ensure!(
        version == VERSION,
        "{}: shard format version {version}, expected {VERSION}",
        path.display()
    );
    let bpt = u32_at(12) as usize;
    ensure!(
        bpt == 2 || bpt == 4,
        "{}: invalid bytes per token {bpt} (2 or 4)",
        path.display()
    );
    let n = u64_at(16);
    let vocab = u64_at(24) as usize;
    let want = HEADER_BYTES as u64 + n * bpt as u64;
    ensure!(
        file_len == want,
        "{}: header says {n} tokens ({want} bytes) but the file has {file_len} bytes (truncated or corrupt)",
        path.display()
    );
    Ok(ShardHeader {
        bytes_per_token: bpt,
        num_tokens: n as usize,
        vocab_size: vocab,
    })
}

/// A memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    pub header: ShardHeader,
    map: memmap2::Mmap,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let f = fs::File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
        let len = f.metadata()?.len();
        // SAFETY: shards are written once (atomically) and never modified in place.
        let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        let header = parse_header(&map, len, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    pub fn len(&self) -> usize {
        self.header.num_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.header.num_tokens == 0
    }

    /// Token at index `i`.
    pub fn get(&self, i: usize) -> u32 {
        let o = HEADER_BYTES + i * self.header.bytes_per_token;
        if self.header.bytes_per_token == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().expect("4 bytes"))
        }
    }

    /// Tokens `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }
}

/// The shard files of one split of a data directory, in order.
pub fn shard_paths(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    ensure!(
        dir.is_dir(),
        "data directory {} does not exist (run `talaria data prepare`)",
        dir.display()
    );
    let prefix = format!("{}_", split.prefix());
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".bin"))
        })
        .collect();
    paths.sort();
    ensure!(
        !paths.is_empty(),
        "no {}_*.bin shards in {}",
        split.prefix(),
        dir.display()
    );
    Ok(paths)
}

/// Where a loader is in its stream of batches; saved in checkpoints for exact resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub index: u64,
}

/// Yields `[B, T]` input/target batches of windows drawn without replacement from all shards
/// of a split, in an order fixed by the seed and the epoch. Its position can be saved and
/// restored, so a resumed run sees exactly the batches an uninterrupted run would.
pub struct TokenLoader {
    shards: Vec<Shard>,
    seq_len: usize,
    seed: u64,
    /// (shard, start) of every window of `seq_len + 1` tokens.
    windows: Vec<(u32, u64)>,
    order: Vec<u32>,
    pos: LoaderPosition,
    vocab_size: usize,
}

impl TokenLoader {
    /// Opens the shards of `split` in `dir` for windows of `seq_len` tokens.
    pub fn open(dir: &Path, split: Split, seq_len: usize, seed: u64) -> Result<Self> {
        ensure!(seq_len > 0, "sequence length must be positive");
        let shards = shard_paths(dir, split)?
            .iter()
            .map(|p| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        let vocab_size = shards[0].header.vocab_size;
        for s in &shards {
            ensure!(
                s.header.vocab_size == vocab_size,
                "{} was written for vocabulary size {}, but {} for {vocab_size}",
                s.path.display(),
                s.header.vocab_size,
                shards[0].path.display()
            );
        }
        let mut windows = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            let n = s.len();
            if n > seq_len {
                for w in 0..(n - 1) / seq_len {
                    windows.push((i as u32, (w * seq_len) as u64));
                }
            }
        }
        let total: usize = shards.iter().map(Shard::len).sum();
        ensure!(
            !windows.is_empty(),
            "the {} split of {} has {total} tokens: too few for one window of {} tokens",
            split.prefix(),
            dir.display(),
            seq_len + 1
        );
        let mut loader = Self {
            shards,
            seq_len,
            seed,
            windows,
            order: vec![],
            pos: LoaderPosition { epoch: 0, index: 0 },
            vocab_size,
        };
        loader.shuffle();
        Ok(loader)
    }

    fn shuffle(&mut self) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.windows.len() as u32).collect();
        self.order.shuffle(&mut rng);
    }

    /// Tokens per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn num_tokens(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    /// Number of windows in one epoch.
    pub fn num_windows(&self) -> usize {
        self.windows.len()
    }

    pub fn position(&self) -> LoaderPosition {
        self.pos
    }

    /// Jumps to a saved position.
    pub fn restore(&mut self, pos: LoaderPosition) -> Result<()> {
        ensure!(
            pos.index <= self.windows.len() as u64,
            "saved data position {} is beyond this split's {} windows (different data?)",
            pos.index,
            self.windows.len()
        );
        self.pos = pos;
        self.shuffle();
        Ok(())
    }

    /// Tokens of window `w` (in shard order, not shuffled): `seq_len + 1` ids.
    pub fn window(&self, w: usize) -> Vec<u32> {
        let (s, start) = self.windows[w];
        self.shards[s as usize].slice(start as usize, self.seq_len + 1)
    }

    /// The next `batch` windows as `(inputs, targets)`, each `[batch, seq_len]` u32.
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(batch * self.seq_len);
        let mut y = Vec::with_capacity(batch * self.seq_len);
        for _ in 0..batch {
            if self.pos.index as usize >= self.order.len() {
                self.pos = LoaderPosition {
                    epoch: self.pos.epoch + 1,
                    index: 0,
                };
                self.shuffle();
            }
            let w = self.window(self.order[self.pos.index as usize] as usize);
            self.pos.index += 1;
            x.extend_from_slice(&w[..self.seq_len]);
            y.extend_from_slice(&w[1..]);
        }
        Ok((
            Tensor::from_vec(x, (batch, self.seq_len), device)?,
            Tensor::from_vec(y, (batch, self.seq_len), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train_0000.bin");
        let toks: Vec<u32> = (0..1000).map(|i| i % 700).collect();
        write_shard(&p, &toks, 700).unwrap();
        let s = Shard::open(&p).unwrap();
        assert_eq!(s.header.bytes_per_token, 2);
        assert_eq!(s.slice(0, 1000), toks);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        fs::write(&p, b"not a shard at all, definitely not").unwrap();
        assert!(Shard::open(&p).err().unwrap().to_string().contains("bad magic"));
        let big = dir.path().join("val_0000.bin");
        write_shard(&big, &[70_000, 1], 100_000).unwrap();
        assert_eq!(Shard::open(&big).unwrap().slice(0, 2), vec![70_000, 1]);
        assert!(
            write_shard(&big, &[5], 5)
                .unwrap_err()
                .to_string()
                .contains("outside the vocabulary")
        );
    }

    #[test]
    fn loader_is_deterministic_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("train_0000.bin"), &(0..500).collect::<Vec<_>>(), 1000).unwrap();
        write_shard(
            &dir.path().join("train_0001.bin"),
            &(500..900).collect::<Vec<_>>(),
            1000,
        )
        .unwrap();
        let mut a = TokenLoader::open(dir.path(), Split::Train, 16, 3).unwrap();
        let mut b = TokenLoader::open(dir.path(), Split::Train, 16, 3).unwrap();
        let batches: Vec<Vec<u32>> = (0..20)
            .map(|_| {
                a.next_batch(4, &Device::Cpu)
                    .unwrap()
                    .0
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        for (i, want) in batches.iter().enumerate() {
            if i == 7 {
                let pos = b.position();
                b = TokenLoader::open(dir.path(), Split::Train, 16, 3).unwrap();
                b.restore(pos).unwrap();
            }
            let (x, y) = b.next_batch(4, &Device::Cpu).unwrap();
            let x: Vec<u32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<u32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(&x, want);
            // Targets are the inputs shifted by one (tokens here are consecutive integers).
            assert!(x.iter().zip(&y).all(|(a, b)| b == &(a + 1)));
        }
        // 20 batches of 4 cross the 55-window epoch; a different seed gives another order.
        assert!(a.position().epoch >= 1);
        let mut c = TokenLoader::open(dir.path(), Split::Train, 16, 4).unwrap();
        let other: Vec<u32> = c
            .next_batch(4, &Device::Cpu)
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(other, batches[0]);
    }
}
