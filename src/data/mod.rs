//! Data: token shards and their loader; the built-in default world.

pub mod shards;
pub mod synth;
