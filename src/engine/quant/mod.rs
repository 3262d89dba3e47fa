//! Our own CPU matmul for GGUF quantized weights, `y = x W^T` with `W` kept in its blocks:
//! Q4_1 ([`Q4_1Matrix`], the layers of SmolLM2-135M Q4_1) and Q8_0 ([`Q8_0Matrix`], its tied
//! output head).
//!
//! Why this exists: candle 0.11.1 has no SIMD kernel for Q4_1 (its `vec_dot` is the scalar
//! `vec_dot_unopt`, 83% of decode time on SmolLM2-135M Q4_1), and its quantized matmul walks
//! the whole weight matrix once per activation row, so a batch of sequences costs as many
//! weight reads as running them one by one. Here each weight row is read from memory once per
//! forward and each block is unpacked once for a whole tile of activation rows (up to 4 x 2
//! (weight row, activation row) pairs share registers), with AVX2 kernels (plus FMA/F16C, and
//! AVX-VNNI when the CPU has it, all detected at run time) and a portable scalar fallback.
//!
//! # Code layout
//! - here: [`BlockFormat`], what one GGUF block format supplies, and the one driver every
//!   format runs through, [`QuantMatrix`]: repacking a `QTensor` row by row, quantizing the
//!   activations, the parallel tile loop, the candle op.
//! - `acts`: activation quantization (scalar and AVX2) and the activation layouts the kernels
//!   read.
//! - `kernel`: which kernel this CPU runs, the tile dispatch and the shared SIMD helpers.
//! - `q4_1`, `q8_0`: one file per format: its row layout, repacking and tile kernels.
//!
//! A new format (Q4_K, Q6_K) is one more file implementing [`BlockFormat`], plus an activation
//! layout in `acts` if none of the existing ones fits.
//!
//! # Numerics
//! Activations are quantized as candle quantizes them for the same weight format (per
//! 32-block int8 with `d = max|x| / 127`, `q = round_half_away(x / d)`, `d` and, for Q8_1,
//! `s = d * Σq` rounded to f16), so the operands are candle's.
//!
//! Q4_1: the sum differs from candle's only in f32 rounding order: per pair of blocks the
//! kernel forms 8 exact i32 partial sums (4 per block), and keeps 8 f32 lanes,
//! `acc = fma(sumi, d4 * d8, acc)` pair after pair, then `acc = fma(m4, s8, acc)` over the
//! blocks' minimum terms, 8 blocks at a time, and one fixed horizontal sum at the end.
//! (candle adds `sumi * d4 * d8 + m4 * s8` block after block into one f32; that serial chain
//! of float work per block was what bound the previous, candle-exact version of this kernel.)
//! The result is within a few f32 ulps of the terms' magnitude of candle's (tested).
//!
//! Q8_0: candle's AVX arithmetic bit for bit (see `q8_0`).
//!
//! Batch independence, bitwise: every (weight row, activation row) pair gets the same
//! instruction sequence whatever tile, batch or thread it lands in, and the AVX2, AVX-VNNI
//! (same exact integer sums) and scalar (`mul_add` = FMA, same lanes and order) kernels agree
//! bit for bit. The engine relies on this: a sample's tokens must not depend on what it was
//! batched with.

// The kernels index several register arrays by the same tile coordinates (i, r); iterators
// would obscure that.
#![allow(clippy::needless_range_loop)]

mod acts;
mod kernel;
mod q4_1;
mod q8_0;
#[cfg(test)]
mod test_util;

pub use q4_1::Q4_1;
pub use q8_0::Q8_0;

use acts::Activations;
use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use kernel::kernel;
use rayon::prelude::*;
use std::marker::PhantomData;

/// A `[out_features, in_features]` GGUF Q4_1 weight matrix (see [`Q4_1`]).
pub type Q4_1Matrix = QuantMatrix<Q4_1>;
/// A `[out_features, in_features]` GGUF Q8_0 weight matrix (see [`Q8_0`]).
pub type Q8_0Matrix = QuantMatrix<Q8_0>;

/// Values per activation block, and per block of the 32-value weight formats.
const QK: usize = 32;
/// Largest activation-row tile of a kernel call.
const ROW_TILE: usize = 4;
/// Most (weight row, activation row) pairs of one kernel call.
const MAX_PAIRS: usize = 8;
/// Weight rows per parallel work item; their bytes (<= 15 KiB of Q4_1 at in = 1536) stay in
/// L1/L2 while every activation tile passes over them.
const ROWS_PER_TASK: usize = 16;
/// Matmuls of at most this many (32 weights x activation row) products run on the calling
/// thread: a few us of work, about what splitting a job over rayon's workers costs when the
/// caller is itself a worker (the models run their forward on one, see `on_a_worker`). On
/// SmolLM2 single-stream decode (2 cores), 3,000 measured ~15% faster than 12,000, which was
/// right when the forward ran outside the pool and each split cost two context switches;
/// 800 measured the same as 3,000.
const SERIAL_MAX_BLOCKS: usize = 3_000;

/// The activation rows a format's kernels take (one tile of its [`BlockFormat::Acts`]).
pub type RowsOf<'a, F> = <<F as BlockFormat>::Acts as Activations>::Rows<'a>;

/// What one GGUF block format supplies to [`QuantMatrix`]: its block geometry, how its blocks
/// are repacked into our row layout, and its kernels for one tile of `W` weight rows against
/// `R` activation rows (`(W, R)` one of `(1..=4, 1..=2)` and `(1..=2, 3..=4)`). Every kernel
/// of a format must give the same bits for a (weight row, activation row) pair, whatever the
/// tile (see the module docs).
///
/// Implemented by the formats of this module ([`Q4_1`], [`Q8_0`]) only: the kernels rely on
/// invariants of this module's activation layouts. A format whose activations are not
/// quantized in 32-value blocks (the K-quants take candle's Q8_K, 256 values a block) brings
/// its own `Activations` layout, overriding its `quantize`.
pub trait BlockFormat: Clone + Send + Sync + 'static {
    /// The ggml type of the tensors this format takes.
    const DTYPE: GgmlDType;
    /// Name of the candle op.
    const OP_NAME: &'static str;
    /// Weights per block.
    const BLOCK_VALUES: usize;
    /// Bytes per block as GGUF stores it.
    const BLOCK_BYTES: usize;
    /// Zero bytes after the last repacked row, for kernels that read past a row's end.
    const PAD: usize;
    /// The activation quantization and layout the kernels take.
    type Acts: Activations;

    /// Bytes of one repacked row of `nb` blocks.
    fn row_bytes(nb: usize) -> usize;

    /// Repacks one weight row: `src` holds its `nb` blocks as GGUF stores them
    /// (`nb * BLOCK_BYTES` bytes), `dst` the row in our layout (`row_bytes(nb)` zero bytes).
    fn repack_row(src: &[u8], dst: &mut [u8]);

    /// Portable kernel: one weight row `wrow` (`row_bytes` long) against the `R` rows of `a`,
    /// `res[r]` for `r < R`. The reference the SIMD kernels match bit for bit.
    fn dot_portable<const R: usize>(wrow: &[u8], a: RowsOf<'_, Self>, res: &mut [f32]);

    /// x86_64 kernel body for one tile, compiled into an AVX2 and an AVX-VNNI entry point by
    /// `kernel` (`VNNI` says which): `res[i * R + r] = <weight row i, activation row r>`.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c (and avxvnni if `VNNI`); `w` must hold `W`
    /// rows (`row_bytes` each) and `PAD` bytes more, `a` exactly `R` rows and `res` `W * R`
    /// entries.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_x86<const W: usize, const R: usize, const VNNI: bool>(
        w: &[u8],
        a: RowsOf<'_, Self>,
        res: &mut [f32],
    );
}

/// A `[out_features, in_features]` weight matrix in the block format `F`, repacked at load into
/// `F`'s row layout (row `o` at `o * F::row_bytes(nb)`), `F::PAD` zero bytes after the last
/// row.
#[derive(Clone)]
pub struct QuantMatrix<F: BlockFormat> {
    out_features: usize,
    in_features: usize,
    data: Vec<u8>,
    format: PhantomData<F>,
}

impl<F: BlockFormat> std::fmt::Debug for QuantMatrix<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(&format!("{:?}Matrix", F::DTYPE))
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .finish_non_exhaustive()
    }
}

impl<F: BlockFormat> QuantMatrix<F> {
    /// Bytes of the repacked matrix in memory.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Copies the blocks of a 2-D tensor of `F`'s dtype into our layout; `None` for any other
    /// dtype. Errors when the tensor is not 2-D, when `in_features` is not a multiple of the
    /// block size, or when its bytes do not match its shape.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if q.dtype() != F::DTYPE {
            return Ok(None);
        }
        let (out_features, in_features) = q.shape().dims2()?;
        if in_features % F::BLOCK_VALUES != 0 {
            candle_core::bail!(
                "{:?} tensor with in_features {in_features} not a multiple of {}",
                F::DTYPE,
                F::BLOCK_VALUES
            );
        }
        let raw = q.data()?;
        let nb = in_features / F::BLOCK_VALUES;
        let src_bytes = nb * F::BLOCK_BYTES;
        if raw.len() != out_features * src_bytes {
            candle_core::bail!(
                "{:?} tensor {:?} holds {} bytes, expected {}",
                F::DTYPE,
                q.shape(),
                raw.len(),
                out_features * src_bytes
            );
        }
        let row_bytes = F::row_bytes(nb);
        let mut data = vec![0u8; out_features * row_bytes + F::PAD];
        if nb > 0 {
            for (src, dst) in raw
                .chunks_exact(src_bytes)
                .zip(data.chunks_exact_mut(row_bytes))
            {
                F::repack_row(src, dst);
            }
        }
        Ok(Some(Self {
            out_features,
            in_features,
            data,
            format: PhantomData,
        }))
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `x W^T` for a CPU f32 tensor `[.., in]`, giving `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    fn row_bytes(&self) -> usize {
        F::row_bytes(self.in_features / F::BLOCK_VALUES)
    }

    /// `y[n, out] = x[n, in] W^T` on contiguous slices.
    fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (inp, out) = (self.in_features, self.out_features);
        assert!(x.len() == n * inp && y.len() == n * out);
        let kernel = kernel();
        let acts = F::Acts::quantize(x, n, inp, kernel);
        let row_bytes = self.row_bytes();
        drive(out, n, inp / QK, y, |o, wn, r0, rt, res| {
            // Row `o` on, with the bytes after the last row (see `BlockFormat::PAD`).
            kernel.tile::<F>(&self.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
        });
    }
}

impl<F: BlockFormat> CustomOp1 for QuantMatrix<F> {
    fn name(&self) -> &'static str {
        F::OP_NAME
    }

    /// `[.., in]` f32 activations in, `[.., out]` out.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match storage {
            CpuStorage::F32(v) => v,
            other => candle_core::bail!(
                "quantized matmul takes f32 activations, got {:?}",
                other.dtype()
            ),
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.in_features) {
            candle_core::bail!(
                "quantized matmul: activations {dims:?} do not end in in_features {}",
                self.in_features
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized matmul: activations must be contiguous")
        };
        let n = dims[..dims.len() - 1].iter().product();
        let mut y = vec![0f32; n * self.out_features];
        self.matmul(&x[start..end], n, &mut y);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.out_features;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// Tiles `(activation rows, weight rows)` of the kernels for `left` activation rows still to
/// do: up to 4 x 2 pairs (8 f32 accumulators of 8 lanes, plus the unpacked weights, fit the 16
/// ymm registers), and 4 weight rows for a single activation row (decode).
fn tile(left: usize) -> (usize, usize) {
    match left {
        1 => (1, 4),
        2 => (2, 4),
        3 => (3, 2),
        _ => (ROW_TILE, 2),
    }
}

/// Runs `dot(o, wn, r0, rt, res)` (weight rows `o..o + wn` against activation rows
/// `r0..r0 + rt`, `wn * rt` results into `res`, `res[w * rt + r]`) over the whole `[n, out]`
/// output `y` (`row_blocks` 32-weight blocks per row), in parallel (rayon) over chunks of
/// weight rows, with tiles `(rt, most wn) = tile(activation rows left)`. How the work is split
/// never changes a result.
fn drive(
    out: usize,
    n: usize,
    row_blocks: usize,
    y: &mut [f32],
    dot: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(y.len(), n * out);
    if n == 0 || out == 0 {
        return;
    }
    let y_ptr = SendPtr(y.as_mut_ptr());
    let task = |t: usize| {
        let o0 = t * ROWS_PER_TASK;
        let o1 = out.min(o0 + ROWS_PER_TASK);
        // Activation tiles outside, weight rows inside: the task's weight rows are fetched
        // from memory once and then reused from cache by every tile.
        let mut r0 = 0;
        while r0 < n {
            let (rt, wt) = tile(n - r0);
            debug_assert!(rt * wt <= MAX_PAIRS && rt <= n - r0);
            tile_span(o0..o1, r0, rt, wt, &dot, |r, o, v| {
                // SAFETY: `r < n` and `o < o1 <= out`, so the index is inside `y` (`n * out`
                // long, borrowed mutably for this whole call); each (row, column) is written
                // by exactly one task (tasks own disjoint column ranges `o0..o1`), so no two
                // threads touch the same element.
                unsafe { *y_ptr.get().add(r * out + o) = v };
            });
            r0 += rt;
        }
    };
    let tasks = out.div_ceil(ROWS_PER_TASK);
    if out * n * row_blocks <= SERIAL_MAX_BLOCKS {
        // Too small to pay a rayon round trip (the caller waits for woken workers).
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// One row of tiles: weight rows `cols`, at most `wt` at a time, against activation rows
/// `r0..r0 + rt`, through `dot` as [`drive`] calls it, each result handed to
/// `put(activation row, weight row, value)`.
#[inline(always)]
fn tile_span(
    cols: std::ops::Range<usize>,
    r0: usize,
    rt: usize,
    wt: usize,
    dot: &impl Fn(usize, usize, usize, usize, &mut [f32]),
    mut put: impl FnMut(usize, usize, f32),
) {
    let mut o = cols.start;
    while o < cols.end {
        let wn = wt.min(cols.end - o);
        let mut res = [0f32; MAX_PAIRS];
        dot(o, wn, r0, rt, &mut res[..wn * rt]);
        for wi in 0..wn {
            for r in 0..rt {
                put(r0 + r, o + wi, res[wi * rt + r]);
            }
        }
        o += wn;
    }
}

/// A raw output pointer shared by the parallel tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used in `drive`, where tasks write disjoint elements of a buffer that outlives
// the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    // A method (not field access) so closures capture the whole Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}
