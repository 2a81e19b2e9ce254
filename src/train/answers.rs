//! Prompt + answer token sequences batched for scoring: the log-probability a model gives each
//! answer token, used by PPO (per token) and DPO (summed per answer), and the hidden state at each
//! answer's positions (PPO's values, the reward model's score).
//!
//! Two layouts: one padded row per sequence ([`batch`]), or one row per prompt holding the prompt
//! once and then every answer to it ([`grouped_batch`]), each answer attending to the prompt and
//! to itself only. The second computes a prompt shared by several samples once, forward and
//! backward, with the same results as the first.

use std::sync::Arc;

use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};

use crate::model::Gpt;
use crate::model::ops::Branches;

/// Sequences batched for the model, and the flat positions of their answer tokens.
pub struct Batch {
    pub x: Tensor,
    /// Flat index into `[rows * L]` of the position predicting each answer token, `[N * A]`.
    pub rows: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    /// Flat index of each answer's last token (its prompt's last token for an empty answer), `[N]`.
    pub last: Tensor,
    /// Answers and the longest answer's length.
    pub n: usize,
    pub a: usize,
    /// For grouped rows: every token's position and what it attends to.
    pub layout: Option<(Tensor, Branches)>,
}

impl Batch {
    /// Final hidden states `[rows, L, C]` of `model` on the batch.
    pub fn hidden(&self, model: &Gpt) -> Result<Tensor> {
        match &self.layout {
            None => model.forward_hidden(&self.x),
            Some((pos, branches)) => model.forward_hidden_branched(&self.x, pos, branches),
        }
    }
}

/// Batches `(sequence, prompt length)` pairs, right-padded with `pad`.
pub fn batch(seqs: &[(&[u32], usize)], pad: u32, device: &Device) -> Result<Batch> {
    let n = seqs.len();
    let l = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
    let a = seqs.iter().map(|(s, p)| s.len() - p).max().unwrap_or(1).max(1);
    let (mut x, mut rows, mut targets, mut mask, mut last) = (
        vec![pad; n * l],
        vec![0u32; n * a],
        vec![0u32; n * a],
        vec![0f32; n * a],
        vec![0u32; n],
    );
    for (i, &(seq, prompt_len)) in seqs.iter().enumerate() {
        x[i * l..i * l + seq.len()].copy_from_slice(seq);
        for k in 0..seq.len() - prompt_len {
            rows[i * a + k] = (i * l + prompt_len + k - 1) as u32;
            targets[i * a + k] = seq[prompt_len + k];
            mask[i * a + k] = 1.0;
        }
        last[i] = (i * l + seq.len() - 1) as u32;
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (n, l), device)?,
        rows: Tensor::from_vec(rows, n * a, device)?,
        targets: Tensor::from_vec(targets, n * a, device)?,
        mask: Tensor::from_vec(mask, (n, a), device)?,
        last: Tensor::from_vec(last, n, device)?,
        n,
        a,
        layout: None,
    })
}

/// Batches groups of answers to one prompt each, one row per group: the prompt's tokens, then
/// each answer's in turn, right-padded with `pad`. Answers are numbered group by group, in order.
pub fn grouped_batch(groups: &[(&[u32], Vec<&[u32]>)], pad: u32, device: &Device) -> Result<Batch> {
    ensure!(
        groups.iter().all(|(p, _)| !p.is_empty()),
        "every group needs a non-empty prompt"
    );
    let g = groups.len();
    let l = groups
        .iter()
        .map(|(p, ans)| p.len() + ans.iter().map(|a| a.len()).sum::<usize>())
        .max()
        .unwrap_or(1);
    let n: usize = groups.iter().map(|(_, ans)| ans.len()).sum();
    let a = groups
        .iter()
        .flat_map(|(_, ans)| ans.iter().map(|x| x.len()))
        .max()
        .unwrap_or(1)
        .max(1);
    let (mut x, mut pos, mut vis) = (vec![pad; g * l], vec![0u32; g * l], vec![(0u32, 0u32); g * l]);
    let (mut rows, mut targets, mut mask, mut last) =
        (vec![0u32; n * a], vec![0u32; n * a], vec![0f32; n * a], vec![0u32; n]);
    let mut i = 0;
    for (r, (prompt, answers)) in groups.iter().enumerate() {
        let base = r * l;
        let p = prompt.len();
        x[base..base + p].copy_from_slice(prompt);
        for (j, q) in pos[base..base + p].iter_mut().enumerate() {
            *q = j as u32;
        }
        let mut at = p;
        for ans in answers {
            for (j, &t) in ans.iter().enumerate() {
                x[base + at + j] = t;
                pos[base + at + j] = (p + j) as u32;
                vis[base + at + j] = (p as u32, at as u32);
                // Token j is predicted by the one before it in this answer, or by the prompt's last.
                let from = if j == 0 { p - 1 } else { at + j - 1 };
                rows[i * a + j] = (base + from) as u32;
                targets[i * a + j] = t;
                mask[i * a + j] = 1.0;
            }
            last[i] = (base + if ans.is_empty() { p - 1 } else { at + ans.len() - 1 }) as u32;
            at += ans.len();
            i += 1;
        }
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (g, l), device)?,
        rows: Tensor::from_vec(rows, n * a, device)?,
        targets: Tensor::from_vec(targets, n * a, device)?,
        mask: Tensor::from_vec(mask, (n, a), device)?,
        last: Tensor::from_vec(last, n, device)?,
        n,
        a,
        layout: Some((Tensor::from_vec(pos, (g, l), device)?, Branches(Arc::new(vis)))),
    })
}

/// Hidden states at the positions predicting each answer token, `[N * A, C]`.
pub fn answer_rows(model: &Gpt, b: &Batch) -> Result<Tensor> {
    let hidden = b.hidden(model)?;
    let c = hidden.dim(2)?;
    Ok(hidden.reshape(((), c))?.index_select(&b.rows, 0)?)
}

/// Log-probabilities `[N, A]` of the answer tokens at `temperature` (padding positions hold some
/// finite value that `b.mask` removes). The LM head runs on the answer positions only, through the
/// fused head cross-entropy where it applies, so neither the logits nor their gradient is ever
/// held whole.
pub fn answer_logprobs(model: &Gpt, b: &Batch, temperature: f64) -> Result<Tensor> {
    let rows = answer_rows(model, b)?;
    let rows = if temperature == 1.0 {
        rows
    } else {
        (rows / temperature)?
    };
    Ok(model.head_target_logprobs(&rows, &b.targets)?.reshape((b.n, b.a))?)
}

/// Scores `[N]` of a linear `head` `[1, C]` at each answer's last token (a reward model's output).
pub fn last_token_scores(model: &Gpt, head: &Tensor, b: &Batch) -> Result<Tensor> {
    let hidden = b.hidden(model)?;
    let c = hidden.dim(2)?;
    let picked = hidden.reshape(((), c))?.index_select(&b.last, 0)?;
    Ok(picked.matmul(&head.t()?)?.squeeze(1)?)
}

/// Log-probabilities `[N, A]` of the answer tokens at `temperature`, and the whole next-token
/// log-distribution `[N * A, V]` at temperature 1 at the same positions, from one forward pass and
/// with a backward (PPO's exact-KL loss). Holds the logits whole: meant for small vocabularies.
pub fn answer_logprobs_and_dists(model: &Gpt, b: &Batch, temperature: f64) -> Result<(Tensor, Tensor)> {
    let rows = answer_rows(model, b)?;
    let scaled = if temperature == 1.0 {
        rows.clone()
    } else {
        (&rows / temperature)?
    };
    let logp = model.head_target_logprobs(&scaled, &b.targets)?.reshape((b.n, b.a))?;
    Ok((logp, log_dists(model, &rows)?))
}

/// Next-token log-distributions `[R, V]` at temperature 1 of hidden-state rows `[R, C]`.
fn log_dists(model: &Gpt, rows: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&model.head_logits(rows)?, 1)?)
}

/// `KL(p || q)` `[N, A]` at each answer position from log-distributions `[N * A, V]`.
pub fn token_kl(lp: &Tensor, lq: &Tensor, b: &Batch) -> Result<Tensor> {
    Ok((lp.exp()? * (lp - lq)?)?.sum(1)?.reshape((b.n, b.a))?)
}

/// The exact KL(policy || reference) of each answer `[N]`: at every answer position the divergence
/// between the two full next-token distributions at temperature 1, summed over the answer's tokens
/// (not the sampled estimate `log p - log q` of one token).
pub fn exact_kl(policy: &Gpt, reference: &Gpt, b: &Batch) -> Result<Vec<f64>> {
    let (lp, lq) = (answer_dists(policy, b)?, answer_dists(reference, b)?);
    let per_answer = (token_kl(&lp, &lq, b)? * b.mask.to_dtype(lp.dtype())?)?.sum(1)?;
    Ok(per_answer.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
}

/// The next-token log-distributions `[N * A, V]` at temperature 1 at the answer positions.
pub fn answer_dists(model: &Gpt, b: &Batch) -> Result<Tensor> {
    log_dists(model, &answer_rows(model, b)?)
}
