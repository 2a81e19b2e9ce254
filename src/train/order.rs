//! The order in which a stage visits its examples: a fresh seeded shuffle each epoch, with a
//! position (epoch, index) that checkpoints save so a resumed run continues exactly.

use anyhow::{Context, Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct EpochOrder {
    epoch: u64,
    index: usize,
    order: Vec<u32>,
    seed: u64,
}

impl EpochOrder {
    /// The order of `n` examples at `(epoch, index)`.
    pub fn new(seed: u64, n: usize, epoch: u64, index: usize) -> Self {
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9)),
        ));
        Self {
            epoch,
            index,
            order,
            seed,
        }
    }

    /// The next example, moving to a freshly shuffled epoch at the end of one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> usize {
        if self.index >= self.order.len() {
            *self = Self::new(self.seed, self.order.len(), self.epoch + 1, 0);
        }
        self.index += 1;
        self.order[self.index - 1] as usize
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position, for checkpoints.
    pub fn state(&self) -> Value {
        json!({"epoch": self.epoch, "index": self.index})
    }

    /// Returns to a saved position.
    pub fn restore(&mut self, state: &Value) -> Result<()> {
        let epoch = state["epoch"].as_u64().context("saved state lacks the data epoch")?;
        let index = state["index"].as_u64().context("saved state lacks the data index")? as usize;
        ensure!(
            index <= self.order.len(),
            "saved data position {index} is beyond the data (different data?)"
        );
        *self = Self::new(self.seed, self.order.len(), epoch, index);
        Ok(())
    }
}

/// Moves a seeded random `fraction` of `items` (at least none, at most all but one) out as a
/// held-out set, shuffling the rest: how every stage splits its data when no validation file is given.
pub fn hold_out<T>(items: &mut Vec<T>, fraction: f64, seed: u64) -> Result<Vec<T>> {
    ensure!(
        (0.0..1.0).contains(&fraction),
        "--val-fraction must be in [0, 1), got {fraction}"
    );
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n = ((items.len() as f64 * fraction).round() as usize).min(items.len().saturating_sub(1));
    Ok(items.split_off(items.len() - n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_once_per_epoch_and_restorable() {
        let mut a = EpochOrder::new(3, 10, 0, 0);
        let first: Vec<usize> = (0..10).map(|_| a.next()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let second: Vec<usize> = (0..10).map(|_| a.next()).collect();
        assert_ne!(first, second);
        assert_eq!(a.epoch(), 1);
        let mut b = EpochOrder::new(3, 10, 0, 0);
        b.restore(&json!({"epoch": 1, "index": 4})).unwrap();
        assert_eq!((0..6).map(|_| b.next()).collect::<Vec<_>>(), second[4..].to_vec());
    }

    #[test]
    fn hold_out_is_seeded_and_keeps_a_training_item() {
        let mut a: Vec<u32> = (0..100).collect();
        let val = hold_out(&mut a, 0.1, 5).unwrap();
        assert_eq!((a.len(), val.len()), (90, 10));
        assert!(val.iter().all(|v| !a.contains(v)));
        let mut b: Vec<u32> = (0..100).collect();
        assert_eq!(hold_out(&mut b, 0.1, 5).unwrap(), val);
        let mut one = vec![1];
        assert!(hold_out(&mut one, 0.5, 0).unwrap().is_empty());
        assert!(hold_out(&mut one, 1.0, 0).is_err());
    }
}
