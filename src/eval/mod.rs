//! Evaluation: the true verifier of the default world's tasks, task accuracy and win-rates,
//! real benchmarks in their published formats, and the report card.

pub mod behaviour;
pub mod benchmarks;
pub mod checkpoint;
pub mod report;
pub mod run;
pub mod tasks;
