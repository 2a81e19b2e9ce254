//! The GPT model: configuration and presets, the decoder itself, its KV slots and numeric ops
//! (composed, fused for training, and the inference kernels of the engine's batches).

pub mod config;
pub mod device;
pub mod fused;
pub mod gpt;
pub mod infer;
pub mod kv_cache;
pub mod ops;

pub use config::{Activation, GptConfig, PRESETS};
pub use device::parse_device;
pub use gpt::{Gpt, init_weights, last_logits, parameter_shapes};
pub use infer::WeightDtype;
pub use kv_cache::{KvDtype, KvSlots, Segment};
