//! Data: corpus readers, tokenizer training on corpus files, `data prepare` (text -> token shards), `data download` (Hub datasets),
//! token shards and their loader, demonstration, preference and prompt readers, and the built-in
//! default world.

pub mod bpe;
pub mod conversations;
pub mod download;
pub mod preferences;
pub mod prepare;
pub mod prompts;
pub mod readers;
pub mod shards;
pub mod synth;
