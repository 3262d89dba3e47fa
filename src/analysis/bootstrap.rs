//! The percentile bootstrap every interval in the analysis uses: items resampled with
//! replacement within strata (the scenarios), each resample from its own random stream, and
//! intervals read off the sorted draws.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A confidence interval `[low, high]`; `[NaN, NaN]` when there was nothing to resample.
pub type Interval = [f64; 2];

/// Resample `r` of a stratified bootstrap: how many times each item is drawn, each stratum
/// drawn to its own size. Resample r uses its own ChaCha stream (seed, r), so results do not
/// depend on the thread count, and two analyses with one seed draw the same items.
pub fn resample_weights(strata: &[Vec<usize>], n_items: usize, seed: u64, r: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(r as u64);
    let mut w = vec![0u32; n_items];
    for stratum in strata {
        for _ in 0..stratum.len() {
            w[stratum[rng.random_range(0..stratum.len())]] += 1;
        }
    }
    w
}

/// Linear interpolation between order statistics (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The central `confidence` interval of the draws (NaNs left out), by [`quantile`].
pub fn percentile_interval(values: impl Iterator<Item = f64>, confidence: f64) -> Interval {
    let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let lo = (1.0 - confidence) / 2.0;
    [quantile(&v, lo), quantile(&v, 1.0 - lo)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates() {
        assert_eq!(quantile(&[0.0, 10.0], 0.5), 5.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.0), 1.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 1.0), 3.0);
    }
}
