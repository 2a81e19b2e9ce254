//! Talaria: the complete ChatGPT recipe in one Rust library and binary. `docs/architecture.md`
//! walks through the pipeline and says which module owns each format.
//!
//! Each module imports only from those listed before it (`tests/layers.rs` checks this), so data
//! flows one way:
//!
//! 1. [`tokenizer`] (byte-level BPE, the special tokens), then [`chat`] (the one chat template);
//! 2. [`model`] (the GPT, its kernels and KV slots), [`checkpoint`] (the one checkpoint format),
//!    [`metrics`] (`metrics.jsonl` and its plots);
//! 3. [`data`]: corpus readers, tokenizer training on files, token shards, demonstration,
//!    preference and prompt files, and the default world with its verifier;
//! 4. [`engine`]: batched generation for every caller;
//! 5. [`train`]: the training loop and the stages (pretraining, SFT, labelling, reward model, PPO,
//!    DPO);
//! 6. [`eval`] (task accuracy, win-rates, benchmarks, the report), [`interop`] (import from Hugging
//!    Face; export to `transformers` and GGUF, with the run's report in the model card), [`serve`]
//!    (the HTTP API and its scheduler), [`terminal`] (`talaria chat`);
//! 7. [`speedrun`] (the whole chain) and [`bench`] (throughput and latency benchmarks).

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod eval;
pub mod interop;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod speedrun;
pub mod terminal;
pub mod tokenizer;
pub mod train;
