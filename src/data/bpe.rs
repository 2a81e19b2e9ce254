//! Training a tokenizer on corpus files (`talaria tokenizer train`): the documents are read on a
//! thread of their own ([`super::readers`]) while [`crate::tokenizer::train_bpe`] consumes them,
//! then read once more to measure the compression the tokenizer achieves.

use std::path::PathBuf;

use anyhow::{Result, anyhow, ensure};

use super::readers::{ReadOptions, ReadStats, for_each_document};
use crate::tokenizer::{Tokenizer, TrainConfig, TrainSummary, check_vocab_size, train_bpe};

/// [`train_bpe`] on corpus files, then one more pass to measure the compression it achieves.
#[derive(Debug, Clone)]
pub struct FilesTrainSummary {
    pub train: TrainSummary,
    pub read: ReadStats,
    /// Tokens of the training documents under the trained tokenizer.
    pub tokens: u64,
}

impl FilesTrainSummary {
    /// UTF-8 bytes per token on the training text.
    pub fn bytes_per_token(&self) -> f64 {
        self.train.bytes as f64 / self.tokens.max(1) as f64
    }
}

/// The reader's error when the consumer of its documents has gone.
#[derive(Debug)]
struct ConsumerStopped;

impl std::fmt::Display for ConsumerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the consumer of the documents stopped early")
    }
}

impl std::error::Error for ConsumerStopped {}

/// Reads documents from `paths` on a separate thread, so reading overlaps the consumer's work.
/// A read error is passed to the consumer as the stream's last item, so it can stop at once.
fn stream_documents(
    paths: &[PathBuf],
    read: &ReadOptions,
    progress: &indicatif::ProgressBar,
    consume: impl FnOnce(std::sync::mpsc::IntoIter<Result<String>>) -> Result<()>,
) -> Result<ReadStats> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<String>>(1024);
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<ReadStats> {
            let mut total = ReadStats::default();
            for p in paths {
                progress.set_message(p.display().to_string());
                let stats = for_each_document(p, read, &mut |d| {
                    progress.inc(d.len() as u64);
                    tx.send(Ok(d)).map_err(|_| anyhow::Error::new(ConsumerStopped))
                });
                match stats {
                    Ok(stats) => total.add(&stats),
                    Err(e) if e.is::<ConsumerStopped>() => return Err(e),
                    Err(e) => {
                        tx.send(Err(e)).map_err(|_| anyhow::Error::new(ConsumerStopped))?;
                        return Ok(total);
                    }
                }
            }
            Ok(total)
        });
        let consumed = consume(rx.into_iter());
        let read = reader.join().map_err(|_| anyhow!("the reader thread panicked"))?;
        // The consumer's error (which includes any read error) explains a reader that stopped.
        consumed?;
        read
    })
}

/// Trains a tokenizer on the documents of corpus files, with progress bars when `cfg.show_progress`.
pub fn train_from_files(
    paths: &[PathBuf],
    read: &ReadOptions,
    cfg: &TrainConfig,
) -> Result<(Tokenizer, FilesTrainSummary)> {
    check_vocab_size(cfg.vocab_size)?;
    ensure!(!paths.is_empty(), "no input files");
    let spinner = |what: &str| {
        if !cfg.show_progress {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::no_length().with_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:10} [{elapsed_precise}] {bytes} ({bytes_per_sec}) {wide_msg}",
            )
            .expect("valid template"),
        );
        pb.set_prefix(what.to_string());
        pb
    };
    let mut trained = None;
    let pb = spinner("reading");
    let read_stats = stream_documents(paths, read, &pb, |docs| {
        trained = Some(train_bpe(cfg, docs)?);
        Ok(())
    })?;
    pb.finish_and_clear();
    let (tok, train) = trained.ok_or_else(|| anyhow!("training did not run"))?;
    let pb = spinner("measuring");
    let mut tokens = 0u64;
    stream_documents(paths, read, &pb, |mut docs| {
        loop {
            let batch = docs.by_ref().take(1024).collect::<Result<Vec<String>>>()?;
            if batch.is_empty() {
                return Ok(());
            }
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            tokens += tok.encode_batch(&refs)?.iter().map(|v| v.len() as u64).sum::<u64>();
        }
    })?;
    pb.finish_and_clear();
    Ok((
        tok,
        FilesTrainSummary {
            train,
            read: read_stats,
            tokens,
        },
    ))
}
