//! AdamW with decoupled weight decay on matrices only, global-norm clipping, and the learning-rate
//! schedule (linear warmup, then cosine decay to a floor). The same arithmetic as PyTorch's
//! `torch.optim.AdamW`, so losses can be compared step by step.
//!
//! Written here rather than using `candle_nn::AdamW`, which decays every parameter (biases and
//! LayerNorm gains included), has no gradient scaling for clipping/accumulation, and cannot
//! save or restore its moments for exact resume.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to parameters with two or more dimensions only (matrices and embeddings).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `params` (name, variable), in the order gradients will be given.
    pub fn new(params: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    decay: var.rank() >= 2,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, slots, step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. Each gradient is multiplied by `grad_scale` first
    /// (folding in gradient-accumulation averaging and clipping without an extra pass).
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        ensure!(
            grads.len() == self.slots.len(),
            "got {} gradients for {} parameters",
            grads.len(),
            self.slots.len()
        );
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let g = (g * grad_scale)?;
            slot.m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let theta = slot.var.as_tensor();
            let theta = if slot.decay {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta.clone()
            };
            let denom = ((slot.v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            let update = ((&slot.m / denom)? * (lr / bc1))?;
            slot.var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// The moments and step count, for `optimizer.safetensors`.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for s in &self.slots {
            m.insert(format!("{}.exp_avg", s.name), s.m.clone());
            m.insert(format!("{}.exp_avg_sq", s.name), s.v.clone());
        }
        m.insert(
            "step".into(),
            Tensor::new(&[self.step as f32], self.slots[0].var.device())?,
        );
        Ok(m)
    }

    /// Restores a state saved by [`AdamW::state`], checking every moment's shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state lacks {key}"))?;
                ensure!(
                    t.dims() == s.var.dims(),
                    "optimizer state {key} has shape {:?}, the model wants {:?} (a checkpoint of another model?)",
                    t.dims(),
                    s.var.dims()
                );
                *dst = t.to_dtype(s.var.dtype())?;
            }
        }
        let step = state.get("step").context("optimizer state lacks step")?;
        self.step = step.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// The global L2 norm of a set of gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Linear warmup from 0 to `max_lr` over `warmup` steps, then cosine decay to `min_lr` at
/// `total` steps (and `min_lr` after).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl LrSchedule {
    /// Learning rate for 0-based step `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.max_lr * (step + 1) as f64 / self.warmup as f64;
        }
        if step >= self.total || self.total <= self.warmup {
            return self.min_lr;
        }
        let progress = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert_eq!(s.at(4), 1.0);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computation_and_decays_matrices_only() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f64], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut opt = AdamW::new(&[("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        let gw = Tensor::new(&[[0.2f64, 0.4]], &dev).unwrap();
        let gb = Tensor::new(&[-1.0f64], &dev).unwrap();
        opt.step(&[gw, gb], 0.1, 0.5).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (plus decay on w).
        let w1 = w.as_tensor().to_vec2::<f64>().unwrap();
        assert!((w1[0][0] - (1.0 * (1.0 - 0.05) - 0.1)).abs() < 1e-6, "{w1:?}");
        assert!((w1[0][1] - (-2.0 * (1.0 - 0.05) - 0.1)).abs() < 1e-6, "{w1:?}");
        let b1 = b.as_tensor().to_vec1::<f64>().unwrap();
        assert!((b1[0] - 0.6).abs() < 1e-6, "bias must not decay: {b1:?}");
        // State round trip.
        let state = opt.state().unwrap();
        let mut again = AdamW::new(&[("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        again.load_state(&state).unwrap();
        assert_eq!(again.steps(), 1);
    }

    #[test]
    fn global_norm_is_the_l2_norm() {
        let dev = Device::Cpu;
        let g = [
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[[4.0f32]], &dev).unwrap(),
        ];
        assert!((global_norm(&g).unwrap() - 5.0).abs() < 1e-9);
    }
}
