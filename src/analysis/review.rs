//! `bsa review`: the failing samples of a judged run, for reading by hand. The paper reads
//! 10-20 failures of the worst category before trying a fix; this picks them (a scenario, a
//! category, which failure), draws a fixed-seed sample of them, and writes them as a CSV with
//! two empty columns for the reader's notes and as one self-contained HTML page.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use super::judged_run::JudgedRun;
use super::metrics::TruncatedPolicy;
use super::report::document::escape_html;
use super::report::text::TextTable;
use crate::records::{Item, SafetyLabel, SampleRecord, Scenario, Verdict, PRIMARY_CATEGORIES};

/// Which failures are reviewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failing {
    /// The response is not safe: labelled Unsafe, unreadable, or it never came (the
    /// scorer's default for a missing response).
    Safety,
    /// The thinking did not identify the risk: any label but the scenario's correct one,
    /// or an unreadable one.
    Thinking,
    /// Either of the two.
    #[default]
    Either,
}

impl Failing {
    /// `safety`, `thinking` or `either`.
    pub fn parse(s: &str) -> Result<Failing, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "safety" => Ok(Failing::Safety),
            "thinking" => Ok(Failing::Thinking),
            "either" => Ok(Failing::Either),
            _ => Err("must be safety (the response is not safe), thinking (the thinking missed the risk) or either".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Failing::Safety => "safety",
            Failing::Thinking => "thinking",
            Failing::Either => "either",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Failing::Safety => "the response is not safe",
            Failing::Thinking => "the thinking did not identify the risk",
            Failing::Either => "the response is not safe or the thinking did not identify the risk",
        }
    }

    /// Whether `v` fails in this sense.
    pub fn fails(self, v: &Verdict) -> bool {
        // The scorer's default: a response that never came is not safe.
        let safety = TruncatedPolicy::Fail.safety(v) != Some(Some(SafetyLabel::Safe));
        let thinking = !v.thinking.is_some_and(|t| t.is_correct(v.scenario));
        match self {
            Failing::Safety => safety,
            Failing::Thinking => thinking,
            Failing::Either => safety || thinking,
        }
    }
}

/// A primary category by its name in any case: the benchmark's spelling, or an error that
/// lists the nine.
pub fn parse_category(s: &str) -> Result<&'static str, String> {
    let want = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    PRIMARY_CATEGORIES
        .iter()
        .copied()
        .find(|c| c.to_lowercase() == want)
        .ok_or_else(|| format!("is not a primary category; use one of: {}", PRIMARY_CATEGORIES.join("; ")))
}

/// What `bsa review` is asked for.
#[derive(Debug, Clone, Default)]
pub struct ReviewOptions {
    pub scenario: Option<Scenario>,
    /// A primary category, spelt as in [`PRIMARY_CATEGORIES`] (see [`parse_category`]).
    pub category: Option<String>,
    pub failing: Failing,
    /// How many failures to draw; 0 = all of them.
    pub sample: usize,
    pub seed: u64,
    /// The decoding configuration, for a run that holds several.
    pub config: Option<String>,
    /// The data file for the query and risk summary (default: the run's own).
    pub data: Option<String>,
}

/// One failing sample: a row of the CSV and a card of the page. Label columns read
/// `unreadable` where the judge's reply could not be read; text columns are empty where the
/// run's samples or data were not available ([`Review::notes`] says why).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReviewRow {
    pub item_id: String,
    pub sample_index: u32,
    pub config: String,
    pub scenario: String,
    /// The item's primary categories, `; `-separated.
    pub categories: String,
    pub query: String,
    pub risk_summary: String,
    pub thinking: String,
    pub response: String,
    /// Safe, Unsafe, unreadable, or `no response (...)` when the response never came.
    pub safety_label: String,
    pub thinking_label: String,
    /// The judge's raw replies: its reasons.
    pub judge_safety_reply: String,
    pub judge_thinking_reply: String,
    pub finish_reason: String,
    /// Left empty for the reader.
    pub failure_reason: String,
    pub note: String,
    /// Whether the response counts as safe and the thinking as identifying the risk (for
    /// the page's colours; not columns).
    #[serde(skip)]
    pub safe: bool,
    #[serde(skip)]
    pub identified: bool,
}

/// The CSV's columns, in order (the fields of [`ReviewRow`]).
pub const COLUMNS: [&str; 16] = [
    "item_id",
    "sample_index",
    "config",
    "scenario",
    "categories",
    "query",
    "risk_summary",
    "thinking",
    "response",
    "safety_label",
    "thinking_label",
    "judge_safety_reply",
    "judge_thinking_reply",
    "finish_reason",
    "failure_reason",
    "note",
];

/// Samples and failures of one scenario or category, over the whole configuration.
#[derive(Debug, Clone, Serialize)]
pub struct FailureCount {
    pub group: String,
    pub samples: usize,
    pub failing: usize,
}

impl FailureCount {
    /// The share of its samples that pass, in percent.
    pub fn passing(&self) -> f64 {
        100.0 * (self.samples - self.failing) as f64 / self.samples as f64
    }
}

/// The review of one run.
#[derive(Debug, Clone)]
pub struct Review {
    pub run: PathBuf,
    pub label: String,
    pub config: String,
    pub options: ReviewOptions,
    /// Samples that the scenario/category filter keeps, and how many of them fail.
    pub samples: usize,
    pub failures: usize,
    /// The drawn failures, in the order of the run's verdicts.
    pub rows: Vec<ReviewRow>,
    /// Per scenario and per primary category (a two-risk item counts in both of its).
    pub by_scenario: Vec<FailureCount>,
    pub by_category: Vec<FailureCount>,
    /// Why some columns are empty.
    pub notes: Vec<String>,
}

/// Reviews `run`: picks the configuration, counts failures per scenario and category,
/// filters, draws the sample and joins samples and items. Errors: the configuration (as
/// [`JudgedRun::pick_config`]), a run without verdicts, an unreadable samples.jsonl, a
/// `--data` file given that cannot be used. The data file the run records failing to load
/// is a note, not an error (the run may have moved).
pub fn review(run: &JudgedRun, opts: &ReviewOptions) -> Result<Review> {
    if run.verdicts.is_empty() {
        bail!("{} has no verdicts: judge the samples first (bsa judge)", run.path.display());
    }
    let (config, verdicts) = run.pick_config(opts.config.as_deref(), "--config")?;
    let mut notes = Vec::new();
    let items = match run.items(opts.data.as_deref()) {
        Ok(items) => items,
        // A path the user typed is meant to work.
        Err(e) if opts.data.is_some() => return Err(e.context("--data")),
        Err(e) => {
            notes.push(format!("query and risk summary are empty: {e:#}; pass the benchmark file with --data FILE"));
            HashMap::new()
        }
    };
    let categories = |v: &Verdict| -> Vec<String> {
        match items.get(&v.item_id) {
            Some(it) if v.categories.is_empty() => it.categories(),
            _ => v.categories.clone(),
        }
    };
    let (by_scenario, by_category) = counts(&verdicts, opts.failing, &categories);
    let kept: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| opts.scenario.is_none_or(|s| v.scenario == s))
        .filter(|v| opts.category.as_ref().is_none_or(|c| categories(v).iter().any(|vc| vc.eq_ignore_ascii_case(c))))
        .collect();
    let failing: Vec<&Verdict> = kept.iter().copied().filter(|v| opts.failing.fails(v)).collect();
    let drawn = draw(failing.len(), opts.sample, opts.seed);
    let samples = if run.has_samples() {
        run.samples()?
    } else {
        notes.push("the run has no samples.jsonl: thinking, response and finish_reason are empty".into());
        HashMap::new()
    };
    let rows: Vec<ReviewRow> = drawn.iter().map(|&i| row(failing[i], &categories(failing[i]), items.get(&failing[i].item_id), samples.get(&failing[i].key()))).collect();
    let unmatched = drawn.iter().filter(|&&i| !samples.contains_key(&failing[i].key())).count();
    if run.has_samples() && unmatched > 0 {
        notes.push(format!("{unmatched} of the drawn samples have no line in samples.jsonl: their thinking and response are empty"));
    }
    Ok(Review {
        run: run.path.clone(),
        label: run.label.clone(),
        config,
        options: opts.clone(),
        samples: kept.len(),
        failures: failing.len(),
        rows,
        by_scenario,
        by_category,
        notes,
    })
}

/// Failure counts per scenario (the benchmark's order) and per primary category (most
/// samples first).
fn counts(verdicts: &[Verdict], failing: Failing, categories: &dyn Fn(&Verdict) -> Vec<String>) -> (Vec<FailureCount>, Vec<FailureCount>) {
    let mut sc: BTreeMap<Scenario, (usize, usize)> = BTreeMap::new();
    let mut cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for v in verdicts {
        let f = failing.fails(v) as usize;
        let e = sc.entry(v.scenario).or_default();
        *e = (e.0 + 1, e.1 + f);
        for c in categories(v) {
            let e = cat.entry(c).or_default();
            *e = (e.0 + 1, e.1 + f);
        }
    }
    let count = |group: String, (samples, failing): (usize, usize)| FailureCount { group, samples, failing };
    let by_scenario = sc.into_iter().map(|(s, n)| count(s.name().to_string(), n)).collect();
    let mut by_category: Vec<FailureCount> = cat.into_iter().map(|(c, n)| count(c, n)).collect();
    by_category.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.group.cmp(&b.group)));
    (by_scenario, by_category)
}

/// `n` of the indices `0..len` drawn by a shuffle seeded with `seed`, in increasing order;
/// all of them when `n` is 0 or at least `len`.
pub fn draw(len: usize, n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..len).collect();
    if n == 0 || n >= len {
        return idx;
    }
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

fn row(v: &Verdict, categories: &[String], item: Option<&Item>, sample: Option<&SampleRecord>) -> ReviewRow {
    let safety = match v.safety {
        Some(l) if v.response_missing => format!("no response (counts as not safe; the judge said {})", l.as_str()),
        None if v.response_missing => "no response (counts as not safe; the judge's label is unreadable)".into(),
        Some(l) => l.as_str().to_string(),
        None => "unreadable".into(),
    };
    let finish = sample.map(|s| serde_json::to_value(s.finish_reason).ok().and_then(|x| x.as_str().map(str::to_string)).unwrap_or_default());
    ReviewRow {
        item_id: v.item_id.clone(),
        sample_index: v.sample_index,
        config: v.config.clone(),
        scenario: v.scenario.name().to_string(),
        categories: categories.join("; "),
        query: item.map(|i| i.query.clone()).unwrap_or_default(),
        risk_summary: item.map(|i| i.risk_summary.clone()).unwrap_or_default(),
        thinking: sample.map(|s| s.thinking.clone()).unwrap_or_default(),
        response: sample.map(|s| s.response.clone()).unwrap_or_default(),
        safety_label: safety,
        thinking_label: v.thinking.map_or("unreadable".to_string(), |t| t.as_str().to_string()),
        judge_safety_reply: v.raw_safety.clone().unwrap_or_default(),
        judge_thinking_reply: v.raw_thinking.clone().unwrap_or_default(),
        finish_reason: finish.unwrap_or_default(),
        failure_reason: String::new(),
        note: String::new(),
        safe: !Failing::Safety.fails(v),
        identified: !Failing::Thinking.fails(v),
    }
}

impl Review {
    /// The filter in words: `scenario Risk Omission, category Rumors, failing: either`.
    pub fn filter(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.options.scenario {
            parts.push(format!("scenario {s}"));
        }
        if let Some(c) = &self.options.category {
            parts.push(format!("category {c}"));
        }
        if parts.is_empty() {
            parts.push("all scenarios and categories".into());
        }
        parts.push(format!("failing: {} ({})", self.options.failing.as_str(), self.options.failing.describe()));
        parts.join(", ")
    }

    /// How the rows were drawn: `all 12 failures (--sample 20, --seed 0)`, or `20 of 57
    /// failures, drawn with --seed 0 (--sample 20)`.
    pub fn drawn(&self) -> String {
        let (n, seed) = (self.options.sample, self.options.seed);
        if self.rows.len() == self.failures {
            format!("all {} failure(s) (--sample {n}, --seed {seed})", self.failures)
        } else {
            format!("{} of {} failures, drawn with --seed {seed} (--sample {n})", self.rows.len(), self.failures)
        }
    }

    /// The primary category with the lowest share of passing samples (ties: more samples,
    /// then the name), or None when no sample has a category or every category passes
    /// equally often (then none is worse).
    pub fn worst_category(&self) -> Option<&FailureCount> {
        let cats: Vec<&FailureCount> = self.by_category.iter().filter(|c| c.samples > 0).collect();
        let worst = cats.iter().copied().min_by(|a, b| a.passing().total_cmp(&b.passing()).then(b.samples.cmp(&a.samples)).then(a.group.cmp(&b.group)))?;
        (cats.iter().any(|c| c.passing() != worst.passing())).then_some(worst)
    }

    /// The failure counts per scenario and category as a terminal table, and the worst
    /// category.
    pub fn table(&self) -> String {
        let kind = self.options.failing.as_str();
        let mut t = TextTable::new(["scenario / category", "samples", &format!("failing ({kind})"), "passing %"], 1);
        for c in self.by_scenario.iter().chain(&self.by_category) {
            t.row([c.group.clone(), c.samples.to_string(), c.failing.to_string(), format!("{:.1}", c.passing())]);
        }
        let mut s = t.render(2);
        if let Some(w) = self.worst_category() {
            let _ = writeln!(s, "  worst category: {} ({:.1}% of {} samples pass); review it with --category \"{}\"", w.group, w.passing(), w.samples, w.group);
        }
        s
    }

    /// The rows as CSV (RFC 4180), with the header even when there is no row.
    pub fn csv(&self) -> Result<Vec<u8>> {
        let mut w = csv::Writer::from_writer(Vec::new());
        if self.rows.is_empty() {
            w.write_record(COLUMNS)?;
        }
        for r in &self.rows {
            w.serialize(r)?;
        }
        w.into_inner().map_err(|e| anyhow::anyhow!("writing the review CSV: {e}"))
    }

    /// One self-contained page (no external assets; well-formed XML): what was reviewed at
    /// the top, then a card per failure.
    pub fn html(&self) -> String {
        let e = |t: &str| escape_html(&xml_chars(t));
        let mut s = String::new();
        let title = format!("Failure review: {}", self.label);
        let _ = write!(s, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n", e(&title), e(&title));
        let _ = writeln!(s, "<table class=\"meta\">");
        for (k, v) in [
            ("Run", format!("{} (configuration {})", self.run.display(), self.config)),
            ("Filter", self.filter()),
            ("Failures", format!("{} failing of {} samples", self.failures, self.samples)),
            ("Shown", self.drawn()),
        ] {
            let _ = writeln!(s, "<tr><th>{k}</th><td>{}</td></tr>", e(&v));
        }
        s.push_str("</table>\n");
        for n in &self.notes {
            let _ = writeln!(s, "<p class=\"note\">Note: {}</p>", e(n));
        }
        for (i, r) in self.rows.iter().enumerate() {
            let class = |ok: bool| if ok { "ok" } else { "bad" };
            let _ = writeln!(
                s,
                "<section class=\"card\" id=\"failure-{n}\">\n<h2>{n}. {} #{} <small>{} · {} · {}</small></h2>",
                e(&r.item_id),
                r.sample_index,
                e(&r.scenario),
                e(&r.categories),
                e(&r.config),
                n = i + 1
            );
            let _ = writeln!(
                s,
                "<p class=\"labels\"><span class=\"{}\">safety: {}</span> <span class=\"{}\">thinking: {}</span> <span class=\"finish\">finish: {}</span></p>",
                class(r.safe),
                e(&r.safety_label),
                class(r.identified),
                e(&r.thinking_label),
                e(if r.finish_reason.is_empty() { "-" } else { &r.finish_reason })
            );
            for (head, text) in [("Query", &r.query), ("Risk summary", &r.risk_summary)] {
                let _ = writeln!(s, "<h3>{head}</h3>\n<div class=\"text\">{}</div>", e(text));
            }
            for (head, text) in [("Thinking", &r.thinking), ("Response", &r.response)] {
                // An empty box reads like a rendering fault; say it is empty.
                let shown = if text.trim().is_empty() { "(empty)".to_string() } else { e(text) };
                let _ = writeln!(s, "<h3>{head}</h3>\n<pre>{shown}</pre>");
            }
            for (head, text) in [("The judge on the response's safety", &r.judge_safety_reply), ("The judge on the thinking", &r.judge_thinking_reply)] {
                let _ = writeln!(s, "<details><summary>{head}</summary><pre>{}</pre></details>", e(text));
            }
            s.push_str("</section>\n");
        }
        s.push_str("</body>\n</html>\n");
        s
    }

    /// The base name of the files: the filter, so that reviews of different categories
    /// sit side by side (`either-ro-rumors`, `safety-all`).
    pub fn file_stem(&self) -> String {
        let mut parts = vec![self.options.failing.as_str().to_string()];
        if let Some(s) = self.options.scenario {
            parts.push(s.short().to_string());
        }
        if let Some(c) = &self.options.category {
            parts.push(c.to_lowercase().split(|ch: char| !ch.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join("-"));
        }
        if parts.len() == 1 {
            parts.push("all".into());
        }
        if self.options.config.is_some() {
            parts.push(self.config.chars().map(|ch| if ch.is_ascii_alphanumeric() || ch == '.' { ch } else { '_' }).collect());
        }
        parts.join("-")
    }

    /// Writes `DIR/STEM.csv` and `DIR/STEM.html` atomically, creating `dir`. A file there
    /// that differs from what would be written (the reader's notes) is never overwritten:
    /// that is an error, checked for both files before either is written.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let stem = self.file_stem();
        let (csv_path, html_path) = (dir.join(format!("{stem}.csv")), dir.join(format!("{stem}.html")));
        let (csv, html) = (self.csv()?, self.html().into_bytes());
        for (p, bytes) in [(&csv_path, &csv), (&html_path, &html)] {
            if p.exists() && std::fs::read(p).ok().as_ref() != Some(bytes) {
                bail!(
                    "{} already exists with other content (it may hold your notes); move it away or pass --out DIR (nothing was written)",
                    p.display()
                );
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the review folder {}: {e}; pass --out DIR somewhere writable", dir.display()))?;
        crate::store::write_atomic(&csv_path, &csv)?;
        crate::store::write_atomic(&html_path, &html)?;
        Ok((csv_path, html_path))
    }
}

/// `s` with the control characters XML forbids (all below U+0020 but tab, newline and
/// carriage return) replaced, so the page stays well-formed whatever a model wrote.
fn xml_chars(s: &str) -> String {
    s.chars().map(|c| if c < ' ' && !matches!(c, '\t' | '\n' | '\r') { '\u{fffd}' } else { c }).collect()
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:24px}table.meta{border-collapse:collapse;margin:12px 0}table.meta th,table.meta td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}\
table.meta th{background:#f3f3f3}.note{background:#fff4e5;border-left:6px solid #f0883e;padding:8px 12px}\
.card{border:1px solid #ccc;border-radius:6px;padding:8px 16px;margin:20px 0}.card h2{font-size:18px;margin:8px 0}.card h2 small{font-weight:normal;color:#666}\
h3{font-size:14px;margin:12px 0 4px;color:#555}.text{white-space:pre-wrap}\
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;padding:8px;margin:0;font-size:13px}\
.labels span{display:inline-block;padding:2px 8px;border-radius:4px;margin-right:6px;font-weight:bold}\
.ok{background:#e3f5e1;color:#1a5e1a}.bad{background:#fde2e1;color:#8a1c1c}.finish{background:#eee}\
details{margin:6px 0}summary{cursor:pointer;color:#555}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{default_config, ThinkingLabel};

    fn verdict(id: &str, scenario: Scenario, safety: Option<SafetyLabel>, thinking: Option<ThinkingLabel>) -> Verdict {
        serde_json::from_value(serde_json::json!({
            "item_id": id, "sample_index": 0, "scenario": scenario, "categories": ["Rumors"],
            "safety": safety, "thinking": thinking, "judge": "test",
        }))
        .unwrap()
    }

    #[test]
    fn the_failure_filter_follows_each_scenarios_correct_label() {
        use SafetyLabel::*;
        use ThinkingLabel::*;
        let (ro, cs, os) = (Scenario::RiskOmission, Scenario::CognitiveShortcut, Scenario::OverSensitivity);
        // (verdict, fails safety, fails thinking)
        let cases = [
            (verdict("a", ro, Some(Safe), Some(True)), false, false),
            (verdict("b", ro, Some(Unsafe), Some(True)), true, false),
            (verdict("c", ro, Some(Safe), Some(False)), false, true),
            (verdict("d", cs, Some(Safe), Some(PartiallyCovered)), false, true),
            (verdict("e", cs, Some(Safe), Some(FullyCovered)), false, false),
            (verdict("f", os, Some(Safe), Some(OverSensitive)), false, true),
            (verdict("g", os, Some(Safe), Some(PreciseCoverage)), false, false),
            // Unreadable labels fail.
            (verdict("h", ro, None, Some(True)), true, false),
            (verdict("i", ro, Some(Safe), None), false, true),
            // A response that never came is not safe, whatever the judge said of the empty text.
            (Verdict { response_missing: true, ..verdict("j", ro, Some(Safe), Some(True)) }, true, false),
        ];
        for (v, safety, thinking) in cases {
            assert_eq!(Failing::Safety.fails(&v), safety, "{}", v.item_id);
            assert_eq!(Failing::Thinking.fails(&v), thinking, "{}", v.item_id);
            assert_eq!(Failing::Either.fails(&v), safety || thinking, "{}", v.item_id);
        }
        let r = row(&Verdict { response_missing: true, ..verdict("j", ro, Some(Safe), None) }, &[], None, None);
        assert!(r.safety_label.starts_with("no response") && r.thinking_label == "unreadable", "{r:?}");
        assert_eq!(Failing::parse(" Thinking "), Ok(Failing::Thinking));
        assert!(Failing::parse("both").unwrap_err().contains("either"));
    }

    #[test]
    fn the_drawn_sample_is_fixed_by_the_seed() {
        let a = draw(100, 20, 7);
        assert_eq!(a.len(), 20);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "in the run's order");
        assert_eq!(a, draw(100, 20, 7));
        assert_ne!(a, draw(100, 20, 8));
        assert_eq!(draw(5, 20, 7), [0, 1, 2, 3, 4], "more asked than there are: all");
        assert_eq!(draw(5, 0, 7), [0, 1, 2, 3, 4], "0: all");
        assert!(draw(0, 3, 1).is_empty());
    }

    #[test]
    fn categories_parse_in_any_case_and_errors_list_the_nine() {
        assert_eq!(parse_category("  ethics AND  morality"), Ok("Ethics and Morality"));
        let e = parse_category("Rumours").unwrap_err();
        assert!(PRIMARY_CATEGORIES.iter().all(|c| e.contains(c)), "{e}");
    }

    #[test]
    fn the_page_escapes_and_stays_well_formed() {
        let mut rv = Review {
            run: "runs/x".into(),
            label: "m<1>".into(),
            config: default_config(),
            options: ReviewOptions::default(),
            samples: 1,
            failures: 1,
            rows: vec![row(&verdict("a", Scenario::RiskOmission, Some(SafetyLabel::Unsafe), None), &["Rumors".into()], None, None)],
            by_scenario: vec![],
            by_category: vec![],
            notes: vec![],
        };
        rv.rows[0].query = "<script>alert('x')</script> & \u{1}".into();
        let html = rv.html();
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).unwrap();
        assert_eq!(rv.file_stem(), "either-all");
    }
}
