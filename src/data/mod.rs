//! Data: token shards and their loader, demonstration readers.

pub mod conversations;
pub mod shards;
