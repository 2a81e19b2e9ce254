//! Tokenizers: a thin owner of a Hugging Face `tokenizers` byte-level BPE, loaded from the
//! `tokenizer.json` a checkpoint carries.

use anyhow::{Result, anyhow};

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| anyhow!("invalid tokenizer.json: {e}"))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, without added special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("encoding failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens included, so decoding is lossless).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
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

/// End of text: separates documents and ends generation for base models.
pub const EOT: &str = "<|endoftext|>";
/// Start of a conversation.
pub const BOS: &str = "<|bos|>";
/// Opens a system message.
pub const SYSTEM: &str = "<|system|>";
/// Opens a user message.
pub const USER: &str = "<|user|>";
/// Opens an assistant message.
pub const ASSISTANT: &str = "<|assistant|>";
/// Closes any message.
pub const END: &str = "<|end|>";

impl Tokenizer {
    /// The id of a special token, if the vocabulary has it.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
