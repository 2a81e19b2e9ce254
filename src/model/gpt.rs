//! The GPT-2 decoder: pre-LayerNorm blocks, learned positions, GELU MLP (4x), tied embeddings and
//! biases everywhere, with tensors named and shaped exactly as Hugging Face's `GPT2LMHeadModel`
//! (its `Conv1D` layers store weights as `[in, out]`, so a layer is `x @ W + b`).

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::config::GptConfig;
use super::kv_cache::{KvSlots, Segment};
use super::{fused, infer, ops};

/// Standard deviation of GPT-2's weight initialisation.
const INIT_STD: f64 = 0.02;

/// Every parameter of a model: its Hugging Face name and shape, in a fixed order (embeddings,
/// blocks, final LayerNorm). Init, load, save and export all go through this one list.
pub fn parameter_shapes(cfg: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let c = cfg.n_embd;
    let mut v = vec![
        ("transformer.wte.weight".to_string(), vec![cfg.vocab_size, c]),
        ("transformer.wpe.weight".to_string(), vec![cfg.n_positions, c]),
    ];
    for i in 0..cfg.n_layer {
        let p = format!("transformer.h.{i}");
        v.extend([
            (format!("{p}.ln_1.weight"), vec![c]),
            (format!("{p}.ln_1.bias"), vec![c]),
            (format!("{p}.attn.c_attn.weight"), vec![c, 3 * c]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * c]),
            (format!("{p}.attn.c_proj.weight"), vec![c, c]),
            (format!("{p}.attn.c_proj.bias"), vec![c]),
            (format!("{p}.ln_2.weight"), vec![c]),
            (format!("{p}.ln_2.bias"), vec![c]),
            (format!("{p}.mlp.c_fc.weight"), vec![c, 4 * c]),
            (format!("{p}.mlp.c_fc.bias"), vec![4 * c]),
            (format!("{p}.mlp.c_proj.weight"), vec![4 * c, c]),
            (format!("{p}.mlp.c_proj.bias"), vec![c]),
        ]);
    }
    v.push(("transformer.ln_f.weight".to_string(), vec![c]));
    v.push(("transformer.ln_f.bias".to_string(), vec![c]));
    v
}

/// GPT-2's initialisation, deterministic for a seed on every device: normal(0, 0.02) for
/// matrices and embeddings, 0.02/sqrt(2 n_layer) for the projections into the residual stream,
/// zero biases, unit LayerNorm gains.
pub fn init_weights(cfg: &GptConfig, seed: u64, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let resid_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
    let mut out = HashMap::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains(".ln_") {
            vec![1.0; n]
        } else {
            let std = if name.ends_with("c_proj.weight") {
                resid_std
            } else {
                INIT_STD
            };
            let normal = Normal::new(0.0, std as f32).expect("positive std");
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
        out.insert(name, t);
    }
    Ok(out)
}

struct Block {
    ln1_w: Tensor,
    ln1_b: Tensor,
    attn_w: Tensor,
    attn_b: Tensor,
    attn_proj_w: Tensor,
    attn_proj_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    fc_w: Tensor,
    fc_b: Tensor,
    fc_proj_w: Tensor,
    fc_proj_b: Tensor,
}

/// A block's weight matrices laid out for the decoding kernels ([`infer::Packed`]).
struct PackedBlock {
    attn: infer::Packed,
    attn_proj: infer::Packed,
    fc: infer::Packed,
    fc_proj: infer::Packed,
}

/// The decoding kernels' copy of the weights: every block's matrices, and the LM head's
/// (the transposed embedding) when they are read in less than f32.
struct DecodeWeights {
    blocks: Vec<PackedBlock>,
    head: Option<infer::Packed>,
}

/// A GPT-2 language model. Its tensors may be candle `Var`s (training updates them in place) or
/// plain tensors loaded from a checkpoint.
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f_w: Tensor,
    ln_f_b: Tensor,
    /// Copies of the block matrices for [`Gpt::forward_packed`], made by [`Gpt::for_decoding`].
    packed: Option<std::sync::Arc<DecodeWeights>>,
    /// The precision [`Gpt::for_decoding`] converts the weights to.
    decode_dtype: infer::WeightDtype,
    /// Whether [`Gpt::new_slots`] keeps keys and values in f16.
    kv_f16: bool,
    /// Mixed precision of the training forward pass: the products of the linear layers and the LM
    /// head in this dtype (bf16), weights, activations and loss in f32 ([`Gpt::set_matmul_dtype`]).
    matmul_dtype: Option<DType>,
}

impl Gpt {
    /// Builds a model from named tensors, checking that every parameter is present with the
    /// right shape. Extra tensors that `transformers` writes (attention-mask buffers, a tied
    /// `lm_head.weight`, a reward model's `score.weight` head) are accepted; anything else is
    /// rejected by name.
    pub fn from_weights(cfg: &GptConfig, weights: &HashMap<String, Tensor>) -> Result<Self> {
        cfg.validate()?;
        let expected = parameter_shapes(cfg);
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in weights.keys() {
            let ignorable = name == "lm_head.weight"
                || name == "score.weight"
                || name.ends_with(".attn.bias")
                || name.ends_with(".attn.masked_bias");
            if !known.contains(name.as_str()) && !ignorable {
                bail!("unexpected tensor {name:?}: not part of a GPT-2 model of this config");
            }
        }
        let mut dtype = None;
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = weights.get(name).with_context(|| format!("missing tensor {name:?}"))?;
            ensure!(
                t.dims() == shape,
                "tensor {name:?} has shape {:?}, but the config wants {shape:?}",
                t.dims()
            );
            let dt = *dtype.get_or_insert(t.dtype());
            ensure!(
                t.dtype() == dt,
                "tensor {name:?} is {:?} while others are {dt:?}",
                t.dtype()
            );
            Ok(t.clone())
        };
        let shapes: HashMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        let mut take = |name: String| -> Result<Tensor> { get(&name, shapes[name.as_str()]) };
        let wte = take("transformer.wte.weight".into())?;
        let wpe = take("transformer.wpe.weight".into())?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln1_w: take(format!("{p}.ln_1.weight"))?,
                ln1_b: take(format!("{p}.ln_1.bias"))?,
                attn_w: take(format!("{p}.attn.c_attn.weight"))?,
                attn_b: take(format!("{p}.attn.c_attn.bias"))?,
                attn_proj_w: take(format!("{p}.attn.c_proj.weight"))?,
                attn_proj_b: take(format!("{p}.attn.c_proj.bias"))?,
                ln2_w: take(format!("{p}.ln_2.weight"))?,
                ln2_b: take(format!("{p}.ln_2.bias"))?,
                fc_w: take(format!("{p}.mlp.c_fc.weight"))?,
                fc_b: take(format!("{p}.mlp.c_fc.bias"))?,
                fc_proj_w: take(format!("{p}.mlp.c_proj.weight"))?,
                fc_proj_b: take(format!("{p}.mlp.c_proj.bias"))?,
            });
        }
        let ln_f_w = take("transformer.ln_f.weight".into())?;
        let ln_f_b = take("transformer.ln_f.bias".into())?;
        if let Some(head) = weights.get("lm_head.weight") {
            let diff = (head - &wte)
                .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
                .context("lm_head.weight must have the shape of transformer.wte.weight")?;
            ensure!(
                diff == 0.0,
                "lm_head.weight differs from transformer.wte.weight: untied heads are not supported"
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f_w,
            ln_f_b,
            packed: None,
            decode_dtype: infer::WeightDtype::F32,
            kv_f16: false,
            matmul_dtype: None,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The same model with untracked tensors that share the weights' storage: it sees every
    /// optimizer update, builds no autograd graph, and takes the inference kernels (generation
    /// during training and PPO's rollouts use it).
    pub fn detached(&self) -> Gpt {
        let d = |t: &Tensor| t.detach();
        Gpt {
            cfg: self.cfg.clone(),
            wte: d(&self.wte),
            wpe: d(&self.wpe),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln1_w: d(&b.ln1_w),
                    ln1_b: d(&b.ln1_b),
                    attn_w: d(&b.attn_w),
                    attn_b: d(&b.attn_b),
                    attn_proj_w: d(&b.attn_proj_w),
                    attn_proj_b: d(&b.attn_proj_b),
                    ln2_w: d(&b.ln2_w),
                    ln2_b: d(&b.ln2_b),
                    fc_w: d(&b.fc_w),
                    fc_b: d(&b.fc_b),
                    fc_proj_w: d(&b.fc_proj_w),
                    fc_proj_b: d(&b.fc_proj_b),
                })
                .collect(),
            ln_f_w: d(&self.ln_f_w),
            ln_f_b: d(&self.ln_f_b),
            packed: None,
            decode_dtype: self.decode_dtype,
            kv_f16: self.kv_f16,
            matmul_dtype: None,
        }
    }

    /// Makes [`Gpt::for_decoding`] (and so every engine on this model) read its weights in
    /// `dtype`; the model's own tensors, and any checkpoint written from them, stay as they are.
    pub fn set_decode_dtype(&mut self, dtype: infer::WeightDtype) {
        if dtype != self.decode_dtype {
            self.packed = None;
        }
        self.decode_dtype = dtype;
    }

    pub fn decode_dtype(&self) -> infer::WeightDtype {
        self.decode_dtype
    }

    /// An untracked model whose block matrices are also laid out for the decoding kernels (f32 on
    /// the CPU, or the [`Gpt::set_decode_dtype`] precision with the LM head too; elsewhere the same
    /// as [`Gpt::detached`]). The layout is a copy: a model whose weights change afterwards (PPO's
    /// actor) makes a new one after each update.
    pub fn for_decoding(&self) -> Result<Gpt> {
        let mut m = self.detached();
        // Already converted (set_decode_dtype drops a conversion): share it.
        if self.packed.is_some() {
            m.packed = self.packed.clone();
            return Ok(m);
        }
        if fused::applies(&[&self.wte]) {
            let dt = self.decode_dtype;
            let pack = |w: &Tensor| infer::Packed::with_dtype(w, dt);
            let blocks = m
                .blocks
                .iter()
                .map(|b| {
                    Ok(PackedBlock {
                        attn: pack(&b.attn_w)?,
                        attn_proj: pack(&b.attn_proj_w)?,
                        fc: pack(&b.fc_w)?,
                        fc_proj: pack(&b.fc_proj_w)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let head = match dt {
                infer::WeightDtype::F32 => None,
                _ => Some(pack(&self.wte.t()?.contiguous()?)?),
            };
            m.packed = Some(std::sync::Arc::new(DecodeWeights { blocks, head }));
        }
        Ok(m)
    }

    /// Bytes of weights one decode step reads: the packed matrices and head, else every parameter
    /// in its dtype.
    pub fn decode_weight_bytes(&self) -> usize {
        match &self.packed {
            Some(p) => {
                let blocks: usize = p
                    .blocks
                    .iter()
                    .map(|b| b.attn.bytes() + b.attn_proj.bytes() + b.fc.bytes() + b.fc_proj.bytes())
                    .sum();
                let head = p.head.as_ref().map_or(self.wte.elem_count() * 4, infer::Packed::bytes);
                blocks + head
            }
            None => self.cfg.num_params() * self.dtype().size_in_bytes(),
        }
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// The parameters by name (the tensors themselves, sharing storage with the model).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        m.insert("transformer.wte.weight".into(), self.wte.clone());
        m.insert("transformer.wpe.weight".into(), self.wpe.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            for (suffix, t) in [
                ("ln_1.weight", &b.ln1_w),
                ("ln_1.bias", &b.ln1_b),
                ("attn.c_attn.weight", &b.attn_w),
                ("attn.c_attn.bias", &b.attn_b),
                ("attn.c_proj.weight", &b.attn_proj_w),
                ("attn.c_proj.bias", &b.attn_proj_b),
                ("ln_2.weight", &b.ln2_w),
                ("ln_2.bias", &b.ln2_b),
                ("mlp.c_fc.weight", &b.fc_w),
                ("mlp.c_fc.bias", &b.fc_b),
                ("mlp.c_proj.weight", &b.fc_proj_w),
                ("mlp.c_proj.bias", &b.fc_proj_b),
            ] {
                m.insert(format!("{p}.{suffix}"), t.clone());
            }
        }
        m.insert("transformer.ln_f.weight".into(), self.ln_f_w.clone());
        m.insert("transformer.ln_f.bias".into(), self.ln_f_b.clone());
        m
    }

    /// Checks token ids against the vocabulary and the sequence against the context, so that
    /// bad input is an error naming the problem rather than an out-of-bounds panic.
    pub fn check_input(&self, ids: &[u32], past: usize) -> Result<()> {
        self.check_vocab(ids)?;
        let total = past + ids.len();
        if total > self.cfg.n_positions {
            bail!(
                "sequence of {total} tokens exceeds the model's context of {} tokens",
                self.cfg.n_positions
            );
        }
        Ok(())
    }

    /// Checks token ids against the vocabulary.
    pub fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    /// Final hidden states `[B, T, C]` (after `ln_f`) for token ids `[B, T]` (u32): the whole
    /// sequences at once, as training and scoring need.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2().context("token ids must be a [batch, time] tensor")?;
        ensure!(t > 0, "cannot run the model on an empty sequence");
        ensure!(
            t <= self.cfg.n_positions,
            "sequence of {t} tokens exceeds the model's context of {} tokens",
            self.cfg.n_positions
        );
        let pos = Tensor::arange(0, t as u32, ids.device())?;
        let tok = self
            .wte
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.n_embd))?;
        self.blocks_and_head(tok.broadcast_add(&self.wpe.embedding(&pos)?)?, None)
    }

    /// [`Gpt::forward_hidden`] for rows that pack a prompt and several answers to it: every token
    /// has its own position `pos` `[B, T]` (u32), and `branches` says what it attends to, so each
    /// answer sees the prompt and itself, as if alone. A prompt shared by its answers is computed
    /// once for all of them, forward and backward.
    pub fn forward_hidden_branched(&self, ids: &Tensor, pos: &Tensor, branches: &ops::Branches) -> Result<Tensor> {
        let (b, t) = ids.dims2().context("token ids must be a [batch, time] tensor")?;
        ensure!(t > 0, "cannot run the model on an empty sequence");
        let max_pos = pos.max_all()?.to_scalar::<u32>()? as usize;
        ensure!(
            max_pos < self.cfg.n_positions,
            "position {max_pos} is beyond the model's context of {} tokens",
            self.cfg.n_positions
        );
        let c = self.cfg.n_embd;
        let tok = self.wte.embedding(&ids.flatten_all()?)?.reshape((b, t, c))?;
        let p = self.wpe.embedding(&pos.flatten_all()?)?.reshape((b, t, c))?;
        self.blocks_and_head((tok + p)?, Some(branches))
    }

    fn blocks_and_head(&self, mut x: Tensor, branches: Option<&ops::Branches>) -> Result<Tensor> {
        for block in &self.blocks {
            let a = self.ln(&x, &block.ln1_w, &block.ln1_b)?;
            let qkv = self.linear(&a, &block.attn_w, &block.attn_b)?;
            let y = ops::causal_self_attention(&qkv, self.cfg.n_head, branches)?;
            x = self.block_rest(block, &x, &y)?;
        }
        self.ln(&x, &self.ln_f_w, &self.ln_f_b)
    }

    /// Final hidden states `[N, C]` (after `ln_f`) of a packed batch for the engine: `ids` holds
    /// the new tokens of every segment in order, and segment `i` continues the sequence cached in
    /// its slot, whose keys and values it appends there. Inference only (no backward).
    pub fn forward_packed(&self, ids: &[u32], segs: &[Segment], cache: &mut KvSlots) -> Result<Tensor> {
        ensure!(!ids.is_empty(), "cannot run the model on an empty batch");
        ensure!(
            segs.iter().map(|s| s.len).sum::<usize>() == ids.len(),
            "the segments cover {} tokens but the batch has {}",
            segs.iter().map(|s| s.len).sum::<usize>(),
            ids.len()
        );
        self.check_vocab(ids)?;
        cache.check(segs)?;
        let hidden = match self.halves(ids, segs) {
            // Two halves of the rows through the whole stack, one per core: a decode step's
            // products are too small to share between two threads op by op, where each of the
            // step's many parallel regions would wake a sleeping worker. Rows are independent
            // (each attends to its own slot), so the halves give the whole batch's bits.
            Some(((ids_a, segs_a), (ids_b, segs_b))) => {
                let slots = &*cache;
                let (a, b) = rayon::join(
                    || self.packed_rows(ids_a, segs_a, slots),
                    || self.packed_rows(ids_b, segs_b, slots),
                );
                Tensor::cat(&[a?, b?], 0)?
            }
            None => self.packed_rows(ids, segs, cache)?,
        };
        cache.advance(segs);
        Ok(hidden)
    }

    /// Where [`Gpt::forward_packed`] splits a batch in two: after the segment that brings the
    /// rows nearest half, when the batch runs on the CPU, has enough rows to share (`SPLIT_ROWS`)
    /// and the pool has a second thread.
    #[allow(clippy::type_complexity)]
    fn halves<'i, 's>(
        &self,
        ids: &'i [u32],
        segs: &'s [Segment],
    ) -> Option<((&'i [u32], &'s [Segment]), (&'i [u32], &'s [Segment]))> {
        /// Fewer rows than this run as one batch: splitting them saves less than it costs.
        const SPLIT_ROWS: usize = 4;
        if !self.device().is_cpu() || segs.len() < 2 || ids.len() < SPLIT_ROWS || rayon::current_num_threads() < 2 {
            return None;
        }
        let mut rows = 0;
        let at = segs.iter().position(|s| {
            rows += s.len;
            2 * rows >= ids.len()
        })?;
        let (at, rows) = if at + 1 == segs.len() {
            (at, rows - segs[at].len)
        } else {
            (at + 1, rows)
        };
        (at > 0).then(|| ((&ids[..rows], &segs[..at]), (&ids[rows..], &segs[at..])))
    }

    /// Final hidden states of packed rows whose keys and values go into `cache` (not advanced).
    fn packed_rows(&self, ids: &[u32], segs: &[Segment], cache: &KvSlots) -> Result<Tensor> {
        let device = self.device();
        let pos: Vec<u32> = segs
            .iter()
            .flat_map(|s| (s.past..s.past + s.len).map(|p| p as u32))
            .collect();
        let tok = self.wte.embedding(&Tensor::new(ids, device)?)?;
        let mut x = (tok + self.wpe.embedding(&Tensor::new(pos.as_slice(), device)?)?)?;
        for (layer, bl) in self.blocks.iter().enumerate() {
            let pb = self.packed.as_ref().map(|p| &p.blocks[layer]);
            let lin = |x: &Tensor, w: &Tensor, b: &Tensor, p: Option<&infer::Packed>| -> Result<Tensor> {
                match p {
                    Some(p) => Ok(p.linear(x, b)?),
                    None => Ok(ops::linear(x, w, b)?),
                }
            };
            let a = self.ln(&x, &bl.ln1_w, &bl.ln1_b)?;
            let qkv = lin(&a, &bl.attn_w, &bl.attn_b, pb.map(|p| &p.attn))?;
            let y = self.packed_attention(&qkv, segs, cache.layer(layer))?;
            let x1 = (&x + lin(&y, &bl.attn_proj_w, &bl.attn_proj_b, pb.map(|p| &p.attn_proj))?)?;
            let m = self.ln(&x1, &bl.ln2_w, &bl.ln2_b)?;
            let m = ops::activation(&lin(&m, &bl.fc_w, &bl.fc_b, pb.map(|p| &p.fc))?, self.cfg.activation)?;
            x = (&x1 + lin(&m, &bl.fc_proj_w, &bl.fc_proj_b, pb.map(|p| &p.fc_proj))?)?;
        }
        self.ln(&x, &self.ln_f_w, &self.ln_f_b)
    }

    fn ln(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, w, b, self.cfg.layer_norm_epsilon)?)
    }

    /// The rest of a block after attention `y`: output projection and residual, then the MLP.
    fn block_rest(&self, bl: &Block, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let x = (x + self.linear(y, &bl.attn_proj_w, &bl.attn_proj_b)?)?;
        let m = self.ln(&x, &bl.ln2_w, &bl.ln2_b)?;
        let m = ops::activation(&self.linear(&m, &bl.fc_w, &bl.fc_b)?, self.cfg.activation)?;
        Ok((&x + self.linear(&m, &bl.fc_proj_w, &bl.fc_proj_b)?)?)
    }

    /// A linear layer of the blocks, in the mixed precision when one is set.
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(match self.matmul_dtype {
            Some(dtype) => ops::linear_in(x, w, b, dtype)?,
            None => ops::linear(x, w, b)?,
        })
    }

    /// Logits `[N, V]` of hidden rows `[N, C]` with the product in the mixed precision (f32 result).
    fn mixed_logits(&self, rows: &Tensor, dtype: DType) -> Result<Tensor> {
        let e = self.wte.to_dtype(dtype)?;
        Ok(rows.to_dtype(dtype)?.matmul(&e.t()?)?.to_dtype(rows.dtype())?)
    }

    /// Writes the keys and values of packed `qkv` `[N, 3C]` into the layer's KV buffer `kv` and
    /// attends each token over its own slot, giving `[N, C]`.
    fn packed_attention(&self, qkv: &Tensor, segs: &[Segment], kv: &Tensor) -> Result<Tensor> {
        let h = self.cfg.n_head;
        if fused::applies(&[qkv]) && kv.device().is_cpu() && matches!(kv.dtype(), DType::F32 | DType::F16) {
            kv.inplace_op2(qkv, &infer::WriteKv { segs, n_head: h })?;
            return Ok(qkv.apply_op2_no_bwd(kv, &infer::RaggedAttention { segs, n_head: h })?);
        }
        // Other devices and dtypes: one segment at a time through the composed ops.
        let (c, dh) = (self.cfg.n_embd, self.cfg.head_dim());
        let mut ys = Vec::with_capacity(segs.len());
        let mut at = 0;
        for s in segs {
            let part = qkv.narrow(0, at, s.len)?;
            at += s.len;
            let heads = |i: usize| -> candle_core::Result<Tensor> {
                part.narrow(1, i * c, c)?
                    .reshape((s.len, h, dh))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let (keys, values) = (kv.narrow(0, 0, 1)?.squeeze(0)?, kv.narrow(0, 1, 1)?.squeeze(0)?);
            keys.narrow(0, s.slot, 1)?.slice_set(&k, 2, s.past)?;
            values.narrow(0, s.slot, 1)?.slice_set(&v, 2, s.past)?;
            let total = s.past + s.len;
            let k_all = keys.narrow(0, s.slot, 1)?.narrow(2, 0, total)?;
            let v_all = values.narrow(0, s.slot, 1)?.narrow(2, 0, total)?;
            let y = ops::causal_attention(&q, &k_all, &v_all, s.past)?;
            ys.push(y.squeeze(0)?.transpose(0, 1)?.reshape((s.len, c))?);
        }
        Ok(Tensor::cat(&ys, 0)?)
    }

    /// Logits `[B, T, V]` from hidden states `[B, T, C]` through the tied embedding matrix.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, c) = hidden.dims3()?;
        let logits = ops::matmul_transposed(&hidden.reshape((b * t, c))?, &self.wte)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Log-probabilities `[R]` of `targets` `[R]` (u32) under the logits of hidden-state rows
    /// `[R, C]`, with a backward pass; on f32 CPU tensors the logits are never held whole.
    pub fn head_target_logprobs(&self, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if let Some(dtype) = self.matmul_dtype {
            return Ok(ops::target_logprobs(&self.mixed_logits(rows, dtype)?, targets)?);
        }
        Ok(ops::head_target_logprobs(rows, &self.wte, targets)?)
    }

    /// Logits `[R, V]` of hidden-state rows `[R, C]` with a backward pass, in the model's matmul dtype.
    pub fn head_logits(&self, rows: &Tensor) -> Result<Tensor> {
        match self.matmul_dtype {
            Some(dtype) => self.mixed_logits(rows, dtype),
            None => Ok(ops::matmul_transposed(rows, &self.wte)?),
        }
    }

    /// Logits `[R, V]` of hidden-state rows `[R, C]` (the engine's selected positions), each row
    /// computed the same whatever the others are (the inference kernel, on f32 CPU tensors).
    pub fn lm_head_rows(&self, rows: &Tensor) -> Result<Tensor> {
        if let Some(head) = self.packed.as_ref().and_then(|p| p.head.as_ref()) {
            return Ok(head.product(rows)?);
        }
        if fused::applies(&[rows, &self.wte]) {
            return Ok(infer::times_transposed(rows, &self.wte)?);
        }
        Ok(ops::matmul_transposed(rows, &self.wte)?)
    }

    /// Logits `[B, T, V]` for token ids `[B, T]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids)?;
        self.lm_head(&hidden)
    }

    /// Mean next-token cross-entropy of `targets` `[B, T]` given `inputs` `[B, T]`, optionally
    /// weighted per position by `weights` `[B, T]` (a loss mask).
    pub fn lm_loss(&self, inputs: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(inputs)?;
        let flat_w = weights.map(|w| w.flatten_all()).transpose()?;
        if let Some(dtype) = self.matmul_dtype {
            let logits = self.mixed_logits(&hidden.reshape(((), self.cfg.n_embd))?, dtype)?;
            return Ok(ops::cross_entropy(&logits, &targets.flatten_all()?, flat_w.as_ref())?);
        }
        Ok(ops::head_cross_entropy(
            &hidden.reshape(((), self.cfg.n_embd))?,
            &self.wte,
            &targets.flatten_all()?,
            flat_w.as_ref(),
        )?)
    }

    /// A fresh KV cache of `slots` sequences of up to `capacity` tokens (at most the context).
    /// KV slots for the engine, in the model's dtype or f16 ([`Gpt::set_kv_dtype`]).
    pub fn new_slots(&self, slots: usize, capacity: usize) -> Result<KvSlots> {
        let dtype = if self.kv_f16 && fused::applies(&[&self.wte]) {
            DType::F16
        } else {
            self.dtype()
        };
        KvSlots::new(&self.cfg, slots, capacity, dtype, self.device())
    }

    /// Keeps the engine's keys and values in f16 (half the memory of a KV slot; attention still
    /// computes in f32). Applies on the CPU in f32.
    pub fn set_kv_dtype(&mut self, dtype: super::KvDtype) {
        self.kv_f16 = dtype == super::KvDtype::F16;
    }

    /// Mixed-precision training: `BF16` takes the products of the linear layers and the LM head in
    /// bf16 while weights, LayerNorm, attention, loss and gradients stay f32; the model's own dtype
    /// turns it off. Untracked views ([`Gpt::detached`]) decode in the model's dtype either way.
    pub fn set_matmul_dtype(&mut self, dtype: DType) {
        self.matmul_dtype = (dtype != self.dtype()).then_some(dtype);
    }
}

/// Last-position logits `[B, V]` of a `[B, T, V]` logits tensor.
pub fn last_logits(logits: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?)
}
