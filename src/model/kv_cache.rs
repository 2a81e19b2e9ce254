//! A preallocated key/value cache for incremental decoding: each layer's keys and values live in
//! one `[B, H, capacity, Dh]` buffer written in place, so a decode step allocates no new cache.

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor};

use super::config::GptConfig;

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    batch: usize,
}

impl KvCache {
    pub fn new(cfg: &GptConfig, batch: usize, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        ensure!(
            batch > 0 && capacity > 0,
            "KV cache needs a positive batch and capacity"
        );
        let shape = (batch, cfg.n_head, capacity, cfg.head_dim());
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self {
            k,
            v,
            len: 0,
            capacity,
            batch,
        })
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Writes the new keys/values `[B, H, t, Dh]` of `layer` after the cached ones and returns
    /// views of all keys and values so far. The length advances once all layers are done.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        ensure!(
            self.len + t <= self.capacity,
            "KV cache capacity {} exceeded",
            self.capacity
        );
        self.k[layer].slice_set(k, 2, self.len)?;
        self.v[layer].slice_set(v, 2, self.len)?;
        let total = self.len + t;
        Ok((self.k[layer].narrow(2, 0, total)?, self.v[layer].narrow(2, 0, total)?))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
