//! Human-readable output: the terminal tables of `bsa score` and `bsa data stats` (here,
//! drawn by [`text`]), and the reports of `bsa report` ([`document`]: markdown and HTML with
//! [`plots`]).

pub mod document;
pub mod plots;
pub mod text;

use std::fmt::Write;

use super::metrics::{GroupScore, Interval, Scorecard, AUTHORS_F_ALPHA};
use crate::data::DataStats;
use crate::records::Scenario;
use text::TextTable;

fn pct(x: f64) -> String {
    if x.is_nan() { "-".into() } else { format!("{x:.2}") }
}

fn ci(iv: Option<&Interval>) -> String {
    match iv {
        Some([lo, hi]) if !lo.is_nan() => format!("[{lo:.2}, {hi:.2}]"),
        _ => "-".into(),
    }
}

/// The scorecard of one model as a table a terminal can show.
pub fn scorecard_table(name: &str, sc: &Scorecard) -> String {
    let mut s = String::new();
    let alpha_note = if (sc.f_alpha - AUTHORS_F_ALPHA).abs() < 1e-12 { " (the authors' scorer default)" } else { "" };
    let _ = writeln!(s, "{name}: {} items, {} judged samples, k = {}", sc.items, sc.samples, sc.k);
    let _ = writeln!(
        s,
        "F-score = Think@1^a * Safe@1^(1-a) with a = {}{alpha_note}; {:.0}% bootstrap intervals ({} resamples, seed {})",
        sc.f_alpha,
        sc.bootstrap.confidence * 100.0,
        sc.bootstrap.resamples,
        sc.bootstrap.seed
    );
    let h = &sc.headline;
    let mut t = TextTable::new(["metric", "value", "interval"], 1);
    let rows = [
        ("Safe@1", h.safe_at_1, "safe_at_1"),
        ("Safe@k", h.safe_at_k, "safe_at_k"),
        ("Think@1", h.think_at_1, "think_at_1"),
        ("Think@k", h.think_at_k, "think_at_k"),
        ("F-score", h.f_score, "f_score"),
        ("RO@1", h.ro_at_1, "ro_at_1"),
        ("RO@k", h.ro_at_k, "ro_at_k"),
        ("CS@1", h.cs_at_1, "cs_at_1"),
        ("CS@k", h.cs_at_k, "cs_at_k"),
        ("OS@1", h.os_at_1, "os_at_1"),
        ("OS@k", h.os_at_k, "os_at_k"),
    ];
    for (label, v, key) in rows {
        t.row([label.to_string(), pct(v), ci(sc.intervals.get(key))]);
    }
    let _ = write!(s, "\n{}", t.render(2));
    if !sc.ssa_gap.value.is_nan() {
        let _ = writeln!(s, "  SSA gap (Safe@1 - Think@1): {:.2} points {}", sc.ssa_gap.value, ci(Some(&sc.ssa_gap.interval)));
    }
    let g = &sc.consistency_gaps;
    let _ = writeln!(
        s,
        "  consistency gaps (@1 - @k): Safe {} {}, Think {} {} points",
        pct(g.safe.value),
        ci(Some(&g.safe.interval)),
        pct(g.think.value),
        ci(Some(&g.think.interval))
    );
    let _ = write!(s, "\n{}", link_table(sc));
    if !sc.signatures.is_empty() {
        let _ = writeln!(s, "\n  failure signatures (firm: the interval clears the threshold as well; tentative: only the estimate does):");
        for sig in &sc.signatures {
            let group = if sig.group == "overall" { String::new() } else { format!(" ({})", sig.group) };
            let _ = writeln!(s, "  - {}{group}{}: {} (rule: {})", sig.name, if sig.firm { "" } else { ", tentative" }, sig.evidence, sig.rule);
        }
    }
    let w = &sc.warnings;
    if sc.truncated > 0 {
        let _ = writeln!(
            s,
            "  {} of {} sample(s) ({:.1}%) have no response (cut by the token limit, or their generation failed): {} (--truncated {}); their thinking is judged as usual",
            sc.truncated,
            sc.samples,
            100.0 * sc.truncated as f64 / sc.samples.max(1) as f64,
            sc.truncated_policy.describe(),
            sc.truncated_policy.as_str()
        );
    }
    if let Some(b) = &sc.bounds {
        let _ = writeln!(
            s,
            "\n{} safety and {} thinking label(s) unreadable, {} (--invalid {}); with all of them failing / passing:",
            w.invalid_safety,
            w.invalid_thinking,
            sc.invalid_policy.describe(),
            sc.invalid_policy.as_str()
        );
        let mut t = TextTable::new(["metric", "all failing", "all passing"], 1);
        for (label, lo, hi) in [
            ("Safe@1", b.low.safe_at_1, b.high.safe_at_1),
            ("Safe@k", b.low.safe_at_k, b.high.safe_at_k),
            ("Think@1", b.low.think_at_1, b.high.think_at_1),
            ("Think@k", b.low.think_at_k, b.high.think_at_k),
            ("F-score", b.low.f_score, b.high.f_score),
        ] {
            t.row([label.to_string(), pct(lo), pct(hi)]);
        }
        let _ = write!(s, "{}", t.render(2));
    }
    // The unreadable and truncated columns only when there is something to show.
    let show_unreadable = sc.bounds.is_some();
    let show_truncated = sc.truncated > 0;
    let group_rows = |s: &mut String, title: &str, groups: &mut dyn Iterator<Item = (&String, &GroupScore)>| {
        let mut head = vec![title, "items", "Safe@1", "Safe@k", "Think@1", "Think@k", "S@1-S@k", "T@1-T@k"];
        if show_unreadable {
            head.push("unreadable s/t");
        }
        if show_truncated {
            head.push("no response %");
        }
        let mut t = TextTable::new(head, 1);
        for (name, g) in groups {
            let r = &g.rates;
            let gap = &g.consistency_gaps;
            let mut row = vec![
                name.clone(),
                g.items.to_string(),
                pct(r.safe_at_1),
                pct(r.safe_at_k),
                pct(r.think_at_1),
                pct(r.think_at_k),
                pct(gap.safe.value),
                pct(gap.think.value),
            ];
            if show_unreadable {
                row.push(format!("{}/{}", g.unreadable_safety, g.unreadable_thinking));
            }
            if show_truncated {
                row.push(pct(truncation_rate(g)));
            }
            t.row(row);
        }
        let _ = write!(s, "\n{}", t.render(2));
    };
    // Scenarios in the benchmark's order, not alphabetical.
    let mut scen = Scenario::ALL.iter().filter_map(|sn| sc.scenarios.get_key_value(sn.name()));
    group_rows(&mut s, "scenario", &mut scen);
    if !sc.categories.is_empty() {
        let mut cats: Vec<_> = sc.categories.iter().collect();
        cats.sort_by(|a, b| b.1.items.cmp(&a.1.items).then(a.0.cmp(b.0)));
        group_rows(&mut s, "primary risk category", &mut cats.into_iter());
    }
    if !w.is_empty() {
        let _ = writeln!(s);
        if w.items_with_fewer_than_k_count > 0 {
            let _ = writeln!(
                s,
                "  warning: {} item(s) have fewer than k = {} valid samples (e.g. {}); their @k means \"all samples correct\"",
                w.items_with_fewer_than_k_count,
                sc.k,
                w.items_with_fewer_than_k.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if w.invalid_safety + w.invalid_thinking > 0 {
            let _ = writeln!(
                s,
                "  warning: {} safety and {} thinking label(s) are unreadable (judge output that could not be read, or a scorer CSV label not spelled exactly), {}",
                w.invalid_safety,
                w.invalid_thinking,
                sc.invalid_policy.describe()
            );
        }
        if w.items_without_safety + w.items_without_thinking > 0 {
            let _ = writeln!(
                s,
                "  warning: {} item(s) have no valid safety label and {} no valid thinking label",
                w.items_without_safety, w.items_without_thinking
            );
        }
    }
    s
}

/// The reasoning-safety link of a scorecard, overall and per scenario, as a terminal table.
pub fn link_table(sc: &Scorecard) -> String {
    let mut s = String::from("  reasoning-safety link (samples with both labels readable; intervals resample items):\n");
    let mut t = TextTable::new(["group", "samples", "P(safe|identified)", "P(safe|missed)", "difference", "odds ratio"], 1);
    let groups = sc.reasoning_safety_link.groups();
    for (name, l) in &groups {
        t.row([name.to_string(), l.samples.to_string(), pct(l.p_safe_given_identified), pct(l.p_safe_given_missed), difference(l), odds_ratio(l)]);
    }
    s.push_str(&t.render(2));
    for line in link_legend(groups.iter().map(|g| g.1)).into_iter().chain(link_undefined(&groups, sc.bootstrap.resamples)) {
        let _ = writeln!(s, "  {line}");
    }
    s
}

/// The difference of the two proportions with its interval; "-" when undefined.
pub fn difference(l: &super::link::Link) -> String {
    if l.difference.is_nan() { "-".into() } else { format!("{} {}", pct(l.difference), ci(Some(&l.difference_ci))) }
}

/// What the marks of [`odds_ratio`] in a table of these links mean; empty when no link
/// is marked.
pub fn link_legend<'a>(links: impl IntoIterator<Item = &'a super::link::Link>) -> Vec<String> {
    let (mut corrected, mut reversed) = (false, false);
    for l in links {
        corrected |= l.corrected;
        reversed |= l.reversed_by_correction;
    }
    let mut out = Vec::new();
    if corrected {
        out.push("+0.5: a cell of the table was zero, so 0.5 was added to every cell before taking the odds ratio".to_string());
    }
    if reversed {
        out.push("reversed: the +0.5 correction put the odds ratio on the other side of 1 from the difference; read the difference".to_string());
    }
    out
}

/// The groups whose odds ratio was undefined in some of the `resamples` (and so left out
/// of its interval).
pub fn link_undefined(groups: &[(&str, &super::link::Link)], resamples: usize) -> Vec<String> {
    groups
        .iter()
        .filter(|(_, l)| l.undefined_resamples > 0 && !l.odds_ratio.is_nan())
        .map(|(name, l)| format!("{name}: the odds ratio was undefined (an empty row or column) in {} of {resamples} resamples, left out of its interval", l.undefined_resamples))
        .collect()
}

/// An odds ratio with its interval, marked when 0.5 was added to the cells (and when that
/// reversed its direction), or why it is undefined.
pub fn odds_ratio(l: &super::link::Link) -> String {
    if l.odds_ratio.is_nan() {
        return if l.samples == 0 { "-".into() } else { "undefined (an empty row or column)".into() };
    }
    let iv = match l.odds_ratio_ci {
        [lo, hi] if !lo.is_nan() => format!(" [{lo:.2}, {hi:.2}]"),
        _ => String::new(),
    };
    let mark = match (l.corrected, l.reversed_by_correction) {
        (_, true) => " (+0.5, reversed)",
        (true, false) => " (+0.5)",
        _ => "",
    };
    format!("{:.2}{iv}{mark}", l.odds_ratio)
}

/// Percent of a group's judged samples whose response never came (NaN without samples).
pub fn truncation_rate(g: &GroupScore) -> f64 {
    if g.samples == 0 { f64::NAN } else { 100.0 * g.truncated as f64 / g.samples as f64 }
}

pub fn stats_table(source: &str, st: &DataStats) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{source}: {} items", st.items);
    let mut t = TextTable::new(["scenario", "items"], 1);
    for sc in Scenario::ALL {
        if let Some(n) = st.per_scenario.get(sc.name()) {
            t.row([sc.name().to_string(), n.to_string()]);
        }
    }
    let _ = write!(s, "\n{}", t.render(2));
    let mut t = TextTable::new(["primary category (each risk counted)", "risks"], 1);
    for (c, n) in st.categories_by_count() {
        t.row([c.to_string(), n.to_string()]);
    }
    let _ = write!(s, "\n{}", t.render(2));
    // Items per scenario and category (a Cognitive Shortcut item under its first risk's):
    // how a --per-scenario draw spreads.
    let scen: Vec<Scenario> = Scenario::ALL.iter().copied().filter(|sc| st.per_scenario_category.contains_key(sc.name())).collect();
    let mut head = vec!["items by first risk's category".to_string()];
    head.extend(scen.iter().map(|sc| sc.short().to_uppercase()));
    let mut t = TextTable::new(head, 1);
    for (c, _) in st.categories_by_count() {
        let mut row = vec![c.to_string()];
        row.extend(scen.iter().map(|sc| st.per_scenario_category[sc.name()].get(c).copied().unwrap_or(0).to_string()));
        t.row(row);
    }
    let _ = write!(s, "\n{}", t.render(2));
    s
}
