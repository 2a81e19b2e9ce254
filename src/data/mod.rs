//! Data: token shards and their loader, demonstration and preference readers.

pub mod conversations;
pub mod preferences;
pub mod prompts;
pub mod shards;
