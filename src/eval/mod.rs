//! Evaluation: the true verifier of the default world's tasks.

pub mod verify;
