//! Data: token shards and their loader, demonstration, preference and prompt readers, and the
//! built-in default world.

pub mod conversations;
pub mod preferences;
pub mod prompts;
pub mod shards;
pub mod synth;
