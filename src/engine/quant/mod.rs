//! Our own CPU matmul for GGUF Q4_1 weights, `y = x W^T` with `W` kept in its 4-bit blocks.
//!
//! Why this exists: candle 0.11.1 has no SIMD kernel for Q4_1 (its `vec_dot` is the scalar
//! `vec_dot_unopt`, 83% of decode time on SmolLM2-135M Q4_1), and its quantized matmul walks
//! the whole weight matrix once per activation row, so a batch of sequences costs as many
//! weight reads as running them one by one. Here each weight row is read from memory once per
//! forward and each 32-weight block is unpacked once for a whole tile of activation rows (up to
//! 4 x 2 (weight row, activation row) pairs share registers), with an AVX2 kernel (plus
//! FMA/F16C, and AVX-VNNI when the CPU has it, all detected at run time) and a portable scalar
//! fallback.
//!
//! Numerics: activations are quantized as candle's Q8_1 (per 32-block int8 with
//! `d = max|x| / 127`, `q = round_half_away(x / d)`, `d` and `s = d * Σq` rounded to f16), so
//! the operands are candle's. The sum differs from candle's only in f32 rounding order: per
//! pair of blocks the kernel forms 8 exact i32 partial sums (4 per block), and keeps 8 f32
//! lanes, `acc = fma(sumi, d4 * d8, acc)` pair after pair, then `acc = fma(m4, s8, acc)` over
//! the blocks' minimum terms, 8 blocks at a time, and one fixed horizontal sum at the end.
//! (candle adds `sumi * d4 * d8 + m4 * s8` block after block into one f32; that serial chain of
//! float work per block was what bound the previous, candle-exact version of this kernel.)
//! The result is within a few f32 ulps of the terms' magnitude of candle's (tested).
//!
//! Batch independence, bitwise: every (weight row, activation row) pair gets the same
//! instruction sequence whatever tile, batch or thread it lands in, and the AVX2, AVX-VNNI
//! (same exact integer sums) and scalar (`mul_add` = FMA, same lanes and order) kernels agree
//! bit for bit. The engine relies on this: a sample's tokens must not depend on what it was
//! batched with.
//!
//! [`Q8_0Matrix`] does the same for Q8_0 weights (the tied output head of SmolLM2-135M Q4_1,
//! 28M weights, was the next cost once Q4_1 was fast), bitwise equal to candle's AVX Q8_0 dot.

// The kernels index several register arrays by the same tile coordinates (i, r); iterators
// would obscure that.
#![allow(clippy::needless_range_loop)]

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Weights per Q4_1 (and activation) block.
const QK: usize = 32;
/// Bytes per Q4_1 block in GGUF: `d: f16, m: f16` and 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;
/// Zero bytes after the last row: the kernel reads nibbles two blocks (32 bytes) at a time,
/// and for an odd block count the last read runs 16 bytes past the row (the bytes meet zero
/// activations).
const PAD: usize = 16;
/// Largest activation-row tile of a kernel call.
const ROW_TILE: usize = 4;
/// Most (weight row, activation row) pairs of one kernel call.
const MAX_PAIRS: usize = 8;
/// Weight rows per parallel work item; their bytes (<= 15 KiB at in = 1536) stay in L1/L2 while
/// every activation tile passes over them.
const ROWS_PER_TASK: usize = 16;
/// Matmuls of at most this many (weight block x activation row) products run on the calling
/// thread: a few us of work, about what splitting a job over rayon's workers costs when the
/// caller is itself a worker (the models run their forward on one, see `on_a_worker`). On
/// SmolLM2 single-stream decode (2 cores), 3,000 measured ~15% faster than 12,000, which was
/// right when the forward ran outside the pool and each split cost two context switches;
/// 800 measured the same as 3,000.
const SERIAL_MAX_BLOCKS: usize = 3_000;

/// Where things are in one repacked Q4_1 row of `nb` blocks: the `d` scales (f16, padded with
/// zeros to an even count, so block pairs load theirs together), the `m` minimums (f16, padded
/// with zeros to a multiple of 8, so the minimum terms go 8 blocks at a time), then the
/// `nb * 16` nibble bytes (ggml's order: byte `j` of a block holds weight `j` in its low nibble
/// and weight `j + 16` in its high nibble).
#[derive(Clone, Copy, Debug)]
struct RowLayout {
    nb: usize,
}

impl RowLayout {
    /// Block pairs.
    fn np(self) -> usize {
        self.nb.div_ceil(2)
    }
    /// Blocks rounded up to a multiple of 8.
    fn nb8(self) -> usize {
        self.nb.div_ceil(8) * 8
    }
    fn m_off(self) -> usize {
        4 * self.np()
    }
    fn nib_off(self) -> usize {
        self.m_off() + 2 * self.nb8()
    }
    fn row_bytes(self) -> usize {
        self.nib_off() + 16 * self.nb
    }
}

/// A `[out_features, in_features]` Q4_1 weight matrix, repacked at load into [`RowLayout`]
/// rows (row `o` at `o * row_bytes`), `PAD` zero bytes after the last row.
#[derive(Clone)]
pub struct Q4_1Matrix {
    out_features: usize,
    in_features: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4_1Matrix")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .finish_non_exhaustive()
    }
}

impl Q4_1Matrix {
    /// Bytes of the repacked matrix in memory.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Copies the blocks of a 2-D Q4_1 tensor into our layout; `None` for any other dtype.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if q.dtype() != GgmlDType::Q4_1 {
            return Ok(None);
        }
        let (out_features, in_features) = q.shape().dims2()?;
        if in_features % QK != 0 {
            candle_core::bail!("Q4_1 tensor with in_features {in_features} not a multiple of {QK}");
        }
        let raw = q.data()?;
        let lay = RowLayout {
            nb: in_features / QK,
        };
        let src_bytes = lay.nb * Q4_1_BYTES;
        if raw.len() != out_features * src_bytes {
            candle_core::bail!(
                "Q4_1 tensor {:?} holds {} bytes, expected {}",
                q.shape(),
                raw.len(),
                out_features * src_bytes
            );
        }
        let mut data = vec![0u8; out_features * lay.row_bytes() + PAD];
        for (src, dst) in raw
            .chunks_exact(src_bytes)
            .zip(data.chunks_exact_mut(lay.row_bytes()))
        {
            let (ds, rest) = dst.split_at_mut(lay.m_off());
            let (ms, nibbles) = rest.split_at_mut(lay.nib_off() - lay.m_off());
            for (b, blk) in src.chunks_exact(Q4_1_BYTES).enumerate() {
                ds[b * 2..b * 2 + 2].copy_from_slice(&blk[..2]);
                ms[b * 2..b * 2 + 2].copy_from_slice(&blk[2..4]);
                nibbles[b * 16..b * 16 + 16].copy_from_slice(&blk[4..]);
            }
        }
        Ok(Some(Self {
            out_features,
            in_features,
            data,
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

    fn layout(&self) -> RowLayout {
        RowLayout {
            nb: self.in_features / QK,
        }
    }

    /// `y[n, out] = x[n, in] W^T` on contiguous slices.
    fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (inp, out) = (self.in_features, self.out_features);
        assert!(x.len() == n * inp && y.len() == n * out);
        let kernel = kernel();
        let acts = Acts::quantize(x, n, inp, kernel);
        let row_bytes = self.layout().row_bytes();
        drive(out, n, inp / QK, y, tile, |o, wn, r0, rt, res| {
            // Row `o` on, with the bytes after the last row (see `PAD`).
            kernel.dot(&self.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
        });
    }
}

/// Tiles `(activation rows, weight rows)` of both kernels for `left` activation rows still to
/// do: up to 4 x 2 pairs (8 f32 accumulators of 8 lanes, plus the unpacked nibbles, fit the 16 ymm
/// registers), and 4 weight rows for a single activation row (decode).
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
/// output `y` (`row_blocks` blocks per row), in parallel (rayon) over chunks of weight rows,
/// with tiles `(rt, most wn) = tile(activation rows left)`. How the work is split never changes
/// a result.
fn drive(
    out: usize,
    n: usize,
    row_blocks: usize,
    y: &mut [f32],
    tile: fn(usize) -> (usize, usize),
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
            let mut o = o0;
            while o < o1 {
                let wn = wt.min(o1 - o);
                let mut res = [0f32; MAX_PAIRS];
                dot(o, wn, r0, rt, &mut res[..wn * rt]);
                for wi in 0..wn {
                    for r in 0..rt {
                        // SAFETY: `r0 + r < n` and `o + wi < o1 <= out`, so the index is
                        // inside `y` (`n * out` long, borrowed mutably for this whole call);
                        // each (row, column) is written by exactly one task (tasks own
                        // disjoint column ranges `o0..o1`), so no two threads touch the same
                        // element.
                        unsafe { *y_ptr.get().add((r0 + r) * out + o + wi) = res[wi * rt + r] };
                    }
                }
                o += wn;
            }
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

impl CustomOp1 for Q4_1Matrix {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(
            self.in_features,
            self.out_features,
            storage,
            layout,
            |x, n, y| self.matmul(x, n, y),
        )
    }
}

/// `[.., in]` f32 activations in, `[.., out]` out, `matmul(x, n, y)` in between.
fn cpu_fwd(
    in_features: usize,
    out_features: usize,
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let x = match storage {
        CpuStorage::F32(v) => v,
        other => candle_core::bail!(
            "quantized matmul takes f32 activations, got {:?}",
            other.dtype()
        ),
    };
    let dims = layout.shape().dims();
    if dims.last() != Some(&in_features) {
        candle_core::bail!(
            "quantized matmul: activations {dims:?} do not end in in_features {in_features}"
        );
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("quantized matmul: activations must be contiguous")
    };
    let n = dims[..dims.len() - 1].iter().product();
    let mut y = vec![0f32; n * out_features];
    matmul(&x[start..end], n, &mut y);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out_features;
    Ok((CpuStorage::F32(y), Shape::from(out_dims)))
}


// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

/// Activation rows quantized to int8 blocks, as candle's `BlockQ8_1::from_float` does (f16
/// values of `d` and `s`), so that ours and candle's QMatMul see the same activations.
///
/// The quants of each row come in pairs of blocks laid out to match how 32 bytes of nibbles
/// (blocks `2p` and `2p + 1`) unpack: 64 bytes holding values 0..16 of block `2p`, then 0..16
/// of `2p + 1` (the low nibbles), then values 16..32 of each (the high nibbles). An odd last
/// block is paired with zeros. The scales come ready for the kernel's lanes.
struct Acts {
    lay: RowLayout,
    /// `n * np` block pairs.
    qs: Vec<[i8; 2 * QK]>,
    /// Per block pair, `d` of block `2p` in lanes 0..4 and of `2p + 1` in lanes 4..8 (the
    /// lanes holding those blocks' partial sums); zero for a missing odd block.
    d: Vec<[f32; 8]>,
    /// Block sums `s = d * Σq`, `nb8` per row (zero past `nb`).
    s: Vec<f32>,
}

/// Activation rows `r0..r0 + R` of an [`Acts`], exactly those rows' data.
#[derive(Clone, Copy)]
struct ActRows<'a> {
    lay: RowLayout,
    qs: &'a [[i8; 2 * QK]],
    d: &'a [[f32; 8]],
    s: &'a [f32],
}

impl<'a> ActRows<'a> {
    /// Rows in this tile.
    fn len(&self) -> usize {
        self.d.len() / self.lay.np().max(1)
    }

    /// Values 0..16 and 16..32 of block `b` of row `r`.
    fn halves(&self, r: usize, b: usize) -> (&'a [i8], &'a [i8]) {
        let pair: &'a [i8; 2 * QK] = &self.qs[r * self.lay.np() + b / 2];
        let h = (b % 2) * 16;
        (&pair[h..h + 16], &pair[QK + h..QK + h + 16])
    }

    /// `d` of block `b` of row `r`.
    #[cfg(test)]
    fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[r * self.lay.np() + b / 2][(b % 2) * 4]
    }
}

impl Acts {
    /// The AVX2 quantizer performs the same IEEE operations as the scalar one: same bits.
    fn quantize(x: &[f32], n: usize, inp: usize, kernel: Kernel) -> Self {
        assert_eq!(x.len(), n * inp);
        let lay = RowLayout { nb: inp / QK };
        let (nb, np, nb8) = (lay.nb, lay.np(), lay.nb8());
        let mut a = Acts {
            lay,
            qs: vec![[0; 2 * QK]; n * np],
            d: vec![[0.0; 8]; n * np],
            s: vec![0.0; n * nb8],
        };
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            let (q, d, s) = kernel.quantize_block(xb);
            let (r, b) = (i / nb, i % nb);
            let h = (b % 2) * 16;
            let pair = &mut a.qs[r * np + b / 2];
            pair[h..h + 16].copy_from_slice(&q[..16]);
            pair[QK + h..QK + h + 16].copy_from_slice(&q[16..]);
            a.d[r * np + b / 2][(b % 2) * 4..][..4].fill(d);
            a.s[r * nb8 + b] = s;
        }
        a
    }

    fn rows(&self, r0: usize, nr: usize) -> ActRows<'_> {
        let (np, nb8) = (self.lay.np(), self.lay.nb8());
        ActRows {
            lay: self.lay,
            qs: &self.qs[r0 * np..(r0 + nr) * np],
            d: &self.d[r0 * np..(r0 + nr) * np],
            s: &self.s[r0 * nb8..(r0 + nr) * nb8],
        }
    }
}

/// One block: quants, `d` and `s` (both f16 values).
fn quantize_block_scalar(xb: &[f32]) -> ([i8; QK], f32, f32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xb) {
        let r = round_half_away(v * id);
        *q = r as i8;
        sum += r;
    }
    let d16 = round_f16(d);
    (qs, d16, round_f16(round_f16(sum as f32) * d16))
}

/// `f32::round` (half away from zero) for |v| <= 127, without the libm call it compiles to on
/// baseline x86_64: truncate, then step away from zero when the (exact) remainder is >= 0.5.
#[inline]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// IEEE binary16 bits to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to the nearest binary16 (ties to even), returned as bits.
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        // Inf stays Inf; NaN stays a (quiet) NaN.
        return sign
            | 0x7c00
            | if man != 0 {
                0x200 | (man >> 13) as u16
            } else {
                0
            };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal or zero in f16: shift the full significand (with hidden bit) into place.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32; // 24-bit significand down to the 10-bit subnormal field
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent, and up to Inf, which is the right rounding
    }
    sign | r as u16
}

/// `x` rounded to the nearest f16 value, as f32.
fn round_f16(x: f32) -> f32 {
    f16_to_f32(f32_to_f16(x))
}


// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// [`Kernel::Avx2`] plus AVX-VNNI: `vpdpbusd` forms the Q4_1 integer sums (the same exact
    /// values) in two instructions where AVX2 needs four.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

/// The kernel for this process, fixed at first use.
fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avxvnni") {
                return Kernel::Vnni;
            }
            return Kernel::Avx2;
        }
        Kernel::Scalar
    })
}

/// Every kernel this CPU can run, the portable one first (for tests comparing them).
#[cfg(test)]
fn kernels_here() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        Kernel::Vnni => ks.extend([Kernel::Avx2, Kernel::Vnni]),
        Kernel::Avx2 => ks.push(Kernel::Avx2),
        Kernel::Scalar => {}
    }
    if ks.len() < 3 {
        eprintln!("*** this CPU runs only {ks:?}: the other kernels go unchecked ***");
    }
    ks
}

/// Calls `$m::$f::<W, R>$args` for the tile `($nw, $nr)`, one of the listed shapes.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($nw:expr, $nr:expr, $m:ident::$f:ident, $args:tt, [$(($w:literal, $r:literal)),*]) => {
        match ($nw, $nr) {
            $(($w, $r) => $m::$f::<$w, $r> $args,)*
            (w, r) => unreachable!("tile of {w} x {r}"),
        }
    };
}

impl Kernel {
    /// One activation block quantized: quants, `d` and `s` (both f16 values). Same bits from
    /// every kernel.
    fn quantize_block(self, xb: &[f32]) -> ([i8; QK], f32, f32) {
        match self {
            Kernel::Scalar => quantize_block_scalar(xb),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: these kernels are chosen only on CPUs with avx2, fma and f16c; the
            // function checks the block length itself.
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2::quantize_block(xb) },
        }
    }

    /// `res[w * R + r] = <weight row w, activation row r>` for the `nw` weight rows at the
    /// start of `w` (followed by at least `PAD` more bytes) and the R = `a.len()` rows of `a`.
    /// Supported `(nw, R)`: `(1..=4, 1..=2)` and `(1..=2, 3..=4)`.
    #[inline]
    fn dot(self, w: &[u8], nw: usize, a: ActRows<'_>, res: &mut [f32]) {
        let lay = a.lay;
        let nr = a.len();
        assert!(
            w.len() >= nw * lay.row_bytes() + PAD
                && a.qs.len() == nr * lay.np()
                && a.s.len() == nr * lay.nb8()
                && res.len() == nw * nr
        );
        match self {
            Kernel::Scalar => {
                let rows = w[..nw * lay.row_bytes()].chunks_exact(lay.row_bytes());
                for (wrow, res) in rows.zip(res.chunks_exact_mut(nr)) {
                    dot_scalar(wrow, a, res);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only chosen after detecting avx2, fma and f16c; the
            // lengths the kernel relies on were checked above.
            Kernel::Avx2 => unsafe {
                dispatch_tile!(nw, nr, avx2::dot_q4_1, (w, a, res),
                    [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (3, 2), (4, 2),
                     (1, 3), (2, 3), (1, 4), (2, 4)])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and `Kernel::Vnni` also needs avxvnni, detected likewise.
            Kernel::Vnni => unsafe {
                dispatch_tile!(nw, nr, avx2::dot_q4_1_vnni, (w, a, res),
                    [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (3, 2), (4, 2),
                     (1, 3), (2, 3), (1, 4), (2, 4)])
            },
        }
    }
}

/// The kernels' fixed horizontal sum of 8 lanes: `((v4 + v0) + (v6 + v2)) + ((v5 + v1) +
/// (v7 + v3))`, the order of AVX's extract-high-half, movehl and movehdup reduction.
fn hsum8(v: [f32; 8]) -> f32 {
    ((v[4] + v[0]) + (v[6] + v[2])) + ((v[5] + v[1]) + (v[7] + v[3]))
}

/// Portable kernel: one weight row against the rows of `a`, the SIMD kernels' arithmetic lane
/// for lane (`mul_add` is the fused multiply-add): same bits.
fn dot_scalar(wrow: &[u8], a: ActRows<'_>, res: &mut [f32]) {
    let lay = a.lay;
    let (nb, np, nb8) = (lay.nb, lay.np(), lay.nb8());
    let f16_at = |off: usize| f16_to_f32(u16::from_le_bytes([wrow[off], wrow[off + 1]]));
    let nibbles = &wrow[lay.nib_off()..];
    for (r, res) in res.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        for p in 0..np {
            for h in 0..2 {
                let b = 2 * p + h;
                // Missing odd block: zero activations and zero scales, as in the SIMD kernels
                // (which read whatever bytes follow; any finite value times 0 adds +-0).
                let mut q4 = [0u8; QK];
                if b < nb {
                    for (j, &byte) in nibbles[b * 16..b * 16 + 16].iter().enumerate() {
                        q4[j] = byte & 0x0f;
                        q4[j + 16] = byte >> 4;
                    }
                }
                let (lo, hi) = a.halves(r, b);
                let sc = f16_at(2 * b) * a.d[r * np + p][h * 4];
                for k in 0..4 {
                    let sumi: i32 = (4 * k..4 * k + 4)
                        .map(|j| q4[j] as i32 * lo[j] as i32 + q4[j + 16] as i32 * hi[j] as i32)
                        .sum();
                    let lane = &mut acc[h * 4 + k];
                    *lane = (sumi as f32).mul_add(sc, *lane);
                }
            }
        }
        for c in 0..nb8 / 8 {
            for l in 0..8 {
                let m4 = f16_at(lay.m_off() + 2 * (8 * c + l));
                acc[l] = m4.mul_add(a.s[r * nb8 + 8 * c + l], acc[l]);
            }
        }
        *res = hsum8(acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Act8Rows, ActRows, Q8_0_BYTES, QK};
    use std::arch::x86_64::*;

    /// How far ahead of the nibbles being read to prefetch, in bytes. The hardware prefetcher
    /// alone leaves single-row matmuls (decode) well short of memory bandwidth on cold weights;
    /// 256 took ~20-35% off them (1536x576: 40 -> 32 us), with no change for 4-row tiles.
    const PREFETCH: usize = 256;

    /// The two compiled entry points of a kernel body: `$plain` for AVX2 (with FMA and F16C)
    /// and `$vnni` with AVX-VNNI as well.
    macro_rules! entry_points {
        ($body:ident, $rows:ident, $plain:ident, $vnni:ident) => {
            #[doc = concat!("[`", stringify!($body), "`] on AVX2.")]
            ///
            /// # Safety
            #[doc = concat!("As [`", stringify!($body), "`].")]
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $plain<const W: usize, const R: usize>(w: &[u8], a: $rows<'_>, res: &mut [f32]) {
                $body::<W, R, false>(w, a, res)
            }

            #[doc = concat!("[`", stringify!($body), "`] with AVX-VNNI.")]
            ///
            /// # Safety
            #[doc = concat!("As [`", stringify!($body), "`], and the CPU must support avxvnni.")]
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            pub(super) unsafe fn $vnni<const W: usize, const R: usize>(w: &[u8], a: $rows<'_>, res: &mut [f32]) {
                $body::<W, R, true>(w, a, res)
            }
        };
    }

    /// [`super::hsum8`] on a vector.
    #[inline(always)]
    unsafe fn hsum8(v: __m256) -> f32 {
        let v = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
    }

    /// The Q4_1 kernel, W weight rows against R activation rows; see the module docs for the
    /// arithmetic. Per block pair and weight row: 32 nibble bytes split into low and high
    /// nibbles (u8 values 0..16 of both blocks, then 16..32), and the two `d` scales spread
    /// over the lanes. Per (weight row, activation row): the 8 exact i32 partial sums (AVX2:
    /// `maddubs` u8 x i8 -> i16 pairs, at most 2 * 15 * 127, added, at most 4 * 15 * 127 so
    /// still exact, and `madd` with ones; VNNI: two `vpdpbusd`), converted (exact) and
    /// accumulated with one multiply and one FMA.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c (and avxvnni if `VNNI`); `w` must hold W rows
    /// laid out as `a.lay` says and `PAD` bytes more, `a` exactly R rows and `res` `W * R`
    /// entries.
    #[inline(always)]
    unsafe fn q4_1_body<const W: usize, const R: usize, const VNNI: bool>(
        w: &[u8],
        a: ActRows<'_>,
        res: &mut [f32],
    ) {
        let lay = a.lay;
        let (np, nb8, row_bytes) = (lay.np(), lay.nb8(), lay.row_bytes());
        let (m_off, nib_off) = (lay.m_off(), lay.nib_off());
        debug_assert!(w.len() >= W * row_bytes + super::PAD && a.len() == R && res.len() >= W * R);
        let wp = w.as_ptr();
        let aq = a.qs.as_ptr() as *const __m256i;
        let ad = a.d.as_ptr() as *const f32;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        for p in 0..np {
            for i in 0..W {
                // SAFETY (all raw reads): row i < W starts at `i * row_bytes`; the `d` pair of
                // block pair p < np is at `4 * p` (the `d`s are padded to an even count); its
                // 32 nibble bytes at `nib_off + 32 * p`, ending at most 16 bytes past the row,
                // inside `w` (`PAD`). Activation pair p of row r < R is `a.qs[r * np + p]`
                // (64 bytes), its spread scales `a.d[r * np + p]` (8 floats). The prefetch is a
                // hint and never faults.
                let row = wp.add(i * row_bytes);
                let nib = row.add(nib_off + 32 * p);
                _mm_prefetch::<_MM_HINT_T0>((nib as *const i8).wrapping_add(PREFETCH));
                let v = _mm256_loadu_si256(nib as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                let d2 = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (row.add(4 * p) as *const i32).read_unaligned(),
                ));
                let dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d2), spread);
                for r in 0..R {
                    let at = r * np + p;
                    let (a0, a1) = (
                        _mm256_loadu_si256(aq.add(2 * at)),
                        _mm256_loadu_si256(aq.add(2 * at + 1)),
                    );
                    let sumi = if VNNI {
                        _mm256_dpbusd_avx_epi32(
                            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a0),
                            hi,
                            a1,
                        )
                    } else {
                        let s = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, a0),
                            _mm256_maddubs_epi16(hi, a1),
                        );
                        _mm256_madd_epi16(s, ones)
                    };
                    let sc = _mm256_mul_ps(dw, _mm256_loadu_ps(ad.add(8 * at)));
                    acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), sc, acc[i][r]);
                }
            }
        }
        // The minimum terms `m4 * s8`, 8 blocks at a time (both padded with zeros).
        for c in 0..nb8 / 8 {
            for i in 0..W {
                let ms = wp.add(i * row_bytes + m_off + 16 * c) as *const __m128i;
                let m4 = _mm256_cvtph_ps(_mm_loadu_si128(ms));
                for r in 0..R {
                    let s8 = _mm256_loadu_ps(a.s.as_ptr().add(r * nb8 + 8 * c));
                    acc[i][r] = _mm256_fmadd_ps(m4, s8, acc[i][r]);
                }
            }
        }
        for i in 0..W {
            for r in 0..R {
                res[i * R + r] = hsum8(acc[i][r]);
            }
        }
    }

    entry_points!(q4_1_body, ActRows, dot_q4_1, dot_q4_1_vnni);

    /// Q8_0 kernel, W weight rows against R activation rows, with candle's AVX arithmetic:
    /// per block, `|w|` (u8) times `x` signed by `w` (`maddubs`, at most 2 * 128 * 127 per
    /// pair, so no saturation), `madd` with ones: 8 exact i32 lane sums; `fma` with the
    /// broadcast `dw * dx` into 8 f32 lanes; candle's horizontal sum at the end. `|w|` and
    /// `dw` are computed once per weight block for all R rows.
    ///
    /// With `VNNI`, one `vpdpbusd` of `|w|` and the signed `x` gives the same exact lane sums
    /// as `maddubs` + `madd`.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c (and avxvnni if `VNNI`); `w` must hold W rows
    /// of `a.nb` Q8_0 blocks, `a.qs` and `a.d` R rows of blocks, and `res` `W * R` entries.
    #[inline(always)]
    unsafe fn q8_0_body<const W: usize, const R: usize, const VNNI: bool>(
        w: &[u8],
        a: Act8Rows<'_>,
        res: &mut [f32],
    ) {
        let nb = a.nb;
        let row_bytes = nb * Q8_0_BYTES;
        debug_assert!(w.len() >= W * row_bytes && a.qs.len() >= R * nb && res.len() >= W * R);
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        for b in 0..nb {
            let mut wq = [_mm256_setzero_si256(); W];
            let mut wabs = [_mm256_setzero_si256(); W];
            let mut dw = [0f32; W];
            for i in 0..W {
                // SAFETY: row i < W: the scale of block b < nb is at byte
                // `i * row_bytes + 2 * b`, its 32 quants at `i * row_bytes + 2 * nb + 32 * b`,
                // inside `w`. The prefetch is a hint and never faults.
                let row = wp.add(i * row_bytes);
                let q = row.add(2 * nb + QK * b);
                _mm_prefetch::<_MM_HINT_T0>((q as *const i8).wrapping_add(PREFETCH));
                wq[i] = _mm256_loadu_si256(q as *const __m256i);
                wabs[i] = _mm256_sign_epi8(wq[i], wq[i]);
                let h = (row.add(2 * b) as *const u16).read_unaligned();
                dw[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
            }
            for r in 0..R {
                // SAFETY: activation block b of row r < R.
                let x = _mm256_loadu_si256(a.qs.as_ptr().add(r * nb + b) as *const __m256i);
                let dx = a.d[r * nb + b];
                for i in 0..W {
                    let sx = _mm256_sign_epi8(x, wq[i]);
                    let lanes = if VNNI {
                        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wabs[i], sx)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[i], sx), ones)
                    };
                    let d = _mm256_set1_ps(dw[i] * dx);
                    acc[i][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[i][r]);
                }
            }
        }
        for i in 0..W {
            for r in 0..R {
                res[i * R + r] = hsum8(acc[i][r]);
            }
        }
    }

    entry_points!(q8_0_body, Act8Rows, dot_q8_0, dot_q8_0_vnni);

    /// [`super::quantize_block_scalar`] with the same operations, 8 lanes at a time: the
    /// absolute maximum (exact in any order), `x * id`, truncation and the +-0.5 remainder
    /// test, and F16C's round-to-nearest-even for the f16 scales.
    ///
    /// # Safety
    /// The CPU must support avx2 and f16c; `xb` must hold 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32]) -> ([i8; QK], f32, f32) {
        assert!(xb.len() >= QK);
        // SAFETY: four 8-float loads within the 32 checked above.
        let x = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(xb.as_ptr().add(i)));
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = x.map(|v| _mm256_and_ps(v, abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let neg_half = _mm256_set1_ps(-0.5);
        let q = x.map(|v| {
            let v = _mm256_mul_ps(v, id);
            let t = _mm256_cvttps_epi32(v);
            let frac = _mm256_sub_ps(v, _mm256_cvtepi32_ps(t));
            // Compare masks are -1 where true: subtract to step up, add to step down.
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half));
            let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, neg_half));
            _mm256_add_epi32(_mm256_sub_epi32(t, up), down)
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        // Pack to i8 (values are within -127..=127, no saturation); packs interleave the
        // 128-bit lanes, and the permute puts the 32 values back in order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let qs: [i8; QK] = std::mem::transmute(p);
        let d16 = round_f16(d);
        (qs, d16, round_f16(round_f16(sum as f32) * d16))
    }

    /// `x` rounded to the nearest f16 (ties to even) with F16C, as f32.
    #[target_feature(enable = "f16c")]
    pub(super) fn round_f16(x: f32) -> f32 {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }
}

// ---------------------------------------------------------------------------------------------
// Q8_0
// ---------------------------------------------------------------------------------------------

/// Bytes per Q8_0 block: `d: f16` and 32 i8 quants.
const Q8_0_BYTES: usize = 34;

/// A `[out_features, in_features]` Q8_0 weight matrix, through the same batched driver as
/// [`Q4_1Matrix`]. GGUF files often keep the token embedding, and with it a tied output head,
/// in Q8_0 (SmolLM2-135M Q4_1 does): candle's Q8_0 matmul has an AVX dot but still runs it
/// per activation row, converting the f16 scales every time, which made the head a quarter of
/// batched decode time. Numerics are candle's AVX ones (`vec_dot_q8_0_q8_0`) bit for bit:
/// per block `d = dw * dx`, 8 exact i32 lane sums of `w * x`, `acc = fma(d, lanes, acc)`
/// lane-wise, and candle's horizontal sum at the end.
///
/// Row `o` occupies `row_bytes = nb * 34` bytes at `o * row_bytes`: the `nb` f16 scales
/// (2 bytes each), then the `nb * 32` quants.
#[derive(Clone)]
pub struct Q8_0Matrix {
    out_features: usize,
    in_features: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for Q8_0Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8_0Matrix")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .finish_non_exhaustive()
    }
}

impl Q8_0Matrix {
    /// Copies the blocks of a 2-D Q8_0 tensor into our layout; `None` for any other dtype.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if q.dtype() != GgmlDType::Q8_0 {
            return Ok(None);
        }
        let (out_features, in_features) = q.shape().dims2()?;
        if in_features % QK != 0 {
            candle_core::bail!("Q8_0 tensor with in_features {in_features} not a multiple of {QK}");
        }
        let raw = q.data()?;
        let nb = in_features / QK;
        let row_bytes = nb * Q8_0_BYTES;
        if raw.len() != out_features * row_bytes {
            candle_core::bail!(
                "Q8_0 tensor {:?} holds {} bytes, expected {}",
                q.shape(),
                raw.len(),
                out_features * row_bytes
            );
        }
        let mut data = vec![0u8; raw.len()];
        for (src, dst) in raw
            .chunks_exact(row_bytes)
            .zip(data.chunks_exact_mut(row_bytes))
        {
            let (scales, quants) = dst.split_at_mut(nb * 2);
            for (b, blk) in src.chunks_exact(Q8_0_BYTES).enumerate() {
                scales[b * 2..b * 2 + 2].copy_from_slice(&blk[..2]);
                quants[b * QK..(b + 1) * QK].copy_from_slice(&blk[2..]);
            }
        }
        Ok(Some(Self {
            out_features,
            in_features,
            data,
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

    fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (inp, out) = (self.in_features, self.out_features);
        assert!(x.len() == n * inp && y.len() == n * out);
        let kernel = kernel();
        let acts = Acts8::quantize(x, n, inp, kernel);
        let row_bytes = inp / QK * Q8_0_BYTES;
        drive(out, n, inp / QK, y, tile, |o, wn, r0, rt, res| {
            kernel.dot_q8_0(&self.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
        });
    }
}

impl CustomOp1 for Q8_0Matrix {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(
            self.in_features,
            self.out_features,
            storage,
            layout,
            |x, n, y| self.matmul(x, n, y),
        )
    }
}

/// Activation rows quantized as candle's `BlockQ8_0::from_float` does (the Q8_1 quantization
/// without `s`), quants in their natural order.
struct Acts8 {
    nb: usize,
    qs: Vec<[i8; QK]>,
    d: Vec<f32>,
}

/// Activation rows `r0..r0 + R` of an [`Acts8`].
#[derive(Clone, Copy)]
struct Act8Rows<'a> {
    nb: usize,
    qs: &'a [[i8; QK]],
    d: &'a [f32],
}

impl Acts8 {
    fn quantize(x: &[f32], n: usize, inp: usize, kernel: Kernel) -> Self {
        assert_eq!(x.len(), n * inp);
        let mut a = Acts8 {
            nb: inp / QK,
            qs: vec![[0; QK]; x.len() / QK],
            d: vec![0.0; x.len() / QK],
        };
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            let (q, d, _) = kernel.quantize_block(xb);
            (a.qs[i], a.d[i]) = (q, d);
        }
        a
    }

    fn rows(&self, r0: usize, nr: usize) -> Act8Rows<'_> {
        let nb = self.nb;
        Act8Rows {
            nb,
            qs: &self.qs[r0 * nb..(r0 + nr) * nb],
            d: &self.d[r0 * nb..(r0 + nr) * nb],
        }
    }
}

impl Kernel {
    /// As [`Kernel::dot`], for Q8_0 weights (no padding needed after the rows).
    #[inline]
    fn dot_q8_0(self, w: &[u8], nw: usize, a: Act8Rows<'_>, res: &mut [f32]) {
        let nb = a.nb;
        let nr = res.len() / nw;
        let row_bytes = nb * Q8_0_BYTES;
        assert!(
            w.len() >= nw * row_bytes
                && a.qs.len() == nr * nb
                && a.d.len() == nr * nb
                && res.len() == nw * nr
        );
        match self {
            Kernel::Scalar => {
                let rows = w[..nw * row_bytes].chunks_exact(row_bytes);
                for (wrow, res) in rows.zip(res.chunks_exact_mut(nr)) {
                    match nr {
                        1 => dot_q8_0_scalar::<1>(wrow, a, res),
                        2 => dot_q8_0_scalar::<2>(wrow, a, res),
                        3 => dot_q8_0_scalar::<3>(wrow, a, res),
                        4 => dot_q8_0_scalar::<4>(wrow, a, res),
                        _ => unreachable!("tile of {nr} rows"),
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: these kernels are only chosen after detecting avx2, fma and f16c; the
            // lengths the kernel relies on were checked above.
            Kernel::Avx2 => unsafe {
                dispatch_tile!(nw, nr, avx2::dot_q8_0, (w, a, res), [(1, 1), (2, 1), (3, 1),
                    (4, 1), (1, 2), (2, 2), (3, 2), (4, 2), (1, 3), (2, 3), (1, 4), (2, 4)])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and `Kernel::Vnni` also needs avxvnni, detected likewise.
            Kernel::Vnni => unsafe {
                dispatch_tile!(nw, nr, avx2::dot_q8_0_vnni, (w, a, res), [(1, 1), (2, 1), (3, 1),
                    (4, 1), (1, 2), (2, 2), (3, 2), (4, 2), (1, 3), (2, 3), (1, 4), (2, 4)])
            },
        }
    }
}

/// Portable Q8_0 kernel, one weight row against R activation rows, with the AVX kernel's
/// arithmetic (8 lanes, `mul_add` = FMA, the same horizontal sum): same bits.
fn dot_q8_0_scalar<const R: usize>(wrow: &[u8], a: Act8Rows<'_>, res: &mut [f32]) {
    let nb = a.nb;
    let (scales, quants) = wrow.split_at(nb * 2);
    let mut acc = [[0f32; 8]; R];
    for b in 0..nb {
        let dw = f16_to_f32(u16::from_le_bytes([scales[b * 2], scales[b * 2 + 1]]));
        let wq = &quants[b * QK..(b + 1) * QK];
        for r in 0..R {
            let i = r * nb + b;
            let d = dw * a.d[i];
            for (k, acc) in acc[r].iter_mut().enumerate() {
                let lane: i32 = (4 * k..4 * k + 4)
                    .map(|j| wq[j] as i8 as i32 * a.qs[i][j] as i32)
                    .sum();
                *acc = (lane as f32).mul_add(d, *acc);
            }
        }
    }
    for r in 0..R {
        res[r] = hsum8(acc[r]);
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{DType, Device, Module};

    const BATCHES: [usize; 7] = [1, 2, 3, 4, 5, 8, 17];
    /// in_features not a multiple of 256 (but of 32), with 3, 19 and 49 blocks so that short
    /// last groups of every length are covered; out_features not a multiple of the task size.
    const SHAPES: [(usize, usize); 3] = [(50, 96), (37, 608), (70, 1568)];
    /// candle's Q4_1 dot debug-asserts an even number of blocks.
    const CANDLE_SHAPES: [(usize, usize); 3] = [(50, 192), (37, 576), (70, 1600)];

    /// A random `[out, inp]` Q4_1 matrix (ours and candle's) and its dequantized f32 values.
    fn weights(out: usize, inp: usize, seed: u64) -> (Q4_1Matrix, QTensor, Tensor) {
        let dev = Device::Cpu;
        // Offset rows so that the block minimums `m` are not all near -max.
        let noise = randn(seed, out * inp, 0.05);
        let offs = randn(seed + 1000, out, 0.02);
        let w: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, v)| v + offs[i / inp])
            .collect();
        let w = Tensor::from_vec(w, (out, inp), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q4_1Matrix::from_qtensor(&q).unwrap().unwrap();
        let deq = q.dequantize(&dev).unwrap();
        (ours, q, deq)
    }

    /// Deterministic normal samples.
    fn randn(seed: u64, len: usize, std: f32) -> Vec<f32> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let d = rand_distr::Normal::new(0f32, std).unwrap();
        (0..len).map(|_| d.sample(&mut rng)).collect()
    }

    /// Activations with a spread of magnitudes across blocks, as hidden states have.
    fn acts(n: usize, inp: usize) -> Tensor {
        let seed = (n * 7919 + inp) as u64;
        let scale = randn(seed + 1, n * inp / QK, 1.0);
        let v: Vec<f32> = randn(seed, n * inp, 1.0)
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[i / QK].exp())
            .collect();
        Tensor::from_vec(v, (n, inp), &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    type Matrix<T> = Vec<Vec<T>>;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// `[n, out]` from `dot(o, wn, r0, rt, res)` calls, single-threaded, with tiles other than
    /// `matmul`'s: activation tiles of 3, 1, 4, 2, ... rows, against 3, 4, 2 and 2 weight rows
    /// (fewer at the ends), so every tile shape the kernels take gets used.
    fn run_tiles(out: usize, n: usize, dot: impl Fn(usize, usize, usize, usize, &mut [f32])) -> Vec<Vec<f32>> {
        let mut y = vec![vec![0f32; out]; n];
        let (mut r0, mut step) = (0, 0);
        while r0 < n {
            let rt = [3, 1, 4, 2][step % 4].min(n - r0);
            let wt = [3, 4, 2, 2][rt - 1];
            let mut o = 0;
            while o < out {
                let wn = wt.min(out - o);
                let mut res = [0f32; MAX_PAIRS];
                dot(o, wn, r0, rt, &mut res[..wn * rt]);
                for wi in 0..wn {
                    for r in 0..rt {
                        y[r0 + r][o + wi] = res[wi * rt + r];
                    }
                }
                o += wn;
            }
            r0 += rt;
            step += 1;
        }
        y
    }

    /// `x W^T` with the given kernel forced ([`run_tiles`]).
    fn run(m: &Q4_1Matrix, x: &Tensor, k: Kernel) -> Vec<Vec<f32>> {
        let (n, inp) = x.dims2().unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let acts = Acts::quantize(&xv, n, inp, k);
        let row_bytes = m.layout().row_bytes();
        run_tiles(m.out_features, n, |o, wn, r0, rt, res| {
            k.dot(&m.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
        })
    }

    /// From the raw ggml blocks (not our repacked copy) and the quantized activations:
    /// candle's f32 formula (`sum += sumi * d4 * d8 + m4 * s8`, block by block), the same in
    /// f64, and the magnitude `Σ |sumi d4 d8| + |m4 s8|` of the terms summed.
    fn reference(q: &QTensor, x: &Tensor) -> (Matrix<f32>, Matrix<f64>, Matrix<f64>) {
        let (n, inp) = x.dims2().unwrap();
        let out = q.shape().dims()[0];
        let raw = q.data().unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let acts = Acts::quantize(&xv, n, inp, Kernel::Scalar);
        let a = acts.rows(0, n);
        let nb = inp / QK;
        let mut f32s = vec![vec![0f32; out]; n];
        let (mut f64s, mut mag) = (vec![vec![0f64; out]; n], vec![vec![0f64; out]; n]);
        for r in 0..n {
            for o in 0..out {
                for b in 0..nb {
                    let wb = &raw[(o * nb + b) * Q4_1_BYTES..][..Q4_1_BYTES];
                    let d4 = f16_to_f32(u16::from_le_bytes([wb[0], wb[1]]));
                    let m4 = f16_to_f32(u16::from_le_bytes([wb[2], wb[3]]));
                    let (d8, s8) = (a.scale(r, b), a.s[r * acts.lay.nb8() + b]);
                    let (lo, hi) = a.halves(r, b);
                    let sumi: i32 = (0..QK)
                        .map(|j| {
                            let (q, x) = if j < 16 {
                                (wb[4 + j] & 15, lo[j])
                            } else {
                                (wb[4 + j - 16] >> 4, hi[j - 16])
                            };
                            q as i32 * x as i32
                        })
                        .sum();
                    f32s[r][o] += sumi as f32 * d4 * d8 + m4 * s8;
                    let t1 = sumi as f64 * d4 as f64 * d8 as f64;
                    let t2 = m4 as f64 * s8 as f64;
                    f64s[r][o] += t1 + t2;
                    mag[r][o] += t1.abs() + t2.abs();
                }
            }
        }
        (f32s, f64s, mag)
    }

    /// Against the dense f32 matmul of the dequantized weights. The only error is the int8
    /// activation rounding (plus f16 scales): each x_i moves by at most d8/2 = amax/254 of its
    /// block, so |err| <= Σ_blocks amax_b/254 * Σ_i |w_i| (+ the f16 rounding of d8 and s8,
    /// relative 2^-11). We check against that bound, per output element, computed from the
    /// data, and also that the typical error is far below it (random rounding errors cancel).
    #[test]
    fn quant_matches_dequantized_f32_within_int8_bound() {
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, deq) = weights(out, inp, seed as u64);
            let wv = rows(&deq);
            for n in BATCHES {
                let x = acts(n, inp);
                let xv = rows(&x);
                let want = rows(&x.matmul(&deq.t().unwrap()).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                let (mut sum_err, mut sum_bound) = (0f64, 0f64);
                for r in 0..n {
                    for o in 0..out {
                        let mut bound = 0f32;
                        for b in 0..inp / QK {
                            let xs = &xv[r][b * QK..(b + 1) * QK];
                            let ws = &wv[o][b * QK..(b + 1) * QK];
                            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                            let wabs: f32 = ws.iter().map(|w| w.abs()).sum();
                            let xw: f32 = xs.iter().zip(ws).map(|(x, w)| (x * w).abs()).sum();
                            bound +=
                                amax / 254.0 * wabs + 2.0 * 2f32.powi(-11) * (xw + amax * wabs);
                        }
                        let err = (got[r][o] - want[r][o]).abs();
                        assert!(
                            err <= bound + 1e-5,
                            "shape {out}x{inp} n {n} [{r},{o}]: {} vs {} (err {err}, bound {bound})",
                            got[r][o],
                            want[r][o]
                        );
                        sum_err += err as f64;
                        sum_bound += bound as f64;
                    }
                }
                assert!(
                    sum_err < 0.25 * sum_bound,
                    "shape {out}x{inp} n {n}: mean error {sum_err} too close to the worst case {sum_bound}"
                );
            }
        }
    }

    /// Bound on the f32 rounding of our kernel for `inp` inputs, relative to the magnitude of
    /// the summed terms: per lane `np + nb8 / 8` rounded FMAs (each term's scale product
    /// rounded once more), then 3 levels of the horizontal sum. `unit` = 2^-24.
    fn kernel_bound(inp: usize) -> f64 {
        let lay = RowLayout { nb: inp / QK };
        (lay.np() + lay.nb8() / 8 + 5) as f64 * 2f64.powi(-24)
    }

    /// Against candle's QMatMul: the same quantized operands, only the f32 summation order
    /// differs (ours: 8 lanes of FMAs; candle 0.11.1: `vec_dot_unopt`'s one serial sum). So
    /// both are within their rounding bounds of the exact value of the quantized dot.
    #[test]
    fn quant_matches_candle_qmatmul() {
        for (seed, &(out, inp)) in CANDLE_SHAPES.iter().enumerate() {
            let (m, q, _) = weights(out, inp, 10 + seed as u64);
            // The same matrix again (QTensor is not Clone).
            let theirs = QMatMul::from_qtensor(weights(out, inp, 10 + seed as u64).1).unwrap();
            let candle_bound = (inp / QK + 3) as f64 * 2f64.powi(-24);
            let mut differ = 0;
            for n in BATCHES {
                let x = acts(n, inp);
                let (_, val, mag) = reference(&q, &x);
                let want = rows(&theirs.forward(&x).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                for r in 0..n {
                    for o in 0..out {
                        let tol = (kernel_bound(inp) + candle_bound) * mag[r][o];
                        let err = (got[r][o] as f64 - want[r][o] as f64).abs();
                        assert!(
                            err <= tol,
                            "shape {out}x{inp} n {n} [{r},{o}]: ours {} candle {} (exact {}, tol {tol})",
                            got[r][o],
                            want[r][o],
                            val[r][o]
                        );
                        differ += (got[r][o] != want[r][o]) as usize;
                    }
                }
            }
            // The orders do differ: were every value equal, this test would not be checking
            // a tolerance at all.
            assert!(differ > 0, "shape {out}x{inp}: identical to candle everywhere");
        }
    }

    /// Every kernel this CPU has gives the portable kernel's bits (odd block counts included,
    /// which candle does not take), and each is within its rounding bound of the f64 value of
    /// the quantized dot.
    #[test]
    fn quant_simd_kernels_match_scalar() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, q, _) = weights(out, inp, 20 + seed as u64);
            for n in BATCHES {
                let x = acts(n, inp);
                let (_, val, mag) = reference(&q, &x);
                let want = run(&m, &x, Kernel::Scalar);
                for &k in &kernels {
                    let y = run(&m, &x, k);
                    for r in 0..n {
                        assert_eq!(
                            bits(&y[r]),
                            bits(&want[r]),
                            "{k:?} shape {out}x{inp} n {n} row {r}"
                        );
                        for o in 0..out {
                            let err = (y[r][o] as f64 - val[r][o]).abs();
                            assert!(
                                err <= kernel_bound(inp) * mag[r][o],
                                "{k:?} shape {out}x{inp} n {n} [{r},{o}]: {} vs {} (magnitude {})",
                                y[r][o],
                                val[r][o],
                                mag[r][o]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row computed inside a batch is bitwise the row computed alone, through the public
    /// (parallel, row-grouping) forward and through each kernel.
    #[test]
    fn quant_batch_rows_equal_single_rows_bitwise() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, _) = weights(out, inp, 30 + seed as u64);
            for n in BATCHES {
                let x = acts(n, inp);
                let batch = rows(&m.forward(&x).unwrap());
                let by_kernel: Vec<_> = kernels.iter().map(|&k| run(&m, &x, k)).collect();
                for r in 0..n {
                    let xr = x.narrow(0, r, 1).unwrap();
                    let alone = rows(&m.forward(&xr).unwrap());
                    assert_eq!(
                        bits(&batch[r]),
                        bits(&alone[0]),
                        "shape {out}x{inp} n {n} row {r}"
                    );
                    for (k, ys) in kernels.iter().zip(&by_kernel) {
                        assert_eq!(
                            bits(&ys[r]),
                            bits(&batch[r]),
                            "{k:?} shape {out}x{inp} n {n} row {r}"
                        );
                    }
                }
            }
        }
    }

    /// Leading dimensions are kept, `[a, b, in] -> [a, b, out]`, and equal the flat result.
    #[test]
    fn quant_keeps_leading_dims() {
        let (m, _, _) = weights(40, 64, 40);
        let x = acts(6, 64);
        let flat = m.forward(&x).unwrap();
        let y = m.forward(&x.reshape((2, 3, 64)).unwrap()).unwrap();
        assert_eq!(y.dims(), &[2, 3, 40]);
        assert_eq!(rows(&y.reshape((6, 40)).unwrap()), rows(&flat));
    }

    #[test]
    fn quant_from_qtensor_only_takes_q4_1() {
        let t = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::F32] {
            let q = QTensor::quantize(&t, dt).unwrap();
            assert!(Q4_1Matrix::from_qtensor(&q).unwrap().is_none(), "{dt:?}");
        }
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let m = Q4_1Matrix::from_qtensor(&q).unwrap().unwrap();
        assert_eq!((m.out_features(), m.in_features()), (8, 64));
    }

    /// The AVX2 activation quantization gives the scalar one's bits, on random data and on
    /// blocks with exact halves, zeros and extreme ranges.
    #[test]
    fn quant_avx2_activation_quantization_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        {
            if kernel() == Kernel::Scalar {
                eprintln!("*** SKIPPED: no avx2+fma+f16c on this CPU ***");
                return;
            }
            let mut x = acts(64, 256)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Block 0: all zeros. Block 1: amax 127 so x * id hits exact halves.
            x[..32].fill(0.0);
            for j in 0..32 {
                x[32 + j] = if j == 0 {
                    127.0
                } else {
                    (j as f32 - 16.0) + 0.5
                };
            }
            // Blocks 2, 3: tiny and huge magnitudes (f16-subnormal and overflowing scales).
            for j in 0..32 {
                x[64 + j] = (j as f32 - 13.0) * 1e-9;
                x[96 + j] = (j as f32 - 7.0) * 1e7;
            }
            let s = Acts::quantize(&x, 64, 256, Kernel::Scalar);
            let v = Acts::quantize(&x, 64, 256, Kernel::Avx2);
            assert_eq!(s.qs, v.qs);
            assert_eq!(bits(s.d.as_flattened()), bits(v.d.as_flattened()));
            assert_eq!(bits(&s.s), bits(&v.s));
            // -14.5 and 14.5 (d = 1) round away from zero.
            let (lo, hi) = s.rows(0, 1).halves(0, 1);
            assert_eq!((lo[1], hi[14]), (-15, 15));
        }
    }

    /// Our f16 rounding (and F16C's) equals candle's (the `half` crate) on random and edge
    /// values.
    #[test]
    fn quant_f16_rounding_matches_candle() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            1e6,
            6.1e-5,
            6.0e-8,
            2.9e-8,
            3.0e-8,
            1e-9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2049.0,
            2051.0,
            4095.0,
            0.1,
            1.0 / 127.0,
        ];
        for (i, v) in randn(5, 20000, 1.0).into_iter().enumerate() {
            // Spread over the normal, subnormal and overflowing ranges.
            vals.push(v * 2f32.powi((i % 60) as i32 - 35));
        }
        let want: Vec<f32> = Tensor::new(vals.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (v, w) in vals.iter().zip(&want) {
            assert_eq!(round_f16(*v).to_bits(), w.to_bits(), "{v:e}");
            #[cfg(target_arch = "x86_64")]
            if kernel() != Kernel::Scalar {
                // SAFETY: f16c was detected.
                let f = unsafe { avx2::round_f16(*v) };
                assert_eq!(f.to_bits(), w.to_bits(), "F16C {v:e}");
            }
        }
        assert!(round_f16(f32::NAN).is_nan());
    }

    #[test]
    fn quant_round_half_away_matches_f32_round() {
        let mut v = -128.0f32;
        while v <= 128.0 {
            for x in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ] {
                if x.abs() <= 128.0 {
                    assert_eq!(round_half_away(x), x.round() as i32, "{x}");
                }
            }
            v += 0.25;
        }
        for x in [0.49999997f32, -0.49999997, 126.5, -126.5, 0.5, -0.5] {
            assert_eq!(round_half_away(x), x.round() as i32, "{x}");
        }
    }

    /// A random `[out, inp]` Q8_0 matrix (ours and candle's) and its dequantized f32 values.
    fn q8_weights(out: usize, inp: usize, seed: u64) -> (Q8_0Matrix, QTensor, Tensor) {
        let w = Tensor::from_vec(randn(seed, out * inp, 0.05), (out, inp), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let ours = Q8_0Matrix::from_qtensor(&q).unwrap().unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        (ours, q, deq)
    }

    /// As `run`, for Q8_0.
    fn run_q8(m: &Q8_0Matrix, x: &Tensor, k: Kernel) -> Vec<Vec<f32>> {
        let (n, inp) = x.dims2().unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let acts = Acts8::quantize(&xv, n, inp, k);
        let row_bytes = inp / QK * Q8_0_BYTES;
        run_tiles(m.out_features, n, |o, wn, r0, rt, res| {
            k.dot_q8_0(&m.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
        })
    }

    /// Q8_0 against candle's QMatMul: with AVX2 the same operations in the same order as
    /// candle's `vec_dot_q8_0_q8_0`, so equal bits (in_features are not multiples of 256, where
    /// candle would switch to its repacked kernels on VNNI CPUs). Without AVX2 candle runs its
    /// scalar dot, in another order: then within 1e-5 of the row's scale.
    #[test]
    fn quant_q8_0_matches_candle_qmatmul() {
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, q, _) = q8_weights(out, inp, 50 + seed as u64);
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for n in BATCHES {
                let x = acts(n, inp);
                let want = rows(&theirs.forward(&x).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                for r in 0..n {
                    if kernel() != Kernel::Scalar {
                        assert_eq!(
                            bits(&got[r]),
                            bits(&want[r]),
                            "shape {out}x{inp} n {n} row {r}"
                        );
                    } else {
                        let scale = want[r].iter().fold(0f32, |a, v| a.max(v.abs()));
                        for (g, w) in got[r].iter().zip(&want[r]) {
                            assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    /// Q8_0: the kernels give the same bits, a row in a batch gives the bits it gets alone,
    /// and the result is within the int8 activation bound of the dense f32 matmul (the
    /// weights dequantize exactly, so only the activations' rounding, at most amax/254 per
    /// value, and their f16 scale, 2^-11 relative, contribute).
    #[test]
    fn quant_q8_0_kernels_batch_independence_and_accuracy() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, deq) = q8_weights(out, inp, 60 + seed as u64);
            let wv = rows(&deq);
            for n in BATCHES {
                let x = acts(n, inp);
                let xv = rows(&x);
                let batch = rows(&m.forward(&x).unwrap());
                let want = rows(&x.matmul(&deq.t().unwrap()).unwrap());
                let by_kernel: Vec<_> = kernels.iter().map(|&k| run_q8(&m, &x, k)).collect();
                for r in 0..n {
                    let alone = rows(&m.forward(&x.narrow(0, r, 1).unwrap()).unwrap());
                    assert_eq!(
                        bits(&batch[r]),
                        bits(&alone[0]),
                        "shape {out}x{inp} n {n} row {r}"
                    );
                    for (k, ys) in kernels.iter().zip(&by_kernel) {
                        assert_eq!(
                            bits(&ys[r]),
                            bits(&batch[r]),
                            "{k:?} shape {out}x{inp} n {n} row {r}"
                        );
                    }
                    for o in 0..out {
                        let mut bound = 0f32;
                        for b in 0..inp / QK {
                            let xs = &xv[r][b * QK..(b + 1) * QK];
                            let ws = &wv[o][b * QK..(b + 1) * QK];
                            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                            let wabs: f32 = ws.iter().map(|w| w.abs()).sum();
                            let xw: f32 = xs.iter().zip(ws).map(|(x, w)| (x * w).abs()).sum();
                            bound += amax / 254.0 * wabs + 2f32.powi(-11) * xw;
                        }
                        let err = (batch[r][o] - want[r][o]).abs();
                        assert!(
                            err <= bound + 1e-5,
                            "shape {out}x{inp} n {n} [{r},{o}]: err {err} bound {bound}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quant_q8_0_from_qtensor_only_takes_q8_0() {
        let t = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::F32] {
            let q = QTensor::quantize(&t, dt).unwrap();
            assert!(Q8_0Matrix::from_qtensor(&q).unwrap().is_none(), "{dt:?}");
        }
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let m = Q8_0Matrix::from_qtensor(&q).unwrap().unwrap();
        assert_eq!((m.out_features(), m.in_features()), (8, 64));
    }
}
