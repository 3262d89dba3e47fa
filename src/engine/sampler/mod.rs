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
