//! Text out of a stream of token ids: pieces that are always whole UTF-8 characters, and stop
//! strings cut out before they are shown.

use std::io::Write;

use anyhow::Result;

use crate::tokenizer::Tokenizer;

/// Turns a stream of token ids into text pieces that are always whole UTF-8 characters: a
/// multi-byte character split across tokens is held back until it is complete. Each push decodes
/// only the last few tokens (the ones after the previous piece, plus the piece before them as
/// context), so a long answer costs no more per token than a short one.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the tokens decoded as context for the next piece.
    prefix: usize,
    /// Start of the tokens whose text has not been emitted yet.
    read: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token and returns the newly completed text, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.is_char_boundary(before.len()) {
            return Ok(String::new());
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now[before.len()..].to_string())
    }
}

/// Cuts streamed text at the first stop string. Text that might be the start of a stop string
/// is held back until the next piece decides, so a stop string split across tokens is never
/// shown.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece; returns the text that is now safe to emit and the stop string that matched.
    pub fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.pending.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = hit {
            let stop = stop.clone();
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, Some(stop));
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - held].to_string();
        self.pending.drain(..self.pending.len() - held);
        (out, None)
    }

    /// The held-back text, once generation has ended without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest proper suffix of `text` that is a prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - k..])
        })
        .unwrap_or(0)
}

/// Where a terminal command streams an answer: each piece is written and flushed as it comes, and
/// the first write error (a closed pipe, a full disk) stops the generation and is kept for the
/// caller, who reports it once decoding has returned.
pub struct WriteSink<'w> {
    out: &'w mut dyn Write,
    error: Option<std::io::Error>,
}

impl<'w> WriteSink<'w> {
    pub fn new(out: &'w mut dyn Write) -> Self {
        Self { out, error: None }
    }

    /// Writes one piece; false (stop generating) once writing has failed.
    pub fn piece(&mut self, text: &str) -> bool {
        if self.error.is_some() {
            return false;
        }
        if text.is_empty() {
            return true;
        }
        match self.out.write_all(text.as_bytes()).and_then(|_| self.out.flush()) {
            Ok(()) => true,
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    /// The write error that stopped the generation, if any.
    pub fn finish(self) -> std::io::Result<()> {
        self.error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails as a closed pipe does.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.len() + buf.len() > self.room {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_sink_stops_at_the_first_write_error_and_keeps_it() {
        let mut pipe = Pipe { got: vec![], room: 5 };
        let mut sink = WriteSink::new(&mut pipe);
        assert!(sink.piece("abc") && sink.piece("") && sink.piece("d"));
        assert!(!sink.piece("efg"), "the pipe is full");
        assert!(!sink.piece("h"), "nothing is written after an error");
        let err = sink.finish().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(pipe.got, b"abcd");
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out += &emit;
            if hit.is_some() {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_pieces_are_cut_and_never_shown() {
        assert_eq!(run(&["END"], &["ab", "cE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&["xy", "b"], &["aab"]), ("aa".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
        assert_eq!(
            run(&[""], &["a"]),
            ("a".into(), false),
            "an empty stop string never fires"
        );
    }

    #[test]
    fn the_matcher_names_the_stop_that_fired_first() {
        let stops = vec!["cd".to_string(), "b".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abcd"), ("a".to_string(), Some("b".to_string())));
    }
}
