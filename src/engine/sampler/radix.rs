//! The device sampler's algorithm, in Rust: the exact passes and arithmetic of
//! `kernels/sampler.cu`, so that CI (which has no GPU) tests what the GPU runs, and a GPU
//! run can be compared with it token for token.
//!
//! # Why a second algorithm
//!
//! The CPU reference ([`super::cpu`]) sorts lazily and sums in f64 in token-id order; a GPU
//! block cannot do either cheaply, and a float sum in a parallel order is neither
//! reproducible nor equal to the sequential one. This algorithm keeps the same semantics
//! (the documented steps 1 to 8 of [`super`]) but:
//!
//! * **Fixed-point weights.** Each weight `w = exp((l - m) / T)` (f64, the same formula as
//!   the CPU) is stored as the integer `q = round_ties_even(w * 2^s)` with
//!   `s = 63 - bits(V)`, so any sum over the row fits in a `u64` and is *exact and
//!   order-independent*: a tree reduction or shared-memory atomics give the same bits in
//!   every run, and the same bits as this file. The price: a token whose weight is below
//!   `2^-(s+1)` (for `V = 152,064`, probability `< 1.5e-14` relative to the top token) has
//!   `q = 0` and is dropped like an underflowed weight.
//! * **Every truncation is a rank prefix.** Top-k, top-p, min-p and the draw itself each
//!   select the first tokens of the order `(logit desc, id asc)`: top-k by count, top-p by
//!   cumulative weight, min-p because the weight is monotone in the logit, the draw by the
//!   cumulative weight reaching `floor(u * Z) + 1`. A prefix is named by its last token's
//!   64-bit order key ([`Bound`]), found by a radix search: three histogram passes over
//!   the 32-bit logit key (11 + 11 + 10 bits; per bucket a count and a `u64` weight sum),
//!   then, only when several tokens share the boundary logit, one id-ordered pass that
//!   picks the right tied token. No sort, no per-row candidate list: the cost is a fixed
//!   number of streaming passes over the row.
//!
//! # Agreement with the CPU reference
//!
//! Same order, same weight formula, same thresholds; the sums differ only by the
//! fixed-point rounding (at most `V * 2^-(s+1)` absolute, about `2e-9` of the top token's
//! weight at `V = 152,064`). So the truncation sets and the drawn token are the CPU's
//! except when a running sum lands within that distance of its threshold; the tests
//! measure how often.


use super::cpu::{self, SamplingParams, NO_TOKEN};
use super::philox::StreamKey;

/// A rank prefix: every eligible token whose order key is `<=` this (see [`order_key`]).
pub type Bound = u64;

/// The prefix holding every eligible token.
pub const ALL: Bound = u64::MAX;

/// Radix digits of the 32-bit logit key, most significant first: `(shift, bits)`.
/// The kernel uses the same three passes (2,048 buckets fit its shared memory).
pub const DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// 32-bit logit key, ascending = logit descending; `-0.0` and `+0.0` map to the same key:
/// the high half of the CPU sampler's order key (logit key high, token id low).
#[inline]
pub fn logit_key(logit: f32) -> u32 {
    (cpu::order_key(logit, 0) >> 32) as u32
}

/// Fixed-point shift for a vocabulary of `vocab` tokens: `V * 2^s < 2^63`.
pub fn weight_shift(vocab: usize) -> u32 {
    63 - (64 - (vocab as u64).leading_zeros())
}

/// What a radix search counts: tokens (top-k) or fixed-point weight (top-p, the draw).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    Count,
    Weight,
}

/// One row with the statistics of the first pass.
struct Row<'a> {
    logits: &'a [f32],
    /// Largest eligible logit, as f64.
    m: f64,
    t: f64,
    scale: f64,
}

impl Row<'_> {
    #[inline]
    fn weight(&self, l: f32) -> u64 {
        let w = ((f64::from(l) - self.m) / self.t).exp();
        (w * self.scale).round_ties_even() as u64
    }

    /// Calls `f(id, logit key, measure)` for every token of the support
    /// `{eligible, order key <= limit, q >= qmin}` (`qmin = 0`: every eligible token).
    #[inline]
    fn for_support(&self, limit: Bound, qmin: u64, measure: Measure, mut f: impl FnMut(u32, u32, u64)) {
        for (i, &l) in self.logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            let key = logit_key(l);
            if ((u64::from(key) << 32) | i as u64) > limit {
                continue;
            }
            let needs_q = qmin > 0 || measure == Measure::Weight;
            let q = if needs_q { self.weight(l) } else { 0 };
            if q < qmin {
                continue;
            }
            f(i as u32, key, if measure == Measure::Count { 1 } else { q });
        }
    }

    /// The shortest rank prefix of the support whose measure reaches `target(total)`,
    /// `total` being the whole support's measure (known after the first pass). Returns the
    /// prefix and the total. `target` must return a value in `1..=total`.
    fn search(&self, limit: Bound, qmin: u64, measure: Measure, target: impl Fn(u64) -> u64) -> (Bound, u64) {
        let (mut prefix, mut prefix_mask) = (0u32, 0u32);
        let mut before = 0u64;
        let mut total = 0u64;
        let mut want = 0u64;
        for (pass, &(shift, bits)) in DIGITS.iter().enumerate() {
            let digit_mask = (1u32 << bits) - 1;
            let mut hist = vec![0u64; 1 << bits];
            self.for_support(limit, qmin, measure, |_, key, x| {
                if key & prefix_mask == prefix {
                    hist[((key >> shift) & digit_mask) as usize] += x;
                }
            });
            if pass == 0 {
                total = hist.iter().sum();
                want = target(total);
                assert!((1..=total).contains(&want), "search target {want} outside 1..={total}");
            }
            // The bucket where the running measure first reaches `want`.
            let mut b = 0usize;
            while before + hist[b] < want {
                before += hist[b];
                b += 1;
            }
            prefix |= (b as u32) << shift;
            prefix_mask |= digit_mask << shift;
        }
        // Tokens sharing the boundary logit have equal measure `each`: take the first
        // `need` of them in id order.
        let mut tied = Vec::new();
        let mut each = 0;
        self.for_support(limit, qmin, measure, |id, key, x| {
            if key == prefix {
                tied.push(id);
                each = x;
            }
        });
        let need = (want - before).div_ceil(each) as usize;
        let id = tied[need - 1];
        (((u64::from(prefix)) << 32) | u64::from(id), total)
    }
}

/// One drawn token and its log-probability under the truncated distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Drawn {
    pub token: u32,
    pub logprob: f32,
}

/// The truncated distribution as the device computes it: the survivors are the eligible
/// tokens with order key `<= bound` and fixed-point weight `>= qmin`; `z` is their total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    pub bound: Bound,
    pub qmin: u64,
    pub shift: u32,
}

/// Steps 1 to 6 of the semantics: the support, or `None` when no logit is eligible.
/// Also returns the row's max logit (needed to recompute weights).
fn support(logits: &[f32], p: &SamplingParams) -> Option<(Support, f64)> {
    if let Err(e) = p.validate() {
        panic!("invalid SamplingParams: {e}");
    }
    // Pass 1: max, first argmax, eligible count.
    let (best, n_eligible) = cpu::first_pass(logits)?;
    let m = f64::from(logits[best as u32 as usize]);
    let shift = weight_shift(logits.len());
    if p.temperature == 0.0 {
        return Some((
            Support {
                bound: best,
                qmin: 0,
                shift,
            },
            m,
        ));
    }
    let row = Row {
        logits,
        m,
        t: f64::from(p.temperature),
        scale: (shift as f64).exp2(),
    };
    let mut limit = ALL;
    if p.top_k > 0 && p.top_k < n_eligible {
        limit = row.search(ALL, 0, Measure::Count, |_| p.top_k as u64).0;
    }
    if p.top_p < 1.0 {
        let top_p = f64::from(p.top_p);
        limit = row
            .search(limit, 0, Measure::Weight, |w| {
                ((top_p * w as f64).ceil() as u64).clamp(1, w)
            })
            .0;
    }
    // Min-p and the zero-weight rule: q >= max(1, ceil(min_p * 2^s)).
    let qmin = ((f64::from(p.min_p) * row.scale).ceil() as u64).max(1);
    Some((
        Support {
            bound: limit,
            qmin,
            shift,
        },
        m,
    ))
}

/// Draws one token with the uniform `u` in `[0, 1)`: the first token of the support where
/// the running fixed-point weight exceeds `floor(u * Z)`. [`NO_TOKEN`] (log-prob `-inf`)
/// when no logit is eligible.
///
/// # Panics
/// If `p` fails [`SamplingParams::validate`] or `u` is outside `[0, 1)`.
pub fn sample_row(logits: &[f32], p: &SamplingParams, u: f64) -> Drawn {
    assert!((0.0..1.0).contains(&u), "uniform u = {u} outside [0, 1)");
    let Some((s, m)) = support(logits, p) else {
        return Drawn {
            token: NO_TOKEN,
            logprob: f32::NEG_INFINITY,
        };
    };
    if p.temperature == 0.0 {
        return Drawn {
            token: s.bound as u32,
            logprob: 0.0,
        };
    }
    let row = Row {
        logits,
        m,
        t: f64::from(p.temperature),
        scale: (s.shift as f64).exp2(),
    };
    let (bound, z) = row.search(s.bound, s.qmin, Measure::Weight, |z| {
        ((u * z as f64).floor() as u64).min(z - 1) + 1
    });
    let token = bound as u32;
    let q = row.weight(logits[token as usize]);
    Drawn {
        token,
        logprob: (q as f64 / z as f64).ln() as f32,
    }
}

/// The truncated distribution as `(token id, probability)` in rank order, probabilities
/// from the fixed-point weights. Empty when no logit is eligible.
pub fn truncated_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let Some((s, m)) = support(logits, p) else {
        return Vec::new();
    };
    if p.temperature == 0.0 {
        return vec![(s.bound as u32, 1.0)];
    }
    let row = Row {
        logits,
        m,
        t: f64::from(p.temperature),
        scale: (s.shift as f64).exp2(),
    };
    let mut kept: Vec<(u64, u64)> = Vec::new();
    row.for_support(s.bound, s.qmin, Measure::Weight, |id, key, q| {
        kept.push(((u64::from(key) << 32) | u64::from(id), q));
    });
    kept.sort_unstable();
    let z: u64 = kept.iter().map(|&(_, q)| q).sum();
    kept.into_iter().map(|(k, q)| (k as u32, q as f64 / z as f64)).collect()
}

/// Samples every row of a row-major `[rows, vocab]` matrix: row `r` with `params[r]` and
/// `keys[r].uniform(steps[r])`, exactly as the device kernel does.
///
/// # Panics
/// On mismatched lengths, invalid params, or a step `>= 2^32`.
pub fn sample_batch(logits: &[f32], vocab: usize, params: &[SamplingParams], keys: &[StreamKey], steps: &[u64]) -> Vec<Drawn> {
    super::cpu::map_rows(logits, vocab, params, keys, steps, sample_row)
}

#[cfg(test)]
mod tests {
    use crate::analysis::stats::{chi_square_p_value, chi_square_stat};
    use super::*;
    use rayon::prelude::*;

    /// xorshift64*: deterministic inputs without a dependency.
    struct Gen(u64);

    impl Gen {
        fn bits(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn unit(&mut self) -> f64 {
            (self.bits() >> 11) as f64 / 2f64.powi(53)
        }
        /// Approximately normal: sum of four uniforms, rescaled to unit variance.
        fn gauss(&mut self) -> f64 {
            ((0..4).map(|_| self.unit()).sum::<f64>() - 2.0) * 3f64.sqrt()
        }
    }

    fn sp(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
        }
    }

    /// LLM-like logits: a Zipf-ish slope, noise, a few strong candidates.
    fn llm_row(g: &mut Gen, vocab: usize) -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                let spike = if g.bits().is_multiple_of(4000) { 9.0 } else { 0.0 };
                (spike + 2.0 * g.gauss() - ((i % 997) as f64).ln_1p() * 0.3) as f32
            })
            .collect()
    }

    /// Rows with the hard cases: heavy ties (incl. ±0), masks and faults, exp underflow.
    fn hard_rows(g: &mut Gen, vocab: usize) -> Vec<Vec<f32>> {
        let ties = (0..vocab)
            .map(|_| match g.bits() % 8 {
                0 => -0.0,
                1 => 0.0,
                r => r as f32 - 4.0,
            })
            .collect();
        let masked = (0..vocab)
            .map(|_| match g.bits() % 16 {
                0 => f32::NEG_INFINITY,
                1 => f32::NAN,
                2 => f32::INFINITY,
                r => (r % 4) as f32 * 0.5,
            })
            .collect();
        let wide = (0..vocab).map(|_| (-g.unit() * 3000.0) as f32).collect();
        let smooth = (0..vocab).map(|_| (g.gauss() * 3.0) as f32).collect();
        vec![ties, masked, wide, smooth]
    }

    const PARAMS: [(f32, usize, f32, f32); 9] = [
        (1.0, 0, 1.0, 0.0),
        (0.6, 20, 0.95, 0.0),
        (0.6, 0, 0.95, 0.0),
        (1.3, 0, 0.5, 0.05),
        (0.7, 3, 1.0, 0.0),
        (1.0, 1, 1.0, 0.0),
        (0.9, 0, 1.0, 0.3),
        (2.0, 50, 0.9, 0.01),
        (0.0, 0, 1.0, 0.0),
    ];

    /// The support and probabilities equal the exact CPU reference's up to the
    /// fixed-point rounding, on rows full of ties, masks and underflow.
    #[test]
    fn distribution_matches_cpu_reference() {
        let mut g = Gen(0x1234_5678_9abc_def1);
        for vocab in [1, 2, 5, 64, 1000, 5000] {
            for row in hard_rows(&mut g, vocab) {
                for &(t, k, tp, mp) in &PARAMS {
                    let p = sp(t, k, tp, mp);
                    let ours = truncated_distribution(&row, &p);
                    let exact = cpu::truncated_distribution(&row, &p);
                    let ids = |d: &[(u32, f64)]| d.iter().map(|&(i, _)| i).collect::<Vec<_>>();
                    // The wide row has underflowing tail weights: those may be dropped by
                    // the fixed point (they are below 2^-(s+1)); compare the kept head.
                    let n = ours.len().min(exact.len());
                    assert_eq!(ids(&ours[..n]), ids(&exact[..n]), "vocab {vocab}, {p:?}");
                    let dropped: f64 = exact[n..].iter().map(|&(_, p)| p).sum();
                    assert!(
                        dropped < 1e-9 && ours.len() <= exact.len(),
                        "vocab {vocab}, {p:?}: dropped mass {dropped}"
                    );
                    for (&(_, a), &(_, b)) in ours.iter().zip(&exact) {
                        assert!(
                            (a - b).abs() <= 1e-9 * b.max(1e-3),
                            "vocab {vocab}, {p:?}: p {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn edge_rows() {
        let p = SamplingParams::default();
        let none = [f32::NEG_INFINITY, f32::NAN, f32::INFINITY];
        assert_eq!(
            sample_row(&none, &p, 0.5),
            Drawn {
                token: NO_TOKEN,
                logprob: f32::NEG_INFINITY
            }
        );
        // Greedy: lowest id among the tied maxima, ±0 equal.
        assert_eq!(sample_row(&[-0.0, 0.0, -1.0], &SamplingParams::greedy(), 0.9).token, 0);
        assert_eq!(sample_row(&[1.0, 3.0, 3.0], &SamplingParams::greedy(), 0.9).token, 1);
        // Top-k that splits a tie keeps the lower ids: with k = 2 over [5, 5, 5] the support
        // is tokens 0 and 1, each drawn half the time.
        let d = truncated_distribution(&[5.0, 5.0, 5.0], &sp(1.0, 2, 1.0, 0.0));
        assert_eq!(d, vec![(0, 0.5), (1, 0.5)]);
        assert_eq!(sample_row(&[5.0, 5.0, 5.0], &sp(1.0, 2, 1.0, 0.0), 0.49).token, 0);
        assert_eq!(sample_row(&[5.0, 5.0, 5.0], &sp(1.0, 2, 1.0, 0.0), 0.5).token, 1);
        // u at the top of its range picks the last survivor, never beyond.
        let u = 1.0 - 2f64.powi(-53);
        assert_eq!(sample_row(&[0.0, 0.0, f32::NEG_INFINITY], &p, u).token, 1);
        // Log-probs are those of the truncated distribution.
        let r = sample_row(&[0.0, 2f32.ln(), 0.0], &sp(1.0, 2, 1.0, 0.0), 0.0);
        assert_eq!(r.token, 1);
        assert!((f64::from(r.logprob) - (2.0f64 / 3.0).ln()).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn weight_shift_keeps_sums_in_u64() {
        assert_eq!(weight_shift(152_064), 45);
        assert_eq!(weight_shift(1), 62);
        for v in [1usize, 2, 3, 1000, 152_064, 1 << 20] {
            let s = weight_shift(v);
            assert!((v as u128) << s < 1u128 << 63, "vocab {v}");
            assert!(
                (v as u128) << (s + 1) >= 1u128 << 63,
                "vocab {v}: shift not the largest"
            );
        }
    }

    /// Chi-square of draws against the exact truncated distribution (the CPU reference's),
    /// for several parameter sets including top-p alone over a 152,064-token vocabulary;
    /// and the test rejects a wrong distribution (power).
    #[test]
    fn draws_follow_the_exact_truncated_distribution() {
        let mut g = Gen(0xfeed_beef_0000_0001);
        let big = llm_row(&mut g, 152_064);
        let small = llm_row(&mut g, 2_000);
        let cases: [(&[f32], SamplingParams, usize); 5] = [
            (&big, sp(0.6, 0, 0.95, 0.0), 1_500),
            (&small, sp(0.6, 20, 0.95, 0.0), 20_000),
            (&small, sp(1.0, 0, 1.0, 0.0), 20_000),
            (&small, sp(1.2, 0, 0.8, 0.02), 20_000),
            (&small, sp(0.8, 40, 1.0, 0.1), 20_000),
        ];
        for (ci, (row, p, n)) in cases.into_iter().enumerate() {
            let key = StreamKey::new(2026, &format!("chi-{ci}"), 0);
            let draws: Vec<u32> = (0..n as u64)
                .into_par_iter()
                .map(|s| sample_row(row, &p, key.uniform(s)).token)
                .collect();
            let exact = cpu::truncated_distribution(row, &p);
            let mut probs = vec![0.0; row.len()];
            for &(id, pr) in &exact {
                probs[id as usize] = pr;
            }
            let mut counts = vec![0u64; row.len()];
            for &t in &draws {
                counts[t as usize] += 1;
            }
            let (stat, df) = chi_square_stat(&counts, &probs);
            let pv = chi_square_p_value(stat, df);
            assert!(pv > 1e-3, "case {ci} {p:?}: chi2 {stat}, df {df}, p {pv}");
            // Power: the untruncated, untempered softmax is rejected by the same draws.
            let wrong = cpu::truncated_distribution(row, &SamplingParams::default());
            let mut wp = vec![0.0; row.len()];
            for &(id, pr) in &wrong {
                wp[id as usize] = pr;
            }
            let (stat, df) = chi_square_stat(&counts, &wp);
            assert!(
                chi_square_p_value(stat, df) < 1e-6 || p == SamplingParams::default(),
                "case {ci}: wrong distribution not rejected"
            );
        }
    }

    /// The same logits and streams through this algorithm and the exact CPU sampler: the
    /// tokens may differ only where rounding moves a boundary, which is rare.
    #[test]
    fn agrees_with_cpu_sampler_on_same_streams() {
        let mut g = Gen(42);
        let vocab = 32_000;
        let rows: Vec<Vec<f32>> = (0..16).map(|_| llm_row(&mut g, vocab)).collect();
        let mut draws = 0usize;
        let mut differ = 0usize;
        for (r, row) in rows.iter().enumerate() {
            let p = match r % 4 {
                0 => sp(0.6, 20, 0.95, 0.0),
                1 => sp(0.6, 0, 0.95, 0.0),
                2 => sp(1.0, 0, 1.0, 0.05),
                _ => sp(1.0, 0, 1.0, 0.0),
            };
            let key = StreamKey::new(7, "agree", r as u32);
            let (d, n): (usize, usize) = (0..100u64)
                .into_par_iter()
                .map(|s| {
                    let u = key.uniform(s);
                    (
                        usize::from(sample_row(row, &p, u).token != cpu::sample_row(row, &p, u)),
                        1,
                    )
                })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            differ += d;
            draws += n;
        }
        // A disagreement needs u * Z within ~1e-9 relative of a cumulative sum: expect none.
        assert!(differ * 10_000 <= draws, "{differ} of {draws} draws differ");
        eprintln!("radix vs CPU sampler: {differ} of {draws} draws differ");
    }

    #[test]
    fn batch_rows_use_their_own_streams() {
        let mut g = Gen(9);
        let vocab = 300;
        let logits: Vec<f32> = (0..vocab * 5).map(|_| (g.gauss() * 2.0) as f32).collect();
        let params: Vec<_> = PARAMS.iter().take(5).map(|&(t, k, tp, mp)| sp(t, k, tp, mp)).collect();
        let keys: Vec<_> = (0..5).map(|i| StreamKey::new(1, "b", i)).collect();
        let steps = [0, 3, 9, 27, 81];
        let got = sample_batch(&logits, vocab, &params, &keys, &steps);
        for r in 0..5 {
            let want = sample_row(
                &logits[r * vocab..(r + 1) * vocab],
                &params[r],
                keys[r].uniform(steps[r]),
            );
            assert_eq!(got[r], want);
        }
    }
}
