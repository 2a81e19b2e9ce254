//! Inference kernels (CPU, no backward; f32 activations) for the engine's packed batches: rows times
//! a weight matrix (weights in f32, or converted once to f16, bf16 or q8: [`WeightDtype`]), rows
//! times the transposed embedding (the LM head), writes of new keys and values into the KV slots,
//! and attention of packed tokens over their own slots.
//!
//! Every output element is computed the same way whatever else is in the batch: an f32 product is
//! one fused multiply-add per term in the order of the summed index (a q8 one sums each group of 32
//! terms so, then adds it scaled), and a tile of several rows or columns only computes several such
//! chains side by side. So a sequence's logits never depend
//! on the other sequences of a batch, on how a prompt was split into prefill chunks, or on the
//! number of threads; the engine's tests check this bit for bit.
//!
//! Written by hand because `gemm` (candle's CPU matmul) packs the whole weight matrix on every
//! call, which costs more than the product itself for the few rows of a decode step, and because
//! its blocking depends on the matrix shape, so a row's rounding would change with the batch.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, InplaceOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::fused::{SharedMut, dot, exp_weights, f32_slice, multiversion, with_f32};
use super::kv_cache::Segment;

/// Output columns per rayon task in [`linear`]: the task's block of `W` stays in cache while its
/// rows pass over it.
const COLS_PER_TASK: usize = 64;
/// Rows per rayon task in [`linear`] and [`times_transposed`].
const ROWS_PER_TASK: usize = 32;
/// Rows of the embedding matrix per rayon task in [`times_transposed`].
const EMB_ROWS_PER_TASK: usize = 256;
/// Untracked products of up to this many rows outside the engine go through these kernels, larger
/// ones (scoring whole batches) through `gemm`; the engine's packed weights always take them. Also
/// the engine's default token budget per step.
pub const MAX_ROWS: usize = 256;

#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The widest vector kernels this CPU runs for products with f32 weights. Every choice gives the
/// same bits (each output is one chain of fused multiply-adds); only the speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    /// A multiply and an add per term, no vectors (a CPU without FMA).
    Plain,
    /// Eight lanes ([`tile_avx2`]).
    Avx2,
    /// Sixteen lanes ([`tile_avx512`]) for whole blocks of several rows, eight otherwise.
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            return if std::arch::is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else {
                Isa::Avx2
            };
        }
        Isa::Plain
    }

    fn fma(self) -> bool {
        self != Isa::Plain
    }
}

/// `a * b + c`, fused where the hardware has FMA (the same rounding as the vector tiles).
#[inline(always)]
fn madd(fma: bool, a: f32, b: f32, c: f32) -> f32 {
    if fma { a.mul_add(b, c) } else { a * b + c }
}

// ---------------------------------------------------------------------------------------------
// Rows times a weight matrix

/// How a tile widens eight stored weights to f32 lanes.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    /// # Safety
    /// `p` points at eight readable weights and the CPU has the features of the calling tile.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: by the caller's promise.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

/// An f16 weight's bits.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(transparent)]
struct F16Bits(u16);

#[cfg(target_arch = "x86_64")]
impl Lanes for F16Bits {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: by the caller's promise (F16C present).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// A bf16 weight's bits: the upper half of an f32.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16Bits(u16);

#[cfg(target_arch = "x86_64")]
impl Lanes for Bf16Bits {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: by the caller's promise.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            ))
        }
    }
}

/// `acc[r][v][l] = Σ_k x_r[k] · w[k·ldw + 8v + l]`, for `RT` rows and `8·CV` columns of weights
/// stored as `L`: the body of [`tile_avx2`] and [`tile_half_avx2`], inlined into each so that it
/// compiles with their target features.
///
/// # Safety
/// The caller's target features cover `L::load8`; every `x_r` holds `k` values and `w` points at
/// `(k - 1)·ldw + 8·CV` weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_body<L: Lanes, const RT: usize, const CV: usize>(
    x: [&[f32]; RT],
    w: *const L,
    ldw: usize,
    k: usize,
    out: &mut [[[f32; 8]; CV]; RT],
) {
    use std::arch::x86_64::*;
    // SAFETY (the whole body): in bounds by the caller's promise; `out[r][v]` is 8 f32s.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); CV]; RT];
        for kk in 0..k {
            let row = w.add(kk * ldw);
            let mut wv = [_mm256_setzero_ps(); CV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = L::load8(row.add(8 * v));
            }
            for r in 0..RT {
                let a = _mm256_set1_ps(*x[r].get_unchecked(kk));
                for v in 0..CV {
                    acc[r][v] = _mm256_fmadd_ps(a, wv[v], acc[r][v]);
                }
            }
        }
        for r in 0..RT {
            for v in 0..CV {
                _mm256_storeu_ps(out[r][v].as_mut_ptr(), acc[r][v]);
            }
        }
    }
}

/// [`tile_body`] over f32 weights.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every `x_r` holds `k` values and `w` holds
/// `(k - 1)·ldw + 8·CV` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const RT: usize, const CV: usize>(
    x: [&[f32]; RT],
    w: &[f32],
    ldw: usize,
    k: usize,
    out: &mut [[[f32; 8]; CV]; RT],
) {
    // SAFETY: the features are on and the lengths are the caller's promise.
    unsafe { tile_body::<f32, RT, CV>(x, w.as_ptr(), ldw, k, out) }
}

/// [`tile_avx2`] sixteen lanes at a time, for CPUs with AVX-512: `acc[r][v]` holds columns
/// `16v..16v + 16`. Each lane is the same chain of fused multiply-adds in the order of `k` as in
/// [`tile_avx2`], so the bits are the same; the wider registers do twice the work per instruction
/// and its 32 registers hold a tile of six rows by 64 columns.
///
/// # Safety
/// The CPU must have AVX-512F; every `x_r` holds `k` values and `w` holds `(k - 1)·ldw + 16·CZ`
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const RT: usize, const CZ: usize>(
    x: [&[f32]; RT],
    w: &[f32],
    ldw: usize,
    k: usize,
    out: &mut [[[f32; 16]; CZ]; RT],
) {
    use std::arch::x86_64::*;
    // SAFETY (the whole body): in bounds by the caller's promise; `out[r][v]` is 16 f32s.
    unsafe {
        let w = w.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); CZ]; RT];
        for kk in 0..k {
            let row = w.add(kk * ldw);
            let mut wv = [_mm512_setzero_ps(); CZ];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(row.add(16 * v));
            }
            for r in 0..RT {
                let a = _mm512_set1_ps(*x[r].get_unchecked(kk));
                for v in 0..CZ {
                    acc[r][v] = _mm512_fmadd_ps(a, wv[v], acc[r][v]);
                }
            }
        }
        for r in 0..RT {
            for v in 0..CZ {
                _mm512_storeu_ps(out[r][v].as_mut_ptr(), acc[r][v]);
            }
        }
    }
}

/// The portable version of [`tile_avx2`] (a multiply and an add per term).
fn tile_plain<const RT: usize, const CV: usize>(
    x: [&[f32]; RT],
    w: &[f32],
    ldw: usize,
    k: usize,
    out: &mut [[[f32; 8]; CV]; RT],
) {
    *out = [[[0.0; 8]; CV]; RT];
    for kk in 0..k {
        let row = &w[kk * ldw..kk * ldw + 8 * CV];
        for r in 0..RT {
            let a = x[r][kk];
            for v in 0..CV {
                for l in 0..8 {
                    out[r][v][l] += a * row[8 * v + l];
                }
            }
        }
    }
}

/// A weight matrix `[K, N]` as the kernels read it.
#[derive(Debug, Clone, Copy)]
enum Weights<'a> {
    /// Row-major `[K, N]`.
    Dense(&'a [f32]),
    /// [`Packed`]'s layout.
    Blocked(&'a [f32]),
    /// [`Packed`]'s layout in half or quarter size.
    Low(&'a Low),
}

impl<'a> Weights<'a> {
    /// Column block `cb` (of [`COLS_PER_TASK`]): its first element, the distance between two of its
    /// rows, and how many columns a tile may read (the block padded, or the columns that exist).
    fn block(self, cb: usize, k: usize, n: usize) -> (&'a [f32], usize, usize) {
        let c0 = cb * COLS_PER_TASK;
        match self {
            Weights::Dense(w) => (&w[c0..], n, COLS_PER_TASK.min(n - c0)),
            Weights::Blocked(w) => (
                &w[cb * k * COLS_PER_TASK..(cb + 1) * k * COLS_PER_TASK],
                COLS_PER_TASK,
                COLS_PER_TASK,
            ),
            Weights::Low(_) => unreachable!("low-precision blocks go through linear_block_low"),
        }
    }
}

/// Where a task of [`linear_block`] or [`linear_block_low`] writes: columns `c0..c0 + width` of the
/// rows of `out` (row-major `[R, n]`), each value plus its bias.
struct BlockOut<'a> {
    out: SharedMut,
    b: &'a [f32],
    n: usize,
    c0: usize,
    width: usize,
}

impl BlockOut<'_> {
    /// Writes `vals + b` at row `r` from block column `j` on, dropping the columns past the block's
    /// width (a tile over the padded end of a block). One slice at a time, so it vectorises.
    #[inline(always)]
    fn row(&self, r: usize, j: usize, vals: &[f32]) {
        let end = (j + vals.len()).min(self.width);
        if j >= end {
            return;
        }
        let at = r * self.n + self.c0 + j;
        // SAFETY: the task owns these rows and columns of `out`, which holds R x n values.
        let dst = unsafe { self.out.slice_mut(at, end - j) };
        let bias = &self.b[self.c0 + j..self.c0 + end];
        for ((d, v), bias) in dst.iter_mut().zip(vals).zip(bias) {
            *d = v + bias;
        }
    }
}

/// Computes rows `rows` of column block `cb` of `y = x W + b` into `out` (row-major `[R, n]`).
#[allow(clippy::too_many_arguments)]
fn linear_block(
    out: SharedMut,
    x: &[f32],
    w: Weights,
    b: &[f32],
    k: usize,
    n: usize,
    rows: Range<usize>,
    cb: usize,
    isa: Isa,
) {
    let fma = isa.fma();
    let (wb, ldw, readable) = w.block(cb, k, n);
    let c0 = cb * COLS_PER_TASK;
    let width = COLS_PER_TASK.min(n - c0);
    let put = BlockOut { out, b, n, c0, width };
    // With AVX-512 and several rows, a whole block of 64 columns for up to six rows at a time: 24
    // accumulators, so that each weight loaded serves six rows. A single row (one sequence
    // decoding) waits on its weights' loads either way and kept the eight-lane tile's pace
    // (BENCHMARKS.md, "Sixteen lanes"). Otherwise the eight-lane tiles below take the block.
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && readable == COLS_PER_TASK && rows.len() > 1 {
        let mut r0 = rows.start;
        while r0 < rows.end {
            let g = (rows.end - r0).min(6);
            let xr = |i: usize| &x[(r0 + i) * k..(r0 + i + 1) * k];
            macro_rules! wide_tile {
                ($rt:literal) => {{
                    let mut acc = [[[0f32; 16]; 4]; $rt];
                    let xs: [&[f32]; $rt] = std::array::from_fn(|i| xr(i));
                    let ws = &wb[..(k - 1) * ldw + 64];
                    // SAFETY: AVX-512F is present and the slices have the promised lengths.
                    unsafe { tile_avx512::<$rt, 4>(xs, ws, ldw, k, &mut acc) };
                    for (i, row) in acc.iter().enumerate() {
                        put.row(r0 + i, 0, row.as_flattened());
                    }
                }};
            }
            match g {
                6 => wide_tile!(6),
                5 => wide_tile!(5),
                4 => wide_tile!(4),
                3 => wide_tile!(3),
                2 => wide_tile!(2),
                _ => wide_tile!(1),
            }
            r0 += g;
        }
        return;
    }
    let mut r0 = rows.start;
    while r0 < rows.end {
        let g = (rows.end - r0).min(4);
        let xr = |i: usize| &x[(r0 + i) * k..(r0 + i + 1) * k];
        let mut j = 0;
        macro_rules! tiles {
            ($rt:literal, $cv:literal) => {
                while j + 8 * $cv <= readable {
                    let mut acc = [[[0f32; 8]; $cv]; $rt];
                    let xs: [&[f32]; $rt] = std::array::from_fn(|i| xr(i));
                    let ws = &wb[j..(k - 1) * ldw + j + 8 * $cv];
                    #[cfg(target_arch = "x86_64")]
                    if fma {
                        // SAFETY: FMA is present and the slices have the promised lengths.
                        unsafe { tile_avx2::<$rt, $cv>(xs, ws, ldw, k, &mut acc) };
                    } else {
                        tile_plain::<$rt, $cv>(xs, ws, ldw, k, &mut acc);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    tile_plain::<$rt, $cv>(xs, ws, ldw, k, &mut acc);
                    for (i, row) in acc.iter().enumerate() {
                        put.row(r0 + i, j, row.as_flattened());
                    }
                    j += 8 * $cv;
                }
            };
        }
        match g {
            4 => tiles!(4, 2),
            3 => tiles!(3, 2),
            2 => tiles!(2, 4),
            _ => tiles!(1, 8),
        }
        // Columns left over (fewer than a tile): the same chain, one element at a time.
        for jj in j..width {
            for i in 0..g {
                let mut a = 0f32;
                for (kk, &xv) in xr(i).iter().enumerate() {
                    a = madd(fma, xv, wb[kk * ldw + jj], a);
                }
                put.row(r0 + i, jj, &[a]);
            }
        }
        r0 += g;
    }
}

fn linear_any(x: &[f32], w: Weights, b: &[f32], k: usize, n: usize) -> Vec<f32> {
    linear_on(Isa::detect(), x, w, b, k, n)
}

/// [`linear_any`] with the kernels of `isa` (which this CPU must run).
fn linear_on(isa: Isa, x: &[f32], w: Weights, b: &[f32], k: usize, n: usize) -> Vec<f32> {
    let r = x.len() / k;
    let mut y = vec![0f32; r * n];
    let out = SharedMut(y.as_mut_ptr(), y.len());
    let col_blocks = n.div_ceil(COLS_PER_TASK);
    let tasks = r.div_ceil(ROWS_PER_TASK) * col_blocks;
    #[cfg(target_arch = "x86_64")]
    let f16c = isa.fma() && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let f16c = false;
    (0..tasks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * ROWS_PER_TASK..((rb + 1) * ROWS_PER_TASK).min(r);
        match w {
            Weights::Low(low) => linear_block_low(out, x, low, b, k, n, rows, cb, f16c),
            _ => linear_block(out, x, w, b, k, n, rows, cb, isa),
        }
    });
    y
}

/// `y = x W + b` for `x` `[R, K]`, `W` `[K, N]` and `b` `[N]`, all row-major.
pub fn linear_rows(x: &[f32], w: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
    linear_any(x, Weights::Dense(w), b, k, n)
}

/// The precision of the weights the decoding kernels read (`--dtype`). Activations, the KV
/// cache, the logits and sampling stay f32; training never sees these copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    /// IEEE half precision: half the bytes, 11 significant bits.
    F16,
    /// bfloat16: half the bytes, f32's range, 8 significant bits.
    Bf16,
    /// 8-bit integers in blocks of 32 along the input dimension, each block with an f32 scale
    /// (its largest magnitude / 127), like llama.cpp's q8_0 (which keeps the scales in f16); a
    /// matrix whose input dimension is not a multiple of 32 is kept in f16.
    Q8,
}

impl std::str::FromStr for WeightDtype {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8" | "q8_0" => Ok(Self::Q8),
            other => bail!("unknown --dtype {other:?} (expected f32, f16, bf16 or q8)"),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
        })
    }
}

/// Weights in [`Packed`]'s blocked layout, in half or quarter size.
#[derive(Debug, Clone)]
enum Low {
    F16(Vec<u16>),
    Bf16(Vec<u16>),
    /// `q[block][k][64]` and `scales[block][k / Q8_GROUP][64]`.
    Q8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
}

/// Weights of one q8 scale: consecutive input rows of a column.
pub const Q8_GROUP: usize = 32;

/// q8 values and per-group scales of a column of `k` weights (`k` a multiple of [`Q8_GROUP`]):
/// each weight is `q * scale` with `|w - q * scale| <= scale / 2`.
pub fn quantize_q8(column: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(column.len());
    let mut scales = Vec::with_capacity(column.len() / Q8_GROUP);
    for g in column.chunks(Q8_GROUP) {
        let amax = g.iter().fold(0f32, |m, w| m.max(w.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        scales.push(scale);
        q.extend(g.iter().map(|w| (w * inv).round().clamp(-127.0, 127.0) as i8));
    }
    (q, scales)
}

/// A weight matrix re-laid out for decoding: blocks of 64 columns, each a contiguous row-major
/// `[K, 64]` (the last one zero-padded), so a task streams its block from memory in order
/// instead of reading a 256-byte piece of every row. In f32, products through it equal those
/// through the row-major matrix bit for bit; in f16 or bf16 it reads 2x fewer bytes, in q8 3.6x
/// (a byte per weight and a 4-byte scale per 32).
#[derive(Debug, Clone)]
pub struct Packed {
    k: usize,
    n: usize,
    data: Vec<f32>,
    low: Option<Low>,
}

impl Packed {
    /// Packs an f32 `[K, N]` matrix.
    pub fn new(w: &Tensor) -> Result<Self> {
        Self::with_dtype(w, WeightDtype::F32)
    }

    /// Packs an f32 `[K, N]` matrix, its weights converted to `dtype`.
    pub fn with_dtype(w: &Tensor, dtype: WeightDtype) -> Result<Self> {
        let (k, n) = w.dims2()?;
        let blocks = n.div_ceil(COLS_PER_TASK);
        let mut data = vec![0f32; blocks * k * COLS_PER_TASK];
        with_f32(w, "infer-pack", |ws| {
            for (cb, block) in data.chunks_exact_mut(k * COLS_PER_TASK).enumerate() {
                let c0 = cb * COLS_PER_TASK;
                let width = COLS_PER_TASK.min(n - c0);
                for (kk, row) in block.chunks_exact_mut(COLS_PER_TASK).enumerate() {
                    row[..width].copy_from_slice(&ws[kk * n + c0..kk * n + c0 + width]);
                }
            }
            Ok(())
        })?;
        let dtype = if dtype == WeightDtype::Q8 && !k.is_multiple_of(Q8_GROUP) {
            WeightDtype::F16
        } else {
            dtype
        };
        let low = match dtype {
            WeightDtype::F32 => None,
            WeightDtype::F16 => Some(Low::F16(
                data.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect(),
            )),
            WeightDtype::Bf16 => Some(Low::Bf16(
                data.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
            )),
            WeightDtype::Q8 => {
                let groups = k / Q8_GROUP;
                let mut q = vec![0i8; data.len()];
                let mut scales = vec![0f32; blocks * groups * COLS_PER_TASK];
                for cb in 0..blocks {
                    let block = &data[cb * k * COLS_PER_TASK..(cb + 1) * k * COLS_PER_TASK];
                    for j in 0..COLS_PER_TASK {
                        let column: Vec<f32> = (0..k).map(|kk| block[kk * COLS_PER_TASK + j]).collect();
                        let (cq, cs) = quantize_q8(&column);
                        for kk in 0..k {
                            q[cb * k * COLS_PER_TASK + kk * COLS_PER_TASK + j] = cq[kk];
                        }
                        for g in 0..groups {
                            scales[(cb * groups + g) * COLS_PER_TASK + j] = cs[g];
                        }
                    }
                }
                Some(Low::Q8 { q, scales })
            }
        };
        // The f32 copy is only kept when it is what the kernels read.
        let data = if low.is_some() { vec![] } else { data };
        Ok(Self { k, n, data, low })
    }

    /// The precision the kernels read (q8 falls back to f16 when `K` is not a multiple of 32).
    pub fn dtype(&self) -> WeightDtype {
        match &self.low {
            None => WeightDtype::F32,
            Some(Low::F16(_)) => WeightDtype::F16,
            Some(Low::Bf16(_)) => WeightDtype::Bf16,
            Some(Low::Q8 { .. }) => WeightDtype::Q8,
        }
    }

    /// Bytes of weights the kernels read.
    pub fn bytes(&self) -> usize {
        match &self.low {
            None => 4 * self.data.len(),
            Some(Low::F16(v) | Low::Bf16(v)) => 2 * v.len(),
            Some(Low::Q8 { q, scales }) => q.len() + 4 * scales.len(),
        }
    }

    /// `x W + b` for f32 CPU `x` `[.., K]` and `b` `[N]`.
    pub fn linear(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (k, n) = (self.k, self.n);
        if x.dims().last() != Some(&k) || b.dims() != [n] {
            bail!(
                "infer-linear: x {:?} and bias {:?} do not fit a packed [{k}, {n}] weight",
                x.dims(),
                b.dims()
            );
        }
        let w = match &self.low {
            None => Weights::Blocked(&self.data),
            Some(low) => Weights::Low(low),
        };
        let y = with_f32(x, "infer-linear", |xs| {
            with_f32(b, "infer-linear", |bs| Ok(linear_any(xs, w, bs, k, n)))
        })?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Tensor::from_vec(y, dims, x.device())
    }

    /// `x W` with no bias.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        self.linear(x, &Tensor::zeros(self.n, candle_core::DType::F32, x.device())?)
    }
}

// ---------------------------------------------------------------------------------------------
// Rows times half- and quarter-size weights

/// One f16 or bf16 weight as f32 (the portable path).
fn half_weight(low: &Low, at: usize) -> f32 {
    match low {
        Low::F16(v) => half::f16::from_bits(v[at]).to_f32(),
        Low::Bf16(v) => half::bf16::from_bits(v[at]).to_f32(),
        Low::Q8 { .. } => unreachable!("q8 weights are summed per group"),
    }
}

/// [`tile_body`] over one 64-column block of f16 or bf16 weights (row stride 64), from column `j0`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every `x_r` holds `k` values and `w` `k * 64`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half_avx2<const RT: usize, const CV: usize>(
    x: [&[f32]; RT],
    w: &[u16],
    bf16: bool,
    j0: usize,
    k: usize,
    out: &mut [[[f32; 8]; CV]; RT],
) {
    // SAFETY: the features are on and the lengths are the caller's promise; the bits types are
    // `repr(transparent)` over u16.
    unsafe {
        let p = w.as_ptr().add(j0);
        if bf16 {
            tile_body::<Bf16Bits, RT, CV>(x, p.cast(), COLS_PER_TASK, k, out)
        } else {
            tile_body::<F16Bits, RT, CV>(x, p.cast(), COLS_PER_TASK, k, out)
        }
    }
}

/// The q8 version of [`tile_half_avx2`]: each group of 32 input rows is summed in integers
/// widened to f32, then scaled by its column scales and added.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every `x_r` holds `k` values, `q` `k * 64` and `scales`
/// `k / 32 * 64`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // `v` and `r` index several tiles at once
unsafe fn tile_q8_avx2<const RT: usize, const CV: usize>(
    x: [&[f32]; RT],
    q: &[i8],
    scales: &[f32],
    j0: usize,
    k: usize,
    out: &mut [[[f32; 8]; CV]; RT],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); CV]; RT];
    let (qp, sp) = (q.as_ptr(), scales.as_ptr());
    for g in 0..k / Q8_GROUP {
        let mut part = [[_mm256_setzero_ps(); CV]; RT];
        for kk in g * Q8_GROUP..(g + 1) * Q8_GROUP {
            // SAFETY: in bounds by the caller's promise.
            unsafe {
                let row = qp.add(kk * COLS_PER_TASK + j0);
                for v in 0..CV {
                    let raw = _mm_loadl_epi64(row.add(8 * v) as *const __m128i);
                    let wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
                    for r in 0..RT {
                        let a = _mm256_set1_ps(*x[r].get_unchecked(kk));
                        part[r][v] = _mm256_fmadd_ps(a, wv, part[r][v]);
                    }
                }
            }
        }
        for v in 0..CV {
            // SAFETY: in bounds by the caller's promise.
            let s = unsafe { _mm256_loadu_ps(sp.add(g * COLS_PER_TASK + j0 + 8 * v)) };
            for r in 0..RT {
                acc[r][v] = _mm256_fmadd_ps(part[r][v], s, acc[r][v]);
            }
        }
    }
    for r in 0..RT {
        for v in 0..CV {
            // SAFETY: `out[r][v]` is 8 f32s.
            unsafe { _mm256_storeu_ps(out[r][v].as_mut_ptr(), acc[r][v]) };
        }
    }
}

/// [`linear_block`] for half- and quarter-size weights: vector tiles where the CPU has AVX2,
/// FMA and F16C, the same sums one term at a time otherwise.
#[allow(clippy::too_many_arguments)]
fn linear_block_low(
    out: SharedMut,
    x: &[f32],
    low: &Low,
    b: &[f32],
    k: usize,
    n: usize,
    rows: Range<usize>,
    cb: usize,
    simd: bool,
) {
    let c0 = cb * COLS_PER_TASK;
    let width = COLS_PER_TASK.min(n - c0);
    let base = cb * k * COLS_PER_TASK;
    let put = BlockOut { out, b, n, c0, width };
    let mut r0 = rows.start;
    while r0 < rows.end {
        let g = (rows.end - r0).min(4);
        let xr = |i: usize| &x[(r0 + i) * k..(r0 + i + 1) * k];
        if simd {
            #[cfg(target_arch = "x86_64")]
            {
                macro_rules! tiles {
                    ($rt:literal, $cv:literal) => {{
                        let mut j = 0;
                        while j < COLS_PER_TASK {
                            let mut acc = [[[0f32; 8]; $cv]; $rt];
                            let xs: [&[f32]; $rt] = std::array::from_fn(|i| xr(i));
                            // SAFETY: the features were detected and the block holds k x 64 weights.
                            unsafe {
                                match low {
                                    Low::F16(v) | Low::Bf16(v) => tile_half_avx2::<$rt, $cv>(
                                        xs,
                                        &v[base..base + k * COLS_PER_TASK],
                                        matches!(low, Low::Bf16(_)),
                                        j,
                                        k,
                                        &mut acc,
                                    ),
                                    Low::Q8 { q, scales } => {
                                        let groups = k / Q8_GROUP;
                                        tile_q8_avx2::<$rt, $cv>(
                                            xs,
                                            &q[base..base + k * COLS_PER_TASK],
                                            &scales[cb * groups * COLS_PER_TASK..(cb + 1) * groups * COLS_PER_TASK],
                                            j,
                                            k,
                                            &mut acc,
                                        )
                                    }
                                }
                            }
                            for (i, row) in acc.iter().enumerate() {
                                put.row(r0 + i, j, row.as_flattened());
                            }
                            j += 8 * $cv;
                        }
                    }};
                }
                match (g, matches!(low, Low::Q8 { .. })) {
                    (4, false) => tiles!(4, 2),
                    (3, false) => tiles!(3, 2),
                    (2, false) => tiles!(2, 4),
                    (_, false) => tiles!(1, 8),
                    (4, true) => tiles!(4, 1),
                    (3, true) => tiles!(3, 1),
                    (2, true) => tiles!(2, 2),
                    (_, true) => tiles!(1, 4),
                }
            }
        } else {
            for i in 0..g {
                for j in 0..width {
                    let mut a = 0f32;
                    match low {
                        Low::Q8 { q, scales } => {
                            // Per group: the integer sum, then its scale (as the vector tiles do).
                            let groups = k / Q8_GROUP;
                            for grp in 0..groups {
                                let mut part = 0f32;
                                for kk in grp * Q8_GROUP..(grp + 1) * Q8_GROUP {
                                    part += xr(i)[kk] * f32::from(q[base + kk * COLS_PER_TASK + j]);
                                }
                                a += part * scales[(cb * groups + grp) * COLS_PER_TASK + j];
                            }
                        }
                        _ => {
                            for (kk, &xv) in xr(i).iter().enumerate() {
                                a += xv * half_weight(low, base + kk * COLS_PER_TASK + j);
                            }
                        }
                    }
                    put.row(r0 + i, j, &[a]);
                }
            }
        }
        r0 += g;
    }
}

/// `x W + b` of f32 CPU tensors (`x` `[.., K]`), without a backward pass.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (k, n) = w.dims2()?;
    if x.dims().last() != Some(&k) || b.dims() != [n] {
        bail!(
            "infer-linear: x {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    let y = with_f32(x, "infer-linear", |xs| {
        with_f32(w, "infer-linear", |ws| {
            with_f32(b, "infer-linear", |bs| Ok(linear_rows(xs, ws, bs, k, n)))
        })
    })?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(y, dims, x.device())
}

// ---------------------------------------------------------------------------------------------
// Rows times the transposed embedding (the tied LM head)

/// `acc[r][e] = x_r · e_e` over `c` values for `RT` rows of `x` and `ET` rows of `E`: eight lanes
/// of fused multiply-adds in order, summed by [`hsum`], then the tail.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every slice holds `c` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const RT: usize, const ET: usize>(x: [&[f32]; RT], e: [&[f32]; ET], c: usize) -> [[f32; ET]; RT] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); ET]; RT];
    let body = c / 8 * 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= c.
        unsafe {
            let mut ev = [_mm256_setzero_ps(); ET];
            for (j, ev) in ev.iter_mut().enumerate() {
                *ev = _mm256_loadu_ps(e[j].as_ptr().add(i));
            }
            for r in 0..RT {
                let xv = _mm256_loadu_ps(x[r].as_ptr().add(i));
                for j in 0..ET {
                    acc[r][j] = _mm256_fmadd_ps(xv, ev[j], acc[r][j]);
                }
            }
        }
        i += 8;
    }
    let mut out = [[0f32; ET]; RT];
    for r in 0..RT {
        for j in 0..ET {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` is 8 f32s.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]) };
            let mut s = hsum(&lanes);
            for t in body..c {
                s = x[r][t].mul_add(e[j][t], s);
            }
            out[r][j] = s;
        }
    }
    out
}

/// The portable version of [`dots_avx2`].
fn dots_plain<const RT: usize, const ET: usize>(x: [&[f32]; RT], e: [&[f32]; ET], c: usize) -> [[f32; ET]; RT] {
    let mut out = [[0f32; ET]; RT];
    let body = c / 8 * 8;
    for r in 0..RT {
        for j in 0..ET {
            let mut lanes = [0f32; 8];
            for i in (0..body).step_by(8) {
                for l in 0..8 {
                    lanes[l] += x[r][i + l] * e[j][i + l];
                }
            }
            let mut s = hsum(&lanes);
            for t in body..c {
                s += x[r][t] * e[j][t];
            }
            out[r][j] = s;
        }
    }
    out
}

/// The eight lanes summed in one fixed order.
#[inline(always)]
fn hsum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// `x E^T` for `x` `[R, C]` and `E` `[V, C]`, row-major.
pub fn times_transposed_rows(x: &[f32], e: &[f32], c: usize) -> Vec<f32> {
    let (r, v) = (x.len() / c, e.len() / c);
    let mut y = vec![0f32; r * v];
    #[cfg(target_arch = "x86_64")]
    let fma = has_fma();
    #[cfg(not(target_arch = "x86_64"))]
    let fma = false;
    let out = SharedMut(y.as_mut_ptr(), y.len());
    let emb_blocks = v.div_ceil(EMB_ROWS_PER_TASK);
    let tasks = r.div_ceil(ROWS_PER_TASK) * emb_blocks;
    (0..tasks).into_par_iter().for_each(|t| {
        let (rb, eb) = (t / emb_blocks, t % emb_blocks);
        let rows = rb * ROWS_PER_TASK..((rb + 1) * ROWS_PER_TASK).min(r);
        let embs = eb * EMB_ROWS_PER_TASK..((eb + 1) * EMB_ROWS_PER_TASK).min(v);
        // SAFETY (all writes): the task owns rows x embs of `out`, which holds R x V values.
        let put = |i: usize, j: usize, val: f32| unsafe { out.write(i * v + j, val) };
        let xr = |i: usize| &x[i * c..(i + 1) * c];
        let er = |j: usize| &e[j * c..(j + 1) * c];
        let mut r0 = rows.start;
        while r0 < rows.end {
            let g = (rows.end - r0).min(4);
            let mut j0 = embs.start;
            macro_rules! tiles {
                ($rt:literal, $et:literal) => {
                    while j0 < embs.end {
                        let h = (embs.end - j0).min($et);
                        // Missing embedding rows repeat the last one; their results are dropped.
                        let xs: [&[f32]; $rt] = std::array::from_fn(|i| xr(r0 + i));
                        let es: [&[f32]; $et] = std::array::from_fn(|j| er(j0 + j.min(h - 1)));
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: FMA is present; every slice holds `c` values.
                        let d = if fma {
                            unsafe { dots_avx2::<$rt, $et>(xs, es, c) }
                        } else {
                            dots_plain::<$rt, $et>(xs, es, c)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let d = dots_plain::<$rt, $et>(xs, es, c);
                        for (i, row) in d.iter().enumerate() {
                            for (j, &val) in row.iter().take(h).enumerate() {
                                put(r0 + i, j0 + j, val);
                            }
                        }
                        j0 += $et;
                    }
                };
            }
            match g {
                4 => tiles!(4, 2),
                3 => tiles!(3, 2),
                2 => tiles!(2, 4),
                _ => tiles!(1, 8),
            }
            r0 += g;
        }
    });
    y
}

/// `x E^T` of f32 CPU tensors `x` `[R, C]` and `E` `[V, C]`, without a backward pass.
pub fn times_transposed(x: &Tensor, e: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    let (v, c2) = e.dims2()?;
    if c != c2 {
        bail!("infer-lm-head: widths {c} and {c2} differ");
    }
    let y = with_f32(x, "infer-lm-head", |xs| {
        with_f32(e, "infer-lm-head", |es| Ok(times_transposed_rows(xs, es, c)))
    })?;
    Tensor::from_vec(y, (r, v), x.device())
}

// ---------------------------------------------------------------------------------------------
// KV slots

/// Where packed token `i` of the batch goes: its segment's slot and its position there.
fn token_places(segs: &[Segment]) -> Vec<(usize, usize)> {
    segs.iter()
        .flat_map(|s| (0..s.len).map(move |j| (s.slot, s.past + j)))
        .collect()
}

/// Copies the keys and values of packed `qkv` `[N, 3C]` into the cache `[2, S, H, cap, Dh]` at
/// each token's slot and position.
pub struct WriteKv<'a> {
    pub segs: &'a [Segment],
    pub n_head: usize,
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "infer-write-kv"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let qkv = f32_slice(s2, l2, self.name())?;
        let [two, slots, h, cap, dh] = l1.dims() else {
            bail!(
                "{}: the cache must be [2, slots, heads, capacity, head_dim]",
                self.name()
            )
        };
        let (n, c3) = l2.shape().dims2()?;
        let c = h * dh;
        if *two != 2 || *h != self.n_head || c3 != 3 * c || !l1.is_contiguous() {
            bail!(
                "{}: cache {:?} does not fit qkv {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let places = token_places(self.segs);
        if places.len() != n || places.iter().any(|&(s, p)| s >= *slots || p >= *cap) {
            bail!("{}: segments do not fit the batch or the cache", self.name());
        }
        let base = l1.start_offset();
        let plane = slots * h * cap * dh;
        // Every token's keys and values go to (offset in the cache, its values in `qkv`).
        let writes = places.iter().enumerate().flat_map(|(i, &(slot, pos))| {
            (0..*h).flat_map(move |hi| {
                let at = base + ((slot * h + hi) * cap + pos) * dh;
                let (k, v) = (i * c3 + c + hi * dh, i * c3 + 2 * c + hi * dh);
                [(at, k), (plane + at, v)]
            })
        });
        match s1 {
            CpuStorage::F32(cache) => {
                for (at, from) in writes {
                    cache[at..at + dh].copy_from_slice(&qkv[from..from + dh]);
                }
            }
            CpuStorage::F16(cache) => {
                use half::slice::HalfFloatSliceExt;
                for (at, from) in writes {
                    cache[at..at + dh].convert_from_f32_slice(&qkv[from..from + dh]);
                }
            }
            _ => bail!("{}: the cache must be f32 or f16", self.name()),
        }
        Ok(())
    }
}

/// Causal attention of the packed queries in `qkv` `[N, 3C]` over their own slots of the cache
/// `[2, S, H, cap, Dh]` (which already holds their keys and values): token `j` of a segment sees
/// positions `0..=past + j` of its slot. Gives the merged heads `[N, C]`.
pub struct RaggedAttention<'a> {
    pub segs: &'a [Segment],
    pub n_head: usize,
}

impl CustomOp2 for RaggedAttention<'_> {
    fn name(&self) -> &'static str {
        "infer-ragged-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, self.name())?;
        let [_, slots, h, cap, dh] = l2.dims() else {
            bail!(
                "{}: the cache must be [2, slots, heads, capacity, head_dim]",
                self.name()
            )
        };
        let (n, c3) = l1.shape().dims2()?;
        let (h, dh, cap) = (*h, *dh, *cap);
        let c = h * dh;
        if h != self.n_head || c3 != 3 * c || !l2.is_contiguous() {
            bail!(
                "{}: cache {:?} does not fit qkv {:?}",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let places = token_places(self.segs);
        if places.len() != n || places.iter().any(|&(s, p)| s >= *slots || p >= cap) {
            bail!("{}: segments do not fit the batch or the cache", self.name());
        }
        let base = l2.start_offset();
        let plane = slots * h * cap * dh;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut y = vec![0f32; n * c];
        match s2 {
            CpuStorage::F32(cache) => y.par_chunks_mut(dh).enumerate().with_min_len(4).for_each_init(
                || vec![0f32; cap],
                |p, (th, y)| {
                    let (i, hi) = (th / h, th % h);
                    let (slot, pos) = places[i];
                    let q = &qkv[i * c3 + hi * dh..i * c3 + (hi + 1) * dh];
                    let start = base + (slot * h + hi) * cap * dh;
                    let keys = &cache[start..start + (pos + 1) * dh];
                    let values = &cache[plane + start..plane + start + (pos + 1) * dh];
                    attend(y, q, keys, values, &mut p[..pos + 1], scale);
                },
            ),
            CpuStorage::F16(cache) => y.par_chunks_mut(dh).enumerate().with_min_len(4).for_each_init(
                || (vec![0f32; cap], Vec::new(), Vec::new()),
                |(p, kb, vb), (th, y)| {
                    let (i, hi) = (th / h, th % h);
                    let (slot, pos) = places[i];
                    let q = &qkv[i * c3 + hi * dh..i * c3 + (hi + 1) * dh];
                    let start = base + (slot * h + hi) * cap * dh;
                    let len = (pos + 1) * dh;
                    let (keys, values) = (&cache[start..start + len], &cache[plane + start..plane + start + len]);
                    attend_half(y, q, keys, values, &mut p[..pos + 1], scale, kb, vb);
                },
            ),
            _ => bail!("{}: the cache must be f32 or f16", self.name()),
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }
}

/// Returns `kernel::<NV>(args)` when the head size `dh` is `8 * NV` for an NV of 1 to 8 (the
/// tiled attention kernels' sizes); other sizes fall through to the code after it. The caller
/// has checked the kernel's target features.
#[cfg(target_arch = "x86_64")]
macro_rules! return_tiled {
    ($dh:expr, $kernel:ident $args:tt) => {
        return_tiled!(@ $dh, $kernel, $args, 1, 2, 3, 4, 5, 6, 7, 8)
    };
    (@ $dh:expr, $kernel:ident, $args:tt, $($nv:literal),*) => {
        match $dh {
            $(n if n == 8 * $nv => {
                // SAFETY: the caller checked the kernel's target features, and the head size is
                // 8 * NV.
                return unsafe { $kernel::<$nv> $args };
            })*
            _ => {}
        }
    };
}

/// One query over its visible keys and values (`p.len()` rows of `q.len()`): scores, softmax,
/// weighted sum. Head sizes of 8 to 64 (a multiple of 8) take [`attend_avx2`] where the CPU has
/// AVX2 and FMA, which computes the same sums in the same order, so both give the same bits.
fn attend(y: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], p: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        return_tiled!(q.len(), attend_avx2(y, q, keys, values, p, scale));
    }
    attend_any(y, q, keys, values, p, scale)
}

/// [`attend`] for a head of `8 * NV` values, the query and the output held in registers. A
/// score is `dot`'s sum: eight lanes of products added key element by key element, then the
/// lanes added in order (here eight keys at once, their lane sums transposed so that the lanes
/// add as vectors); each output lane adds `weight * value` key after key, as [`attend_any`] does.
/// Keys and values stored as `L` are widened to f32 as they are loaded (exactly, for f16).
///
/// # Safety
/// The caller's target features cover AVX2, FMA and `L::load8`; `q` and `y` hold `8 * NV` values
/// and `keys` and `values` point at `p.len()` rows of them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn attend_body<L: Lanes, const NV: usize>(
    y: &mut [f32],
    q: &[f32],
    keys: *const L,
    values: *const L,
    p: &mut [f32],
    scale: f32,
) {
    use std::arch::x86_64::*;
    let dh = 8 * NV;
    let n = p.len();
    debug_assert!(q.len() == dh && y.len() == dh);
    // SAFETY (the whole body): in bounds by the caller's promise.
    unsafe {
        let mut qv = [_mm256_setzero_ps(); NV];
        for (v, qv) in qv.iter_mut().enumerate() {
            *qv = _mm256_loadu_ps(q.as_ptr().add(8 * v));
        }
        let mut j = 0;
        while j + 8 <= n {
            // acc[r]: lane l of key j + r's products, summed over the head's chunks of eight.
            let mut acc = [_mm256_setzero_ps(); 8];
            for (r, a) in acc.iter_mut().enumerate() {
                let k = keys.add((j + r) * dh);
                for (v, qv) in qv.iter().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(*qv, L::load8(k.add(8 * v))));
                }
            }
            // Transpose so that t[l] holds lane l of the eight keys, then add the lanes in order.
            let t = transpose8(acc);
            let mut s = t[0];
            for tl in &t[1..] {
                s = _mm256_add_ps(s, *tl);
            }
            _mm256_storeu_ps(p.as_mut_ptr().add(j), _mm256_mul_ps(s, _mm256_set1_ps(scale)));
            j += 8;
        }
        // The last keys (fewer than eight) one by one through `dot`, widened first.
        let mut key = [0f32; 64];
        for (r, pr) in p.iter_mut().enumerate().skip(j) {
            let k = keys.add(r * dh);
            for v in 0..NV {
                _mm256_storeu_ps(key.as_mut_ptr().add(8 * v), L::load8(k.add(8 * v)));
            }
            *pr = dot(q, &key[..dh]) * scale;
        }
        let inv = exp_weights(p);
        let mut out = [_mm256_setzero_ps(); NV];
        for (r, &pr) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pr * inv);
            let row = values.add(r * dh);
            for (v, o) in out.iter_mut().enumerate() {
                *o = _mm256_add_ps(*o, _mm256_mul_ps(w, L::load8(row.add(8 * v))));
            }
        }
        for (v, o) in out.iter().enumerate() {
            _mm256_storeu_ps(y.as_mut_ptr().add(8 * v), *o);
        }
    }
}

/// [`attend_body`] over an f32 cache.
///
/// # Safety
/// The CPU has AVX2 and FMA; `q` and `y` hold `8 * NV` values and `keys` and `values` `p.len()`
/// rows of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<const NV: usize>(
    y: &mut [f32],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    p: &mut [f32],
    scale: f32,
) {
    let n = p.len() * 8 * NV;
    assert!(keys.len() >= n && values.len() >= n);
    // SAFETY: the features are on and the lengths were checked.
    unsafe { attend_body::<f32, NV>(y, q, keys.as_ptr(), values.as_ptr(), p, scale) }
}

/// [`attend_body`] over an f16 cache, which it reads at half the bytes of an f32 one (batched
/// decoding waits on these loads).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `q` and `y` hold `8 * NV` values and `keys` and `values`
/// `p.len()` rows of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_f16_avx2<const NV: usize>(
    y: &mut [f32],
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    p: &mut [f32],
    scale: f32,
) {
    let n = p.len() * 8 * NV;
    assert!(keys.len() >= n && values.len() >= n);
    // SAFETY: the features are on, the lengths were checked, and `half::f16` is a transparent u16.
    unsafe {
        attend_body::<F16Bits, NV>(
            y,
            q,
            keys.as_ptr() as *const F16Bits,
            values.as_ptr() as *const F16Bits,
            p,
            scale,
        )
    }
}

/// [`attend`] over f16 keys and values, with the bits [`attend`] gives on them widened to f32.
/// Head sizes of 8 to 64 (a multiple of 8) read them as they go where the CPU has F16C; others
/// are widened into `kb` and `vb` (grown as needed) first.
#[allow(clippy::too_many_arguments)]
fn attend_half(
    y: &mut [f32],
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    p: &mut [f32],
    scale: f32,
    kb: &mut Vec<f32>,
    vb: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() && std::arch::is_x86_feature_detected!("f16c") {
        return_tiled!(q.len(), attend_f16_avx2(y, q, keys, values, p, scale));
    }
    use half::slice::HalfFloatSliceExt;
    let len = p.len() * q.len();
    if kb.len() < len {
        kb.resize(len, 0.0);
        vb.resize(len, 0.0);
    }
    keys[..len].convert_to_f32_slice(&mut kb[..len]);
    values[..len].convert_to_f32_slice(&mut vb[..len]);
    attend(y, q, &kb[..len], &vb[..len], p, scale)
}

/// The 8 x 8 transpose of eight vectors: lane `l` of output `r` is lane `r` of input `l`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose8(a: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(a[0], a[1]);
    let t1 = _mm256_unpackhi_ps(a[0], a[1]);
    let t2 = _mm256_unpacklo_ps(a[2], a[3]);
    let t3 = _mm256_unpackhi_ps(a[2], a[3]);
    let t4 = _mm256_unpacklo_ps(a[4], a[5]);
    let t5 = _mm256_unpackhi_ps(a[4], a[5]);
    let t6 = _mm256_unpacklo_ps(a[6], a[7]);
    let t7 = _mm256_unpackhi_ps(a[6], a[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

multiversion! {
    fn attend_any(y: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], p: &mut [f32], scale: f32) {
        // The portable kernel of [`attend`], for any head size.
        let dh = q.len();
        for (p, k) in p.iter_mut().zip(keys.chunks_exact(dh)) {
            *p = dot(q, k) * scale;
        }
        let inv = exp_weights(p);
        y.fill(0.0);
        for (&pj, v) in p.iter().zip(values.chunks_exact(dh)) {
            let w = pj * inv;
            for (y, &v) in y.iter_mut().zip(v) {
                *y += w * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Every vector width gives the bits of one fused multiply-add chain per output, in the order
    /// of the summed index: row counts around the tile heights, column counts around the tile
    /// widths, weights row-major and in [`Packed`]'s blocks.
    #[test]
    fn linear_kernels_of_every_width_give_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        if !has_fma() {
            eprintln!("SKIPPED: this CPU lacks AVX2/FMA, so the vector kernels do not run");
            return;
        }
        let wide = Isa::detect() == Isa::Avx512;
        if !wide {
            eprintln!("SKIPPED (in part): this CPU lacks AVX-512F; only the eight-lane kernel is checked");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (r, k, n) in [
            (1, 7, 64),
            (2, 33, 70),
            (3, 64, 131),
            (4, 20, 200),
            (5, 48, 128),
            (9, 40, 257),
            (33, 16, 96),
        ] {
            let mut draw = |len: usize| (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
            let (x, w, b) = (draw(r * k), draw(k * n), draw(n));
            let want: Vec<u32> = (0..r * n)
                .map(|at| {
                    let (i, j) = (at / n, at % n);
                    let chain = (0..k).fold(0f32, |a, kk| x[i * k + kk].mul_add(w[kk * n + j], a));
                    (chain + b[j]).to_bits()
                })
                .collect();
            let packed = Packed::new(&Tensor::from_vec(w.clone(), (k, n), &candle_core::Device::Cpu).unwrap()).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let isas: &[Isa] = if wide { &[Isa::Avx2, Isa::Avx512] } else { &[Isa::Avx2] };
            for &isa in isas {
                let dense = linear_on(isa, &x, Weights::Dense(&w), &b, k, n);
                assert_eq!(bits(dense), want, "{isa:?}, row-major, {r}x{k}x{n}");
                let blocked = linear_on(isa, &x, Weights::Blocked(&packed.data), &b, k, n);
                assert_eq!(bits(blocked), want, "{isa:?}, blocked, {r}x{k}x{n}");
            }
        }
    }

    /// The tiled attention gives the portable kernel's bits for every head size and key count
    /// (full groups of eight keys, a remainder, and fewer than eight), writing every output; a
    /// head size that is not a multiple of eight takes the portable kernel itself.
    #[test]
    fn tiled_attention_matches_the_portable_kernel_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if !has_fma() {
            eprintln!("SKIPPED: this CPU lacks AVX2/FMA, so the tiled kernel does not run");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for dh in [8, 16, 24, 32, 40, 64, 12] {
            for n in [1, 3, 7, 8, 9, 16, 23, 40, 117] {
                let mut draw = |len: usize| (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<_>>();
                let (q, keys, values) = (draw(dh), draw(n * dh), draw(n * dh));
                let scale = 1.0 / (dh as f32).sqrt();
                let (mut y1, mut y2) = (vec![f32::NAN; dh], vec![f32::NAN; dh]);
                let (mut p1, mut p2) = (vec![0f32; n], vec![0f32; n]);
                attend(&mut y1, &q, &keys, &values, &mut p1, scale);
                attend_any(&mut y2, &q, &keys, &values, &mut p2, scale);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p1), bits(&p2), "weights differ at head size {dh}, {n} keys");
                assert_eq!(bits(&y1), bits(&y2), "outputs differ at head size {dh}, {n} keys");
            }
        }
    }

    /// Attention over an f16 cache gives the bits of attention over the same values widened to
    /// f32, for every head size (the widening fallback included) and key count.
    #[test]
    fn attention_over_f16_keys_matches_attention_over_them_widened() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for dh in [8, 16, 32, 64, 12] {
            for n in [1, 5, 8, 13, 64, 117] {
                let mut draw = |len: usize| {
                    (0..len)
                        .map(|_| half::f16::from_f32(rng.random_range(-2.0f32..2.0)))
                        .collect::<Vec<_>>()
                };
                let (keys, values) = (draw(n * dh), draw(n * dh));
                let q: Vec<f32> = draw(dh).iter().map(|v| v.to_f32()).collect();
                let widen = |v: &[half::f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                let scale = 1.0 / (dh as f32).sqrt();
                let (mut y1, mut y2) = (vec![f32::NAN; dh], vec![f32::NAN; dh]);
                let (mut p1, mut p2) = (vec![0f32; n], vec![0f32; n]);
                let (mut kb, mut vb) = (Vec::new(), Vec::new());
                attend_half(&mut y1, &q, &keys, &values, &mut p1, scale, &mut kb, &mut vb);
                attend(&mut y2, &q, &widen(&keys), &widen(&values), &mut p2, scale);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p1), bits(&p2), "weights differ at head size {dh}, {n} keys");
                assert_eq!(bits(&y1), bits(&y2), "outputs differ at head size {dh}, {n} keys");
            }
        }
    }
}
