//! The engine's KV cache: a fixed number of slots, one sequence each with its own length, in one
//! preallocated `[2, slots, H, capacity, Dh]` buffer per layer (keys, then values) written in
//! place. A batch is a list of [`Segment`]s, each continuing the sequence of its slot, so
//! sequences of different lengths decode together and nothing is padded.

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Device, Tensor};

use super::config::GptConfig;

/// The element type of the engine's keys and values (`--kv-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    /// Half the memory per slot; attention widens them back to f32.
    F16,
}

impl std::str::FromStr for KvDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => bail!("unknown --kv-dtype {other:?} (expected f32 or f16)"),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if *self == Self::F16 { "f16" } else { "f32" })
    }
}

/// New tokens of one sequence in a packed batch: they continue the `past` tokens already cached
/// in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub slot: usize,
    pub past: usize,
    pub len: usize,
}

pub struct KvSlots {
    layers: Vec<Tensor>,
    lens: Vec<usize>,
    capacity: usize,
}

impl KvSlots {
    pub fn new(cfg: &GptConfig, slots: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        ensure!(
            slots > 0 && capacity > 0,
            "the KV cache needs at least one slot and one position"
        );
        let capacity = capacity.min(cfg.n_positions);
        let shape = (2, slots, cfg.n_head, capacity, cfg.head_dim());
        let layers = (0..cfg.n_layer)
            .map(|_| Tensor::zeros(shape, dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            lens: vec![0; slots],
            capacity,
        })
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Positions per slot (at most the model's context).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Forgets the sequence in `slot` (its entries are overwritten by the next one).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Copies the first `len` cached tokens of slot `from` into slot `to`: the samples of one prompt
    /// prefill it once and start from copies of its entries.
    pub fn copy_prefix(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        ensure!(from != to, "cannot copy a KV slot onto itself");
        ensure!(
            len <= self.lens[from],
            "slot {from} holds {} tokens, not {len}",
            self.lens[from]
        );
        if len > 0 {
            for kv in &self.layers {
                for plane in 0..2 {
                    let half = kv.narrow(0, plane, 1)?;
                    let src = half.narrow(1, from, 1)?.narrow(3, 0, len)?.contiguous()?;
                    half.narrow(1, to, 1)?.slice_set(&src, 3, 0)?;
                }
            }
        }
        self.lens[to] = len;
        Ok(())
    }

    /// The `[2, slots, H, capacity, Dh]` buffer of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> &Tensor {
        &self.layers[layer]
    }

    /// Checks that `segs` continue their slots' sequences, fit the capacity and use each slot once.
    pub(crate) fn check(&self, segs: &[Segment]) -> Result<()> {
        let mut seen = vec![false; self.slots()];
        for s in segs {
            ensure!(
                s.slot < self.slots(),
                "KV slot {} does not exist ({} slots)",
                s.slot,
                self.slots()
            );
            ensure!(!seen[s.slot], "KV slot {} appears twice in one batch", s.slot);
            seen[s.slot] = true;
            ensure!(s.len > 0, "a segment of slot {} has no tokens", s.slot);
            if s.past != self.lens[s.slot] {
                bail!(
                    "slot {} holds {} tokens but the segment continues after {}",
                    s.slot,
                    self.lens[s.slot],
                    s.past
                );
            }
            ensure!(
                s.past + s.len <= self.capacity,
                "sequence of {} tokens exceeds the KV cache's {} positions",
                s.past + s.len,
                self.capacity
            );
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, segs: &[Segment]) {
        for s in segs {
            self.lens[s.slot] += s.len;
        }
    }
}
