//! The model's numeric building blocks. f32 tensors on the CPU go through the fused kernels of
//! [`super::fused`]; everything else through the composed versions in [`composed`], built from
//! candle ops that all have a backward pass (and the reference the fused kernels are tested
//! against).
//!
//! candle's own fused `LayerNorm::forward`, `ops::softmax_last_dim` and `rms_norm` have no
//! backward and silently drop gradients, so none of them is used here; every function in this
//! file is safe on a training path (tests check that each parameter receives a gradient).

use candle_core::{D, DType, Device, Result, Tensor};

use super::config::Activation;
pub use super::fused::Branches;
use super::{fused, infer};

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::applies(&[x, weight, bias]) {
        return fused::layer_norm(x, weight, bias, eps);
    }
    composed::layer_norm(x, weight, bias, eps)
}

/// Whether `x` (of rank 2 or more) has few enough rows, and no gradient to track, for the
/// inference kernels of [`infer`].
fn inference_rows(x: &Tensor, others: &[&Tensor]) -> bool {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    rows <= infer::MAX_ROWS && !x.track_op() && others.iter().all(|t| !t.track_op())
}

/// `x W + b` for `x` of any rank with `W` `[in, out]` (a Hugging Face `Conv1D`). Untracked f32
/// CPU tensors of a few rows (the engine's batches) take the inference kernel, whose rows never
/// depend on each other; the rest the fused kernel with its backward.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused::applies(&[x, w, b]) && inference_rows(x, &[w, b]) {
        return infer::linear(x, w, b);
    }
    if fused::applies(&[x, w, b]) {
        return fused::linear(x, w, b);
    }
    composed::linear(x, w, b)
}

/// [`linear`] with the product taken in `dtype` (mixed precision: bf16 products of the f32 weights
/// and activations) and the result and bias add back in `x`'s dtype. Composed candle ops, so it has
/// a backward pass on every device; the gradients reach the f32 weights through the casts.
pub fn linear_in(x: &Tensor, w: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (k, n) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, k))?.to_dtype(dtype)?.matmul(&w.to_dtype(dtype)?)?;
    let y = y.to_dtype(x.dtype())?.broadcast_add(b)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = n;
    y.reshape(out)
}

/// `x E^T` for `x` `[N, C]` and `E` `[V, C]` (the tied LM head). Untracked f32 CPU rows as in
/// [`linear`] take the inference kernel; the rest a candle matmul.
pub fn matmul_transposed(x: &Tensor, e: &Tensor) -> Result<Tensor> {
    if fused::applies(&[x, e]) && inference_rows(x, &[e]) {
        return infer::times_transposed(x, e);
    }
    x.matmul(&e.t()?)
}

/// The MLP activation.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh if fused::applies(&[x]) => fused::gelu_tanh(x),
        _ => composed::activation(x, act),
    }
}

/// Numerically stable softmax over the last dimension, composed (so it has a backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Additive causal mask for `t` new queries at absolute positions `past..past + t` attending to
/// `past + t` keys: 0 where the key is visible, -inf where it lies in the future. Shape `[t, past + t]`.
pub fn causal_mask(t: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (t, total), device)?.to_dtype(dtype)
}

/// Scaled dot-product attention. `q`: `[B, H, Tq, Dh]`; `k`, `v`: `[B, H, Tk, Dh]`; `mask`:
/// additive `[Tq, Tk]` or `None` when every key is visible (a single decode step).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    composed::attention(q, k, v, mask)
}

/// Causal attention of `Tq` new queries `[B, H, Tq, Dh]` at positions `past..past + Tq` over
/// keys and values `[B, H, past + Tq, Dh]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
    if fused::applies(&[q, k, v]) {
        return fused::causal_attention(q, k, v, past);
    }
    let t = q.dim(2)?;
    let mask = if t > 1 {
        Some(causal_mask(t, past, q.dtype(), q.device())?)
    } else {
        None
    };
    composed::attention(q, k, v, mask.as_ref())
}

/// Causal self-attention with `n_head` heads from the fused projection `qkv` `[B, T, 3C]` (all
/// queries, then keys, then values) to the merged heads `[B, T, C]`, without a KV cache;
/// `branches` lets several answers in a row share the prompt before them ([`Branches`]).
pub fn causal_self_attention(qkv: &Tensor, n_head: usize, branches: Option<&Branches>) -> Result<Tensor> {
    if fused::applies(&[qkv]) {
        return fused::causal_self_attention(qkv, n_head, branches);
    }
    composed::causal_self_attention(qkv, n_head, branches)
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32), optionally weighted per
/// row by `weights` `[N]` (a loss mask: the mean is over the weight sum). Returns a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    if !fused::applies(&[logits]) {
        return composed::cross_entropy(logits, targets, weights);
    }
    weighted_mean(&fused::cross_entropy_rows(logits, targets)?, weights)
}

/// Mean cross-entropy of the logits `hidden E^T` (`hidden` `[N, C]`, tied embedding `E`
/// `[V, C]`) against `targets` `[N]`, weighted as in [`cross_entropy`]. On f32 CPU tensors the
/// logits are computed a chunk of rows at a time and never held whole (nor their gradient).
pub fn head_cross_entropy(hidden: &Tensor, emb: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    if !fused::applies(&[hidden, emb]) {
        return composed::cross_entropy(&hidden.matmul(&emb.t()?)?, targets, weights);
    }
    weighted_mean(&fused::head_cross_entropy_rows(hidden, emb, targets)?, weights)
}

/// Log-probabilities `[N]` of `targets` `[N]` (u32) under the logits `hidden E^T` (`hidden`
/// `[N, C]`, tied embedding `E` `[V, C]`): the fused head cross-entropy, negated, on f32 CPU
/// tensors; composed ops elsewhere. Both have a backward pass.
pub fn head_target_logprobs(hidden: &Tensor, emb: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused::applies(&[hidden, emb]) {
        return fused::head_cross_entropy_rows(hidden, emb, targets)?.neg();
    }
    target_logprobs(&hidden.matmul(&emb.t()?)?, targets)
}

/// Log-probabilities of `targets` (u32, the shape of `logits` without its last dimension) under
/// the distributions `logits` `[..., V]`: log-softmax over the vocabulary, then each target picked.
/// candle's `log_softmax` is composed from ops with a backward pass, so this trains.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let last = logits.rank() - 1;
    candle_nn::ops::log_softmax(logits, D::Minus1)?
        .gather(&targets.unsqueeze(last)?, last)?
        .squeeze(last)
}

/// The mean of per-row losses, or their `weights`-weighted sum over the weight sum.
fn weighted_mean(rows: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => rows.mean_all(),
        Some(w) => {
            let w = w.to_dtype(rows.dtype())?;
            let total = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
            (rows * w)?.sum_all()? / total
        }
    }
}

/// The same functions composed from candle ops: the path for other devices and dtypes, and the
/// reference for the fused kernels' tests.
pub mod composed {
    use candle_core::{D, DType, Result, Tensor};

    use crate::model::config::Activation;

    /// `x W + b` for `x` of any rank with `W` `[in, out]`.
    pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (k, n) = w.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, k))?.matmul(w)?.broadcast_add(b)?;
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = n;
        y.reshape(out)
    }

    /// Splits `qkv` `[B, T, 3C]` into heads, attends causally (within `branches` when given) and
    /// merges the heads again.
    pub fn causal_self_attention(qkv: &Tensor, n_head: usize, branches: Option<&super::Branches>) -> Result<Tensor> {
        let (b, t, c3) = qkv.dims3()?;
        let c = c3 / 3;
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, n_head, c / n_head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let y = match branches {
            None => attention(&q, &k, &v, Some(&super::causal_mask(t, 0, qkv.dtype(), qkv.device())?))?,
            Some(br) => {
                // One additive [T, T] mask per row: key j is visible to query i when it lies in
                // 0..prefix or start..=i.
                let mut data = vec![f32::NEG_INFINITY; b * t * t];
                for bi in 0..b {
                    for i in 0..t {
                        let (p, s) = br.0[bi * t + i];
                        for j in (0..p as usize).chain(s as usize..=i) {
                            data[(bi * t + i) * t + j] = 0.0;
                        }
                    }
                }
                let mask = Tensor::from_vec(data, (b, 1, t, t), qkv.device())?.to_dtype(qkv.dtype())?;
                let dh = q.dim(D::Minus1)?;
                let scores = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(&mask)?;
                super::softmax_last_dim(&scores)?.matmul(&v)?
            }
        };
        y.transpose(1, 2)?.reshape((b, t, c))
    }

    /// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(weight)?.broadcast_add(bias)
    }

    /// The MLP activation.
    pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::GeluTanh => x.gelu(),
            Activation::GeluErf => x.gelu_erf(),
        }
    }

    /// Scaled dot-product attention. `q`: `[B, H, Tq, Dh]`; `k`, `v`: `[B, H, Tk, Dh]`; `mask`:
    /// additive `[Tq, Tk]` or `None` when every key is visible (a single decode step).
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let dh = q.dim(D::Minus1)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        super::softmax_last_dim(&scores)?.matmul(v)
    }

    /// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32), optionally weighted per
    /// row by `weights` `[N]` (a loss mask: the mean is over the weight sum). Returns a scalar.
    pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        match weights {
            None => picked.mean_all()?.neg(),
            Some(w) => {
                let w = w.to_dtype(picked.dtype())?;
                let total = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
                ((picked * w)?.sum_all()? / total)?.neg()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_normalises() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [-2., 0., 2., 8.]], &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let mean = y
            .mean_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let var = y
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (m, v) in mean.iter().zip(var) {
            assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-3, "{m} {v}");
        }
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(2, 1, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[0f32, 1f32.ln()], [2f32.ln(), 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        // row 0: p(1) = 1/2; row 1: p(0) = 2/3
        let want = -((0.5f32).ln() + (2.0f32 / 3.0).ln()) / 2.0;
        let got = cross_entropy(&logits, &t, None).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-6);
        let w = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let got = cross_entropy(&logits, &t, Some(&w))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got + (2.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
