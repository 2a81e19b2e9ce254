//! Training: parameters, the optimizer and learning-rate schedule, the shared loop, and the stages
//! that run on it.

pub mod answers;
pub mod collective;
pub mod comparisons;
pub mod dpo;
pub mod optim;
pub mod order;
pub mod params;
pub mod ppo;
pub mod pretrain;
pub mod reward;
pub mod rl;
pub mod sft;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, LrSchedule, accumulate, clip_scale, global_norm};
pub use params::ParamSet;
