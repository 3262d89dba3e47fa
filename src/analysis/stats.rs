//! Statistical tests: chi-square goodness of fit (the sampler's tests and the GPU check run
//! it on sampled tokens).

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
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
    }
}
