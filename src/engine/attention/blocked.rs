//! The blocking of the CUDA paged-attention kernel (`kernels/paged_attention.cu`), in Rust,
//! so that CI (no GPU) tests the algorithm the GPU runs: per query token and KV head, the
//! context is split round-robin over `WARPS` partial online softmaxes (running max, sum,
//! weighted V), merged at the end. It differs from the CPU kernel's single pass only in the
//! order of the f32 operations; the tests bound the difference against the naive formula.
//! The kernel's per-token context description ([`TokenContext`]) is built here too, so the
//! device path and its model share it.

use super::cpu::AttnDims;

/// Warps per block in the kernel (`NW`): the number of partial softmaxes merged.
pub const WARPS: usize = 4;

/// Largest GQA group (query heads per KV head) the kernel handles (`MAXG`).
pub const MAX_GROUP: usize = 8;

/// Head sizes the kernel is compiled for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Per query token: where its context rows start in the batch's row list and how many it
/// sees (causal: a prefill token sees up to its own position).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenContext {
    pub ctx_off: Vec<u32>,
    pub ctx_len: Vec<u32>,
}

impl TokenContext {
    /// From the batch's sequences as `(len, kv_off, kv_len)`: `len` new tokens whose context
    /// rows are `rows[kv_off .. kv_off + kv_len]`, the new ones last.
    pub fn new(seqs: impl IntoIterator<Item = (usize, usize, usize)>) -> Self {
        let mut t = Self::default();
        for (len, kv_off, kv_len) in seqs {
            for i in 0..len {
                t.ctx_off.push(kv_off as u32);
                t.ctx_len.push((kv_len - len + i + 1) as u32);
            }
        }
        t
    }
}

/// Whether the kernel handles this shape (else the engine takes the candle-op path).
pub fn kernel_supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    kv_heads > 0 && heads.is_multiple_of(kv_heads) && heads / kv_heads <= MAX_GROUP && HEAD_DIMS.contains(&head_dim)
}

/// The kernel's computation on f32 data: `q [n, heads * d]`, pools `[rows, kv_heads * d]`;
/// returns `[n, heads * d]`. `dims.scale` multiplies the queries (as the kernel does).
pub fn paged_attention_blocked(q: &[f32], k_pool: &[f32], v_pool: &[f32], rows: &[u32], ctx: &TokenContext, dims: AttnDims) -> Vec<f32> {
    let AttnDims { heads, kv_heads, head_dim: d, scale } = dims;
    let group = heads / kv_heads;
    let (qw, kvw) = (heads * d, kv_heads * d);
    let mut out = vec![0f32; q.len()];
    for t in 0..ctx.ctx_off.len() {
        let (off, len) = (ctx.ctx_off[t] as usize, ctx.ctx_len[t] as usize);
        for kvh in 0..kv_heads {
            for g in 0..group {
                let h = kvh * group + g;
                let qh: Vec<f32> = q[t * qw + h * d..][..d].iter().map(|x| x * scale).collect();
                // Partial softmax state per warp.
                let mut m = [f32::NEG_INFINITY; WARPS];
                let mut l = [0f32; WARPS];
                let mut acc = vec![vec![0f32; d]; WARPS];
                for j in 0..len {
                    let w = j % WARPS;
                    let row = rows[off + j] as usize;
                    let k = &k_pool[row * kvw + kvh * d..][..d];
                    let v = &v_pool[row * kvw + kvh * d..][..d];
                    let s: f32 = qh.iter().zip(k).map(|(a, b)| a * b).sum();
                    let mn = m[w].max(s);
                    let corr = (m[w] - mn).exp();
                    let p = (s - mn).exp();
                    l[w] = l[w] * corr + p;
                    for (a, &x) in acc[w].iter_mut().zip(v) {
                        *a = *a * corr + p * x;
                    }
                    m[w] = mn;
                }
                let mx = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let c: Vec<f32> = m
                    .iter()
                    .map(|&mw| if mw == f32::NEG_INFINITY { 0.0 } else { (mw - mx).exp() })
                    .collect();
                let den: f32 = (0..WARPS).map(|w| l[w] * c[w]).sum();
                for e in 0..d {
                    let num: f32 = (0..WARPS).map(|w| acc[w][e] * c[w]).sum();
                    out[t * qw + h * d + e] = num / den;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gen(u64);
    impl Gen {
        fn f(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// softmax(q k^T * scale) v in f64, straight from the definition, per token and head.
    fn naive(q: &[f32], kp: &[f32], vp: &[f32], rows: &[u32], ctx: &TokenContext, dims: AttnDims) -> Vec<f64> {
        let AttnDims { heads, kv_heads, head_dim: d, scale } = dims;
        let group = heads / kv_heads;
        let mut out = vec![0f64; q.len()];
        for t in 0..ctx.ctx_off.len() {
            let (off, len) = (ctx.ctx_off[t] as usize, ctx.ctx_len[t] as usize);
            for h in 0..heads {
                let kvh = h / group;
                let qh = &q[t * heads * d + h * d..][..d];
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        let k = &kp[rows[off + j] as usize * kv_heads * d + kvh * d..][..d];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, &p) in e.iter().enumerate() {
                    let v = &vp[rows[off + j] as usize * kv_heads * d + kvh * d..][..d];
                    for x in 0..d {
                        out[t * heads * d + h * d + x] += p / z * f64::from(v[x]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn token_context_is_causal_within_a_prefill() {
        // A decode token with 5 cached + 1 new, then a 3-token prefill chunk after 2 cached.
        let c = TokenContext::new([(1, 0, 6), (3, 6, 5)]);
        assert_eq!(c.ctx_off, vec![0, 6, 6, 6]);
        assert_eq!(c.ctx_len, vec![6, 3, 4, 5]);
    }

    #[test]
    fn supported_shapes() {
        assert!(kernel_supports(28, 4, 128)); // Qwen2.5-7B
        assert!(kernel_supports(9, 3, 64)); // SmolLM2-135M
        assert!(!kernel_supports(32, 2, 128)); // group 16
        assert!(!kernel_supports(8, 8, 96));
    }

    /// Mixed lengths (1 to 300, incl. fewer keys than warps), GQA groups 1, 2, 7, scattered
    /// cache rows: the blocked online softmax equals the naive formula to f32 rounding.
    #[test]
    fn blocked_online_softmax_matches_naive() {
        let mut g = Gen(11);
        for (heads, kv_heads, d) in [(4, 4, 64), (4, 2, 64), (28, 4, 128), (2, 1, 256)] {
            let pool_rows = 700;
            let kvw = kv_heads * d;
            let kp: Vec<f32> = (0..pool_rows * kvw).map(|_| g.f() * 3.0).collect();
            let vp: Vec<f32> = (0..pool_rows * kvw).map(|_| g.f()).collect();
            // Sequences (new tokens, context length): decodes of several lengths, a prefill.
            let shapes = [(1usize, 1usize), (1, 3), (1, 300), (1, 17), (5, 40)];
            let mut rows = Vec::new();
            let mut seqs = Vec::new();
            for (i, &(len, kv_len)) in shapes.iter().enumerate() {
                seqs.push((len, rows.len(), kv_len));
                rows.extend((0..kv_len).map(|j| ((j * 37 + i * 101) % pool_rows) as u32));
            }
            let ctx = TokenContext::new(seqs);
            let n = ctx.ctx_len.len();
            let q: Vec<f32> = (0..n * heads * d).map(|_| g.f()).collect();
            let dims = AttnDims { heads, kv_heads, head_dim: d, scale: 1.0 / (d as f32).sqrt() };
            let got = paged_attention_blocked(&q, &kp, &vp, &rows, &ctx, dims);
            let want = naive(&q, &kp, &vp, &rows, &ctx, dims);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (f64::from(a) - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 2e-5, "heads {heads}/{kv_heads}, d {d}: max abs error {worst}");
        }
    }
}
