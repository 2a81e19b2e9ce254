//! Training: parameters, the optimizer and learning-rate schedule, shared by every stage.

pub mod optim;
pub mod params;

pub use optim::{AdamW, AdamWConfig, LrSchedule, global_norm};
pub use params::ParamSet;
