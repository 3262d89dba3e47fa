//! Statistical tests: chi-square goodness of fit (the sampler's tests and the GPU check run
//! it on sampled tokens) and the exact McNemar test (`bsa compare`). The distributions are
//! statrs'; the pooling of sparse cells and the two-sided tail are ours.

use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, DiscreteCDF};

/// Upper-tail p-value of a chi-square statistic with `df` degrees of freedom (statrs'
/// regularized incomplete gamma); an infinite statistic has p = 0.
pub fn chi_square_p_value(stat: f64, df: usize) -> f64 {
    if stat.is_infinite() {
        return 0.0;
    }
    ChiSquared::new(df as f64).map_or(f64::NAN, |d| d.sf(stat))
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

/// Two-sided exact McNemar p-value for `b` and `c` discordant pairs: under "no change" the
/// discordant pairs are Binomial(b + c, 1/2), and p = 2 P(X <= min(b, c)), capped at 1.
pub fn exact_mcnemar(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let tail = Binomial::new(0.5, n as u64).map_or(f64::NAN, |d| d.cdf(b.min(c) as u64));
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn exact_mcnemar_matches_binomial_tails() {
        // b = 0, c = 5: 2 * 0.5^5 = 0.0625.
        assert!((exact_mcnemar(0, 5) - 0.0625).abs() < 1e-12);
        // b = 1, c = 9: 2 * (1 + 10) / 1024.
        assert!((exact_mcnemar(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(exact_mcnemar(3, 3), 1.0);
        assert_eq!(exact_mcnemar(0, 0), 1.0);
        // Symmetric, and no underflow for thousands of discordant pairs.
        assert_eq!(exact_mcnemar(4, 7), exact_mcnemar(7, 4));
        let p = exact_mcnemar(2400, 2600);
        assert!(p > 0.0 && p < 0.01, "{p}");
        assert!(exact_mcnemar(2500, 2500) > 0.98);
    }
}
