//! Token sampling: the exact, documented semantics that every backend (this CPU reference
//! and the later GPU kernel) implements, so that a run is reproducible from its seed.
//!
//! # Randomness ([`philox`])
//!
//! Each draw gets its uniform `u` in `[0, 1)` from Philox4x32-10 keyed by a
//! [`StreamKey`] `(seed, item, sample)` and counted by the decoding `step`; see
//! [`StreamKey`] for the exact bit layout. A sample's draws therefore never depend on which
//! other rows share its batch, on their order, or on the batch size.
//!
//! # Truncation and draw ([`cpu`])
//!
//! For one row of logits `l[0..V)` (f32) and [`SamplingParams`] `{temperature T, top_k,
//! top_p, min_p}`:
//!
//! 1. **Eligibility.** Only finite logits are eligible. `-inf` is the mask value
//!    (probability 0); NaN and `+inf` are numerical faults — never chosen, and reported
//!    by [`check_logits`] / [`try_sample_batch`]. A row with no eligible logit has an empty
//!    distribution and samples [`NO_TOKEN`].
//! 2. **Order.** Tokens are ranked by `(logit descending, token id ascending)`; `-0.0`
//!    and `+0.0` are equal. This is the probability order with ties broken by lower id
//!    (ranking on the logit rather than the rounded probability only differs for tokens
//!    whose probabilities round to the same f64, and keeps the order exact and cheap).
//! 3. **Temperature.** `T == 0` is greedy: the first token of the order (argmax, lowest id
//!    on ties), probability 1; the other parameters are ignored. Otherwise, with `m` the
//!    largest eligible logit, each eligible token gets the weight
//!    `w = exp((l as f64 - m as f64) / T as f64)` (f64 throughout; the top token has
//!    `w = 1` exactly). Probabilities are weights over their sum.
//! 4. **Top-k** (`0 < top_k`): keep the first `top_k` eligible tokens of the order
//!    (all of them when fewer): the set `K`.
//! 5. **Top-p** (`top_p < 1`): let `W_K` be the sum of the weights of `K` and
//!    `target = top_p as f64 * W_K`. Walking `K` in order with a running sum `c += w`,
//!    keep the shortest prefix at whose end `c >= target`, i.e. cumulative renormalised
//!    probability `>= top_p`; if rounding keeps `c` below `target` to the end, keep all
//!    of `K`. The kept prefix always holds at least the top token.
//! 6. **Min-p** (`min_p > 0`): of those, keep tokens with `w >= min_p as f64`, which is
//!    `p >= min_p * p_max` because the top token (always kept) has `w = 1`.
//! 7. **Zero weights** (`exp` underflow) are dropped: a probability-0 token is never drawn.
//! 8. **Renormalise and draw.** `Z` = sum of the survivors' weights; the survivor
//!    probabilities are `w / Z`. Given `u`, walk the survivors in order with a running sum
//!    `c += w` and return the first token where `u * Z < c`; if rounding never gets
//!    there, return the last survivor.
//!
//! Defaults (`top_k = 0`, `top_p = 1`, `min_p = 0`) disable steps 4–6; the disabled
//! value of each gives the same result as skipping the step.
//!
//! ## Floating-point contract
//!
//! The CPU reference sums `W_K`, `Z` (and the all-token sum used for `W_K` when top-k is
//! off) sequentially in ascending token-id order, in f64; the running sums of steps 5
//! and 8 are sequential in rank order. Another implementation (a GPU tree reduction, a
//! different `exp`) agrees up to rounding: probabilities to about `1e-12` relative, and
//! truncation sets and drawn tokens exactly except when a running sum lands within
//! rounding of its threshold. GPU parity checks should compare with that tolerance.
//!
//! ## Cost
//!
//! The CPU path never sorts the whole vocabulary for sampling: top-k uses a selection
//! then sorts the `k` survivors; top-p and plain sampling sort lazily, selecting and
//! sorting growing chunks of the top of the order until the running sum reaches its
//! target. [`truncated_distribution`] sorts all survivors, since it returns them in order.

pub mod cpu;
pub mod device;
pub mod philox;
pub mod radix;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::{
    check_logits, sample_batch, sample_row, truncated_distribution, try_sample_batch,
    SamplingParams, NO_TOKEN,
};
pub use philox::{fnv1a64, philox4x32_10, StreamKey};

/// Chi-square goodness-of-fit helpers shared by the tests of this module and by the GPU
/// check ([`crate::gpu_check`]), which runs the same statistics on device draws.
pub mod test_stats {
    /// `ln Γ(x)` for `x > 0`: recurrence up to `x >= 16`, then the Stirling series, which
    /// there is accurate to about 1e-15.
    pub fn ln_gamma(x: f64) -> f64 {
        assert!(x > 0.0);
        let mut x = x;
        let mut shift = 0.0;
        while x < 16.0 {
            shift += x.ln();
            x += 1.0;
        }
        let inv = 1.0 / x;
        let inv2 = inv * inv;
        let series =
            inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)));
        (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + series - shift
    }

    /// Regularized upper incomplete gamma `Q(a, x) = Γ(a, x) / Γ(a)`.
    pub fn gamma_q(a: f64, x: f64) -> f64 {
        assert!(a > 0.0 && x >= 0.0);
        if x == 0.0 {
            return 1.0;
        }
        let log_prefactor = -x + a * x.ln() - ln_gamma(a);
        if x < a + 1.0 {
            // P(a, x) = e^-x x^a Σ_n x^n / (a (a+1) ... (a+n)); converges fast here.
            let mut term = 1.0 / a;
            let mut sum = term;
            let mut n = 1.0;
            while term > sum * 1e-17 && n < 10_000.0 {
                term *= x / (a + n);
                sum += term;
                n += 1.0;
            }
            (1.0 - sum * log_prefactor.exp()).max(0.0)
        } else {
            // Q(a, x) = e^-x x^a / Γ(a) · 1/(x+1-a- 1(1-a)/(x+3-a- 2(2-a)/(x+5-a- ...))),
            // evaluated with the modified Lentz method.
            let tiny = 1e-300;
            let mut b = x + 1.0 - a;
            let mut c = 1.0 / tiny;
            let mut d = 1.0 / b;
            let mut h = d;
            for i in 1..10_000 {
                let an = -(i as f64) * (i as f64 - a);
                b += 2.0;
                d = an * d + b;
                if d.abs() < tiny {
                    d = tiny;
                }
                c = b + an / c;
                if c.abs() < tiny {
                    c = tiny;
                }
                d = 1.0 / d;
                let delta = d * c;
                h *= delta;
                if (delta - 1.0).abs() < 1e-16 {
                    break;
                }
            }
            h * log_prefactor.exp()
        }
    }

    /// Upper-tail p-value of a chi-square statistic with `df` degrees of freedom.
    pub fn chi_square_p_value(stat: f64, df: usize) -> f64 {
        if stat.is_infinite() {
            return 0.0;
        }
        gamma_q(df as f64 / 2.0, stat / 2.0)
    }

    /// Pearson chi-square of `observed` counts against cell probabilities `probs`.
    /// Cells expecting fewer than 5 counts are pooled (and the pool, if still under 5,
    /// joins the smallest regular cell) so the chi-square approximation holds. Counts in
    /// cells of probability 0 make the statistic infinite. Returns `(stat, df)`.
    pub fn chi_square_stat(observed: &[u64], probs: &[f64]) -> (f64, usize) {
        assert_eq!(observed.len(), probs.len());
        let n = observed.iter().sum::<u64>() as f64;
        let mut cells: Vec<(f64, f64)> = Vec::new();
        let (mut pool_o, mut pool_e) = (0.0, 0.0);
        for (&o, &p) in observed.iter().zip(probs) {
            let e = p * n;
            if e >= 5.0 {
                cells.push((o as f64, e));
            } else {
                pool_o += o as f64;
                pool_e += e;
            }
        }
        if pool_e == 0.0 && pool_o > 0.0 {
            return (f64::INFINITY, cells.len().max(2) - 1);
        }
        if pool_e >= 5.0 || cells.is_empty() {
            cells.push((pool_o, pool_e));
        } else if pool_e > 0.0 || pool_o > 0.0 {
            let smallest = (0..cells.len())
                .min_by(|&i, &j| cells[i].1.total_cmp(&cells[j].1))
                .unwrap();
            cells[smallest].0 += pool_o;
            cells[smallest].1 += pool_e;
        }
        let stat = cells.iter().map(|&(o, e)| (o - e) * (o - e) / e).sum();
        (stat, cells.len().max(2) - 1)
    }

    #[test]
    fn chi_square_p_value_known_points() {
        // Critical values at the 5% level.
        for (x, df) in [
            (3.841458820694124, 1),
            (18.307038053275146, 10),
            (123.2252, 99),
        ] {
            let p = chi_square_p_value(x, df);
            assert!((p - 0.05).abs() < 2e-4, "df {df}: p = {p}");
        }
        // df = 2 has the closed form e^(-x/2).
        for x in [0.5, 3.0, 10.0, 60.0] {
            let p = chi_square_p_value(x, 2);
            assert!(
                (p / (-x / 2.0f64).exp() - 1.0).abs() < 1e-10,
                "x {x}: p = {p}"
            );
        }
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
    }
}
