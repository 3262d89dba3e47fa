//! CPU reference sampler over f32 logits. The semantics are specified in the parent
//! module's docs ([`super`]); this file implements them without sorting the whole
//! vocabulary per draw.

use rayon::prelude::*;

use super::philox::StreamKey;

/// Token returned for a row with no eligible (finite) logit. Never a valid token id.
pub const NO_TOKEN: u32 = u32::MAX;

/// Size of the first chunk the lazy sort selects; later chunks double the sorted prefix.
/// Nucleus sets are usually far smaller, so one selection pass over the vocabulary
/// typically suffices.
const FIRST_CHUNK: usize = 128;

/// Per-row sampling parameters. Every field's "off" value is its [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Keep only the `top_k` most probable tokens; `0` disables.
    pub top_k: usize,
    /// Nucleus mass in `(0, 1]`; `1` disables.
    pub top_p: f32,
    /// Keep tokens with `p >= min_p * p_max`, `min_p` in `[0, 1)`; `0` disables.
    pub min_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0; the other fields are ignored).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range; the message names the field, the value and the range.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!("temperature must be finite and >= 0, got {t}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return Err(format!("min_p must be in [0, 1), got {}", self.min_p));
        }
        Ok(())
    }
}

/// Reports the faults that the sampler silently skips: NaN or `+inf` logits, and a row
/// with no finite logit at all (which would sample [`NO_TOKEN`]).
pub fn check_logits(logits: &[f32]) -> Result<(), String> {
    if logits.is_empty() {
        return Err("empty logits row".to_string());
    }
    let mut any_finite = false;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return Err(format!("logit of token {i} is NaN"));
        }
        if l == f32::INFINITY {
            return Err(format!("logit of token {i} is +inf"));
        }
        any_finite |= l.is_finite();
    }
    if !any_finite {
        return Err("no finite logit: every token is masked (-inf)".to_string());
    }
    Ok(())
}

/// Rank key: ascending key order is `(logit descending, id ascending)`. The high half is
/// the logit's bits mapped to an order-preserving unsigned integer, then complemented.
#[inline]
pub(crate) fn order_key(logit: f32, id: u32) -> u64 {
    // Adding +0.0 turns -0.0 into +0.0, so the two zeros tie (and fall back to the id).
    let bits = (logit + 0.0).to_bits();
    let ascending = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ascending) << 32) | u64::from(id)
}

#[inline]
fn key_id(key: u64) -> u32 {
    key as u32
}

/// Sum of weights in ascending token-id order (the documented summation order).
fn sum_in_id_order(mut items: Vec<(u32, f64)>) -> f64 {
    items.sort_unstable_by_key(|&(id, _)| id);
    items.iter().fold(0.0, |s, &(_, w)| s + w)
}

#[derive(Clone, Copy)]
struct Cand {
    key: u64,
    w: f64,
}

/// The truncated support of one row, before the draw.
///
/// Survivors are the candidates at rank positions `< len` whose weight passes
/// [`Support::survives`]. Invariant: `cands[..sorted]` holds the `sorted` smallest keys in
/// order (the rest is unordered), and `len <= sorted || len == cands.len()`.
struct Support {
    cands: Vec<Cand>,
    sorted: usize,
    len: usize,
    min_w: f64,
    /// Sum of the survivors' weights in token-id order.
    z: f64,
}

impl Support {
    #[inline]
    fn survives(&self, w: f64) -> bool {
        w > 0.0 && w >= self.min_w
    }

    /// Makes at least `cands[..upto]` sorted, growing the sorted prefix geometrically: a
    /// selection puts the next chunk's keys in front of the rest, then only the chunk is
    /// sorted.
    fn ensure_sorted(&mut self, upto: usize) {
        if upto <= self.sorted {
            return;
        }
        let want = upto
            .max(2 * self.sorted)
            .max(FIRST_CHUNK)
            .min(self.cands.len());
        let rest = &mut self.cands[self.sorted..];
        let n = want - self.sorted;
        if n < rest.len() {
            rest.select_nth_unstable_by_key(n, |c| c.key);
        }
        rest[..n].sort_unstable_by_key(|c| c.key);
        self.sorted = want;
    }

    /// Top-p over all candidates (which must include every token of `K` with a positive
    /// weight): shortens `len` to the shortest rank prefix whose running weight sum reaches
    /// `target`. Stops early once every survivor has been passed, since a longer prefix
    /// then keeps the same survivors. Returns whether `len` shrank.
    fn cut_top_p(&mut self, target: f64) -> bool {
        let n_survivors = self.cands.iter().filter(|c| self.survives(c.w)).count();
        let mut c = 0.0;
        let mut seen = 0;
        for i in 0..self.cands.len() {
            self.ensure_sorted(i + 1);
            let w = self.cands[i].w;
            c += w;
            seen += usize::from(self.survives(w));
            if c >= target || seen == n_survivors {
                self.len = i + 1;
                return self.len < self.cands.len();
            }
        }
        // Not reached: the top token survives, so the last survivor ends the loop.
        false
    }

    fn survivors_in_id_order_sum(&self) -> f64 {
        sum_in_id_order(
            self.cands[..self.len]
                .iter()
                .filter(|c| self.survives(c.w))
                .map(|c| (key_id(c.key), c.w))
                .collect(),
        )
    }

    /// Inverse CDF over the survivors in rank order.
    fn draw(&mut self, u: f64) -> u32 {
        let target = u * self.z;
        let mut c = 0.0;
        let mut last = NO_TOKEN;
        for i in 0..self.len {
            self.ensure_sorted(i + 1);
            let cand = self.cands[i];
            if !self.survives(cand.w) {
                continue;
            }
            c += cand.w;
            last = key_id(cand.key);
            if target < c {
                return last;
            }
        }
        // Only reachable through rounding (u * Z >= the final running sum).
        last
    }

    fn into_distribution(mut self) -> Vec<(u32, f64)> {
        self.ensure_sorted(self.len);
        let z = self.z;
        self.cands[..self.len]
            .iter()
            .filter(|c| self.survives(c.w))
            .map(|c| (key_id(c.key), c.w / z))
            .collect()
    }
}

/// Pass 1 over a row: the top token's order key (smallest key) and the eligible count;
/// `None` when no logit is eligible.
pub(crate) fn first_pass(logits: &[f32]) -> Option<(u64, usize)> {
    let mut best = u64::MAX;
    let mut n_eligible = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_finite() {
            n_eligible += 1;
            best = best.min(order_key(l, i as u32));
        }
    }
    (n_eligible > 0).then_some((best, n_eligible))
}

/// Applies temperature, top-k, top-p and min-p; `None` when no logit is eligible.
fn build_support(logits: &[f32], p: &SamplingParams) -> Option<Support> {
    if let Err(e) = p.validate() {
        panic!("invalid SamplingParams: {e}");
    }
    assert!(
        logits.len() < NO_TOKEN as usize,
        "vocabulary too large for u32 token ids"
    );

    let (best, n_eligible) = first_pass(logits)?;
    if p.temperature == 0.0 {
        let top = Cand { key: best, w: 1.0 };
        return Some(Support {
            cands: vec![top],
            sorted: 1,
            len: 1,
            min_w: 0.0,
            z: 1.0,
        });
    }

    let m = f64::from(logits[key_id(best) as usize]);
    let t = f64::from(p.temperature);
    let weight = |l: f32| ((f64::from(l) - m) / t).exp();
    let min_w = f64::from(p.min_p);
    let top_p_on = p.top_p < 1.0;

    if p.top_k > 0 && p.top_k < n_eligible {
        // Top-k: select the k smallest keys, sort only those; weights only for them.
        let mut keys: Vec<u64> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| order_key(l, i as u32))
            .collect();
        keys.select_nth_unstable(p.top_k);
        keys.truncate(p.top_k);
        keys.sort_unstable();
        let cands: Vec<Cand> = keys
            .iter()
            .map(|&key| Cand {
                key,
                w: weight(logits[key_id(key) as usize]),
            })
            .collect();
        let n = cands.len();
        let mut s = Support {
            cands,
            sorted: n,
            len: n,
            min_w,
            z: 0.0,
        };
        if top_p_on {
            let w_k = sum_in_id_order(s.cands.iter().map(|c| (key_id(c.key), c.w)).collect());
            s.cut_top_p(f64::from(p.top_p) * w_k);
        }
        s.z = s.survivors_in_id_order_sum();
        Some(s)
    } else {
        // K is every eligible token. One pass computes all weights, their sum W (needed
        // by top-p) and the survivors' sum Z in id order. Top-p needs every positive
        // weight as a candidate (below-min-p tokens still count towards its running
        // sum); otherwise only survivors are kept.
        let mut cands = Vec::with_capacity(n_eligible);
        let (mut w_all, mut z_all) = (0.0, 0.0);
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            let w = weight(l);
            w_all += w;
            let survives = w > 0.0 && w >= min_w;
            if survives {
                z_all += w;
            }
            if survives || (top_p_on && w > 0.0) {
                cands.push(Cand {
                    key: order_key(l, i as u32),
                    w,
                });
            }
        }
        let n = cands.len();
        let mut s = Support {
            cands,
            sorted: 0,
            len: n,
            min_w,
            z: z_all,
        };
        if top_p_on && s.cut_top_p(f64::from(p.top_p) * w_all) {
            s.z = s.survivors_in_id_order_sum();
        }
        Some(s)
    }
}

/// The exact final distribution: `(token id, probability)` in rank order (probability
/// descending, id ascending). Empty when no logit is eligible.
///
/// # Panics
/// If `p` fails [`SamplingParams::validate`].
pub fn truncated_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    build_support(logits, p)
        .map(Support::into_distribution)
        .unwrap_or_default()
}

/// Draws one token from `logits` with the uniform `u` in `[0, 1)` (inverse CDF over the
/// survivors in rank order). Returns [`NO_TOKEN`] when no logit is eligible.
///
/// # Panics
/// If `p` fails [`SamplingParams::validate`] or `u` is outside `[0, 1)`.
pub fn sample_row(logits: &[f32], p: &SamplingParams, u: f64) -> u32 {
    assert!((0.0..1.0).contains(&u), "uniform u = {u} outside [0, 1)");
    match build_support(logits, p) {
        Some(mut s) => s.draw(u),
        None => NO_TOKEN,
    }
}

pub(super) fn batch_rows(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParams],
    keys: &[StreamKey],
    steps: &[u64],
) -> usize {
    assert!(vocab > 0, "vocab must be > 0");
    assert_eq!(
        logits.len() % vocab,
        0,
        "logits length {} is not a multiple of vocab {vocab}",
        logits.len()
    );
    let rows = logits.len() / vocab;
    assert_eq!(params.len(), rows, "params: one per row");
    assert_eq!(keys.len(), rows, "keys: one per row");
    assert_eq!(steps.len(), rows, "steps: one per row");
    rows
}

/// Samples every row of a row-major `[rows, vocab]` logits matrix in parallel. Row `r`
/// uses `params[r]` and the uniform `keys[r].uniform(steps[r])`, so its token depends on
/// nothing else in the batch.
///
/// # Panics
/// On mismatched lengths, invalid params, or a step `>= 2^32`.
pub fn sample_batch(logits: &[f32], vocab: usize, params: &[SamplingParams], keys: &[StreamKey], steps: &[u64]) -> Vec<u32> {
    map_rows(logits, vocab, params, keys, steps, sample_row)
}

/// Checks the batch's shape ([`batch_rows`]), then runs `f(row, params, u)` on every row in
/// parallel, `u` being the row's own uniform draw for its step.
pub(super) fn map_rows<T: Send>(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParams],
    keys: &[StreamKey],
    steps: &[u64],
    f: impl Fn(&[f32], &SamplingParams, f64) -> T + Sync + Send,
) -> Vec<T> {
    batch_rows(logits, vocab, params, keys, steps);
    logits
        .par_chunks(vocab)
        .zip(params.par_iter())
        .zip(keys.par_iter())
        .zip(steps.par_iter())
        .map(|(((row, p), key), &step)| f(row, p, key.uniform(step)))
        .collect()
}

/// [`sample_batch`] that first checks every row ([`check_logits`], params, step range)
/// and returns the first fault as `"row R: ..."` instead of sampling around it.
///
/// # Panics
/// On mismatched lengths only.
pub fn try_sample_batch(
    logits: &[f32],
    vocab: usize,
    params: &[SamplingParams],
    keys: &[StreamKey],
    steps: &[u64],
) -> Result<Vec<u32>, String> {
    batch_rows(logits, vocab, params, keys, steps);
    let faults: Vec<(usize, String)> = logits
        .par_chunks(vocab)
        .zip(params.par_iter())
        .zip(steps.par_iter())
        .enumerate()
        .filter_map(|(r, ((row, p), &step))| {
            let checked = p
                .validate()
                .and_then(|()| check_logits(row))
                .and_then(|()| {
                    if step <= u64::from(u32::MAX) {
                        Ok(())
                    } else {
                        Err(format!("step {step} exceeds 2^32 - 1"))
                    }
                });
            checked.err().map(|e| (r, e))
        })
        .collect();
    if let Some((r, e)) = faults.into_iter().next() {
        return Err(format!("row {r}: {e}"));
    }
    Ok(sample_batch(logits, vocab, params, keys, steps))
}

#[cfg(test)]
mod tests {
    use crate::analysis::stats::{chi_square_p_value, chi_square_stat};
    use super::*;

    use crate::engine::test_rng::TestRng as Rng;

    /// Naive reference: the documented semantics, literally, with a full sort.
    fn naive_support(logits: &[f32], p: &SamplingParams) -> (Vec<(u32, f64)>, f64) {
        let mut elig: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (l, i as u32))
            .collect();
        if elig.is_empty() {
            return (vec![], 0.0);
        }
        // partial_cmp treats -0.0 == +0.0, as specified.
        elig.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        if p.temperature == 0.0 {
            return (vec![(elig[0].1, 1.0)], 1.0);
        }
        let m = f64::from(elig[0].0);
        let t = f64::from(p.temperature);
        let ranked: Vec<(u32, f64)> = elig
            .iter()
            .map(|&(l, id)| (id, ((f64::from(l) - m) / t).exp()))
            .collect();
        let kn = if p.top_k > 0 {
            p.top_k.min(ranked.len())
        } else {
            ranked.len()
        };
        let k_set = &ranked[..kn];
        let mut tlen = kn;
        if p.top_p < 1.0 {
            let mut by_id = k_set.to_vec();
            by_id.sort_by_key(|&(id, _)| id);
            let w_k = by_id.iter().fold(0.0, |s, &(_, w)| s + w);
            let target = f64::from(p.top_p) * w_k;
            let mut c = 0.0;
            for (i, &(_, w)) in k_set.iter().enumerate() {
                c += w;
                if c >= target {
                    tlen = i + 1;
                    break;
                }
            }
        }
        let min_w = f64::from(p.min_p);
        let f: Vec<(u32, f64)> = k_set[..tlen]
            .iter()
            .copied()
            .filter(|&(_, w)| w > 0.0 && w >= min_w)
            .collect();
        let mut by_id = f.clone();
        by_id.sort_by_key(|&(id, _)| id);
        let z = by_id.iter().fold(0.0, |s, &(_, w)| s + w);
        (f, z)
    }

    fn naive_walk(f: &[(u32, f64)], z: f64, u: f64) -> u32 {
        let target = u * z;
        let mut c = 0.0;
        for &(id, w) in f {
            c += w;
            if target < c {
                return id;
            }
        }
        f.last().map_or(NO_TOKEN, |&(id, _)| id)
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
        }
    }

    /// Rows of several shapes: continuous, heavy ties (incl. ±0), very wide (exp
    /// underflow), LLM-like peaked, with specials (-inf, NaN, +inf), and fully masked.
    fn test_rows(rng: &mut Rng, vocab: usize) -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        rows.push((0..vocab).map(|_| (rng.rough_normal() * 2.5) as f32).collect());
        rows.push(
            (0..vocab)
                .map(|_| match rng.below(10) {
                    0 => -0.0,
                    1 => 0.0,
                    _ => (rng.below(9) as f32) - 4.0,
                })
                .collect(),
        );
        rows.push((0..vocab).map(|_| (-rng.unit() * 2000.0) as f32).collect());
        rows.push(
            (0..vocab)
                .map(|_| {
                    let spike = if rng.below(100) == 0 { 12.0 } else { 0.0 };
                    (spike + rng.rough_normal() * 1.5) as f32
                })
                .collect(),
        );
        rows.push(
            (0..vocab)
                .map(|_| match rng.below(20) {
                    0 => f32::NEG_INFINITY,
                    1 => f32::NAN,
                    2 => f32::INFINITY,
                    _ => (rng.below(5) as f32) * 0.5,
                })
                .collect(),
        );
        rows.push(
            (0..vocab)
                .map(|i| {
                    if i % 2 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        f32::NAN
                    }
                })
                .collect(),
        );
        rows
    }

    #[test]
    fn fast_path_equals_naive_reference() {
        let mut rng = Rng(0x5eed);
        let temps = [0.0, 0.3, 0.6, 1.0, 1.5];
        let top_ks = [0, 1, 2, 5, 40, 1000];
        let top_ps = [1.0, 0.999_999_94, 0.95, 0.5, 0.1, 1e-6];
        let min_ps = [0.0, 0.05, 0.3];
        let mut checked = 0;
        // 700 > FIRST_CHUNK * 4, so the lazy sort selects several chunks.
        for vocab in [1, 2, 3, 7, 50, 300, 700] {
            for row in test_rows(&mut rng, vocab) {
                for &t in &temps {
                    for &k in &top_ks {
                        for &tp in &top_ps {
                            for &mp in &min_ps {
                                let p = params(t, k, tp, mp);
                                let fast = truncated_distribution(&row, &p);
                                let (f, z) = naive_support(&row, &p);
                                let slow: Vec<(u32, f64)> =
                                    f.iter().map(|&(id, w)| (id, w / z)).collect();
                                assert_eq!(fast, slow, "vocab {vocab}, {p:?}, row {row:?}");
                                for u in [0.0, 0.3, 0.999_999, 1.0 - 2f64.powi(-53), rng.unit()] {
                                    assert_eq!(
                                        sample_row(&row, &p, u),
                                        naive_walk(&f, z, u),
                                        "vocab {vocab}, {p:?}, u {u}"
                                    );
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 7 * 6 * 5 * 6 * 6 * 3);
    }

    #[test]
    fn distribution_is_normalised_and_ranked() {
        let mut rng = Rng(99);
        for row in test_rows(&mut rng, 500) {
            for p in [
                params(1.0, 0, 1.0, 0.0),
                params(0.6, 30, 0.9, 0.01),
                params(1.5, 0, 0.95, 0.0),
            ] {
                let d = truncated_distribution(&row, &p);
                if row.iter().all(|l| !l.is_finite()) {
                    assert!(d.is_empty());
                    continue;
                }
                let total: f64 = d.iter().map(|&(_, q)| q).sum();
                assert!((total - 1.0).abs() < 1e-12, "total {total}");
                for pair in d.windows(2) {
                    let (a, b) = (pair[0], pair[1]);
                    assert!(
                        row[a.0 as usize] > row[b.0 as usize]
                            || (row[a.0 as usize] == row[b.0 as usize] && a.0 < b.0)
                    );
                    assert!(a.1 >= b.1);
                }
                assert!(d
                    .iter()
                    .all(|&(id, q)| q > 0.0 && row[id as usize].is_finite()));
            }
        }
    }

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let g = SamplingParams::greedy();
        assert_eq!(sample_row(&[0.1, 0.7, 0.3], &g, 0.5), 1);
        assert_eq!(sample_row(&[1.0, 3.0, 2.0, 3.0], &g, 0.9), 1);
        assert_eq!(sample_row(&[3.0, 3.0, 3.0], &g, 0.0), 0);
        // -0.0 and +0.0 are equal logits: the lower id wins either way round.
        assert_eq!(sample_row(&[-1.0, 0.0, -0.0], &g, 0.5), 1);
        assert_eq!(sample_row(&[-1.0, -0.0, 0.0], &g, 0.5), 1);
        // Masked and faulty logits are never chosen.
        assert_eq!(
            sample_row(
                &[f32::NAN, f32::INFINITY, -2.0, f32::NEG_INFINITY, -1.0],
                &g,
                0.5
            ),
            4
        );
        assert_eq!(
            sample_row(&[f32::NEG_INFINITY, f32::NAN], &g, 0.5),
            NO_TOKEN
        );
        // The other parameters do not matter at temperature 0.
        let g2 = params(0.0, 3, 0.2, 0.5);
        assert_eq!(sample_row(&[1.0, 5.0, 5.0], &g2, 0.99), 1);
        assert_eq!(
            truncated_distribution(&[1.0, 5.0, 5.0], &g2),
            vec![(1, 1.0)]
        );
        // top_k = 1 at any temperature is greedy too, for every u.
        let mut rng = Rng(3);
        let row: Vec<f32> = (0..1000).map(|_| rng.below(50) as f32).collect();
        let argmax = sample_row(&row, &g, 0.0);
        for _ in 0..100 {
            assert_eq!(
                sample_row(&row, &params(1.3, 1, 1.0, 0.0), rng.unit()),
                argmax
            );
        }
    }

    fn assert_dist(got: &[(u32, f64)], want: &[(u32, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
            assert!((g.1 - w.1).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn hand_computed_truncations() {
        // Probabilities 0.2, 0.5, 0.3: weights relative to the top are 0.4, 1, 0.6.
        let row = [0.2f32.ln(), 0.5f32.ln(), 0.3f32.ln()];
        let t1 = |k, tp, mp| truncated_distribution(&row, &params(1.0, k, tp, mp));
        assert_dist(&t1(0, 1.0, 0.0), &[(1, 0.5), (2, 0.3), (0, 0.2)]);
        assert_dist(&t1(2, 1.0, 0.0), &[(1, 0.625), (2, 0.375)]);
        assert_dist(&t1(0, 0.75, 0.0), &[(1, 0.625), (2, 0.375)]);
        assert_dist(&t1(0, 0.45, 0.0), &[(1, 1.0)]);
        assert_dist(&t1(0, 0.85, 0.0), &[(1, 0.5), (2, 0.3), (0, 0.2)]);
        assert_dist(&t1(0, 1.0, 0.5), &[(1, 0.625), (2, 0.375)]);
        assert_dist(&t1(0, 1.0, 0.65), &[(1, 1.0)]);
        // Top-p applies to the top-k renormalised mass: of {0.625, 0.375}, 0.6 keeps one.
        assert_dist(&t1(2, 0.6, 0.0), &[(1, 1.0)]);
        // Ties: ranked by id, so top-k and top-p cut them at the lower ids.
        let ties = [0.0f32, 2.0, 2.0, 1.0, 2.0];
        let d = truncated_distribution(&ties, &params(1.0, 2, 1.0, 0.0));
        assert_dist(&d, &[(1, 0.5), (2, 0.5)]);
        let d = truncated_distribution(&ties, &params(1.0, 0, 0.5, 0.0));
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let d = truncated_distribution(&ties, &params(1.0, 0, 1.0, 0.0));
        assert_eq!(
            d.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 4, 3, 0]
        );
        // Temperature sharpens: logits [0, 1] at T = 0.5 are weights 1 : e^2.
        let e2 = 2f64.exp();
        let d = truncated_distribution(&[0.0, 1.0], &params(0.5, 0, 1.0, 0.0));
        assert_dist(&d, &[(1, e2 / (1.0 + e2)), (0, 1.0 / (1.0 + e2))]);
    }

    #[test]
    fn inverse_cdf_walks_rank_order() {
        // Token 1 holds 0.75 and is walked first, although token 0 has the lower id.
        let row = [0.0f32, 3f32.ln()];
        let p = SamplingParams::default();
        assert_eq!(sample_row(&row, &p, 0.0), 1);
        assert_eq!(sample_row(&row, &p, 0.74), 1);
        assert_eq!(sample_row(&row, &p, 0.76), 0);
        assert_eq!(sample_row(&row, &p, 1.0 - 2f64.powi(-53)), 0);
    }

    #[test]
    fn masked_and_faulty_logits_never_drawn() {
        let row = [f32::NAN, 1.0, f32::INFINITY, f32::NEG_INFINITY, 0.5];
        let d = truncated_distribution(&row, &SamplingParams::default());
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
        let key = StreamKey::new(1, "faulty", 0);
        for s in 0..2000 {
            let tok = sample_row(&row, &SamplingParams::default(), key.uniform(s));
            assert!(tok == 1 || tok == 4, "drew {tok}");
        }
        let masked = [f32::NEG_INFINITY; 4];
        assert!(truncated_distribution(&masked, &SamplingParams::default()).is_empty());
        assert_eq!(
            sample_row(&masked, &SamplingParams::default(), 0.5),
            NO_TOKEN
        );

        assert_eq!(check_logits(&[0.0, f32::NEG_INFINITY]), Ok(()));
        assert_eq!(check_logits(&row).unwrap_err(), "logit of token 0 is NaN");
        assert_eq!(
            check_logits(&[0.0, f32::INFINITY]).unwrap_err(),
            "logit of token 1 is +inf"
        );
        assert!(check_logits(&masked)
            .unwrap_err()
            .contains("no finite logit"));
        assert!(check_logits(&[]).is_err());
    }

    /// Skewed 50-token row, ranks shuffled against ids, with a tie, a masked and a NaN token.
    fn skewed_row() -> Vec<f32> {
        let mut rng = Rng(17);
        let mut perm: Vec<usize> = (0..50).collect();
        for i in (1..50).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut row = vec![0f32; 50];
        for (rank, &id) in perm.iter().enumerate() {
            row[id] = 2.0 - 0.15 * rank as f32;
        }
        row[perm[4]] = row[perm[3]];
        row[perm[10]] = f32::NEG_INFINITY;
        row[perm[20]] = f32::NAN;
        row
    }

    fn draw_counts(row: &[f32], p: &SamplingParams, key: StreamKey, n: u64) -> Vec<u64> {
        let mut counts = vec![0u64; row.len()];
        for s in 0..n {
            counts[sample_row(row, p, key.uniform(s)) as usize] += 1;
        }
        counts
    }

    fn dense(d: &[(u32, f64)], vocab: usize) -> Vec<f64> {
        let mut probs = vec![0.0; vocab];
        for &(id, q) in d {
            probs[id as usize] = q;
        }
        probs
    }

    #[test]
    fn draws_match_truncated_distribution_chi_square() {
        let row = skewed_row();
        let n = 40_000;
        let sets = [
            params(1.0, 0, 1.0, 0.0),
            params(0.7, 8, 1.0, 0.0),
            params(1.3, 0, 0.8, 0.0),
            params(1.0, 0, 1.0, 0.1),
            params(0.6, 20, 0.9, 0.02),
        ];
        for (i, p) in sets.iter().enumerate() {
            let counts = draw_counts(&row, p, StreamKey::new(1234, "gof", i as u32), n);
            let d = truncated_distribution(&row, p);
            let probs = dense(&d, row.len());
            for (tok, &c) in counts.iter().enumerate() {
                assert!(
                    c == 0 || probs[tok] > 0.0,
                    "{p:?}: drew excluded token {tok}"
                );
            }
            let (stat, df) = chi_square_stat(&counts, &probs);
            let pv = chi_square_p_value(stat, df);
            assert!(pv > 1e-3, "{p:?}: chi2 = {stat}, df = {df}, p = {pv}");

            // Power check: the same draws must reject wrong distributions.
            let full = dense(
                &truncated_distribution(&row, &params(p.temperature, 0, 1.0, 0.0)),
                row.len(),
            );
            if full != probs {
                let (stat, df) = chi_square_stat(&counts, &full);
                let pv = chi_square_p_value(stat, df);
                assert!(
                    pv < 1e-6,
                    "{p:?}: untruncated softmax not rejected (p = {pv})"
                );
            }
            let mut swapped = probs.clone();
            swapped.swap(d[0].0 as usize, d[2].0 as usize);
            let (stat, df) = chi_square_stat(&counts, &swapped);
            let pv = chi_square_p_value(stat, df);
            assert!(
                pv < 1e-6,
                "{p:?}: swapped ranks 0 and 2 not rejected (p = {pv})"
            );
        }
    }

    #[test]
    fn batch_rows_are_independent() {
        let mut rng = Rng(8);
        let vocab = 1000;
        let rows = 9;
        let logits: Vec<f32> = (0..vocab * rows)
            .map(|_| (rng.rough_normal() * 3.0) as f32)
            .collect();
        let ps: Vec<SamplingParams> = (0..rows)
            .map(|r| match r % 4 {
                0 => SamplingParams::default(),
                1 => params(0.6, 20, 0.95, 0.0),
                2 => params(1.2, 0, 0.9, 0.05),
                _ => SamplingParams::greedy(),
            })
            .collect();
        let keys: Vec<StreamKey> = (0..rows)
            .map(|r| StreamKey::new(77, &format!("item-{}", r / 3), (r % 3) as u32))
            .collect();
        let steps: Vec<u64> = (0..rows).map(|r| 5 + r as u64 * 11).collect();
        let row = |r: usize| &logits[r * vocab..(r + 1) * vocab];
        let alone: Vec<u32> = (0..rows)
            .map(|r| sample_row(row(r), &ps[r], keys[r].uniform(steps[r])))
            .collect();
        assert_eq!(sample_batch(&logits, vocab, &ps, &keys, &steps), alone);
        assert_eq!(
            try_sample_batch(&logits, vocab, &ps, &keys, &steps),
            Ok(alone.clone())
        );

        // Any subset in any order, any batch size, gives each row the same token.
        for trial in 0..20 {
            let size = 1 + trial % rows;
            let mut order: Vec<usize> = (0..rows).collect();
            for i in (1..rows).rev() {
                order.swap(i, rng.below(i + 1));
            }
            order.truncate(size);
            let sub_logits: Vec<f32> = order.iter().flat_map(|&r| row(r).iter().copied()).collect();
            let sub_p: Vec<_> = order.iter().map(|&r| ps[r]).collect();
            let sub_k: Vec<_> = order.iter().map(|&r| keys[r]).collect();
            let sub_s: Vec<_> = order.iter().map(|&r| steps[r]).collect();
            let got = sample_batch(&sub_logits, vocab, &sub_p, &sub_k, &sub_s);
            let want: Vec<u32> = order.iter().map(|&r| alone[r]).collect();
            assert_eq!(got, want, "order {order:?}");
        }
    }

    #[test]
    fn try_sample_batch_reports_faulty_rows() {
        let logits = [0.0, 1.0, 2.0, f32::NAN, 0.5, 0.5];
        let ps = [SamplingParams::default(); 2];
        let keys = [StreamKey::new(1, "a", 0), StreamKey::new(1, "a", 1)];
        let err = try_sample_batch(&logits, 3, &ps, &keys, &[0, 0]).unwrap_err();
        assert_eq!(err, "row 1: logit of token 0 is NaN");
        let bad = [SamplingParams::default(), params(1.0, 0, 0.0, 0.0)];
        let err = try_sample_batch(&[0.0; 6], 3, &bad, &keys, &[0, 0]).unwrap_err();
        assert_eq!(err, "row 1: top_p must be in (0, 1], got 0");
        let err = try_sample_batch(&[0.0; 6], 3, &ps, &keys, &[1 << 32, 0]).unwrap_err();
        assert!(err.starts_with("row 0: step 4294967296"), "{err}");
    }

    #[test]
    #[should_panic(expected = "params: one per row")]
    fn sample_batch_checks_shapes() {
        sample_batch(
            &[0.0; 6],
            3,
            &[SamplingParams::default()],
            &[StreamKey::new(0, "", 0); 2],
            &[0, 0],
        );
    }

    #[test]
    fn validate_messages() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
        assert_eq!(params(0.7, 50, 0.95, 0.05).validate(), Ok(()));
        let cases = [
            (
                params(-0.5, 0, 1.0, 0.0),
                "temperature must be finite and >= 0, got -0.5",
            ),
            (
                params(f32::NAN, 0, 1.0, 0.0),
                "temperature must be finite and >= 0, got NaN",
            ),
            (
                params(f32::INFINITY, 0, 1.0, 0.0),
                "temperature must be finite and >= 0, got inf",
            ),
            (params(1.0, 0, 0.0, 0.0), "top_p must be in (0, 1], got 0"),
            (params(1.0, 0, 1.5, 0.0), "top_p must be in (0, 1], got 1.5"),
            (
                params(1.0, 0, f32::NAN, 0.0),
                "top_p must be in (0, 1], got NaN",
            ),
            (params(1.0, 0, 1.0, 1.0), "min_p must be in [0, 1), got 1"),
            (
                params(1.0, 0, 1.0, -0.1),
                "min_p must be in [0, 1), got -0.1",
            ),
        ];
        for (p, msg) in cases {
            assert_eq!(p.validate(), Err(msg.to_string()));
        }
    }

    #[test]
    #[should_panic(expected = "invalid SamplingParams: min_p must be in [0, 1), got 2")]
    fn sampling_with_invalid_params_panics() {
        sample_row(&[0.0, 1.0], &params(1.0, 0, 1.0, 2.0), 0.5);
    }
}
