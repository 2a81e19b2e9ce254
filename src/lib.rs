//! Talaria: the complete ChatGPT recipe in one Rust library and binary.
//!
//! Data flows one way: text -> [`tokenizer`] -> [`model`] -> [`checkpoint`] -> [`engine`].
//! [`interop`] converts checkpoints to and from Hugging Face `transformers`.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod eval;
pub mod interop;
pub mod model;
pub mod serve;
pub mod speedrun;
pub mod terminal;
pub mod tokenizer;
pub mod train;
