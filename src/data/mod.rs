//! Data: token shards and their loader.

pub mod shards;
