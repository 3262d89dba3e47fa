//! The results of a decoding sweep: each configuration scored on its own verdicts (never
//! pooled), `sweep.json`, and the configuration x metric table with the spread across
//! configurations.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metrics::{self, ScoreOptions, Scorecard};
use super::report::text::TextTable;
use crate::records::{Decoding, Verdict};
use crate::store::RunDir;

/// The file in a sweep's run directory that holds its results.
pub const SWEEP_JSON: &str = "sweep.json";

/// One configuration's result, as written to sweep.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigResult {
    pub name: String,
    pub decoding: Decoding,
    pub scorecard: Scorecard,
}

/// sweep.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepResults {
    /// Values per swept parameter, in grid order (what the heatmap axes are).
    pub grid: BTreeMap<String, Value>,
    pub samples: u32,
    pub configs: Vec<ConfigResult>,
}

/// Scores each configuration on its own verdicts (configurations are never pooled).
pub fn score_configs(run: &RunDir, configs: &[(String, Decoding)], opts: &ScoreOptions) -> Result<Vec<ConfigResult>> {
    let log = run.verdicts();
    let (mut verdicts, _) = log.read_keyed::<Verdict>(Verdict::key)?;
    super::judged_run::mark_missing_responses(&mut verdicts, &run.samples())?;
    let wanted: HashSet<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    let mut by_config: BTreeMap<&str, Vec<Verdict>> = BTreeMap::new();
    for v in verdicts {
        if let Some(&name) = wanted.get(v.config.as_str()) {
            by_config.entry(name).or_default().push(v);
        }
    }
    configs
        .iter()
        .map(|(name, decoding)| {
            let vs = by_config.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
            if vs.is_empty() {
                bail!("{}: no verdicts for configuration {name}; judge the run (bsa judge {})", log.path.display(), run.path.display());
            }
            let scorecard = metrics::score(vs, opts).with_context(|| format!("scoring configuration {name}"))?;
            Ok(ConfigResult { name: name.clone(), decoding: decoding.clone(), scorecard })
        })
        .collect()
}

/// Reads sweep.json from a run directory.
pub fn read_results(run: &Path) -> Result<SweepResults> {
    let p = run.join(SWEEP_JSON);
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}: is {} a sweep run (bsa sweep)?", p.display(), run.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a valid sweep.json", p.display()))
}

fn cell(sc: &Scorecard, value: f64, key: &str) -> String {
    match sc.intervals.get(key) {
        Some([lo, hi]) if !lo.is_nan() => format!("{value:.2} [{lo:6.2},{hi:6.2}]"),
        _ if value.is_nan() => "-".into(),
        _ => format!("{value:.2}"),
    }
}

/// The configuration x metric table a terminal shows, with the spread across configurations.
pub fn table(r: &SweepResults) -> String {
    let mut s = String::new();
    let Some(first) = r.configs.first() else { return "no configurations\n".into() };
    let sc0 = &first.scorecard;
    let _ = writeln!(
        s,
        "{} configurations, {} items, k = {}; F = Think@1^a * Safe@1^(1-a), a = {}; {:.0}% bootstrap intervals",
        r.configs.len(),
        sc0.items,
        sc0.k,
        sc0.f_alpha,
        sc0.bootstrap.confidence * 100.0
    );
    let unreadable: usize = r.configs.iter().map(|c| c.scorecard.warnings.invalid_safety + c.scorecard.warnings.invalid_thinking).sum();
    if unreadable > 0 {
        let _ = writeln!(s, "{unreadable} unreadable judge label(s) over all configurations, {}", sc0.invalid_policy.describe());
    }
    let mut t = TextTable::new(["config", "Safe@1", "Safe@k", "Think@1", "Think@k", "F-score"], 1);
    for c in &r.configs {
        let (sc, h) = (&c.scorecard, &c.scorecard.headline);
        t.row([
            c.name.clone(),
            cell(sc, h.safe_at_1, "safe_at_1"),
            cell(sc, h.safe_at_k, "safe_at_k"),
            cell(sc, h.think_at_1, "think_at_1"),
            cell(sc, h.think_at_k, "think_at_k"),
            cell(sc, h.f_score, "f_score"),
        ]);
    }
    let _ = write!(s, "\n{}", t.render(0));
    if r.configs.len() > 1 {
        let _ = writeln!(s);
        for (label, key, get) in [
            ("Safe@1", "safe_at_1", (|c: &ConfigResult| c.scorecard.headline.safe_at_1) as fn(&ConfigResult) -> f64),
            ("Think@1", "think_at_1", |c: &ConfigResult| c.scorecard.headline.think_at_1),
        ] {
            let _ = writeln!(s, "{}", spread(r, label, key, get));
        }
    }
    s
}

/// "Safe@1 spans 3.20 points (A 90.00 .. B 93.20); the intervals of all configurations
/// overlap": whether the decoding changes are distinguishable from noise.
fn spread(r: &SweepResults, label: &str, key: &str, get: fn(&ConfigResult) -> f64) -> String {
    let valid: Vec<&ConfigResult> = r.configs.iter().filter(|c| !get(c).is_nan()).collect();
    let (Some(lo), Some(hi)) = (
        valid.iter().min_by(|a, b| get(a).total_cmp(&get(b))),
        valid.iter().max_by(|a, b| get(a).total_cmp(&get(b))),
    ) else {
        return format!("{label}: no values");
    };
    let ivs: Vec<[f64; 2]> = valid.iter().filter_map(|c| c.scorecard.intervals.get(key).copied()).filter(|iv| !iv[0].is_nan()).collect();
    let overlap = if ivs.len() == valid.len() && !ivs.is_empty() {
        let common_lo = ivs.iter().map(|iv| iv[0]).fold(f64::MIN, f64::max);
        let common_hi = ivs.iter().map(|iv| iv[1]).fold(f64::MAX, f64::min);
        if common_lo <= common_hi { "; the intervals of all configurations overlap" } else { "; some intervals do not overlap" }
    } else {
        ""
    };
    format!(
        "{label} spans {:.2} points ({} {:.2} .. {} {:.2}){overlap}",
        get(hi) - get(lo),
        lo.name,
        get(lo),
        hi.name,
        get(hi)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Decoding {
        Decoding { temperature: 0.6, top_p: 0.95, top_k: 0, min_p: 0.0, max_new_tokens: 64, stop: vec!["###".into()], ignore_eos: false }
    }

    fn verdict(item: &str, s: u32, config: &str, safe: bool) -> Verdict {
        serde_json::from_value(json!({
            "item_id": item, "sample_index": s, "config": config, "scenario": "Risk Omission",
            "categories": ["Rumors"], "safety": if safe { "Safe" } else { "Unsafe" }, "thinking": "True", "judge": "test",
        }))
        .unwrap()
    }

    #[test]
    fn each_configuration_is_scored_on_its_own_verdicts_and_tabled() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(&dir.path().join("r"), Default::default(), crate::store::OnExisting::Resume).unwrap();
        let mut a = run.verdicts().appender().unwrap();
        for item in ["a", "b", "c", "d"] {
            for s in 0..2 {
                a.append(&verdict(item, s, "t0.2_p1.0_k0", true)).unwrap();
                // The hot configuration is unsafe on one sample of every item.
                a.append(&verdict(item, s, "t1.0_p1.0_k0", s == 0)).unwrap();
            }
        }
        drop(a);
        let cfgs: Vec<(String, Decoding)> = ["t0.2_p1.0_k0", "t1.0_p1.0_k0"].iter().map(|n| (n.to_string(), base())).collect();
        let opts = ScoreOptions { k: 2, resamples: 200, ..Default::default() };
        let res = score_configs(&run, &cfgs, &opts).unwrap();
        assert_eq!(res[0].scorecard.headline.safe_at_1, 100.0);
        assert_eq!(res[1].scorecard.headline.safe_at_1, 50.0);
        assert_eq!(res[1].scorecard.headline.safe_at_k, 0.0);
        assert_eq!(res[1].scorecard.samples, 8, "not pooled with the other configuration");
        let t = table(&SweepResults { grid: BTreeMap::new(), samples: 2, configs: res });
        assert!(t.contains("t0.2_p1.0_k0") && t.contains("Think@k") && t.contains("100.00"), "{t}");
        assert!(t.contains("Safe@1 spans 50.00 points (t1.0_p1.0_k0 50.00 .. t0.2_p1.0_k0 100.00)"), "{t}");
        // A configuration without verdicts is an error naming it, not a silent zero.
        let missing = vec![("t9.0_p1.0_k0".to_string(), base())];
        let e = score_configs(&run, &missing, &opts).unwrap_err().to_string();
        assert!(e.contains("t9.0_p1.0_k0") && e.contains("bsa judge"), "{e}");
    }
}
