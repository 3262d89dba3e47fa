//! CPU attention that reads K/V straight out of the paged cache pool.
//!
//! Why this exists: the candle-op path gathers every sequence's context rows into a fresh
//! tensor and then runs about a dozen small ops per sequence and layer (narrow, reshape,
//! permute, two matmuls, softmax, ...). In batched decode that is tens of thousands of tiny
//! ops per step, whose fixed costs dominate. Here one parallel pass over
//! (sequence, kv head, query tile) computes everything in place: for each query of the item
//! (the kv-head group's heads times the tile's tokens) it walks the sequence's cache rows in
//! order, scores four K rows per reduction, and sums the V rows into an output held in
//! registers. The group's queries re-read the same rows from cache; what the earlier
//! one-read-for-all-queries version saved in loads it lost in a horizontal reduction per score
//! and a load and store of the output per row (batched decode spent 27% of its time here then,
//! 10% now).
//!
//! Numerics: scores, softmax and the weighted sum are f32 (the softmax denominator is summed
//! in f64), as candle's path computes them in f32; results agree with it to ~1e-6 relative.
//!
//! Batch independence: a query's output is computed by the same instruction sequence however
//! many sequences, tokens or heads share the call: dot products, softmax and the V sum of
//! one query only ever combine that query's own values, in context-position order, with a
//! fixed lane split. So a sequence's result does not depend on what it is batched with (the
//! engine relies on that: batched generation must equal one-at-a-time generation), nor on how
//! its prompt is chunked. The AVX2 and portable loops run the same operations (no FMA
//! contraction), so they agree bitwise too (tested).

use anyhow::{bail, Context, Result};
use candle_core::{Layout, Storage};
use rayon::prelude::*;

/// The f32 elements of a contiguous CPU tensor, borrowed from its storage (no copy). Call with
/// the parts of `Tensor::storage_and_layout` and keep its guard alive while using the slice.
pub fn cpu_f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        bail!("the CPU attention kernel needs CPU tensors");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .context("the CPU attention kernel needs contiguous tensors")?;
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// One sequence of the batch as the kernel sees it.
#[derive(Debug, Clone, Copy)]
pub struct SeqRows<'a> {
    /// Row of this sequence's first new token in `q` (and in the output).
    pub tok_off: usize,
    /// New tokens of this sequence (1 for a decode step, more for a prefill chunk).
    pub len: usize,
    /// Pool rows of the sequence's whole context in position order: `start_pos + len` rows,
    /// the last `len` of which hold the new tokens. New token `t` (position `start_pos + t`)
    /// attends to positions `0..=start_pos + t`.
    pub rows: &'a [u32],
}

impl SeqRows<'_> {
    /// Tokens cached before this step's new ones.
    fn start_pos(&self) -> usize {
        self.rows.len() - self.len
    }
}

/// Head layout of the attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Score scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Query tokens of one prefill chunk that share a work item. Bounded so a long chunk is split
/// over many items (load balance over the cores) and the item's queries, scores and outputs
/// stay small; every item still reads each of its K/V rows once for all its queries.
const TOKEN_TILE: usize = 16;

/// `softmax(q k^T * scale + causal mask) v` for every new token of every sequence, over the
/// sequence's rows of the pools.
///
/// `q`: `[n_tokens, heads * head_dim]`; `k_pool`, `v_pool`: `[pool_rows, kv_heads * head_dim]`;
/// returns `[n_tokens, heads * head_dim]`. Rows of `q` that no sequence covers come back zero.
///
/// Panics if the shapes disagree or a sequence names a row outside the pools (the caller
/// validates block tables; this is a programming error, not bad input).
pub fn paged_attention_cpu(q: &[f32], k_pool: &[f32], v_pool: &[f32], seqs: &[SeqRows], dims: AttnDims) -> Vec<f32> {
    let loops = Loops::for_head_dim(dims.head_dim);
    paged_attention_with(q, k_pool, v_pool, seqs, dims, loops)
}

/// [`paged_attention_cpu`] with the inner loops chosen by the caller (tests compare them).
fn paged_attention_with(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    seqs: &[SeqRows],
    dims: AttnDims,
    loops: Loops,
) -> Vec<f32> {
    let AttnDims {
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = dims;
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "{heads} query heads cannot be grouped over {kv_heads} kv heads"
    );
    let q_width = heads * d;
    let kv_width = kv_heads * d;
    assert_eq!(
        q.len() % q_width.max(1),
        0,
        "q is not [n, heads * head_dim]"
    );
    assert_eq!(k_pool.len(), v_pool.len(), "K and V pools differ in size");
    assert_eq!(
        k_pool.len() % kv_width.max(1),
        0,
        "pool is not [rows, kv_width]"
    );
    let n_tokens = q.len() / q_width.max(1);
    for s in seqs {
        assert!(
            s.len > 0 && s.len <= s.rows.len() && s.tok_off + s.len <= n_tokens,
            "sequence does not fit the batch"
        );
    }

    // Work items: (sequence, kv head, token tile). Decode steps give one tile per sequence
    // and kv head; long prefill chunks several.
    let mut tasks = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for g in 0..kv_heads {
            for t0 in (0..s.len).step_by(TOKEN_TILE) {
                tasks.push(Task {
                    seq: si,
                    kv_head: g,
                    t0,
                    t1: (t0 + TOKEN_TILE).min(s.len),
                });
            }
        }
    }

    let group = heads / kv_heads;
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| attend_tile(q, k_pool, v_pool, &seqs[t.seq], dims, t, loops))
        .collect();

    // Scatter each item's `[tile tokens, group heads, d]` block into the output rows.
    let mut out = vec![0f32; n_tokens * q_width];
    for (t, res) in tasks.iter().zip(&results) {
        let s = &seqs[t.seq];
        let block = group * d;
        for (i, src) in res.chunks_exact(block).enumerate() {
            let row = s.tok_off + t.t0 + i;
            let at = row * q_width + t.kv_head * block;
            out[at..at + block].copy_from_slice(src);
        }
    }
    out
}

/// One work item: these query tokens of this sequence, the query heads of this kv head.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    kv_head: usize,
    /// Token range `t0..t1` within the sequence's new tokens.
    t0: usize,
    t1: usize,
}

/// The two inner loops of a tile, in a portable build and (x86_64) an AVX2 one. Both run the
/// same IEEE operations in the same order, lane for lane (no FMA contraction), so they agree
/// bitwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loops {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Loops {
    /// AVX2 when the CPU has it and the head dimension is whole vectors.
    fn for_head_dim(d: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx2") {
            return Loops::Avx2;
        }
        let _ = d;
        Loops::Portable
    }

    /// `scores[j] = <q, k_j>` for the K rows `k_j` of the listed pool rows ([`dot8`]).
    fn scores(self, q: &[f32], k_pool: &[f32], rows: RowsOf<'_>, scores: &mut [f32]) {
        match self {
            Loops::Portable => {
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = dot8(q, rows.get(k_pool, j));
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Loops::Avx2` is only chosen on CPUs with AVX2 and for whole-vector
            // head dims; the function checks every slice bound it relies on.
            Loops::Avx2 => unsafe { avx2::scores(q, k_pool, rows, scores) },
        }
    }

    /// `out = Σ_j p[j] v_j` over the V rows `v_j` of the listed pool rows, in `j` order, each
    /// lane `out[l] += p[j] * v_j[l]` (a rounded product, then a rounded sum).
    fn weighted_sum(self, p: &[f32], v_pool: &[f32], rows: RowsOf<'_>, out: &mut [f32]) {
        match self {
            Loops::Portable => {
                out.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    for (o, &v) in out.iter_mut().zip(rows.get(v_pool, j)) {
                        *o += pj * v;
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `scores`.
            Loops::Avx2 => unsafe { avx2::weighted_sum(p, v_pool, rows, out) },
        }
    }
}

/// One head's `d` values in each of a sequence's cache rows.
#[derive(Debug, Clone, Copy)]
struct RowsOf<'a> {
    /// Pool rows, in context order.
    rows: &'a [u32],
    /// Floats per pool row.
    width: usize,
    /// The head's first float within a row.
    off: usize,
    d: usize,
}

impl<'a> RowsOf<'a> {
    /// The head's values in context row `j`.
    fn get<'p>(&self, pool: &'p [f32], j: usize) -> &'p [f32] {
        &pool[self.rows[j] as usize * self.width + self.off..][..self.d]
    }
}

/// Attention of query tokens `t.t0..t.t1` of sequence `s`, query heads of kv head
/// `t.kv_head`. Returns `[t1 - t0, group, d]`.
///
/// Queries are numbered `m = (token - t0) * group + head_in_group`; query `m` sees the first
/// `n_seen(m)` context positions.
fn attend_tile(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    s: &SeqRows,
    dims: AttnDims,
    t: &Task,
    loops: Loops,
) -> Vec<f32> {
    let d = dims.head_dim;
    let group = dims.heads / dims.kv_heads;
    let q_width = dims.heads * d;
    let n_q = (t.t1 - t.t0) * group;
    let start = s.start_pos();
    let rows = RowsOf {
        rows: s.rows,
        width: dims.kv_heads * d,
        off: t.kv_head * d,
        d,
    };
    // Context positions query `m` sees.
    let n_seen = |m: usize| start + t.t0 + m / group + 1;

    let mut qs = vec![0f32; d];
    let mut scores = vec![0f32; n_seen(n_q - 1)];
    let mut out = vec![0f32; n_q * d];
    for (m, o) in out.chunks_exact_mut(d).enumerate() {
        // The query, pre-scaled so the score loop is a plain dot product.
        let tok = s.tok_off + t.t0 + m / group;
        let h = t.kv_head * group + m % group;
        for (x, &y) in qs.iter_mut().zip(&q[tok * q_width + h * d..][..d]) {
            *x = y * dims.scale;
        }
        let sc = &mut scores[..n_seen(m)];
        loops.scores(&qs, k_pool, rows, sc);
        // Softmax numerators, subtracting the max; the normalisation is applied to the output.
        // The sum is a loop of its own: beside the `exp` call it lived on the stack, and the
        // chain of f64 adds through memory took a tenth of a long prefill (the same adds in
        // the same order, so the same bits).
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
        }
        let sum = sc.iter().fold(0f64, |acc, &x| acc + x as f64);
        let inv = (1.0 / sum) as f32;
        loops.weighted_sum(sc, v_pool, rows, o);
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
    out
}

/// `Σ a_i b_i` with 8 lanes (`acc[i % 8] += a_i * b_i`, product and sum each rounded) and a
/// fixed reduction, `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`: what the AVX2 loop
/// computes (8 lanes, then `hadd`, `hadd` and the two halves added).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] += x * y;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

// The register arrays are indexed by vector number, as the lanes they hold are.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::RowsOf;
    use std::arch::x86_64::*;

    /// Checks that every row `rows` names has its `d` values inside `pool`.
    fn check_rows(pool: &[f32], rows: RowsOf<'_>, n: usize) {
        assert!(rows.d.is_multiple_of(8) && rows.off + rows.d <= rows.width);
        let limit = pool.len() / rows.width.max(1);
        assert!(rows.rows[..n].iter().all(|&r| (r as usize) < limit));
    }

    /// [`super::Loops::scores`]: four context rows at a time, each query vector loaded once
    /// for all four, four 8-lane accumulators reduced together by two rounds of `hadd`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scores(q: &[f32], pool: &[f32], rows: RowsOf<'_>, out: &mut [f32]) {
        let n = out.len();
        check_rows(pool, rows, n);
        assert_eq!(q.len(), rows.d);
        let nv = rows.d / 8;
        // SAFETY: `check_rows` bounds every row start plus `d` within `pool`; `q` holds `d`.
        let row = |j: usize| pool.as_ptr().add(rows.rows[j] as usize * rows.width + rows.off);
        let mut j = 0;
        while j < n {
            // A short last group repeats its last row; the extra results are dropped.
            let idx = [0, 1, 2, 3].map(|i| (j + i).min(n - 1));
            let p = idx.map(row);
            let mut acc = [_mm256_setzero_ps(); 4];
            for v in 0..nv {
                let qv = _mm256_loadu_ps(q.as_ptr().add(8 * v));
                for i in 0..4 {
                    let kv = _mm256_loadu_ps(p[i].add(8 * v));
                    acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(qv, kv));
                }
            }
            // [s0 s1 s2 s3] as (l0+l1)+(l2+l3) in the low half, (l4+l5)+(l6+l7) in the high.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            let s: [f32; 4] = std::mem::transmute(s);
            let take = (n - j).min(4);
            out[j..j + take].copy_from_slice(&s[..take]);
            j += 4;
        }
    }

    /// [`super::Loops::weighted_sum`]: up to 64 output lanes (8 vectors) held in registers
    /// while the context rows stream past.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weighted_sum(p: &[f32], pool: &[f32], rows: RowsOf<'_>, out: &mut [f32]) {
        check_rows(pool, rows, p.len());
        assert_eq!(out.len(), rows.d);
        let mut col = 0;
        while col < rows.d {
            let nv = ((rows.d - col) / 8).min(8);
            match nv {
                1 => columns::<1>(p, pool, rows, col, out),
                2 => columns::<2>(p, pool, rows, col, out),
                3 => columns::<3>(p, pool, rows, col, out),
                4 => columns::<4>(p, pool, rows, col, out),
                5 => columns::<5>(p, pool, rows, col, out),
                6 => columns::<6>(p, pool, rows, col, out),
                7 => columns::<7>(p, pool, rows, col, out),
                _ => columns::<8>(p, pool, rows, col, out),
            }
            col += 8 * nv;
        }
    }

    /// Output lanes `col..col + 8 * NV` of [`weighted_sum`].
    #[inline(always)]
    unsafe fn columns<const NV: usize>(
        p: &[f32],
        pool: &[f32],
        rows: RowsOf<'_>,
        col: usize,
        out: &mut [f32],
    ) {
        debug_assert!(col + 8 * NV <= rows.d && out.len() == rows.d);
        let mut acc = [_mm256_setzero_ps(); NV];
        for (j, &pj) in p.iter().enumerate() {
            // SAFETY: the row was bounds-checked by the caller; lanes stay below `d`.
            let r = pool
                .as_ptr()
                .add(rows.rows[j] as usize * rows.width + rows.off + col);
            let w = _mm256_set1_ps(pj);
            for v in 0..NV {
                acc[v] = _mm256_add_ps(acc[v], _mm256_mul_ps(w, _mm256_loadu_ps(r.add(8 * v))));
            }
        }
        for v in 0..NV {
            _mm256_storeu_ps(out.as_mut_ptr().add(col + 8 * v), acc[v]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    use crate::engine::test_rng::TestRng as Rng;

    /// The candle-op computation `PagedAttention::forward` runs on non-CPU devices: gather the
    /// context rows, then per kv head one batched matmul, mask, softmax, matmul.
    fn reference(q: &[f32], k_pool: &[f32], v_pool: &[f32], seqs: &[SeqRows], dims: AttnDims) -> Vec<f32> {
        let dev = Device::Cpu;
        let (h, hk, d) = (dims.heads, dims.kv_heads, dims.head_dim);
        let n = q.len() / (h * d);
        let q = Tensor::from_slice(q, (n, h * d), &dev).unwrap();
        let rows = k_pool.len() / (hk * d);
        let kp = Tensor::from_slice(k_pool, (rows, hk * d), &dev).unwrap();
        let vp = Tensor::from_slice(v_pool, (rows, hk * d), &dev).unwrap();
        reference_on_tensors(&q, &kp, &vp, seqs, dims)
    }

    fn reference_on_tensors(
        q: &Tensor,
        kp: &Tensor,
        vp: &Tensor,
        seqs: &[SeqRows],
        dims: AttnDims,
    ) -> Vec<f32> {
        let dev = Device::Cpu;
        let (h, hk, d) = (dims.heads, dims.kv_heads, dims.head_dim);
        let group = h / hk;
        let n = q.dim(0).unwrap();
        let mut out = vec![0f32; n * h * d];
        for s in seqs {
            let kv_len = s.rows.len();
            let start = s.start_pos();
            let idx = Tensor::from_slice(s.rows, kv_len, &dev).unwrap();
            let to_heads = |p: &Tensor| {
                p.index_select(&idx, 0)
                    .unwrap()
                    .reshape((kv_len, hk, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (ks, vs) = (to_heads(kp), to_heads(vp));
            let qs = q
                .narrow(0, s.tok_off, s.len)
                .unwrap()
                .reshape((s.len, hk, group, d))
                .unwrap()
                .permute((1, 2, 0, 3))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((hk, group * s.len, d))
                .unwrap();
            let mut att = (qs.matmul(&ks.t().unwrap()).unwrap() * dims.scale as f64).unwrap();
            if s.len > 1 {
                let mask = crate::engine::attention::causal_mask(start, s.len, &dev).unwrap();
                att = att
                    .reshape((hk, group, s.len, kv_len))
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap()
                    .reshape((hk, group * s.len, kv_len))
                    .unwrap();
            }
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let y: Vec<f32> = att
                .matmul(&vs)
                .unwrap()
                .reshape((hk, group, s.len, d))
                .unwrap()
                .permute((2, 0, 1, 3))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            out[s.tok_off * h * d..][..y.len()].copy_from_slice(&y);
        }
        out
    }

    /// Largest |a - b| over the largest |b|: relative to the output's scale, so a component
    /// that happens to cancel to ~0 does not blow the ratio up.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Builds a pool with `block_size`-row blocks, gives each sequence a shuffled (so
    /// scattered, non-contiguous) block table, and checks the kernel against the reference.
    /// `shape`: per sequence `(start_pos, len)`.
    fn check(seed: u64, heads: usize, kv_heads: usize, d: usize, shape: &[(usize, usize)]) {
        let mut rng = Rng(seed);
        let block_size = 4;
        let blocks_needed: usize = shape
            .iter()
            .map(|&(p, l)| (p + l).div_ceil(block_size))
            .sum();
        let num_blocks = blocks_needed + 5; // a few never-used blocks in the mix
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.below(i + 1));
        }
        let rows = num_blocks * block_size;
        let width = kv_heads * d;
        // Keys with a spread of magnitudes so softmaxes are neither flat nor one-hot.
        let k_pool = rng.vec(rows * width, 3.0);
        let v_pool = rng.vec(rows * width, 1.0);
        let n_tokens: usize = shape.iter().map(|&(_, l)| l).sum::<usize>() + 1; // + an unused row
        let q = rng.vec(n_tokens * heads * d, 3.0);

        let mut row_lists = Vec::new();
        for &(p, l) in shape {
            let table: Vec<u32> = (0..(p + l).div_ceil(block_size))
                .map(|_| free.pop().unwrap())
                .collect();
            let rows: Vec<u32> = (0..p + l)
                .map(|pos| table[pos / block_size] * block_size as u32 + (pos % block_size) as u32)
                .collect();
            row_lists.push(rows);
        }
        let mut seqs = Vec::new();
        let mut tok_off = 1; // row 0 of q belongs to no sequence
        for (&(_, l), rows) in shape.iter().zip(&row_lists) {
            seqs.push(SeqRows {
                tok_off,
                len: l,
                rows,
            });
            tok_off += l;
        }
        let dims = AttnDims {
            heads,
            kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let ours = paged_attention_cpu(&q, &k_pool, &v_pool, &seqs, dims);
        let want = reference(&q, &k_pool, &v_pool, &seqs, dims);
        // The portable loops give the chosen (SIMD where the CPU has it) loops' bits.
        let portable = paged_attention_with(&q, &k_pool, &v_pool, &seqs, dims, Loops::Portable);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&portable), "portable vs {:?}", Loops::for_head_dim(d));
        assert!(ours[..heads * d].iter().all(|&x| x == 0.0));
        // Per sequence, so a failure says which one.
        for (i, s) in seqs.iter().enumerate() {
            let r = s.tok_off * heads * d..(s.tok_off + s.len) * heads * d;
            let e = rel_err(&ours[r.clone()], &want[r]);
            assert!(
                e < 1e-5,
                "heads {heads}/{kv_heads}, d {d}, sequence {i} (start {}, len {}): rel err {e}",
                s.start_pos(),
                s.len
            );
        }
    }

    /// Decode steps and prefill chunks (first chunks, later chunks, chunks longer than a
    /// token tile, a chunk ending exactly on a tile) mixed in one call.
    const MIXED: &[(usize, usize)] = &[
        (0, 1),
        (37, 1),
        (0, 23),
        (5, 1),
        (12, 7),
        (100, 1),
        (40, 33),
        (1, 16),
        (63, 1),
    ];

    #[test]
    fn matches_candle_reference_for_every_head_grouping() {
        // (seed, query heads, kv heads, head dim): plain multi-head, groups of 2 and 3.
        let cases = [(1, 4, 4, 16), (2, 2, 2, 64), (3, 4, 2, 16), (4, 8, 4, 64), (5, 6, 2, 16), (6, 9, 3, 64)];
        for (seed, heads, kv_heads, d) in cases {
            check(seed, heads, kv_heads, d, MIXED);
        }
        // Qwen's head dim: two 64-lane column blocks.
        check(11, 4, 2, 128, MIXED);
    }

    #[test]
    fn head_dim_with_a_remainder_lane() {
        // 20 = 2 x 8 lanes + 4: the dot product's tail path (portable loops only); 40 is 5
        // whole vectors, and 72 takes a 64-lane and an 8-lane column block in the V sum.
        check(7, 4, 2, 20, &[(3, 1), (0, 5), (9, 18)]);
        check(8, 4, 2, 40, &[(3, 1), (0, 5), (9, 18)]);
        check(10, 3, 1, 72, &[(3, 1), (0, 5), (9, 18)]);
    }

    #[test]
    fn result_does_not_depend_on_the_batch_or_chunking() {
        let mut rng = Rng(9);
        let (heads, kv_heads, d) = (6, 2, 16);
        let width = kv_heads * d;
        let rows: Vec<u32> = (0..30).rev().collect(); // reversed: scattered rows
        let k_pool = rng.vec(30 * width, 3.0);
        let v_pool = rng.vec(30 * width, 1.0);
        let q = rng.vec(30 * heads * d, 3.0);
        let dims = AttnDims {
            heads,
            kv_heads,
            head_dim: d,
            scale: 0.25,
        };
        // The whole 30-token prompt at once...
        let one = paged_attention_cpu(
            &q,
            &k_pool,
            &v_pool,
            &[SeqRows {
                tok_off: 0,
                len: 30,
                rows: &rows,
            }],
            dims,
        );
        // ...equals, bit for bit, chunks of 7, 1 and 22 tokens run next to another sequence.
        let other_rows: Vec<u32> = (0..10).collect();
        let mut chunked = Vec::new();
        for (start, len) in [(0, 7), (7, 1), (8, 22)] {
            let mut qq = rng.vec(4 * heads * d, 3.0); // the other sequence's 4 tokens
            qq.extend_from_slice(&q[start * heads * d..(start + len) * heads * d]);
            let out = paged_attention_cpu(
                &qq,
                &k_pool,
                &v_pool,
                &[
                    SeqRows {
                        tok_off: 0,
                        len: 4,
                        rows: &other_rows,
                    },
                    SeqRows {
                        tok_off: 4,
                        len,
                        rows: &rows[..start + len],
                    },
                ],
                dims,
            );
            chunked.extend_from_slice(&out[4 * heads * d..]);
        }
        assert_eq!(one, chunked);
    }
}
