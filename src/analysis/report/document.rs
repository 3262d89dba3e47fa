//! `bsa report`: one or more judged runs -> report.md, a self-contained report.html (every
//! plot inline as SVG, no external assets) and the plots as SVG files beside them.
//!
//! The report is built once as a list of [`Block`]s (headings, tables, figures, callouts)
//! and rendered twice, to markdown and to HTML, so the two never disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::progress::progress_bar;
use crate::records::{PRIMARY_CATEGORIES, Scenario};
use crate::records::Decoding;
use crate::analysis::judged_run::JudgedRun;
use crate::analysis::metrics::{self, Gaps, Interval, ScoreOptions, Scorecard, AUTHORS_F_ALPHA};
use crate::analysis::reference::{self, Reference};
use crate::analysis::signatures;
use super::plots::{self, BarSeries, ScatterPoint};
use super::text::TextTable;

#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub score: ScoreOptions,
    pub progress: bool,
    /// Published results drawn next to the runs in the Safe@1 vs Think@1 scatter.
    pub reference: Reference,
    /// The scored unit (`label` or `label@config`, as the report names them) the others
    /// are weighed against in the safety-tax section; None: the first.
    pub baseline: Option<String>,
}

/// One scored unit of the report: a run, or one decoding configuration of a run.
#[derive(Debug, Clone)]
pub struct Entity {
    /// Index of the run among the report's runs (the colour of its points).
    pub run: usize,
    pub config: String,
    /// `label` or `label@config`.
    pub name: String,
    pub card: Scorecard,
    /// From the run's samples.jsonl; None for verdict-only runs.
    pub decoding: Option<Decoding>,
}

#[derive(Debug, Clone)]
pub struct Figure {
    /// Also the SVG's file name (plots/ID.svg) and the HTML element id.
    pub id: String,
    pub title: String,
    pub svg: String,
}

/// A piece of the report, rendered to markdown and HTML alike. Text is plain (escaped by
/// the renderers).
#[derive(Debug, Clone)]
pub enum Block {
    Heading(u8, String),
    Para(String),
    Bullets(Vec<String>),
    /// A highlighted box (the SSA gap).
    Callout(Vec<String>),
    Table { head: Vec<String>, rows: Vec<Vec<String>> },
    /// Index into `Report::figures`.
    Figure(usize),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub runs: Vec<String>,
    pub entities: Vec<Entity>,
    pub figures: Vec<Figure>,
    pub blocks: Vec<Block>,
}

/// With more scored units than this, plots number them and the report lists the key.
const NUMBERED_ABOVE: usize = 6;

/// The decoding parameters a sweep can vary, in the order they become x, y and panels.
pub const SWEEP_PARAMS: [&str; 5] = ["temperature", "top_p", "top_k", "min_p", "max_new_tokens"];

fn param(d: &Decoding, p: &str) -> (f64, String) {
    match p {
        "temperature" => (d.temperature as f64, d.temperature.to_string()),
        "top_p" => (d.top_p as f64, d.top_p.to_string()),
        "top_k" => (d.top_k as f64, d.top_k.to_string()),
        "min_p" => (d.min_p as f64, d.min_p.to_string()),
        _ => (d.max_new_tokens as f64, d.max_new_tokens.to_string()),
    }
}

fn pct(x: f64) -> String {
    if x.is_nan() { "-".into() } else { format!("{x:.2}") }
}

fn with_ci(x: f64, iv: Option<&Interval>) -> String {
    match iv {
        Some([lo, hi]) if !lo.is_nan() && !x.is_nan() => format!("{x:.2} [{lo:.1}, {hi:.1}]"),
        _ => pct(x),
    }
}

fn slug(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').to_string()
}

/// Scores every configuration of every run and lays out the report.
pub fn build(runs: &[JudgedRun], opts: &ReportOptions) -> Result<Report> {
    if runs.is_empty() {
        bail!("bsa report needs at least one run directory (or verdicts.jsonl)");
    }
    opts.score.validate()?;
    let jobs: Vec<(usize, String, Vec<crate::records::Verdict>, usize)> = runs
        .iter()
        .enumerate()
        .flat_map(|(ri, r)| {
            let by = r.by_config();
            let n = by.len();
            by.into_iter().map(move |(c, vs)| (ri, c, vs, n))
        })
        .collect();
    let bar = progress_bar(opts.progress, jobs.len() as u64, "scoring");
    let mut entities = Vec::new();
    for (ri, config, vs, n_configs) in jobs {
        let r = &runs[ri];
        let name = r.config_name(&config, n_configs);
        bar.set_message(name.clone());
        let card = metrics::score(&vs, &opts.score).with_context(|| format!("scoring {name} ({})", r.path.display()))?;
        entities.push(Entity { run: ri, decoding: r.decodings.get(&config).cloned(), config, name, card });
        bar.inc(1);
    }
    bar.finish_and_clear();
    unique_names(&mut entities, runs);
    let mut rep = Report { runs: runs.iter().map(|r| format!("{} ({})", r.label, r.path.display())).collect(), entities, figures: Vec::new(), blocks: Vec::new() };
    // By name, or by the path of a run that is one unit.
    let by_path = |e: &Entity, b: &str| Path::new(b) == runs[e.run].path && rep.entities.iter().filter(|x| x.run == e.run).count() == 1;
    let baseline = match &opts.baseline {
        None => 0,
        Some(b) => rep.entities.iter().position(|e| &e.name == b || by_path(e, b)).ok_or_else(|| {
            anyhow::anyhow!("--baseline {b:?} is none of the report's runs; use one of: {}", rep.entities.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "))
        })?,
    };
    lay_out(&mut rep, runs, &opts.score, opts.reference)?;
    if rep.entities.len() > 1 {
        let tax = tax_section(&rep.entities, baseline, runs, &opts.score);
        // Before the risk categories: with the other analysis sections.
        let at = rep.blocks.iter().position(|b| matches!(b, Block::Heading(2, t) if t == "Risk categories")).unwrap_or(rep.blocks.len());
        rep.blocks.splice(at..at, tax);
    }
    Ok(rep)
}

/// Two runs of one model (a profile and the same model with the safety rules) share a
/// label: such units are told apart by their run's path, and, were that the same too, by
/// their place on the command line. Plot files are named after units, so names must differ.
fn unique_names(entities: &mut [Entity], runs: &[JudgedRun]) {
    let shared = |es: &[Entity]| -> Vec<bool> { es.iter().map(|e| es.iter().filter(|x| x.name == e.name).count() > 1).collect() };
    for (i, dup) in shared(entities).into_iter().enumerate() {
        if dup {
            let e = &entities[i];
            entities[i].name = format!("{} ({})", e.name, runs[e.run].path.display());
        }
    }
    for (i, dup) in shared(entities).into_iter().enumerate() {
        if dup {
            entities[i].name = format!("{} #{}", entities[i].name, entities[i].run + 1);
        }
    }
}

fn lay_out(rep: &mut Report, runs: &[JudgedRun], so: &ScoreOptions, reference: Reference) -> Result<()> {
    let ents = rep.entities.clone();
    let mut blocks = Vec::new();
    let mut figures = Vec::new();
    let alpha_note = if (so.f_alpha - AUTHORS_F_ALPHA).abs() < 1e-12 { " (the authors' scorer default; their leaderboard fits 0.610)" } else { "" };
    blocks.push(Block::Heading(1, "Beyond Safe Answers: report".into()));
    blocks.push(Block::Para(format!(
        "bsa {}. Runs: {}. Metrics in percent; k = {}; F-score = Think@1^a x Safe@1^(1-a) with a = {}{alpha_note}; intervals are {:.0}% percentile bootstrap intervals over items, stratified by scenario ({} resamples, seed {}). Unreadable judge labels are {} (--invalid {}); the safety of samples whose response never came (cut by the token limit, or failed) is {} (--truncated {}).",
        env!("CARGO_PKG_VERSION"),
        rep.runs.join("; "),
        so.k,
        so.f_alpha,
        so.confidence * 100.0,
        so.resamples,
        so.seed,
        so.invalid.describe(),
        so.invalid.as_str(),
        so.truncated.describe(),
        so.truncated.as_str()
    )));

    // Headline table.
    blocks.push(Block::Heading(2, "Headline".into()));
    let head = ["run", "items", "samples", "Safe@1", "Safe@k", "Think@1", "Think@k", "F-score", "SSA gap"];
    let rows = ents
        .iter()
        .map(|e| {
            let h = &e.card.headline;
            let iv = |k: &str| e.card.intervals.get(k);
            vec![
                e.name.clone(),
                e.card.items.to_string(),
                e.card.samples.to_string(),
                with_ci(h.safe_at_1, iv("safe_at_1")),
                with_ci(h.safe_at_k, iv("safe_at_k")),
                with_ci(h.think_at_1, iv("think_at_1")),
                with_ci(h.think_at_k, iv("think_at_k")),
                with_ci(h.f_score, iv("f_score")),
                with_ci(e.card.ssa_gap.value, Some(&e.card.ssa_gap.interval)),
            ]
        })
        .collect();
    blocks.push(Block::Table { head: head.iter().map(|s| s.to_string()).collect(), rows });
    unreadable_section(&ents, &mut blocks);

    // The SSA gap, called out.
    blocks.push(Block::Heading(2, "The SSA gap (Safe@1 - Think@1)".into()));
    let widest = ents.iter().map(|e| e.card.headline.safe_at_1 - e.card.headline.think_at_1).filter(|g| !g.is_nan()).fold(f64::NAN, f64::max);
    let gap_lines = ents
        .iter()
        .map(|e| {
            let h = &e.card.headline;
            let gap = h.safe_at_1 - h.think_at_1;
            let mark = if gap == widest && ents.len() > 1 { " (widest)" } else { "" };
            format!(
                "{}: SSA gap {} points{mark}: {} of samples are safe, but only {} have thinking that identified the risk",
                e.name,
                pct(gap),
                pct(h.safe_at_1) + "%",
                pct(h.think_at_1) + "%"
            )
        })
        .collect();
    blocks.push(Block::Callout(gap_lines));
    blocks.push(Block::Para(
        "Superficial safety alignment: a safe final answer whose reasoning never noticed the annotated risk. The wider the gap, the more of the model's safety is luck or reflex rather than understanding.".into(),
    ));
    signatures_section(&ents, so, &mut blocks);

    // Scatter.
    let numbered = ents.len() > NUMBERED_ABOVE;
    let points: Vec<ScatterPoint> = ents
        .iter()
        .map(|e| ScatterPoint {
            label: e.name.clone(),
            series: e.run,
            safe_at_1: e.card.headline.safe_at_1,
            think_at_1: e.card.headline.think_at_1,
            safe_interval: e.card.intervals.get("safe_at_1").copied().unwrap_or([f64::NAN; 2]),
            think_interval: e.card.intervals.get("think_at_1").copied().unwrap_or([f64::NAN; 2]),
        })
        .collect();
    let refs = reference.rows();
    figures.push(Figure { id: "ssa-scatter".into(), title: "Safe@1 vs Think@1".into(), svg: plots::ssa_scatter(&points, numbered, refs)? });
    blocks.push(Block::Heading(2, "Safe@1 vs Think@1".into()));
    blocks.push(Block::Figure(figures.len() - 1));
    // Clustered points (a sweep, similar models) also get a frame around the cluster.
    if let Some(range) = plots::scatter_zoom(&points) {
        figures.push(Figure { id: "ssa-scatter-zoomed".into(), title: "Safe@1 vs Think@1, zoomed".into(), svg: plots::ssa_scatter_zoomed(&points, numbered, range, refs)? });
        blocks.push(Block::Figure(figures.len() - 1));
    }
    if !refs.is_empty() {
        blocks.push(Block::Para(format!(
            "Grey crosses: the {}. Facts from the paper, not computed here: a run on a subset, with another judge, prompt or decoding compares only roughly.",
            reference::PAPER_SOURCE
        )));
        blocks.push(Block::Table {
            head: ["published model", "Safe@1", "Safe@k", "Think@1", "Think@k", "F-score"].map(String::from).to_vec(),
            rows: refs.iter().map(|r| vec![r.model.to_string(), pct(r.safe_at_1), pct(r.safe_at_k), pct(r.think_at_1), pct(r.think_at_k), pct(r.f_score)]).collect(),
        });
    }
    if numbered {
        blocks.push(Block::Table {
            head: vec!["point".into(), "run".into()],
            rows: ents.iter().enumerate().map(|(i, e)| vec![(i + 1).to_string(), e.name.clone()]).collect(),
        });
    }

    // Scenarios.
    blocks.push(Block::Heading(2, "Scenarios".into()));
    let scenarios: Vec<Scenario> = Scenario::ALL.iter().copied().filter(|s| ents.iter().any(|e| e.card.scenarios.contains_key(s.name()))).collect();
    let mut rows = Vec::new();
    for e in &ents {
        for s in &scenarios {
            if let Some(g) = e.card.scenarios.get(s.name()) {
                let r = &g.rates;
                let iv = |k: &str| g.intervals.get(k);
                rows.push(vec![
                    e.name.clone(),
                    s.name().into(),
                    g.items.to_string(),
                    with_ci(r.safe_at_1, iv("safe_at_1")),
                    with_ci(r.safe_at_k, iv("safe_at_k")),
                    with_ci(r.think_at_1, iv("think_at_1")),
                    with_ci(r.think_at_k, iv("think_at_k")),
                    format!("{} / {}", g.unreadable_safety, g.unreadable_thinking),
                    pct(super::truncation_rate(g)),
                ]);
            }
        }
    }
    let head = ["run", "scenario", "items", "Safe@1", "Safe@k", "Think@1", "Think@k", "unreadable (safety / thinking)", "no response %"];
    blocks.push(Block::Table { head: head.map(String::from).to_vec(), rows });
    let groups: Vec<String> = scenarios.iter().map(|s| s.name().to_string()).collect();
    const PER_CHART: usize = 10;
    for (metric, key) in [("Safe@1", "safe_at_1"), ("Think@1", "think_at_1")] {
        let chunks: Vec<&[Entity]> = ents.chunks(PER_CHART).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let series: Vec<BarSeries> = chunk
                .iter()
                .enumerate()
                .map(|(i, e)| BarSeries {
                    name: e.name.clone(),
                    // One colour per bar in a group: configurations of one run must differ.
                    series: i,
                    values: scenarios
                        .iter()
                        .map(|s| match e.card.scenarios.get(s.name()) {
                            Some(g) => (rate(&g.rates, key), g.intervals.get(key).copied().unwrap_or([f64::NAN; 2])),
                            None => (f64::NAN, [f64::NAN; 2]),
                        })
                        .collect(),
                })
                .collect();
            let part = if chunks.len() > 1 { format!(" ({}/{})", ci + 1, chunks.len()) } else { String::new() };
            let title = format!("{metric} per scenario{part}");
            figures.push(Figure { id: format!("scenario-{key}{}", if chunks.len() > 1 { format!("-{}", ci + 1) } else { String::new() }), svg: plots::bars_with_intervals(&title, &format!("{metric} (%)"), &groups, &series)?, title });
            blocks.push(Block::Figure(figures.len() - 1));
        }
    }

    link_section(&ents, &scenarios, &mut blocks, &mut figures)?;
    consistency_section(&ents, &scenarios, &mut blocks);

    // Risk categories.
    blocks.push(Block::Heading(2, "Risk categories".into()));
    blocks.push(Block::Para("Each item counts in every primary category among its risks (Cognitive Shortcut items carry two).".into()));
    let metric_cols = ["Safe@1", "Safe@k", "Think@1", "Think@k"].map(String::from).to_vec();
    for e in &ents {
        let mut cats: Vec<&String> = e.card.categories.keys().collect();
        let rank = |c: &str| PRIMARY_CATEGORIES.iter().position(|p| *p == c).unwrap_or(PRIMARY_CATEGORIES.len());
        cats.sort_by_key(|c| (rank(c), (*c).clone()));
        if cats.is_empty() {
            continue;
        }
        let labels: Vec<String> = cats.iter().map(|c| format!("{c} ({})", e.card.categories[*c].items)).collect();
        let values: Vec<Vec<f64>> = cats
            .iter()
            .map(|c| {
                let r = &e.card.categories[*c].rates;
                vec![r.safe_at_1, r.safe_at_k, r.think_at_1, r.think_at_k]
            })
            .collect();
        let title = format!("{}: risk category x metric (items)", e.name);
        figures.push(Figure { id: format!("categories-{}", slug(&e.name)), svg: plots::heatmap(&title, &metric_cols, &labels, &values, "", "")?, title });
        blocks.push(Block::Figure(figures.len() - 1));
    }

    // Decoding sweeps.
    for (ri, run) in runs.iter().enumerate() {
        let mine: Vec<&Entity> = ents.iter().filter(|e| e.run == ri).collect();
        if mine.len() < 2 {
            continue;
        }
        sweep_section(run, &mine, &mut blocks, &mut figures)?;
    }

    // Warnings.
    let mut warn = Vec::new();
    for e in &ents {
        let w = &e.card.warnings;
        if w.items_with_fewer_than_k_count > 0 {
            warn.push(format!("{}: {} item(s) have fewer than k = {} valid samples; their @k means \"all samples correct\"", e.name, w.items_with_fewer_than_k_count, e.card.k));
        }
        if w.invalid_safety + w.invalid_thinking > 0 {
            warn.push(format!(
                "{}: {} safety and {} thinking label(s) are unreadable (judge output that could not be read, or a scorer CSV label not spelled exactly), {}",
                e.name,
                w.invalid_safety,
                w.invalid_thinking,
                e.card.invalid_policy.describe()
            ));
        }
    }
    if !warn.is_empty() {
        blocks.push(Block::Heading(2, "Warnings".into()));
        blocks.push(Block::Bullets(warn));
    }
    rep.blocks = blocks;
    rep.figures = figures;
    Ok(())
}

/// The failure signatures each scored unit shows, with the rules stated.
fn signatures_section(ents: &[Entity], so: &ScoreOptions, blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(2, "Failure signatures".into()));
    let mut lines = Vec::new();
    for e in ents {
        if e.card.signatures.is_empty() {
            lines.push(format!("{}: none of the signatures below holds", e.name));
        }
        for sig in &e.card.signatures {
            let group = if sig.group == "overall" { String::new() } else { format!(" in {}", sig.group) };
            lines.push(format!("{}: {}{group}{}. {}.", e.name, sig.name, if sig.firm { "" } else { " (tentative: the interval reaches below the threshold)" }, sig.evidence));
        }
    }
    blocks.push(Block::Bullets(lines));
    blocks.push(Block::Para(format!("The rules, stated: {}.", signatures::rules(so.confidence).join("; "))));
}

/// The reasoning-safety link per scored unit and scenario: a table and, per unit (or, for
/// many units, one chart of them all), P(safe) with the thinking's risk identified or missed.
fn link_section(ents: &[Entity], scenarios: &[Scenario], blocks: &mut Vec<Block>, figures: &mut Vec<Figure>) -> Result<()> {
    blocks.push(Block::Heading(2, "The reasoning-safety link".into()));
    blocks.push(Block::Para(
        "Over the samples with both labels readable: how often a sample is safe when its thinking identified the annotated risk, and when it missed it. The paper's finding is that identifying the risk goes with a safe answer; a small or negative difference means the model's safety does not come from its reasoning. The odds ratio is that of being safe, identified against missed (0.5 added to every cell when one is zero, marked +0.5; undefined when no sample identified, or missed, the risk, or when every sample was safe, or none). Intervals resample items, not samples.".into(),
    ));
    let mut rows = Vec::new();
    for e in ents {
        for (g, l) in e.card.reasoning_safety_link.groups() {
            rows.push(vec![
                e.name.clone(),
                g.to_string(),
                l.samples.to_string(),
                with_ci(l.p_safe_given_identified, Some(&l.p_safe_given_identified_ci)),
                with_ci(l.p_safe_given_missed, Some(&l.p_safe_given_missed_ci)),
                super::difference(l),
                super::odds_ratio(l),
            ]);
        }
    }
    let head = ["run", "group", "samples", "P(safe | identified) %", "P(safe | missed) %", "difference (points)", "odds ratio"];
    blocks.push(Block::Table { head: head.map(String::from).to_vec(), rows });
    let mut notes = super::link_legend(ents.iter().flat_map(|e| e.card.reasoning_safety_link.groups().into_iter().map(|g| g.1)));
    for e in ents {
        let undefined = super::link_undefined(&e.card.reasoning_safety_link.groups(), e.card.bootstrap.resamples);
        notes.extend(undefined.into_iter().map(|n| format!("{}, {n}", e.name)));
    }
    if !notes.is_empty() {
        blocks.push(Block::Bullets(notes));
    }
    let bar = |name: &str, series: usize, values: Vec<(f64, Interval)>| BarSeries { name: name.into(), series, values };
    // Green for identified, red for missed (palette entries 2 and 3). One chart per unit
    // while the scatter names its points; beyond that one chart of all, by point number.
    if ents.len() <= NUMBERED_ABOVE {
        let mut groups = vec!["overall".to_string()];
        groups.extend(scenarios.iter().map(|s| s.name().to_string()));
        for e in ents {
            let link = &e.card.reasoning_safety_link;
            let at = |s: Option<&Scenario>| match s {
                None => Some(&link.overall),
                Some(s) => link.scenarios.get(s.name()),
            };
            let pick = |f: fn(&crate::analysis::link::Link) -> (f64, Interval)| -> Vec<(f64, Interval)> {
                std::iter::once(None).chain(scenarios.iter().map(Some)).map(|s| at(s).map_or((f64::NAN, [f64::NAN; 2]), f)).collect()
            };
            let series = [
                bar("thinking identified the risk", 2, pick(|l| (l.p_safe_given_identified, l.p_safe_given_identified_ci))),
                bar("thinking missed it", 3, pick(|l| (l.p_safe_given_missed, l.p_safe_given_missed_ci))),
            ];
            let title = format!("{}: P(safe) by whether the thinking identified the risk", e.name);
            figures.push(Figure { id: format!("link-{}", slug(&e.name)), svg: plots::bars_with_intervals(&title, "safe samples (%)", &groups, &series)?, title });
            blocks.push(Block::Figure(figures.len() - 1));
        }
    } else {
        const PER_CHART: usize = 10;
        let chunks: Vec<&[Entity]> = ents.chunks(PER_CHART).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            // Numbered as in the scatter's key: many names do not fit under their bars.
            let groups: Vec<String> = (0..chunk.len()).map(|i| (ci * PER_CHART + i + 1).to_string()).collect();
            let series = [
                bar("thinking identified the risk", 2, chunk.iter().map(|e| (e.card.reasoning_safety_link.overall.p_safe_given_identified, e.card.reasoning_safety_link.overall.p_safe_given_identified_ci)).collect()),
                bar("thinking missed it", 3, chunk.iter().map(|e| (e.card.reasoning_safety_link.overall.p_safe_given_missed, e.card.reasoning_safety_link.overall.p_safe_given_missed_ci)).collect()),
            ];
            let part = if chunks.len() > 1 { format!(" ({}/{})", ci + 1, chunks.len()) } else { String::new() };
            let title = format!("P(safe) by whether the thinking identified the risk, runs by point number{part}");
            figures.push(Figure { id: format!("link{}", if chunks.len() > 1 { format!("-{}", ci + 1) } else { String::new() }), svg: plots::bars_with_intervals(&title, "safe samples (%)", &groups, &series)?, title });
            blocks.push(Block::Figure(figures.len() - 1));
        }
    }
    Ok(())
}

/// The safety alignment tax of every scored unit against the baseline, as `bsa compare`
/// weighs it: the reasoning bought on Risk Omission and Cognitive Shortcut and the price in
/// Over Sensitive labels, paired on the items both share.
fn tax_section(ents: &[Entity], baseline: usize, runs: &[JudgedRun], so: &ScoreOptions) -> Vec<Block> {
    let base = &ents[baseline];
    let mut blocks = vec![
        Block::Heading(2, "The safety alignment tax".into()),
        Block::Para(format!(
            "Each run against the baseline {} (choose another with --baseline NAME), as bsa compare weighs them: B - A of Think@1 on Risk Omission and Cognitive Shortcut (the reasoning a mitigation buys) and of the share of Over Sensitive labels on Over Sensitivity items (the price the paper calls the safety alignment tax), in points on the items both share, with {:.0}% paired bootstrap intervals; * marks an interval that excludes 0 (groups of at least {} items).",
            base.name,
            so.confidence * 100.0,
            super::super::compare::MIN_ITEMS
        )),
    ];
    let cell = |m: Option<&crate::analysis::compare::MetricDiff>| match m {
        None => "-".to_string(),
        Some(m) if m.interval[0].is_nan() => format!("{:+.2}", m.diff),
        Some(m) => format!("{:+.2} [{:+.1}, {:+.1}]{}", m.diff, m.interval[0], m.interval[1], if m.distinguishable { " *" } else { "" }),
    };
    let mut rows = Vec::new();
    for (i, e) in ents.iter().enumerate() {
        if i == baseline {
            continue;
        }
        let opts = crate::analysis::compare::CompareOptions { score: so.clone(), config_a: Some(base.config.clone()), config_b: Some(e.config.clone()), progress: false };
        match crate::analysis::compare::compare(&runs[base.run], &runs[e.run], &opts) {
            Ok(c) => {
                let t = &c.safety_tax;
                let think = |s: Scenario| t.reasoning.iter().find(|m| m.group == s.name());
                rows.push(vec![
                    e.name.clone(),
                    c.shared_items.to_string(),
                    cell(think(Scenario::RiskOmission)),
                    cell(think(Scenario::CognitiveShortcut)),
                    cell(t.over_sensitive.as_ref()),
                    t.summary(),
                ]);
            }
            Err(err) => rows.push(vec![e.name.clone(), "0".into(), "-".into(), "-".into(), "-".into(), format!("cannot compare: {err}")]),
        }
    }
    let head = ["run (B)", "shared items", "RO Think@1", "CS Think@1", "Over Sensitive labels %", "verdict"];
    blocks.push(Block::Table { head: head.map(String::from).to_vec(), rows });
    blocks
}

/// Safe@1 - Safe@k and Think@1 - Think@k per scored unit, scenario and (for a few units)
/// category.
fn consistency_section(ents: &[Entity], scenarios: &[Scenario], blocks: &mut Vec<Block>) {
    blocks.push(Block::Heading(2, "Consistency across samples".into()));
    blocks.push(Block::Para(format!(
        "How much of each @1 rate does not hold across all k = {} samples of an item (the paper's latent vulnerability): a model that is safe in 4 of 5 samples of every item has Safe@1 80 but Safe@k 0. Differences in points, with intervals from the same item resamples.",
        ents.first().map_or(5, |e| e.card.k)
    )));
    const CATEGORY_ROWS_UP_TO: usize = 4;
    let gap_cells = |g: &Gaps| vec![with_ci(g.safe.value, Some(&g.safe.interval)), with_ci(g.think.value, Some(&g.think.interval))];
    let mut rows = Vec::new();
    for e in ents {
        let c = &e.card;
        let h = &c.headline;
        let mut row = vec![e.name.clone(), "overall".into(), c.items.to_string(), pct(h.safe_at_1), pct(h.safe_at_k), pct(h.think_at_1), pct(h.think_at_k)];
        row.extend(gap_cells(&c.consistency_gaps));
        rows.push(row);
        let mut groups: Vec<(String, &metrics::GroupScore)> = scenarios.iter().filter_map(|s| c.scenarios.get(s.name()).map(|g| (s.name().to_string(), g))).collect();
        if ents.len() <= CATEGORY_ROWS_UP_TO {
            let rank = |x: &str| PRIMARY_CATEGORIES.iter().position(|p| *p == x).unwrap_or(PRIMARY_CATEGORIES.len());
            let mut cats: Vec<(&String, &metrics::GroupScore)> = c.categories.iter().collect();
            cats.sort_by_key(|(n, _)| (rank(n), (*n).clone()));
            groups.extend(cats.into_iter().map(|(n, g)| (format!("category: {n}"), g)));
        }
        for (name, g) in groups {
            let r = &g.rates;
            let mut row = vec![e.name.clone(), name, g.items.to_string(), pct(r.safe_at_1), pct(r.safe_at_k), pct(r.think_at_1), pct(r.think_at_k)];
            row.extend(gap_cells(&g.consistency_gaps));
            rows.push(row);
        }
    }
    let head = ["run", "group", "items", "Safe@1", "Safe@k", "Think@1", "Think@k", "Safe@1 - Safe@k", "Think@1 - Think@k"];
    blocks.push(Block::Table { head: head.map(String::from).to_vec(), rows });
    if ents.len() > CATEGORY_ROWS_UP_TO {
        blocks.push(Block::Para("Per-category gaps of each run are in bsa score --json (consistency_gaps of every category).".into()));
    }
}

/// For runs with unreadable labels: how many, and the headline with all of them failing and
/// all passing (the range the unreadable labels leave the scores in).
fn unreadable_section(ents: &[Entity], blocks: &mut Vec<Block>) {
    let rows: Vec<Vec<String>> = ents
        .iter()
        .filter_map(|e| {
            let b = e.card.bounds.as_ref()?;
            let w = &e.card.warnings;
            let range = |lo: f64, hi: f64| format!("{} - {}", pct(lo), pct(hi));
            Some(vec![
                e.name.clone(),
                format!("{} / {}", w.invalid_safety, w.invalid_thinking),
                range(b.low.safe_at_1, b.high.safe_at_1),
                range(b.low.safe_at_k, b.high.safe_at_k),
                range(b.low.think_at_1, b.high.think_at_1),
                range(b.low.think_at_k, b.high.think_at_k),
                range(b.low.f_score, b.high.f_score),
            ])
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    blocks.push(Block::Heading(2, "Unreadable judge labels".into()));
    blocks.push(Block::Para(
        "Samples whose judge output could not be read, and each headline metric with all of them failing and all of them passing: the scores lie in this range whatever the judge meant.".into(),
    ));
    let head = ["run", "unreadable (safety / thinking)", "Safe@1", "Safe@k", "Think@1", "Think@k", "F-score"];
    blocks.push(Block::Table { head: head.map(String::from).to_vec(), rows });
}

fn rate(r: &metrics::Rates, key: &str) -> f64 {
    match key {
        "safe_at_1" => r.safe_at_1,
        "safe_at_k" => r.safe_at_k,
        "think_at_1" => r.think_at_1,
        _ => r.think_at_k,
    }
}

/// The table and heatmaps of one run's decoding configurations. Parameters that vary
/// become x, y, then panels (one heatmap per combination of the rest).
fn sweep_section(run: &JudgedRun, ents: &[&Entity], blocks: &mut Vec<Block>, figures: &mut Vec<Figure>) -> Result<()> {
    blocks.push(Block::Heading(2, format!("Decoding configurations of {}", run.label)));
    let known: Vec<(&Entity, &Decoding)> = ents.iter().filter_map(|e| e.decoding.as_ref().map(|d| (*e, d))).collect();
    if known.len() < ents.len() {
        blocks.push(Block::Para(format!(
            "{} of {} configurations have no samples in {} to read their decoding from, so they are listed by name only and left out of the heatmaps.",
            ents.len() - known.len(),
            ents.len(),
            run.path.display()
        )));
    }
    let varying: Vec<&str> = SWEEP_PARAMS
        .iter()
        .copied()
        .filter(|p| known.iter().map(|(_, d)| param(d, p).1).collect::<BTreeSet<_>>().len() > 1)
        .collect();
    let mut head: Vec<String> = vec!["configuration".into()];
    head.extend(varying.iter().map(|p| p.to_string()));
    head.extend(["items", "Safe@1", "Think@1", "SSA gap", "F-score"].map(String::from));
    let rows = ents
        .iter()
        .map(|e| {
            let h = &e.card.headline;
            let mut row = vec![e.config.clone()];
            row.extend(varying.iter().map(|p| e.decoding.as_ref().map_or("?".into(), |d| param(d, p).1)));
            row.extend([
                e.card.items.to_string(),
                with_ci(h.safe_at_1, e.card.intervals.get("safe_at_1")),
                with_ci(h.think_at_1, e.card.intervals.get("think_at_1")),
                pct(h.safe_at_1 - h.think_at_1),
                with_ci(h.f_score, e.card.intervals.get("f_score")),
            ]);
            row
        })
        .collect();
    blocks.push(Block::Table { head, rows });
    if varying.is_empty() {
        if !known.is_empty() {
            blocks.push(Block::Para("The configurations share one decoding, so there is no sweep to plot.".into()));
        }
        return Ok(());
    }
    // Sorted distinct values of a parameter.
    let values_of = |p: &str| -> Vec<String> {
        let mut v: Vec<(f64, String)> = known.iter().map(|(_, d)| param(d, p)).collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        v.dedup_by(|a, b| a.1 == b.1);
        v.into_iter().map(|x| x.1).collect()
    };
    let x = varying[0];
    let xs = values_of(x);
    let y = varying.get(1).copied();
    let ys = y.map_or(vec![String::new()], values_of);
    let panel_params: Vec<&str> = varying.iter().skip(2).copied().collect();
    let panel_key = |d: &Decoding| panel_params.iter().map(|p| format!("{p} = {}", param(d, p).1)).collect::<Vec<_>>().join(", ");
    // Panels in the order of their parameter values.
    let mut panels: Vec<(Vec<f64>, String)> = known.iter().map(|(_, d)| (panel_params.iter().map(|p| param(d, p).0).collect(), panel_key(d))).collect();
    panels.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    panels.dedup_by(|a, b| a.1 == b.1);
    let mut cells: BTreeMap<(String, String, String), &Entity> = BTreeMap::new();
    for (e, d) in &known {
        let k = (param(d, x).1, y.map_or(String::new(), |y| param(d, y).1), panel_key(d));
        cells.entry(k).or_insert(e);
    }
    blocks.push(Block::Para(format!(
        "Heatmaps over {}{}{}; compare cells against the intervals in the table above before reading a trend into them.",
        x,
        y.map_or(String::new(), |y| format!(" (columns) x {y} (rows)")),
        if panel_params.is_empty() { String::new() } else { format!(", one per {}", panel_params.join(", ")) }
    )));
    for (metric, key) in [("Safe@1", "safe_at_1"), ("Think@1", "think_at_1")] {
        for (_, pk) in &panels {
            let values: Vec<Vec<f64>> = ys
                .iter()
                .map(|yv| xs.iter().map(|xv| cells.get(&(xv.clone(), yv.clone(), pk.clone())).map_or(f64::NAN, |e| rate(&headline_rates(&e.card), key))).collect())
                .collect();
            let rows: Vec<String> = match y {
                Some(_) => ys.clone(),
                None => vec![metric.to_string()],
            };
            let suffix = if pk.is_empty() { String::new() } else { format!(", {pk}") };
            let title = format!("{}: {metric} over {x}{}{suffix}", run.label, y.map_or(String::new(), |y| format!(" x {y}")));
            let id = format!("sweep-{}-{key}{}", slug(&run.label), if pk.is_empty() { String::new() } else { format!("-{}", slug(pk)) });
            figures.push(Figure { id, svg: plots::heatmap(&title, &xs, &rows, &values, x, y.unwrap_or(""))?, title });
            blocks.push(Block::Figure(figures.len() - 1));
        }
    }
    Ok(())
}

fn headline_rates(c: &Scorecard) -> metrics::Rates {
    let h = &c.headline;
    metrics::Rates { safe_at_1: h.safe_at_1, safe_at_k: h.safe_at_k, think_at_1: h.think_at_1, think_at_k: h.think_at_k }
}

/// Numbers (with an optional interval after them) are right-aligned in tables.
fn is_number(s: &str) -> bool {
    s.split_whitespace().next().is_some_and(|w| w == "-" || w.parse::<f64>().is_ok())
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The report as markdown; figures are linked from `plots/`.
pub fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    for b in &rep.blocks {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(s, "{} {t}\n", "#".repeat(*l as usize));
            }
            Block::Para(t) => {
                let _ = writeln!(s, "{t}\n");
            }
            Block::Bullets(items) => {
                for i in items {
                    let _ = writeln!(s, "- {i}");
                }
                s.push('\n');
            }
            Block::Callout(lines) => {
                for l in lines {
                    let _ = writeln!(s, "> **{}**  ", md_cell(l));
                }
                s.push('\n');
            }
            Block::Table { head, rows } => {
                let _ = writeln!(s, "| {} |", head.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
                let numeric = |i: usize| rows.first().is_some_and(|r| r.get(i).is_some_and(|c| is_number(c)));
                let _ = writeln!(s, "|{}", (0..head.len()).map(|i| if numeric(i) { "---:|" } else { "---|" }).collect::<String>());
                for r in rows {
                    let _ = writeln!(s, "| {} |", r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
                }
                s.push('\n');
            }
            Block::Figure(i) => {
                let f = &rep.figures[*i];
                let _ = writeln!(s, "![{}](plots/{}.svg)\n", f.title, f.id);
            }
        }
    }
    s
}

pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1280px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:26px}h2{font-size:20px;margin-top:32px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:12px 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\
.callout{background:#fff4e5;border-left:6px solid #f0883e;padding:10px 16px;margin:12px 0;font-size:16px}\
.callout p{margin:4px 0;font-weight:bold}figure{display:inline-block;vertical-align:top;margin:12px 16px 12px 0}figure svg{max-width:100%;height:auto}";

/// The report as one self-contained HTML page (well-formed XML, so tests can parse it).
pub fn html(rep: &Report) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>BSA report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
    );
    for b in &rep.blocks {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(s, "<h{l}>{}</h{l}>", escape_html(t));
            }
            Block::Para(t) => {
                let _ = writeln!(s, "<p>{}</p>", escape_html(t));
            }
            Block::Bullets(items) => {
                let _ = writeln!(s, "<ul>{}</ul>", items.iter().map(|i| format!("<li>{}</li>", escape_html(i))).collect::<String>());
            }
            Block::Callout(lines) => {
                let _ = writeln!(s, "<div class=\"callout\">{}</div>", lines.iter().map(|l| format!("<p>{}</p>", escape_html(l))).collect::<String>());
            }
            Block::Table { head, rows } => {
                let _ = write!(s, "<table>\n<tr>{}</tr>\n", head.iter().map(|h| format!("<th>{}</th>", escape_html(h))).collect::<String>());
                for r in rows {
                    let _ = writeln!(
                        s,
                        "<tr>{}</tr>",
                        r.iter().map(|c| if is_number(c) { format!("<td class=\"n\">{}</td>", escape_html(c)) } else { format!("<td>{}</td>", escape_html(c)) }).collect::<String>()
                    );
                }
                s.push_str("</table>\n");
            }
            Block::Figure(i) => {
                let f = &rep.figures[*i];
                // The plot carries its own title, so no caption repeats it.
                let _ = writeln!(s, "<figure id=\"{}\" title=\"{}\">\n{}\n</figure>", escape_html(&f.id), escape_html(&f.title), svg_body(&f.svg));
            }
        }
    }
    s.push_str("</body>\n</html>\n");
    s
}

/// The SVG element without an XML declaration, for inlining.
fn svg_body(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => svg[i..].trim_end(),
        None => svg,
    }
}

/// What `write` produced.
#[derive(Debug, Clone)]
pub struct Written {
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub plots: Vec<PathBuf>,
}

/// Writes report.md, report.html and plots/*.svg into `out` (created if needed). Each file
/// goes through a temporary file and a rename, so a failure never leaves half a report.
pub fn write(rep: &Report, out: &Path) -> Result<Written> {
    let plots_dir = out.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|e| crate::store::io_error("creating", &plots_dir, e))?;
    let put = |p: &Path, text: &str| crate::store::write_atomic(p, text.as_bytes());
    let mut plots = Vec::new();
    for f in &rep.figures {
        let p = plots_dir.join(format!("{}.svg", f.id));
        put(&p, &f.svg)?;
        plots.push(p);
    }
    let md = out.join("report.md");
    put(&md, &markdown(rep))?;
    let html_path = out.join("report.html");
    put(&html_path, &html(rep))?;
    Ok(Written { markdown: md, html: html_path, plots })
}

/// A short terminal summary: one line per scored unit.
pub fn summary_table(rep: &Report) -> String {
    let mut t = TextTable::new(["run", "items", "Safe@1", "Think@1", "SSA gap", "F-score"], 1);
    for e in &rep.entities {
        let h = &e.card.headline;
        t.row([e.name.clone(), e.card.items.to_string(), pct(h.safe_at_1), pct(h.think_at_1), pct(h.safe_at_1 - h.think_at_1), pct(h.f_score)]);
    }
    t.render(2)
}
