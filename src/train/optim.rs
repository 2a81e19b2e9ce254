//! AdamW with decoupled weight decay on matrices only, global-norm clipping, and the learning-rate
//! schedule (linear warmup, then cosine decay to a floor). The same arithmetic as PyTorch's
//! `torch.optim.AdamW`, so losses can be compared step by step.
//!
//! Written here rather than using `candle_nn::AdamW`, which decays every parameter (biases and
//! LayerNorm gains included), has no gradient scaling for clipping/accumulation, and cannot
//! save or restore its moments for exact resume. For f32 parameters on the CPU the update runs
//! in place (three passes, no allocation: see [`fused_update`]); elsewhere it is composed from
//! candle ops with the same arithmetic in the same order.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
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
        let h = Hyper {
            b1: self.cfg.beta1,
            b2: self.cfg.beta2,
            bc1: 1.0 - self.cfg.beta1.powi(self.step as i32),
            bc2_sqrt: (1.0 - self.cfg.beta2.powi(self.step as i32)).sqrt(),
            eps: self.cfg.eps,
            lr,
            decay: 1.0 - lr * self.cfg.weight_decay,
            grad_scale,
        };
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            // Gradients computed by candle ops from forward tensors still point into that step's
            // graph; detaching keeps the moments from holding every past graph alive.
            let g = g.detach();
            let fused = [slot.var.as_tensor(), &slot.m, &slot.v, &g]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
            if fused {
                fused_update(slot, &g, &h)?;
            } else {
                composed_update(slot, &g, &h)?;
            }
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

/// The scalars of one AdamW step, shared by every parameter.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    b1: f64,
    b2: f64,
    /// `1 - beta1^step`
    bc1: f64,
    /// `sqrt(1 - beta2^step)`
    bc2_sqrt: f64,
    eps: f64,
    lr: f64,
    /// The weight-decay factor `1 - lr * weight_decay`, for parameters that decay.
    decay: f64,
    grad_scale: f64,
}

/// The update composed from candle ops (any device and dtype).
fn composed_update(slot: &mut Slot, g: &Tensor, h: &Hyper) -> Result<()> {
    let g = (g * h.grad_scale)?;
    slot.m = ((&slot.m * h.b1)? + (&g * (1.0 - h.b1))?)?;
    slot.v = ((&slot.v * h.b2)? + (g.sqr()? * (1.0 - h.b2))?)?;
    let theta = slot.var.as_tensor().detach();
    let theta = if slot.decay { (theta * h.decay)? } else { theta };
    let denom = ((slot.v.sqrt()? / h.bc2_sqrt)? + h.eps)?;
    let update = ((&slot.m / denom)? * (h.lr / h.bc1))?;
    slot.var.set(&(theta - update)?)?;
    Ok(())
}

/// The same update in place on f32 CPU tensors: the moments first (each from the gradient),
/// then the parameter from both moments. Each pass is the composed version's arithmetic in f32
/// (candle applies a scalar `s` to f32 data as `x * (s as f32)`), so results agree bit for bit.
fn fused_update(slot: &mut Slot, g: &Tensor, h: &Hyper) -> Result<()> {
    if !slot.m.is_contiguous() || !slot.v.is_contiguous() {
        slot.m = slot.m.contiguous()?;
        slot.v = slot.v.contiguous()?;
    }
    let g = g.contiguous()?;
    slot.m.inplace_op2(&g, &Moment { first: true, h: *h })?;
    slot.v.inplace_op2(&g, &Moment { first: false, h: *h })?;
    slot.var.as_tensor().inplace_op3(
        &slot.m,
        &slot.v,
        &ParamUpdate {
            decay: slot.decay,
            h: *h,
        },
    )?;
    Ok(())
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("fused AdamW takes contiguous f32 tensors"),
    }
}

fn f32_data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("fused AdamW takes contiguous f32 tensors"),
    }
}

/// Elements per rayon task in the update passes.
const CHUNK: usize = 1 << 14;

/// `m = m b1 + (g s)(1 - b1)` (`first`) or `v = v b2 + (g s)^2 (1 - b2)`, in place.
struct Moment {
    first: bool,
    h: Hyper,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "fused-adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let dst = f32_data_mut(s1, l1)?;
        let g = f32_data(s2, l2)?;
        if dst.len() != g.len() {
            candle_core::bail!("fused AdamW: moment and gradient sizes differ");
        }
        let scale = self.h.grad_scale as f32;
        let (keep, take) = if self.first {
            (self.h.b1 as f32, (1.0 - self.h.b1) as f32)
        } else {
            (self.h.b2 as f32, (1.0 - self.h.b2) as f32)
        };
        let first = self.first;
        dst.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(d, g)| {
            for (d, &g) in d.iter_mut().zip(g) {
                let g = g * scale;
                let g = if first { g } else { g * g };
                *d = *d * keep + g * take;
            }
        });
        Ok(())
    }
}

/// `theta = theta (1 - lr wd) - lr / bc1 * m / (sqrt(v) / bc2_sqrt + eps)`, in place.
struct ParamUpdate {
    decay: bool,
    h: Hyper,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "fused-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let theta = f32_data_mut(s1, l1)?;
        let (m, v) = (f32_data(s2, l2)?, f32_data(s3, l3)?);
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("fused AdamW: parameter and moment sizes differ");
        }
        let decay = if self.decay { self.h.decay as f32 } else { 1.0 };
        let inv_bc2 = (1.0 / self.h.bc2_sqrt) as f32;
        let eps = self.h.eps as f32;
        let step = (self.h.lr / self.h.bc1) as f32;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() * inv_bc2 + eps;
                    *t = *t * decay - (m / denom) * step;
                }
            });
        Ok(())
    }
}

/// Adds `g` into the running gradient sum `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Option<Vec<Tensor>>, g: Vec<Tensor>) -> Result<()> {
    *acc = Some(match acc.take() {
        None => g,
        Some(a) => a
            .iter()
            .zip(&g)
            .map(|(a, g)| a + g)
            .collect::<candle_core::Result<Vec<_>>>()?,
    });
    Ok(())
}

/// The factor that scales gradients of global norm `norm` down to at most `max` (1 when already below).
pub fn clip_scale(norm: f64, max: f64) -> f64 {
    if norm > max { max / (norm + 1e-6) } else { 1.0 }
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
    fn fused_update_equals_the_composed_one() {
        let dev = Device::Cpu;
        let cfg = AdamWConfig::default();
        let shapes: [&[usize]; 3] = [&[5, 7], &[13], &[3, 33]];
        let make = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n: usize = s.iter().product();
                    let data: Vec<f32> = (0..n).map(|j| ((i * 31 + j * 17) % 23) as f32 / 7.0 - 1.5).collect();
                    let t = Tensor::from_vec(data, *s, &dev).unwrap();
                    (format!("p{i}"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let (pa, pb) = (make(), make());
        let mut a = AdamW::new(&pa, cfg).unwrap();
        let mut b = AdamW::new(&pb, cfg).unwrap();
        for step in 0..4 {
            let grads: Vec<Tensor> = pa
                .iter()
                .map(|(_, v)| (v.as_tensor().sin().unwrap() * (0.3 + step as f64)).unwrap())
                .collect();
            let (lr, scale) = (1e-2 * (step + 1) as f64, 0.7);
            // `a` takes the public (fused on f32 CPU) path, `b` the composed one.
            a.step(&grads, lr, scale).unwrap();
            b.step += 1;
            let h = Hyper {
                b1: cfg.beta1,
                b2: cfg.beta2,
                bc1: 1.0 - cfg.beta1.powi(b.step as i32),
                bc2_sqrt: (1.0 - cfg.beta2.powi(b.step as i32)).sqrt(),
                eps: cfg.eps,
                lr,
                decay: 1.0 - lr * cfg.weight_decay,
                grad_scale: scale,
            };
            for (slot, g) in b.slots.iter_mut().zip(&grads) {
                composed_update(slot, g, &h).unwrap();
            }
            for ((sa, sb), (_, va)) in a.slots.iter().zip(&b.slots).zip(&pa) {
                for (x, y) in [(&sa.m, &sb.m), (&sa.v, &sb.v), (va.as_tensor(), sb.var.as_tensor())] {
                    let d = (x - y)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert_eq!(d, 0.0, "{} differs at step {step}", sa.name);
                }
            }
        }
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
