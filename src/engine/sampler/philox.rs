//! Philox4x32-10 counter-based generator and the per-draw stream key.
//!
//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) is
//! the generator behind Random123, cuRAND's `curand_Philox4x32_10` and JAX. It maps a
//! 128-bit counter and a 64-bit key to 128 random bits with no state, so any draw can be
//! recomputed anywhere (CPU, GPU, a resumed run) from its coordinates alone.
//!
//! One round, on counter words `c0..c3` and key words `k0, k1`:
//!
//! ```text
//! (hi0, lo0) = M0 * c0   (full 64-bit product split in 32-bit halves)
//! (hi1, lo1) = M1 * c2
//! c' = [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]
//! ```
//!
//! Ten rounds; between consecutive rounds the key is bumped, `k0 += W0`, `k1 += W1`
//! (wrapping), so rounds 0..9 use `key + r * (W0, W1)`.

/// Philox multiplier applied to counter word 0.
pub const M0: u32 = 0xD251_1F53;
/// Philox multiplier applied to counter word 2.
pub const M1: u32 = 0xCD9E_8D57;
/// Weyl increment for key word 0 (golden ratio).
pub const W0: u32 = 0x9E37_79B9;
/// Weyl increment for key word 1 (sqrt(3) - 1).
pub const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: 128 random bits for `(ctr, key)`.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3; the `fnv` crate) of
/// an item id's bytes: the item word of a [`StreamKey`]. A GPU kernel must match it.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// Coordinates of one random stream: one sample (completion) of one benchmark item under
/// one run seed. Each decoding step of that sample draws `uniform(step)`.
///
/// # Exact scheme (any other implementation, e.g. the GPU kernel, must match it)
///
/// * `item = fnv1a64(item_id.as_bytes())` — FNV-1a 64 over the id's UTF-8 bytes.
/// * Philox key (2 words): `[seed as u32, (seed >> 32) as u32]`.
/// * Philox counter (4 words): `[step as u32, sample, item as u32, (item >> 32) as u32]`,
///   with `step < 2^32` (steps are token positions; larger steps panic).
/// * Output `x = philox4x32_10(counter, key)`; the uniform is
///   `u = ((x[0] as u64) << 21 | (x[1] as u64) >> 11) as f64 * 2^-53`,
///   i.e. 53 random bits, `x[0]` the high 32 and the top 21 bits of `x[1]` the low 21;
///   `x[2]` and `x[3]` are unused. `u` lies in `[0, 1)` and is exact (no rounding).
///
/// Because `(seed, item, sample, step)` maps injectively onto `(key, counter)` and Philox
/// is a bijection of the counter for a fixed key, no two draws of a run share their
/// random bits, whatever the batch composition, order or size. Distinct item ids share a
/// stream only on an FNV-1a 64 collision (probability about n²/2⁶⁵ for n ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// Run seed: the whole Philox key.
    pub seed: u64,
    /// FNV-1a 64 of the item id.
    pub item: u64,
    /// Index of the sample (completion) of this item, 0-based.
    pub sample: u32,
}

impl StreamKey {
    /// Stream for sample `sample_index` of item `item_id` under run seed `seed`.
    pub fn new(seed: u64, item_id: &str, sample_index: u32) -> Self {
        StreamKey {
            seed,
            item: fnv1a64(item_id.as_bytes()),
            sample: sample_index,
        }
    }

    /// The Philox key words: `[lo32(seed), hi32(seed)]`.
    #[inline]
    pub fn key_words(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The Philox counter for `step`: `[step, sample, lo32(item), hi32(item)]`.
    ///
    /// # Panics
    /// If `step >= 2^32`: the scheme reserves 32 counter bits for the step, and silently
    /// wrapping would reuse random bits.
    #[inline]
    pub fn counter(&self, step: u64) -> [u32; 4] {
        assert!(
            step <= u64::from(u32::MAX),
            "StreamKey step {step} exceeds 2^32 - 1"
        );
        [
            step as u32,
            self.sample,
            self.item as u32,
            (self.item >> 32) as u32,
        ]
    }

    /// The uniform in `[0, 1)` (53 random bits) for decoding step `step`.
    #[inline]
    pub fn uniform(&self, step: u64) -> f64 {
        let x = philox4x32_10(self.counter(step), self.key_words());
        let bits = (u64::from(x[0]) << 21) | (u64::from(x[1]) >> 11);
        // 2^-53: exact scaling, so u <= 1 - 2^-53 < 1.
        bits as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::analysis::stats::{chi_square_p_value, chi_square_stat};
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Random123 kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn fnv1a64_known_answers() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        // UTF-8 bytes, not chars: a non-ASCII id hashes its encoded bytes.
        assert_eq!(StreamKey::new(0, "é", 0).item, fnv1a64(&[0xc3, 0xa9]));
    }

    #[test]
    fn stream_key_layout() {
        let k = StreamKey::new(0x1122_3344_5566_7788, "item-7", 5);
        let item = fnv1a64(b"item-7");
        assert_eq!(k.key_words(), [0x5566_7788, 0x1122_3344]);
        assert_eq!(k.counter(9), [9, 5, item as u32, (item >> 32) as u32]);
        let x = philox4x32_10(k.counter(9), k.key_words());
        let want = ((u64::from(x[0]) << 21) | (u64::from(x[1]) >> 11)) as f64 / 2f64.powi(53);
        assert_eq!(k.uniform(9), want);
        // Largest allowed step works; deterministic.
        assert_eq!(
            k.uniform(u64::from(u32::MAX)),
            k.uniform(u64::from(u32::MAX))
        );
    }

    #[test]
    #[should_panic(expected = "exceeds 2^32 - 1")]
    fn step_beyond_32_bits_panics() {
        StreamKey::new(1, "x", 0).uniform(1 << 32);
    }

    #[test]
    fn streams_differ_by_each_coordinate() {
        let base = StreamKey::new(42, "q1", 0);
        let others = [
            StreamKey::new(43, "q1", 0),
            StreamKey::new(42, "q2", 0),
            StreamKey::new(42, "q1", 1),
        ];
        for o in others {
            let same = (0..64).filter(|&s| base.uniform(s) == o.uniform(s)).count();
            assert_eq!(same, 0, "{o:?} collides with {base:?}");
        }
        // And the same coordinates give the same stream.
        let again = StreamKey::new(42, "q1", 0);
        assert!((0..64).all(|s| base.uniform(s) == again.uniform(s)));
    }

    #[test]
    fn uniform_range_and_bits() {
        let k = StreamKey::new(7, "range", 3);
        let mut low_bit_set = 0;
        let mut sum = 0.0;
        let n = 100_000u64;
        for s in 0..n {
            let u = k.uniform(s);
            assert!((0.0..1.0).contains(&u), "u = {u}");
            // All 53 bits are used: the lowest one is set about half the time.
            if ((u * 2f64.powi(53)) as u64) & 1 == 1 {
                low_bit_set += 1;
            }
            sum += u;
        }
        assert!(
            (45_000..55_000).contains(&low_bit_set),
            "low bit set {low_bit_set} times"
        );
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    }

    fn histogram(draws: impl Iterator<Item = f64>, bins: usize) -> Vec<u64> {
        let mut h = vec![0u64; bins];
        for u in draws {
            h[((u * bins as f64) as usize).min(bins - 1)] += 1;
        }
        h
    }

    #[test]
    fn uniform_chi_square_100_bins() {
        let n = 200_000u64;
        let flat = vec![0.01; 100];
        // Along the steps of one stream.
        let k = StreamKey::new(2024, "chi-square", 0);
        let h = histogram((0..n).map(|s| k.uniform(s)), 100);
        let (stat, df) = chi_square_stat(&h, &flat);
        let p = chi_square_p_value(stat, df);
        assert!(p > 1e-3, "steps: chi2 = {stat}, df = {df}, p = {p}");
        // Across samples at a fixed step (what a batch of samples of one item sees).
        let h = histogram(
            (0..n as u32).map(|i| StreamKey::new(2024, "chi-square", i).uniform(17)),
            100,
        );
        let (stat, df) = chi_square_stat(&h, &flat);
        let p = chi_square_p_value(stat, df);
        assert!(p > 1e-3, "samples: chi2 = {stat}, df = {df}, p = {p}");
        // The test has power: a mildly non-uniform transform is rejected.
        let h = histogram((0..n).map(|s| k.uniform(s).powf(1.05)), 100);
        let (stat, df) = chi_square_stat(&h, &flat);
        assert!(
            chi_square_p_value(stat, df) < 1e-6,
            "skewed draws not rejected: chi2 = {stat}"
        );
    }
}
