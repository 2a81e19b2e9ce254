//! Data: corpus readers, `data prepare` (text -> token shards), `data download` (Hub datasets),
//! token shards and their loader.

pub mod download;
pub mod prepare;
pub mod readers;
pub mod shards;
