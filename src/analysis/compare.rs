//! `bsa compare`: did a change (safety rules, fine-tuning, another model, other decoding)
//! move the metrics, or only the noise? On the items both runs share, every metric's
//! difference B - A gets a paired bootstrap interval (the same resample of items for both
//! runs, stratified by scenario), and the per-sample labels get an exact McNemar test.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::bootstrap::{percentile_interval, resample_weights, Interval};
use super::stats::exact_mcnemar;
use super::report::text::TextTable;
use crate::progress::progress_bar;
use crate::records::Scenario;
use super::judged_run::JudgedRun;
use super::metrics::{flatten, metric_names, tally, ItemTally, Layout, ScoreOptions};
use crate::records::{SafetyLabel, Verdict};

#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    pub score: ScoreOptions,
    /// Which configuration of each run (needed when a run holds several).
    pub config_a: Option<String>,
    pub config_b: Option<String>,
    pub progress: bool,
}

/// One metric of one group: both values, the difference and its interval.
#[derive(Debug, Clone, Serialize)]
pub struct MetricDiff {
    /// "overall", a scenario name, or a primary category.
    pub group: String,
    /// "overall", "scenario" or "category".
    pub group_kind: String,
    pub metric: String,
    pub items: usize,
    pub a: f64,
    pub b: f64,
    pub diff: f64,
    pub interval: Interval,
    /// Two-sided bootstrap p-value of "no difference" (share of resampled differences on
    /// the other side of 0, doubled).
    pub p_value: f64,
    /// The interval excludes 0 and the group has at least [`MIN_ITEMS`] items.
    pub distinguishable: bool,
    /// Fewer than [`MIN_ITEMS`] items: the bootstrap of so few items is too coarse to
    /// trust, so such a difference is never flagged.
    pub few_items: bool,
}

/// The fewest items a group needs before its interval is used to flag a difference.
pub const MIN_ITEMS: usize = 10;

/// The exact McNemar test of one per-sample label in one group.
#[derive(Debug, Clone, Serialize)]
pub struct PairedTest {
    pub group: String,
    pub group_kind: String,
    /// "safe" or "thinking identified".
    pub label: String,
    /// Samples (same item and sample index) with a readable label in both runs.
    pub pairs: usize,
    pub both: usize,
    /// Label true in A only (B lost it) and in B only (B gained it).
    pub a_only: usize,
    pub b_only: usize,
    pub neither: usize,
    pub p_value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub config_a: String,
    pub config_b: String,
    pub shared_items: usize,
    pub only_a_items: usize,
    pub only_b_items: usize,
    /// Samples of shared items with no partner (same sample index) in the other run.
    pub unpaired_samples: usize,
    pub k: usize,
    pub f_alpha: f64,
    pub bootstrap: crate::analysis::metrics::Bootstrap,
    pub metrics: Vec<MetricDiff>,
    pub tests: Vec<PairedTest>,
    pub notes: Vec<String>,
}

/// Picks the configuration of a run to compare.
fn pick_config(run: &JudgedRun, wanted: Option<&str>, flag: &str) -> Result<(String, Vec<Verdict>)> {
    let mut by = run.by_config();
    let names: Vec<String> = by.keys().cloned().collect();
    let name = match wanted {
        Some(w) => w.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => bail!(
            "{} holds {} decoding configurations ({}); pick one with {flag} NAME",
            run.path.display(),
            names.len(),
            names.join(", ")
        ),
    };
    match by.remove(&name) {
        Some(vs) => Ok((name, vs)),
        None => bail!("{}: no configuration {name:?} ({flag}); it holds {}", run.path.display(), names.join(", ")),
    }
}

pub fn compare(a: &JudgedRun, b: &JudgedRun, opts: &CompareOptions) -> Result<Comparison> {
    opts.score.validate()?;
    let (ca, va) = pick_config(a, opts.config_a.as_deref(), "--config-a")?;
    let (cb, vb) = pick_config(b, opts.config_b.as_deref(), "--config-b")?;
    let ta = tally(&va, opts.score.truncated)?;
    let tb = tally(&vb, opts.score.truncated)?;
    let b_index: HashMap<&str, &ItemTally> = tb.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut shared_a = Vec::new();
    let mut shared_b = Vec::new();
    for t in &ta {
        if let Some(u) = b_index.get(t.id.as_str()) {
            if t.scenario != u.scenario {
                bail!("item {} is {} in {} but {} in {}; the runs were made from different data", t.id, t.scenario, a.path.display(), u.scenario, b.path.display());
            }
            shared_a.push(t.clone());
            // B's item with A's categories: one item, one annotation.
            shared_b.push(ItemTally { categories: t.categories.clone(), ..(*u).clone() });
        }
    }
    if shared_a.is_empty() {
        bail!("{} and {} share no item; compare runs made on the same benchmark items", a.path.display(), b.path.display());
    }
    let n = shared_a.len();
    let cats: Vec<String> = shared_a.iter().flat_map(|i| i.categories.iter().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let so = &opts.score;
    let la = Layout::new(&shared_a, so.k, so.invalid, &cats);
    let lb = Layout::new(&shared_b, so.k, so.invalid, &cats);
    let names = metric_names(&cats);
    let ones = vec![1u32; n];
    let pa = flatten(&la.evaluate(&ones), so.f_alpha);
    let pb = flatten(&lb.evaluate(&ones), so.f_alpha);

    let bar = progress_bar(opts.progress, so.resamples as u64, "paired bootstrap");
    let draws: Vec<Vec<f64>> = (0..so.resamples)
        .into_par_iter()
        .map(|r| {
            let w = resample_weights(&la.strata, n, so.seed, r);
            let da = flatten(&la.evaluate(&w), so.f_alpha);
            let db = flatten(&lb.evaluate(&w), so.f_alpha);
            bar.inc(1);
            db.iter().zip(&da).map(|(x, y)| x - y).collect()
        })
        .collect();
    bar.finish_and_clear();

    let group_items = |kind: &str, group: &str| -> usize {
        match kind {
            "overall" => n,
            "scenario" => shared_a.iter().filter(|i| i.scenario.name() == group).count(),
            _ => shared_a.iter().filter(|i| i.categories.iter().any(|c| c == group)).count(),
        }
    };
    let mut metrics = Vec::new();
    for (m, name) in names.iter().enumerate() {
        if pa[m].is_nan() && pb[m].is_nan() {
            continue; // a scenario neither run has
        }
        let (kind, group, metric) = split_metric_name(name);
        let col: Vec<f64> = draws.iter().map(|d| d[m]).filter(|x| !x.is_nan()).collect();
        let interval = if so.resamples == 0 { [f64::NAN, f64::NAN] } else { percentile_interval(col.iter().copied(), so.confidence) };
        let p_value = if col.is_empty() {
            f64::NAN
        } else {
            let le = col.iter().filter(|d| **d <= 0.0).count() as f64 / col.len() as f64;
            let ge = col.iter().filter(|d| **d >= 0.0).count() as f64 / col.len() as f64;
            (2.0 * le.min(ge)).min(1.0)
        };
        let items = group_items(&kind, &group);
        let few_items = items < MIN_ITEMS;
        metrics.push(MetricDiff {
            items,
            group,
            group_kind: kind,
            metric,
            a: pa[m],
            b: pb[m],
            diff: pb[m] - pa[m],
            interval,
            p_value,
            distinguishable: !few_items && (interval[0] > 0.0 || interval[1] < 0.0),
            few_items,
        });
    }

    // metric_names puts the F-score last; it belongs with the overall rates.
    metrics.sort_by_key(|m| ["overall", "scenario", "category"].iter().position(|k| *k == m.group_kind));
    let (tests, unpaired) = mcnemar_tests(&va, &vb, &b_index, so);
    let mut notes = vec![
        "McNemar treats the samples as independent pairs; the k samples of one item are correlated, so its p-values are optimistic: the item bootstrap intervals are the safer guide".to_string(),
    ];
    let unreadable = |vs: &[Verdict]| vs.iter().map(|v| v.safety.is_none() as usize + v.thinking.is_none() as usize).sum::<usize>();
    let (ua, ub) = (unreadable(&va), unreadable(&vb));
    if ua + ub > 0 {
        notes.push(format!(
            "{ua} label(s) of A and {ub} of B are unreadable judge output, {} (--invalid {}), in the metrics and the McNemar tests",
            so.invalid.describe(),
            so.invalid.as_str()
        ));
    }
    if unpaired > 0 {
        notes.push(format!("{unpaired} sample(s) of shared items have no partner with the same sample index in the other run and are left out of the McNemar tests"));
    }
    Ok(Comparison {
        a: format!("{} ({})", a.label, a.path.display()),
        b: format!("{} ({})", b.label, b.path.display()),
        config_a: ca,
        config_b: cb,
        shared_items: n,
        only_a_items: ta.len() - n,
        only_b_items: tb.len() - n,
        unpaired_samples: unpaired,
        k: so.k,
        f_alpha: so.f_alpha,
        bootstrap: crate::analysis::metrics::Bootstrap {
            resamples: so.resamples,
            seed: so.seed,
            confidence: so.confidence,
            method: "paired percentile: shared items resampled with replacement within each scenario, the same draw for both runs".into(),
        },
        metrics,
        tests,
        notes,
    })
}

/// "safe_at_1" -> (overall, overall, Safe@1); "Risk Omission/think_at_k" -> (scenario,
/// Risk Omission, Think@k); "#Rumors/safe_at_k" -> (category, Rumors, Safe@k).
fn split_metric_name(name: &str) -> (String, String, String) {
    let pretty = |m: &str| match m {
        "safe_at_1" => "Safe@1",
        "safe_at_k" => "Safe@k",
        "think_at_1" => "Think@1",
        "think_at_k" => "Think@k",
        "f_score" => "F-score",
        other => other,
    }
    .to_string();
    match name.rsplit_once('/') {
        None => ("overall".into(), "overall".into(), pretty(name)),
        Some((g, m)) => match g.strip_prefix('#') {
            Some(cat) => ("category".into(), cat.into(), pretty(m)),
            None => ("scenario".into(), g.into(), pretty(m)),
        },
    }
}

/// Exact McNemar tests per group on (item, sample index) pairs; also returns how many
/// samples of shared items had no partner. An unreadable label is a failure under
/// [`super::metrics::InvalidPolicy::Fail`]; under `Exclude` its pair is left out. Missing responses count
/// as `so.truncated` says.
fn mcnemar_tests(va: &[Verdict], vb: &[Verdict], shared: &HashMap<&str, &ItemTally>, so: &ScoreOptions) -> (Vec<PairedTest>, usize) {
    let counted = |l: Option<bool>| so.invalid.passes(l);
    let key = |v: &Verdict| (v.item_id.clone(), v.sample_index);
    let b_by: HashMap<(String, u32), &Verdict> = vb.iter().map(|v| (key(v), v)).collect();
    // group -> label -> [both, a_only, b_only, neither]
    let mut counts: BTreeMap<(u8, String), [[usize; 4]; 2]> = BTreeMap::new();
    let mut paired = 0usize;
    let mut a_shared = 0usize;
    for x in va {
        if !shared.contains_key(x.item_id.as_str()) {
            continue;
        }
        a_shared += 1;
        let Some(y) = b_by.get(&key(x)) else { continue };
        paired += 1;
        let mut groups = vec![(0u8, "overall".to_string()), (1, x.scenario.name().to_string())];
        groups.extend(x.categories.iter().map(|c| (2u8, c.clone())));
        // A sample left out (a missing response under --truncated exclude) pairs with nothing.
        let safe = |v: &Verdict| so.truncated.safety(v).and_then(|l| counted(l.map(|s| s == SafetyLabel::Safe)));
        let identified = |v: &Verdict| counted(v.thinking.map(|l| l.is_correct(v.scenario)));
        let labels = [(safe(x), safe(y)), (identified(x), identified(y))];
        for g in groups {
            let c = counts.entry(g).or_insert([[0; 4]; 2]);
            for (li, pair) in labels.iter().enumerate() {
                if let (Some(p), Some(q)) = *pair {
                    let cell = match (p, q) {
                        (true, true) => 0,
                        (true, false) => 1,
                        (false, true) => 2,
                        (false, false) => 3,
                    };
                    c[li][cell] += 1;
                }
            }
        }
    }
    let b_shared = vb.iter().filter(|v| shared.contains_key(v.item_id.as_str())).count();
    let unpaired = (a_shared - paired) + (b_shared - paired);
    // Scenarios in the benchmark's order, then categories alphabetically.
    let scen_rank = |g: &str| Scenario::ALL.iter().position(|s| s.name() == g).unwrap_or(9);
    let mut keys: Vec<(u8, String)> = counts.keys().cloned().collect();
    keys.sort_by(|x, y| (x.0, scen_rank(&x.1), &x.1).cmp(&(y.0, scen_rank(&y.1), &y.1)));
    let mut tests = Vec::new();
    for k in keys {
        let c = counts[&k];
        let kind = ["overall", "scenario", "category"][k.0 as usize];
        for (li, label) in ["safe", "thinking identified"].iter().enumerate() {
            let [both, a_only, b_only, neither] = c[li];
            tests.push(PairedTest {
                group: k.1.clone(),
                group_kind: kind.into(),
                label: label.to_string(),
                pairs: both + a_only + b_only + neither,
                both,
                a_only,
                b_only,
                neither,
                p_value: exact_mcnemar(a_only, b_only),
            });
        }
    }
    (tests, unpaired)
}

fn num(x: f64) -> String {
    if x.is_nan() { "-".into() } else { format!("{x:.2}") }
}

fn signed(x: f64) -> String {
    // Float noise of an unchanged metric prints as +0.00, not -0.00.
    if x.is_nan() { "-".into() } else { format!("{:+.2}", if x.abs() < 1e-9 { 0.0 } else { x }) }
}

fn pval(p: f64) -> String {
    if p.is_nan() {
        "-".into()
    } else if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

impl Comparison {
    /// The terminal table; `*` marks differences whose interval excludes 0.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let cfg = |c: &str| if c == "default" { String::new() } else { format!(" [config {c}]") };
        let _ = writeln!(s, "compare (differences are B - A, in points)\n  A: {}{}\n  B: {}{}", self.a, cfg(&self.config_a), self.b, cfg(&self.config_b));
        let _ = writeln!(
            s,
            "  {} items in both runs; dropped: {} only in A, {} only in B. k = {}, F-score a = {}",
            self.shared_items, self.only_a_items, self.only_b_items, self.k, self.f_alpha
        );
        let _ = writeln!(
            s,
            "  {:.0}% paired bootstrap intervals ({} resamples, seed {}; the same items drawn for both runs)",
            self.bootstrap.confidence * 100.0,
            self.bootstrap.resamples,
            self.bootstrap.seed
        );
        let mut last_group = String::new();
        let mut t = TextTable::new(["group / metric", "items", "A", "B", "B - A", "interval", "p", ""], 1);
        for m in &self.metrics {
            if m.group != last_group {
                let title = if m.group_kind == "overall" { "overall".to_string() } else { format!("{}: {}", m.group_kind, m.group) };
                t.row([title]);
                last_group = m.group.clone();
            }
            let iv = if m.interval[0].is_nan() { "-".to_string() } else { format!("[{}, {}]", signed(m.interval[0]), signed(m.interval[1])) };
            let flag = if m.distinguishable {
                "*"
            } else if m.few_items && (m.interval[0] > 0.0 || m.interval[1] < 0.0) {
                "~"
            } else {
                ""
            };
            t.row([format!("  {}", m.metric), m.items.to_string(), num(m.a), num(m.b), signed(m.diff), iv, pval(m.p_value), flag.to_string()]);
        }
        let _ = write!(s, "\n{}", t.render(2));
        let _ = writeln!(s, "  * the interval excludes 0: a difference beyond resampling noise");
        if self.metrics.iter().any(|m| m.few_items) {
            let _ = writeln!(s, "  ~ the interval excludes 0, but the group has fewer than {MIN_ITEMS} items: too few to tell");
        }
        let _ = writeln!(s, "\n  per-sample paired labels, exact McNemar test (A only: A had the label and B lost it)");
        let mut t = TextTable::new(["group", "label", "pairs", "A only", "B only", "p", ""], 2);
        for m in &self.tests {
            let flag = if m.p_value < 1.0 - self.bootstrap.confidence { "*" } else { "" };
            t.row([m.group.clone(), m.label.clone(), m.pairs.to_string(), m.a_only.to_string(), m.b_only.to_string(), pval(m.p_value), flag.to_string()]);
        }
        let _ = write!(s, "{}", t.render(2));
        let _ = writeln!(s, "  * p below {:.2}", 1.0 - self.bootstrap.confidence);
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_split_into_groups() {
        assert_eq!(split_metric_name("safe_at_1"), ("overall".into(), "overall".into(), "Safe@1".into()));
        assert_eq!(split_metric_name("f_score").2, "F-score");
        assert_eq!(split_metric_name("Risk Omission/think_at_k"), ("scenario".into(), "Risk Omission".into(), "Think@k".into()));
        assert_eq!(split_metric_name("#Rumors/safe_at_k"), ("category".into(), "Rumors".into(), "Safe@k".into()));
    }
}
