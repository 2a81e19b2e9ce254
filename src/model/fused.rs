//! Fused CPU kernels (f32) as candle custom ops. Training, each with its own backward: linear
//! layers with their bias, LayerNorm, GELU-tanh, causal self-attention from the fused `qkv`
//! projection, the masked softmax of cached attention, cross-entropy, and the LM head fused with
//! cross-entropy. Decoding (no gradient): vector-matrix products, the LM head as dot products,
//! and attention of new tokens over the KV cache.
//!
//! Written by hand because candle composes each of these from many single-threaded elementwise
//! ops (every one allocating a tensor that the autograd graph then keeps alive), and no
//! maintained crate provides them as candle ops. Each kernel makes one or two passes over its
//! data, splits rows across rayon's threads, and keeps its inner loops free of branches and
//! library calls so that they vectorise. `ops.rs` dispatches here for f32 tensors on the CPU and
//! keeps the composed versions for other devices and dtypes, which the tests compare against.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

/// Runs `f` on one of rayon's worker threads and returns its result. A kernel called from any other
/// thread hands its work to the pool and sleeps until a worker has done it: at least two thread
/// wake-ups per op, which on a small model (decoding, above all) cost more than the op itself. From
/// a worker, a one-task op runs inline and the rest are shared by work stealing. The results are
/// bit-identical either way; docs/tuning-history.md has the measured difference.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Rows handed to one rayon task at a time: enough work to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Whether the fused kernels apply: every tensor f32 and on the CPU.
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: the fused kernel takes f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: the fused kernel takes contiguous tensors"),
    }
}

/// Runs `f` on the f32 contents of a CPU tensor (made contiguous first if needed).
pub(super) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: the fused kernel runs on the CPU only")
    };
    f(f32_slice(cpu, layout, op)?)
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` to about 2 ulp, branch-free so that loops calling it vectorise (libm's `expf` is an
/// opaque call): range reduction by ln 2, then a degree-7 Taylor polynomial on [-ln2/2, ln2/2].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest through the float adder (1.5 * 2^23), which vectorises where `round` does not.
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Sum with eight independent accumulators (a plain fold is one serial dependency chain).
#[inline(always)]
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

#[inline(always)]
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Attention scores to softmax weights, unnormalised: `p[j] = e^(p[j] - max p)`; returns the factor
/// `1 / sum p` that normalises them (the attention kernels fold it into the weighted sum).
#[inline(always)]
pub(super) fn exp_weights(p: &mut [f32]) -> f32 {
    let m = max(p);
    p.iter_mut().for_each(|x| *x = exp(*x - m));
    1.0 / sum(p)
}

/// `sum(e^(x - m))` over a row.
#[inline(always)]
fn sum_exp(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += exp(c[i] - m);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - m)).sum::<f32>()
}

// ---------------------------------------------------------------------------------------------
// Matrix products through `gemm`, the crate behind candle's own CPU matmul

/// A strided matrix inside a buffer: element `(i, j)` sits at `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
struct Mat {
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// A contiguous row-major `rows x cols` matrix starting at `off`.
    fn dense(off: usize, rows: usize, cols: usize) -> Self {
        Self {
            off,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Rows of `cols` values every `rs` elements (a column block of a wider matrix).
    fn block(off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            off,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// One past the last element the matrix touches.
    fn end(&self) -> usize {
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// A raw pointer that rayon tasks may share because each writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32, pub(super) usize);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Writes `v` at element `i`.
    ///
    /// # Safety
    /// `i` is below the buffer's length and no other thread touches element `i` meanwhile.
    pub(super) unsafe fn write(&self, i: usize, v: f32) {
        debug_assert!(i < self.1);
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(i) = v }
    }

    /// Elements `start..start + len` as a slice.
    ///
    /// # Safety
    /// The range is within the buffer and no other thread touches it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [f32] {
        debug_assert!(start + len <= self.1);
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// `dst = a b`, or `dst += a b` with `accumulate`.
///
/// # Safety
/// `dst.0` must be valid for `dst.1` elements, no other thread may touch the elements `d`
/// covers during the call, and those elements must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_shared(
    dst: SharedMut,
    d: Mat,
    a: &[f32],
    am: Mat,
    b: &[f32],
    bm: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(
        d.rows == am.rows && d.cols == bm.cols && am.cols == bm.rows,
        "gemm shapes: {d:?} = {am:?} x {bm:?}"
    );
    assert!(
        d.end() <= dst.1 && am.end() <= a.len() && bm.end() <= b.len(),
        "gemm bounds"
    );
    // SAFETY: every index is in bounds (checked above); exclusivity is the caller's promise.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            am.cols,
            dst.0.add(d.off),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            a.as_ptr().add(am.off),
            am.cs as isize,
            am.rs as isize,
            b.as_ptr().add(bm.off),
            bm.cs as isize,
            bm.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst = a b`, or `dst += a b` with `accumulate`, into a buffer this thread owns.
#[allow(clippy::too_many_arguments)]
fn gemm_into(dst: &mut [f32], d: Mat, a: &[f32], am: Mat, b: &[f32], bm: Mat, accumulate: bool, par: Parallelism) {
    // SAFETY: `dst` is borrowed mutably, so no one else touches it and it cannot alias `a`, `b`.
    unsafe { gemm_shared(SharedMut(dst.as_mut_ptr(), dst.len()), d, a, am, b, bm, accumulate, par) }
}

/// Spread one large product over rayon's threads.
fn all_threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Up to this many rows (decoding), a product with a weight matrix streams the matrix once per
/// row instead of calling `gemm`, which packs the whole matrix first and is several times slower
/// for a single row.
const GEMV_ROWS: usize = 4;

/// Rows of `W` per rayon task in [`vec_mat`]: each task streams a contiguous slab of the
/// matrix (which the hardware prefetcher follows best) into its own partial sum.
const GEMV_SLAB: usize = 64;

/// Output rows of the LM head per rayon task.
const HEAD_ROWS: usize = 256;

/// Compiles `$body` (a closure-free block over its arguments) once for AVX-512, once for AVX2
/// and once for the baseline, and picks one at run time: the crate is built for baseline
/// x86-64, where these memory-bound loops would otherwise use 4-wide SSE.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has just been checked for the enabled features.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(super) use multiversion;

multiversion! {
    fn axpy_rows(acc: &mut [f32], x: &[f32], w: &[f32]) {
        let n = acc.len();
        // Four rows of `w` per pass over `acc`, so the accumulator is loaded and stored a
        // quarter as often as the matrix is read.
        let (x4, x1) = x.split_at(x.len() / 4 * 4);
        let (w4, w1) = w.split_at(x4.len() * n);
        for (xs, ws) in x4.chunks_exact(4).zip(w4.chunks_exact(4 * n)) {
            let (w0, rest) = ws.split_at(n);
            let (w1, rest) = rest.split_at(n);
            let (w2, w3) = rest.split_at(n);
            for j in 0..n {
                acc[j] += xs[0] * w0[j] + xs[1] * w1[j] + xs[2] * w2[j] + xs[3] * w3[j];
            }
        }
        for (&xk, wk) in x1.iter().zip(w1.chunks_exact(n)) {
            for (a, &w) in acc.iter_mut().zip(wk) {
                *a += xk * w;
            }
        }
    }
}

multiversion! {
    fn dot_rows(y: &mut [f32], x: &[f32], e: &[f32]) {
        for (y, e) in y.iter_mut().zip(e.chunks_exact(x.len())) {
            *y = dot(x, e);
        }
    }
}

/// `y = x W + b` for one row `x` `[K]` and `W` `[K, N]`: slabs of rows of `W` are summed in
/// parallel into per-task partial rows, which are then added up.
fn vec_mat(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32]) {
    let n = y.len();
    let parts: Vec<Vec<f32>> = x
        .par_chunks(GEMV_SLAB)
        .zip(w.par_chunks(GEMV_SLAB * n))
        .map(|(x, w)| {
            let mut acc = vec![0f32; n];
            axpy_rows(&mut acc, x, w);
            acc
        })
        .collect();
    let partial = ordered_sum(parts, n);
    for ((y, p), b) in y.iter_mut().zip(partial).zip(b) {
        *y = p + b;
    }
}

/// `x E^T` for a few rows `x` `[R, C]` and `E` `[V, C]` (the tied LM head while decoding): one
/// dot product per output, rows of `E` split across threads.
pub fn few_rows_times_transposed(x: &Tensor, e: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    let (v, c2) = e.dims2()?;
    if c != c2 {
        bail!("few_rows_times_transposed: widths {c} and {c2} differ");
    }
    let mut y = vec![0f32; r * v];
    with_f32(x, "lm-head", |xs| {
        with_f32(e, "lm-head", |es| {
            for (y, x) in y.chunks_exact_mut(v).zip(xs.chunks_exact(c)) {
                y.par_chunks_mut(HEAD_ROWS)
                    .zip(es.par_chunks(HEAD_ROWS * c))
                    .for_each(|(y, e)| dot_rows(y, x, e));
            }
            Ok(())
        })
    })?;
    Tensor::from_vec(y, (r, v), x.device())
}

/// Whether a product with `rows` rows takes the vector-matrix route.
pub fn is_few_rows(rows: usize) -> bool {
    rows <= GEMV_ROWS
}

/// Column sums of a row-major `[rows, n]` matrix (the gradient of a bias).
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = g
        .par_chunks(n * rows_per_task(n))
        .map(|rows| {
            let mut acc = vec![0f32; n];
            for r in rows.chunks_exact(n) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    ordered_sum(parts, n)
}

/// Adds per-chunk partial sums in chunk order. Reductions go through this rather than rayon's
/// `fold`/`reduce`, whose grouping depends on how the work was split at run time: float addition is
/// not associative, so that would make training results depend on machine load.
fn ordered_sum(parts: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    parts.into_iter().fold(vec![0f32; n], |mut a, b| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        a
    })
}

// ---------------------------------------------------------------------------------------------
// Linear layer

/// `x W + b` for `x` `[.., K]`, `W` `[K, N]` (Hugging Face `Conv1D` layout) and `b` `[N]`, as one
/// graph node: candle would keep the matmul output and the broadcast sum as two tensors.
struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, self.name())?;
        let w = f32_slice(sw, lw, self.name())?;
        let b = f32_slice(sb, lb, self.name())?;
        let (k, n) = lw.shape().dims2()?;
        if lx.dims().last() != Some(&k) || b.len() != n {
            bail!(
                "{}: x {:?}, weight {:?} and bias {:?} do not fit",
                self.name(),
                lx.dims(),
                lw.dims(),
                lb.dims()
            );
        }
        let rows = x.len() / k;
        let mut y = vec![0f32; rows * n];
        if rows <= GEMV_ROWS {
            for (y, x) in y.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
                vec_mat(y, x, w, b);
            }
        } else {
            y.par_chunks_mut(n).for_each(|r| r.copy_from_slice(b));
            gemm_into(
                &mut y,
                Mat::dense(0, rows, n),
                x,
                Mat::dense(0, rows, k),
                w,
                Mat::dense(0, k, n),
                true,
                all_threads(),
            );
        }
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, n) = w.dims2()?;
        let (dx, dw, db) = with_f32(x, self.name(), |xs| {
            with_f32(w, self.name(), |ws| {
                with_f32(grad, self.name(), |g| {
                    let rows = xs.len() / k;
                    let mut dx = vec![0f32; rows * k];
                    gemm_into(
                        &mut dx,
                        Mat::dense(0, rows, k),
                        g,
                        Mat::dense(0, rows, n),
                        ws,
                        Mat::dense(0, k, n).t(),
                        false,
                        all_threads(),
                    );
                    let mut dw = vec![0f32; k * n];
                    gemm_into(
                        &mut dw,
                        Mat::dense(0, k, n),
                        xs,
                        Mat::dense(0, rows, k).t(),
                        g,
                        Mat::dense(0, rows, n),
                        false,
                        all_threads(),
                    );
                    Ok((dx, dw, column_sums(g, n)))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, (k, n), dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// `x W + b` of f32 CPU tensors, with backward.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention

/// Causal multi-head self-attention from the fused projection `qkv` `[B, T, 3C]` (queries, keys,
/// values side by side, heads within each) to the merged heads `[B, T, C]`, one (batch, head)
/// pair per rayon task. Scores and probabilities live in a per-task `T x T` scratch buffer; only
/// each row's log-sum-exp is kept, and the backward pass recomputes the probabilities from it.
///
/// With `branches`, a row holds a prompt followed by several answers to it, each answer seeing the
/// prompt and itself but not the other answers ([`Branches`]).
struct CausalSelfAttention {
    n_head: usize,
    branches: Option<Branches>,
    lse: Mutex<Vec<f32>>,
}

/// Which keys each query of a `[B, T]` batch sees, beyond plain causality: query `(b, i)` sees keys
/// `0..prefix` and `start..=i` for its `(prefix, start)` entry (plain causal is `(0, 0)`). A row
/// that packs a prompt of `P` tokens and answers after it gives the prompt's tokens `(0, 0)` and
/// an answer starting at `s` the entry `(P, s)`, so each answer attends to the prompt and to its own
/// earlier tokens: the prompt is computed once for all its answers, with the same results as each
/// prompt and answer alone.
#[derive(Debug, Clone)]
pub struct Branches(pub std::sync::Arc<Vec<(u32, u32)>>);

impl Branches {
    /// The visible ranges of query `i` of row `b` in a batch of `t` positions.
    fn of(&self, b: usize, t: usize, i: usize) -> (usize, usize) {
        let (p, s) = self.0[b * t + i];
        (p as usize, s as usize)
    }
}

/// Softmax over the visible entries `0..prefix` and `start..=i` of a score row (scaled by `scale`),
/// the rest of the row set to 0; returns its log-sum-exp.
fn visible_softmax(row: &mut [f32], i: usize, (prefix, start): (usize, usize), scale: f32) -> f32 {
    let (vis, hidden) = row.split_at_mut(i + 1);
    hidden.fill(0.0);
    if start <= prefix {
        let m = max(vis) * scale;
        for x in vis.iter_mut() {
            *x = exp(*x * scale - m);
        }
        let total = sum(vis);
        let inv = 1.0 / total;
        vis.iter_mut().for_each(|x| *x *= inv);
        return m + total.ln();
    }
    let (head, rest) = vis.split_at_mut(prefix);
    let (gap, own) = rest.split_at_mut(start - prefix);
    gap.fill(0.0);
    let m = max(head).max(max(own)) * scale;
    for x in head.iter_mut().chain(own.iter_mut()) {
        *x = exp(*x * scale - m);
    }
    let total = sum(head) + sum(own);
    let inv = 1.0 / total;
    head.iter_mut().chain(own.iter_mut()).for_each(|x| *x *= inv);
    m + total.ln()
}

/// Shapes of one attention call: batch, time, width, heads, head width, 1/sqrt(head width).
struct AttnDims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    dh: usize,
    scale: f32,
}

impl AttnDims {
    fn new(dims: &[usize], n_head: usize) -> Result<Self> {
        let [b, t, c3] = dims else {
            bail!("fused attention: qkv must be [B, T, 3C], got {dims:?}")
        };
        let c = c3 / 3;
        if c3 % 3 != 0 || n_head == 0 || c % n_head != 0 {
            bail!("fused attention: width {c3} is not 3 x a multiple of {n_head} heads");
        }
        let dh = c / n_head;
        Ok(Self {
            b: *b,
            t: *t,
            c,
            h: n_head,
            dh,
            scale: 1.0 / (dh as f32).sqrt(),
        })
    }

    /// Query, key and value of (batch `bi`, head `hi`) inside `qkv`.
    fn qkv(&self, bi: usize, hi: usize) -> [Mat; 3] {
        let base = bi * self.t * 3 * self.c + hi * self.dh;
        [0, 1, 2].map(|i| Mat::block(base + i * self.c, self.t, self.dh, 3 * self.c))
    }

    /// Head `hi` of batch `bi` in a merged `[B, T, C]` tensor.
    fn merged(&self, bi: usize, hi: usize) -> Mat {
        Mat::block(bi * self.t * self.c + hi * self.dh, self.t, self.dh, self.c)
    }
}

impl CustomOp1 for CausalSelfAttention {
    fn name(&self) -> &'static str {
        "fused-causal-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, self.name())?;
        let d = AttnDims::new(l.dims(), self.n_head)?;
        let t = d.t;
        let mut y = vec![0f32; d.b * t * d.c];
        let out = SharedMut(y.as_mut_ptr(), y.len());
        let mut lse = vec![0f32; d.b * d.h * t];
        let sq = Mat::dense(0, t, t);
        lse.par_chunks_mut(t).enumerate().for_each_init(
            || vec![0f32; t * t],
            |p, (bh, lse)| {
                let (bi, hi) = (bh / d.h, bh % d.h);
                let [q, k, v] = d.qkv(bi, hi);
                gemm_into(p, sq, qkv, q, qkv, k.t(), false, Parallelism::None);
                for (i, (row, lse)) in p.chunks_exact_mut(t).zip(lse).enumerate() {
                    let vis = self.branches.as_ref().map_or((0, 0), |b| b.of(bi, t, i));
                    *lse = visible_softmax(row, i, vis, d.scale);
                }
                // SAFETY: each task writes only its own (batch, head) column block of `y`.
                unsafe { gemm_shared(out, d.merged(bi, hi), p, sq, qkv, v, false, Parallelism::None) };
            },
        );
        *self.lse.lock().expect("poisoned") = lse;
        Ok((CpuStorage::F32(y), Shape::from((d.b, t, d.c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let lse = self.lse.lock().expect("poisoned");
        let d = AttnDims::new(arg.dims(), self.n_head)?;
        let t = d.t;
        let sq = Mat::dense(0, t, t);
        let dqkv = with_f32(arg, self.name(), |qkv| {
            with_f32(grad, self.name(), |dy| {
                let mut dqkv = vec![0f32; qkv.len()];
                let out = SharedMut(dqkv.as_mut_ptr(), dqkv.len());
                lse.par_chunks(t).enumerate().for_each_init(
                    || (vec![0f32; t * t], vec![0f32; t * t]),
                    |(p, dp), (bh, lse)| {
                        let (bi, hi) = (bh / d.h, bh % d.h);
                        let [q, k, v] = d.qkv(bi, hi);
                        let dyh = d.merged(bi, hi);
                        let [dq, dk, dv] = d.qkv(bi, hi);
                        // Probabilities again from the scores and the saved log-sum-exp.
                        gemm_into(p, sq, qkv, q, qkv, k.t(), false, Parallelism::None);
                        for (i, (row, &lse)) in p.chunks_exact_mut(t).zip(lse).enumerate() {
                            let (vis, hidden) = row.split_at_mut(i + 1);
                            vis.iter_mut().for_each(|x| *x = exp(*x * d.scale - lse));
                            hidden.fill(0.0);
                            if let Some(b) = &self.branches {
                                let (prefix, start) = b.of(bi, t, i);
                                if start > prefix {
                                    row[prefix..start].fill(0.0);
                                }
                            }
                        }
                        // SAFETY (all three): each task writes only its own (batch, head)
                        // column blocks of `dqkv`, which are disjoint from every other task's.
                        unsafe { gemm_shared(out, dv, p, sq.t(), dy, dyh, false, Parallelism::None) };
                        gemm_into(dp, sq, dy, dyh, qkv, v.t(), false, Parallelism::None);
                        // dS = P * (dP - rowsum(P * dP)) * scale, in place of dP.
                        for (i, (prow, drow)) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)).enumerate() {
                            let n = i + 1;
                            let dd = dot(&prow[..n], &drow[..n]);
                            for j in 0..n {
                                drow[j] = prow[j] * (drow[j] - dd) * d.scale;
                            }
                            drow[n..].fill(0.0);
                        }
                        unsafe { gemm_shared(out, dq, dp, sq, qkv, k, false, Parallelism::None) };
                        unsafe { gemm_shared(out, dk, dp, sq.t(), qkv, q, false, Parallelism::None) };
                    },
                );
                Ok(dqkv)
            })
        })?;
        Ok(Some(Tensor::from_vec(dqkv, arg.shape(), arg.device())?))
    }
}

/// Causal self-attention of an f32 CPU `qkv` `[B, T, 3C]` with `n_head` heads, giving the
/// merged heads `[B, T, C]`, with backward; `branches` narrows what each query sees.
pub fn causal_self_attention(qkv: &Tensor, n_head: usize, branches: Option<&Branches>) -> Result<Tensor> {
    if let Some(b) = branches {
        let (bt, t) = (qkv.dim(0)? * qkv.dim(1)?, qkv.dim(1)?);
        if b.0.len() != bt || b.0.iter().enumerate().any(|(n, &(p, s))| s as usize > n % t || p > s) {
            bail!(
                "fused attention: the branches do not describe a [{}, {t}] batch",
                qkv.dim(0)?
            );
        }
    }
    qkv.contiguous()?.apply_op1(CausalSelfAttention {
        n_head,
        branches: branches.cloned(),
        lse: Mutex::new(Vec::new()),
    })
}

// ---------------------------------------------------------------------------------------------
// GELU, tanh approximation

const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_C: f32 = 0.044_715;

/// GELU-tanh written as `x * sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, which equals
/// `0.5 x (1 + tanh u)` and stays accurate for large |x| of either sign.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16_384).zip(x.par_chunks(16_384)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                let u = GELU_K * (x + GELU_C * x * x * x);
                *y = x / (1.0 + exp(-2.0 * u));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(arg, self.name(), |x| {
            with_f32(grad, self.name(), |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(16_384)
                    .zip(x.par_chunks(16_384).zip(g.par_chunks(16_384)))
                    .for_each(|(dx, (x, g))| {
                        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                            let u = GELU_K * (x + GELU_C * x * x * x);
                            let s = 1.0 / (1.0 + exp(-2.0 * u));
                            let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
                            *dx = g * (s + 2.0 * x * s * (1.0 - s) * du);
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// GELU-tanh of an f32 CPU tensor, with backward.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last dimension. The forward pass keeps each row's mean and 1/std so the
/// backward pass needs only `x` (which the graph holds anyway) and no normalised copy.
struct LayerNorm {
    eps: f32,
    stats: Mutex<Vec<(f32, f32)>>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, self.name())?;
        let w = f32_slice(sw, lw, self.name())?;
        let b = f32_slice(sb, lb, self.name())?;
        let c = w.len();
        if b.len() != c || lx.dims().last() != Some(&c) {
            bail!("{}: weight and bias must match the last dimension", self.name());
        }
        let rows = x.len() / c;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![(0f32, 0f32); rows];
        let per = rows_per_task(c);
        y.par_chunks_mut(c * per)
            .zip(x.par_chunks(c * per))
            .zip(stats.par_chunks_mut(per))
            .for_each(|((y, x), st)| {
                for ((y, x), st) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(st) {
                    let mean = sum(x) / c as f32;
                    let mut acc = [0f32; 8];
                    let chunks = x.chunks_exact(8);
                    let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
                    for ch in chunks {
                        for i in 0..8 {
                            acc[i] += (ch[i] - mean) * (ch[i] - mean);
                        }
                    }
                    let var = (acc.iter().sum::<f32>() + rest) / c as f32;
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for i in 0..c {
                        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                    }
                    *st = (mean, rstd);
                }
            });
        *self.stats.lock().expect("poisoned") = stats;
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("poisoned");
        let c = w.elem_count();
        let (dx, dw, db) = with_f32(x, self.name(), |x| {
            with_f32(w, self.name(), |w| {
                with_f32(grad, self.name(), |g| {
                    let per = rows_per_task(c);
                    let mut dx = vec![0f32; x.len()];
                    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(c * per)
                        .zip(x.par_chunks(c * per).zip(g.par_chunks(c * per)))
                        .zip(stats.par_chunks(per))
                        .map(|((dx, (x, g)), st)| {
                            let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                            let rows = dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(g.chunks_exact(c));
                            for (((dx, x), g), &(mean, rstd)) in rows.zip(st) {
                                // dx = rstd (g w - mean(g w) - xhat mean(g w xhat))
                                let mut a = [0f32; 2];
                                for i in 0..c {
                                    let xhat = (x[i] - mean) * rstd;
                                    let gw = g[i] * w[i];
                                    a[0] += gw;
                                    a[1] += gw * xhat;
                                    dw[i] += g[i] * xhat;
                                    db[i] += g[i];
                                }
                                let (m1, m2) = (a[0] / c as f32, a[1] / c as f32);
                                for i in 0..c {
                                    let xhat = (x[i] - mean) * rstd;
                                    dx[i] = rstd * (g[i] * w[i] - m1 - xhat * m2);
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let (dws, dbs): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
                    let (dw, db) = (ordered_sum(dws, c), ordered_sum(dbs, c));
                    Ok((dx, dw, db))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// LayerNorm of f32 CPU tensors over the last dimension, with backward.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNorm {
        eps: eps as f32,
        stats: Mutex::new(Vec::new()),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------------
// Causal softmax of attention scores

/// `softmax(scale * s + causal mask)` over the last dimension of scores `[.., Tq, Tk]`, where
/// query `i` sees keys `0..=past + i`. The mask is never materialised; masked entries are 0.
struct CausalSoftmax {
    scale: f32,
    past: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.dims();
        let (tq, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if self.past + tq != tk {
            bail!(
                "{}: {tq} queries after {} cached keys need {} keys, got {tk}",
                self.name(),
                self.past,
                self.past + tq
            );
        }
        let mut y = vec![0f32; x.len()];
        let per = rows_per_task(tk);
        y.par_chunks_mut(tk * per)
            .zip(x.par_chunks(tk * per))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (r, (y, x)) in y.chunks_exact_mut(tk).zip(x.chunks_exact(tk)).enumerate() {
                    let visible = self.past + (task * per + r) % tq + 1;
                    let (y, x) = (&mut y[..visible], &x[..visible]);
                    let m = max(x) * self.scale;
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = exp(x * self.scale - m);
                    }
                    let inv = 1.0 / sum(y);
                    y.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let tk = arg.dim(candle_core::D::Minus1)?;
        let dx = with_f32(res, self.name(), |y| {
            with_f32(grad, self.name(), |g| {
                let mut dx = vec![0f32; y.len()];
                let per = rows_per_task(tk);
                dx.par_chunks_mut(tk * per)
                    .zip(y.par_chunks(tk * per).zip(g.par_chunks(tk * per)))
                    .for_each(|(dx, (y, g))| {
                        for ((dx, y), g) in dx.chunks_exact_mut(tk).zip(y.chunks_exact(tk)).zip(g.chunks_exact(tk)) {
                            let d = dot(y, g);
                            for i in 0..tk {
                                dx[i] = self.scale * y[i] * (g[i] - d);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Causal attention `softmax(q k^T / sqrt(Dh) + mask) v` for `q` `[B, H, Tq, Dh]` and `k`, `v`
/// `[B, H, past + Tq, Dh]`: candle matmuls around the fused masked softmax.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
    let dh = q.dim(candle_core::D::Minus1)?;
    let scores = q.matmul(&k.t()?)?;
    let p = scores.apply_op1(CausalSoftmax {
        scale: 1.0 / (dh as f32).sqrt(),
        past,
    })?;
    p.matmul(v)
}

/// Attention of a few new queries `q` `[B, H, t, Dh]` over `past + t` cached keys and values
/// (views `[B, H, past + t, Dh]` into the preallocated cache, read through their strides): dot
/// products, masked softmax and weighted sum per (batch, head, query), no intermediate tensors.
/// Inference only: its backward is candle's "not supported" error, never a silent zero.
struct DecodeAttention {
    past: usize,
}

/// Element offset of `[b, h, i, 0]` in a rank-4 layout.
fn offset4(l: &Layout, b: usize, h: usize, i: usize) -> usize {
    let s = l.stride();
    l.start_offset() + b * s[0] + h * s[1] + i * s[2]
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "fused-decode-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (sq, sk, sv) else {
            bail!("{}: f32 tensors only", self.name())
        };
        let (b, h, t, dh) = lq.shape().dims4()?;
        let total = self.past + t;
        if lk.dims() != [b, h, total, dh] || lv.dims() != [b, h, total, dh] {
            bail!(
                "{}: keys {:?} / values {:?} do not fit queries {:?} after {} cached",
                self.name(),
                lk.dims(),
                lv.dims(),
                lq.dims(),
                self.past
            );
        }
        if [lq, lk, lv].iter().any(|l| l.stride()[3] != 1) {
            bail!("{}: the head dimension must be contiguous", self.name());
        }
        let scale = 1.0 / (dh as f32).sqrt();
        let mut y = vec![0f32; b * h * t * dh];
        y.par_chunks_mut(t * dh).enumerate().for_each_init(
            || vec![0f32; total],
            |p, (bh, y)| {
                let (bi, hi) = (bh / h, bh % h);
                for (i, y) in y.chunks_exact_mut(dh).enumerate() {
                    let qo = offset4(lq, bi, hi, i);
                    let qi = &q[qo..qo + dh];
                    let vis = self.past + i + 1;
                    let p = &mut p[..vis];
                    for (j, p) in p.iter_mut().enumerate() {
                        let ko = offset4(lk, bi, hi, j);
                        *p = dot(qi, &k[ko..ko + dh]) * scale;
                    }
                    let inv = exp_weights(p);
                    y.fill(0.0);
                    for (j, &pj) in p.iter().enumerate() {
                        let vo = offset4(lv, bi, hi, j);
                        let w = pj * inv;
                        for (y, &v) in y.iter_mut().zip(&v[vo..vo + dh]) {
                            *y += w * v;
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), lq.shape().clone()))
    }
}

/// Attention of `q` `[B, H, t, Dh]` (f32, CPU, few queries, no gradient) over cached keys and
/// values `[B, H, past + t, Dh]`, which may be strided views.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> Result<Tensor> {
    q.contiguous()?.apply_op3(k, v, DecodeAttention { past })
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Per-row cross-entropy `logsumexp(logits) - logits[target]` of logits `[N, V]` against u32
/// targets `[N]`. The forward pass keeps each row's log-sum-exp, so the backward pass writes
/// `softmax - onehot` in a single pass without a stored probability tensor.
struct CrossEntropy {
    lse: Mutex<Vec<f32>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, sl: &CpuStorage, ll: &Layout, st: &CpuStorage, lt: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = f32_slice(sl, ll, self.name())?;
        let CpuStorage::U32(t) = st else {
            bail!("{}: targets must be u32", self.name())
        };
        let Some((a, b)) = lt.contiguous_offsets() else {
            bail!("{}: targets must be contiguous", self.name())
        };
        let targets = &t[a..b];
        let (n, v) = ll.shape().dims2()?;
        if targets.len() != n {
            bail!("{}: {} targets for {n} rows", self.name(), targets.len());
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            bail!("{}: target {bad} is outside the {v} classes", self.name());
        }
        let mut lse = vec![0f32; n];
        let mut loss = vec![0f32; n];
        lse.par_iter_mut()
            .zip(loss.par_iter_mut())
            .zip(logits.par_chunks(v).zip(targets.par_iter()))
            .for_each(|((lse, loss), (row, &t))| {
                let m = max(row);
                *lse = m + sum_exp(row, m).ln();
                *loss = *lse - row[t as usize];
            });
        *self.lse.lock().expect("poisoned") = lse;
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().expect("poisoned");
        let targets = targets.to_vec1::<u32>()?;
        let g = grad.to_vec1::<f32>()?;
        let v = logits.dim(1)?;
        let d = with_f32(logits, self.name(), |x| {
            let mut d = vec![0f32; x.len()];
            d.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(lse.par_iter().zip(g.par_iter().zip(targets.par_iter())))
                .for_each(|((d, x), (&lse, (&g, &t)))| {
                    for (d, &x) in d.iter_mut().zip(x) {
                        *d = g * exp(x - lse);
                    }
                    d[t as usize] -= g;
                });
            Ok(d)
        })?;
        Ok((Some(Tensor::from_vec(d, logits.shape(), logits.device())?), None))
    }
}

/// Per-row cross-entropy `[N]` of f32 CPU logits `[N, V]` against u32 targets `[N]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        CrossEntropy {
            lse: Mutex::new(Vec::new()),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// LM head fused with cross-entropy

/// Rows of logits computed at a time by [`HeadCrossEntropy`]: large enough for efficient
/// products, small enough that the full `[N, V]` logits never exist.
const HEAD_CHUNK: usize = 512;

/// Per-row cross-entropy of the logits `h E^T` (hidden `[N, C]`, tied embedding `E` `[V, C]`)
/// against u32 targets `[N]`, computed a chunk of rows at a time. The backward pass recomputes
/// each chunk's logits, turns them into `softmax - onehot` in place, and accumulates both
/// gradients from it, so neither the logits nor their gradient is ever held whole.
struct HeadCrossEntropy {
    lse: Mutex<Vec<f32>>,
}

impl HeadCrossEntropy {
    fn targets<'a>(s: &'a CpuStorage, l: &Layout, n: usize, v: usize) -> Result<&'a [u32]> {
        let (CpuStorage::U32(t), Some((a, b))) = (s, l.contiguous_offsets()) else {
            bail!("fused head cross-entropy: targets must be contiguous u32")
        };
        let t = &t[a..b];
        if t.len() != n {
            bail!("fused head cross-entropy: {} targets for {n} rows", t.len());
        }
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= v) {
            bail!("fused head cross-entropy: target {bad} is outside the {v} classes");
        }
        Ok(t)
    }

    /// Logits of rows `r0..r0 + rows` into `buf`.
    fn logits(buf: &mut [f32], h: &[f32], e: &[f32], r0: usize, rows: usize, c: usize, v: usize) {
        gemm_into(
            buf,
            Mat::dense(0, rows, v),
            h,
            Mat::dense(r0 * c, rows, c),
            e,
            Mat::dense(0, v, c).t(),
            false,
            all_threads(),
        );
    }
}

impl CustomOp3 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sh: &CpuStorage,
        lh: &Layout,
        se: &CpuStorage,
        le: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(sh, lh, self.name())?;
        let e = f32_slice(se, le, self.name())?;
        let (n, c) = lh.shape().dims2()?;
        let (v, c2) = le.shape().dims2()?;
        if c != c2 {
            bail!("{}: hidden width {c} but embedding width {c2}", self.name());
        }
        let targets = Self::targets(st, lt, n, v)?;
        let mut lse = vec![0f32; n];
        let mut loss = vec![0f32; n];
        let mut buf = vec![0f32; HEAD_CHUNK.min(n) * v];
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            Self::logits(&mut buf, h, e, r0, rows, c, v);
            buf[..rows * v]
                .par_chunks(v)
                .zip(lse[r0..r0 + rows].par_iter_mut())
                .zip(loss[r0..r0 + rows].par_iter_mut().zip(&targets[r0..r0 + rows]))
                .for_each(|((x, lse), (loss, &t))| {
                    let m = max(x);
                    *lse = m + sum_exp(x, m).ln();
                    *loss = *lse - x[t as usize];
                });
        }
        *self.lse.lock().expect("poisoned") = lse;
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        emb: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().expect("poisoned");
        let (n, c) = hidden.dims2()?;
        let v = emb.dim(0)?;
        let targets = targets.to_vec1::<u32>()?;
        let g = grad.to_vec1::<f32>()?;
        let (dh, de) = with_f32(hidden, self.name(), |h| {
            with_f32(emb, self.name(), |e| {
                let mut dh = vec![0f32; n * c];
                let mut de = vec![0f32; v * c];
                let mut buf = vec![0f32; HEAD_CHUNK.min(n) * v];
                for r0 in (0..n).step_by(HEAD_CHUNK) {
                    let rows = HEAD_CHUNK.min(n - r0);
                    Self::logits(&mut buf, h, e, r0, rows, c, v);
                    buf[..rows * v]
                        .par_chunks_mut(v)
                        .zip(lse[r0..r0 + rows].par_iter())
                        .zip(g[r0..r0 + rows].par_iter().zip(&targets[r0..r0 + rows]))
                        .for_each(|((d, &lse), (&g, &t))| {
                            for x in d.iter_mut() {
                                *x = g * exp(*x - lse);
                            }
                            d[t as usize] -= g;
                        });
                    let d = Mat::dense(0, rows, v);
                    gemm_into(
                        &mut dh,
                        Mat::dense(r0 * c, rows, c),
                        &buf,
                        d,
                        e,
                        Mat::dense(0, v, c),
                        false,
                        all_threads(),
                    );
                    gemm_into(
                        &mut de,
                        Mat::dense(0, v, c),
                        &buf,
                        d.t(),
                        h,
                        Mat::dense(r0 * c, rows, c),
                        r0 > 0,
                        all_threads(),
                    );
                }
                Ok((dh, de))
            })
        })?;
        let dev = hidden.device();
        Ok((
            Some(Tensor::from_vec(dh, (n, c), dev)?),
            Some(Tensor::from_vec(de, (v, c), dev)?),
            None,
        ))
    }
}

/// Per-row cross-entropy `[N]` of the logits `hidden E^T` (f32 CPU `hidden` `[N, C]`, `E`
/// `[V, C]`) against u32 `targets` `[N]`, without materialising the logits.
pub fn head_cross_entropy_rows(hidden: &Tensor, emb: &Tensor, targets: &Tensor) -> Result<Tensor> {
    hidden.contiguous()?.apply_op3(
        &emb.contiguous()?,
        &targets.contiguous()?,
        HeadCrossEntropy {
            lse: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_the_work_on_a_worker_thread() {
        assert_eq!(rayon::current_thread_index(), None, "a test thread is not a worker");
        let (index, value) = on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(index.is_some(), "on_pool ran its work outside the pool");
        assert_eq!(value, 42);
    }

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn reductions_handle_remainders() {
        let x: Vec<f32> = (0..19).map(|i| i as f32 - 3.0).collect();
        assert_eq!(sum(&x), x.iter().sum::<f32>());
        assert_eq!(max(&x), 15.0);
        assert_eq!(dot(&x, &x), x.iter().map(|v| v * v).sum::<f32>());
    }
}
