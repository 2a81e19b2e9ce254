//! Prompt + answer token sequences batched for scoring: the log-probability a model gives each
//! answer token, used by PPO (per token) and DPO (summed per answer).

use anyhow::Result;
use candle_core::{D, Device, Tensor};

use crate::model::Gpt;

/// Padded prompt+answer sequences and the flat positions of their answer tokens.
pub struct Batch {
    pub x: Tensor,
    /// Flat index into `[N * L]` of the position predicting each answer token, `[N * A]`.
    pub rows: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    pub n: usize,
    pub a: usize,
}

/// Batches `(sequence, prompt length)` pairs, right-padded with `pad`.
pub fn batch(seqs: &[(&[u32], usize)], pad: u32, device: &Device) -> Result<Batch> {
    let n = seqs.len();
    let l = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
    let a = seqs.iter().map(|(s, p)| s.len() - p).max().unwrap_or(1).max(1);
    let (mut x, mut rows, mut targets, mut mask) = (
        vec![pad; n * l],
        vec![0u32; n * a],
        vec![0u32; n * a],
        vec![0f32; n * a],
    );
    for (i, &(seq, prompt_len)) in seqs.iter().enumerate() {
        x[i * l..i * l + seq.len()].copy_from_slice(seq);
        for k in 0..seq.len() - prompt_len {
            rows[i * a + k] = (i * l + prompt_len + k - 1) as u32;
            targets[i * a + k] = seq[prompt_len + k];
            mask[i * a + k] = 1.0;
        }
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (n, l), device)?,
        rows: Tensor::from_vec(rows, n * a, device)?,
        targets: Tensor::from_vec(targets, n * a, device)?,
        mask: Tensor::from_vec(mask, (n, a), device)?,
        n,
        a,
    })
}

/// Log-probabilities `[N, A]` of the answer tokens at `temperature`, and the per-position log
/// distributions `[N * A, V]` (for the entropy).
pub fn answer_logprobs(model: &Gpt, b: &Batch, temperature: f64) -> Result<(Tensor, Tensor)> {
    let logits = model.forward(&b.x)?;
    let v = logits.dim(2)?;
    let rows = logits.reshape(((), v))?.index_select(&b.rows, 0)?;
    let logp = candle_nn::ops::log_softmax(&(rows / temperature)?, D::Minus1)?;
    let picked = logp
        .gather(&b.targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .reshape((b.n, b.a))?;
    Ok((picked, logp))
}
