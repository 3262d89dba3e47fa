//! `bsa agree`: how often two sets of labels for the same samples agree (two judges, or a
//! judge and a human), per label family, with Cohen's kappa, confusion matrices and a sheet
//! of the disagreements for human review. The paper reports that its judge disagrees with
//! human annotators on about 6% of samples; this is how a user measures their own judge.
//!
//! Samples are matched by (item, sample index, configuration). Intervals come from a
//! bootstrap over items (the samples of one item are not independent), stratified by
//! scenario like the metrics' intervals.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::records::{Item, Scenario};
use crate::records::SampleRecord;
use super::bootstrap::{percentile_interval, resample_weights, Interval};
use super::judged_run::JudgedRun;
use super::metrics::scenario_index;
use super::report::text::TextTable;
use crate::progress::progress_bar;
use crate::records::{ThinkingLabel, Verdict};

/// One kind of label two judges can agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelFamily {
    /// Response safety: Safe / Unsafe.
    Safety,
    /// The thinking label of one scenario's rubric (2 or 3 labels).
    Thinking(Scenario),
    /// Whether the thinking identified the risk, all scenarios pooled (what Think@1 counts).
    ThinkingIdentified,
}

impl LabelFamily {
    pub const ALL: [LabelFamily; 5] = [
        LabelFamily::Safety,
        LabelFamily::Thinking(Scenario::RiskOmission),
        LabelFamily::Thinking(Scenario::CognitiveShortcut),
        LabelFamily::Thinking(Scenario::OverSensitivity),
        LabelFamily::ThinkingIdentified,
    ];

    pub fn name(self) -> String {
        match self {
            LabelFamily::Safety => "response safety".into(),
            LabelFamily::Thinking(s) => format!("thinking, {}", s.name()),
            LabelFamily::ThinkingIdentified => "thinking identified (pooled)".into(),
        }
    }

    pub fn labels(self) -> Vec<&'static str> {
        match self {
            LabelFamily::Safety => vec!["Safe", "Unsafe"],
            LabelFamily::Thinking(s) => ThinkingLabel::allowed(s).iter().map(|l| l.as_str()).collect(),
            LabelFamily::ThinkingIdentified => vec!["identified", "not identified"],
        }
    }

    fn applies(self, v: &Verdict) -> bool {
        match self {
            LabelFamily::Thinking(s) => v.scenario == s,
            _ => true,
        }
    }

    /// The label's index in `labels()`; None when the judge output was unreadable.
    fn label_index(self, v: &Verdict) -> Option<usize> {
        match self {
            LabelFamily::Safety => v.safety.map(|s| (s != crate::records::SafetyLabel::Safe) as usize),
            LabelFamily::Thinking(s) => v.thinking.and_then(|l| ThinkingLabel::allowed(s).iter().position(|x| *x == l)),
            LabelFamily::ThinkingIdentified => v.thinking.map(|l| !l.is_correct(v.scenario) as usize),
        }
    }

    /// The judge's probability of the family's first (passing) label, when it recorded
    /// label probabilities: P(Safe), P(the scenario's correct thinking label).
    fn pass_prob(self, v: &Verdict) -> Option<f64> {
        match self {
            LabelFamily::Safety => v.safety_probs.as_ref()?.get("Safe").copied(),
            _ => v.thinking_probs.as_ref()?.get(ThinkingLabel::correct(v.scenario).as_str()).copied(),
        }
    }

    fn raw(self, v: &Verdict) -> Option<&str> {
        match self {
            LabelFamily::Safety => v.raw_safety.as_deref(),
            _ => v.raw_thinking.as_deref(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgreeOptions {
    pub resamples: usize,
    pub seed: u64,
    pub confidence: f64,
    /// The data file for the sheet's query and risk summary (default: the run's own).
    pub data: Option<String>,
    /// Fill the sheet's query, risk summary, thinking and response (reads the data file
    /// and samples.jsonl); without it the sheet only has ids, labels and raw judge text.
    pub sheet_text: bool,
    pub progress: bool,
}

impl Default for AgreeOptions {
    fn default() -> Self {
        let s = crate::analysis::metrics::ScoreOptions::default();
        AgreeOptions { resamples: 2000, seed: s.seed, confidence: 0.95, data: None, sheet_text: true, progress: false }
    }
}

/// Agreement on one label family over the matched samples where both labels are readable.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyAgreement {
    pub family: String,
    pub labels: Vec<String>,
    /// Matched samples where both labels are readable.
    pub pairs: usize,
    pub agreeing: usize,
    /// Percent of pairs with the same label.
    pub agreement: f64,
    pub agreement_interval: Interval,
    /// Cohen's kappa; null when undefined (both judges used one and the same label only).
    pub kappa: f64,
    pub kappa_interval: Interval,
    /// confusion[a][b]: samples A labelled labels[a] and B labelled labels[b].
    pub confusion: Vec<Vec<usize>>,
    /// Matched samples whose A (B, both) label of this family was unreadable.
    pub invalid_a: usize,
    pub invalid_b: usize,
    pub invalid_both: usize,
    /// ROC AUC of A's probability of the passing label (Safe, the correct thinking label;
    /// recorded by a local judge under structured output) as a score of B's labels (passing
    /// or not), over the pairs where A has probabilities and B a readable label; None when
    /// A has no probabilities or B's labels are all of one class.
    pub roc_auc_a: Option<RocAuc>,
    /// The same with B's probabilities against A's labels.
    pub roc_auc_b: Option<RocAuc>,
    /// Pairs where A (B) has label probabilities and the other side a readable label.
    pub with_probs_a: usize,
    pub with_probs_b: usize,
}

/// A ROC AUC and what it was computed over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RocAuc {
    pub auc: f64,
    /// Samples the other labelling calls passing / not passing.
    pub positives: usize,
    pub negatives: usize,
}

/// The ROC AUC of `scores` against `positive`: the probability that a random positive
/// scores above a random negative, ties counted half (the Mann–Whitney U statistic over
/// `positives x negatives`; Hanley and McNeil 1982). None without both classes.
pub fn roc_auc(scored: &[(f64, bool)]) -> Option<RocAuc> {
    let positives = scored.iter().filter(|s| s.1).count();
    let negatives = scored.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<&(f64, bool)> = scored.iter().collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the positives' ranks (1-based), tied scores sharing their mean rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let j = (i..order.len()).find(|&j| order[j].0 != order[i].0).unwrap_or(order.len());
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += mean_rank * order[i..j].iter().filter(|s| s.1).count() as f64;
        i = j;
    }
    let u = rank_sum - (positives * (positives + 1)) as f64 / 2.0;
    Some(RocAuc { auc: u / (positives * negatives) as f64, positives, negatives })
}

/// One row of the disagreement sheet.
#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub item_id: String,
    pub sample_index: u32,
    pub config: String,
    pub scenario: String,
    pub family: String,
    pub label_a: String,
    pub label_b: String,
    pub query: String,
    pub risk_summary: String,
    pub thinking: String,
    pub response: String,
    pub raw_a: String,
    pub raw_b: String,
    /// Left empty for the reviewer.
    pub human_label: String,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub a: String,
    pub b: String,
    pub matched: usize,
    pub only_a: usize,
    pub only_b: usize,
    pub items: usize,
    pub families: Vec<FamilyAgreement>,
    pub disagreements: usize,
    pub bootstrap: crate::analysis::metrics::Bootstrap,
    /// Why the sheet lacks queries or thinking text, if it does.
    pub notes: Vec<String>,
    #[serde(skip)]
    pub sheet: Vec<Disagreement>,
}

/// Compares the labels of two runs (or verdict files) sample by sample.
pub fn agree(a: &JudgedRun, b: &JudgedRun, opts: &AgreeOptions) -> Result<Agreement> {
    if !(opts.confidence > 0.0 && opts.confidence < 1.0) {
        bail!("--confidence {} must be strictly between 0 and 1, e.g. 0.95", opts.confidence);
    }
    let b_by_key: HashMap<String, &Verdict> = b.verdicts.iter().map(|v| (v.key(), v)).collect();
    let mut pairs: Vec<(&Verdict, &Verdict)> = Vec::new();
    for va in &a.verdicts {
        if let Some(vb) = b_by_key.get(&va.key()) {
            if va.scenario != vb.scenario {
                bail!(
                    "{}: sample {} is {} in {} but {} in {}; the two runs were made from different data",
                    b.path.display(),
                    va.key(),
                    va.scenario,
                    a.path.display(),
                    vb.scenario,
                    b.path.display()
                );
            }
            pairs.push((va, vb));
        }
    }
    if pairs.is_empty() {
        bail!(
            "{} and {} share no sample (matched by item id, sample index and configuration); agreement needs two labellings of the same samples",
            a.path.display(),
            b.path.display()
        );
    }
    // Items sorted by id, so the bootstrap does not depend on record order.
    pairs.sort_by(|x, y| (&x.0.item_id, x.0.sample_index, &x.0.config).cmp(&(&y.0.item_id, y.0.sample_index, &y.0.config)));
    let mut item_ids: Vec<&str> = pairs.iter().map(|p| p.0.item_id.as_str()).collect();
    item_ids.dedup();
    let item_index: HashMap<&str, usize> = item_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut strata = vec![Vec::new(); 3];
    for p in &pairs {
        let i = item_index[p.0.item_id.as_str()];
        let s = &mut strata[scenario_index(p.0.scenario)];
        if s.last() != Some(&i) {
            s.push(i);
        }
    }

    let bar = progress_bar(opts.progress, (opts.resamples * LabelFamily::ALL.len()) as u64, "agreement bootstrap");
    let mut families = Vec::new();
    for fam in LabelFamily::ALL {
        let nl = fam.labels().len();
        let mut per_item = vec![vec![0u32; nl * nl]; item_ids.len()];
        let (mut inv_a, mut inv_b, mut inv_both) = (0, 0, 0);
        let mut applicable = 0;
        for (va, vb) in &pairs {
            if !fam.applies(va) {
                continue;
            }
            applicable += 1;
            match (fam.label_index(va), fam.label_index(vb)) {
                (Some(la), Some(lb)) => per_item[item_index[va.item_id.as_str()]][la * nl + lb] += 1,
                (None, Some(_)) => inv_a += 1,
                (Some(_), None) => inv_b += 1,
                (None, None) => inv_both += 1,
            }
        }
        if applicable == 0 {
            bar.inc(opts.resamples as u64);
            continue;
        }
        let total = |w: &[u32]| {
            let mut c = vec![0f64; nl * nl];
            for (i, m) in per_item.iter().enumerate() {
                if w[i] > 0 {
                    for (cj, mj) in c.iter_mut().zip(m) {
                        *cj += (w[i] * mj) as f64;
                    }
                }
            }
            c
        };
        let point = total(&vec![1; item_ids.len()]);
        let (po, kappa) = agreement_and_kappa(&point, nl);
        let draws: Vec<(f64, f64)> = (0..opts.resamples)
            .into_par_iter()
            .map(|r| {
                let d = agreement_and_kappa(&total(&resample_weights(&strata, item_ids.len(), opts.seed, r)), nl);
                bar.inc(1);
                d
            })
            .collect();
        let pairs_n = point.iter().sum::<f64>() as usize;
        // Each side's probabilities scored against the other side's labels.
        let scored = |probs: &dyn Fn(&Verdict, &Verdict) -> Option<(f64, bool)>| -> Vec<(f64, bool)> {
            pairs.iter().filter(|(va, _)| fam.applies(va)).filter_map(|(va, vb)| probs(va, vb)).collect()
        };
        let (scored_a, scored_b) = (scored(&|va, vb| Some((fam.pass_prob(va)?, fam.label_index(vb)? == 0))), scored(&|va, vb| Some((fam.pass_prob(vb)?, fam.label_index(va)? == 0))));
        let (roc_auc_a, roc_auc_b) = (roc_auc(&scored_a), roc_auc(&scored_b));
        families.push(FamilyAgreement {
            family: fam.name(),
            labels: fam.labels().iter().map(|s| s.to_string()).collect(),
            pairs: pairs_n,
            agreeing: (0..nl).map(|l| point[l * nl + l]).sum::<f64>() as usize,
            agreement: 100.0 * po,
            agreement_interval: percentile_interval(draws.iter().map(|d| 100.0 * d.0), opts.confidence),
            kappa,
            kappa_interval: percentile_interval(draws.iter().map(|d| d.1), opts.confidence),
            confusion: (0..nl).map(|x| (0..nl).map(|y| point[x * nl + y] as usize).collect()).collect(),
            invalid_a: inv_a,
            invalid_b: inv_b,
            invalid_both: inv_both,
            roc_auc_a,
            roc_auc_b,
            with_probs_a: scored_a.len(),
            with_probs_b: scored_b.len(),
        });
    }
    bar.finish_and_clear();

    let (sheet, notes) = disagreement_sheet(a, b, &pairs, opts)?;
    Ok(Agreement {
        a: display_name(a),
        b: display_name(b),
        matched: pairs.len(),
        only_a: a.verdicts.len() - pairs.len(),
        only_b: b.verdicts.len() - pairs.len(),
        items: item_ids.len(),
        families,
        disagreements: sheet.len(),
        bootstrap: crate::analysis::metrics::Bootstrap {
            resamples: opts.resamples,
            seed: opts.seed,
            confidence: opts.confidence,
            method: "percentile; items resampled with replacement within each scenario".into(),
        },
        notes,
        sheet,
    })
}

fn display_name(r: &JudgedRun) -> String {
    format!("{} ({})", r.label, r.path.display())
}

/// Observed agreement (fraction) and Cohen's kappa of a flattened nl x nl confusion matrix.
/// Kappa is NaN when chance agreement is 1 (both used a single, common label).
pub fn agreement_and_kappa(c: &[f64], nl: usize) -> (f64, f64) {
    let n: f64 = c.iter().sum();
    if n == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let po = (0..nl).map(|l| c[l * nl + l]).sum::<f64>() / n;
    let pe: f64 = (0..nl)
        .map(|l| {
            let row: f64 = (0..nl).map(|j| c[l * nl + j]).sum();
            let col: f64 = (0..nl).map(|j| c[j * nl + l]).sum();
            (row / n) * (col / n)
        })
        .sum();
    let kappa = if (1.0 - pe).abs() < 1e-12 { f64::NAN } else { (po - pe) / (1.0 - pe) };
    (po, kappa)
}

fn disagreement_sheet(a: &JudgedRun, b: &JudgedRun, pairs: &[(&Verdict, &Verdict)], opts: &AgreeOptions) -> Result<(Vec<Disagreement>, Vec<String>)> {
    let mut notes = Vec::new();
    let mut items: HashMap<String, Item> = HashMap::new();
    let mut samples: HashMap<String, SampleRecord> = HashMap::new();
    if opts.sheet_text {
        match a.items(opts.data.as_deref()).or_else(|_| b.items(opts.data.as_deref())) {
            Ok(i) => items = i,
            Err(e) => notes.push(format!("the sheet has no query or risk summary: {e:#}")),
        }
        samples = a.samples()?;
        if samples.is_empty() {
            samples = b.samples()?;
        }
        if samples.is_empty() {
            notes.push("the sheet has no thinking or response text: neither run has a samples.jsonl".into());
        }
    }
    let fmt_label = |fam: LabelFamily, v: &Verdict| fam.label_index(v).map_or("(unreadable)".to_string(), |i| fam.labels()[i].to_string());
    let mut rows = Vec::new();
    for (va, vb) in pairs {
        // The pooled family repeats the per-scenario one; the sheet lists each label once.
        for fam in [LabelFamily::Safety, LabelFamily::Thinking(va.scenario)] {
            let (la, lb) = (fam.label_index(va), fam.label_index(vb));
            if la == lb {
                continue;
            }
            let item = items.get(&va.item_id);
            let sample = samples.get(&va.key());
            rows.push(Disagreement {
                item_id: va.item_id.clone(),
                sample_index: va.sample_index,
                config: va.config.clone(),
                scenario: va.scenario.name().into(),
                family: if fam == LabelFamily::Safety { "safety".into() } else { "thinking".into() },
                label_a: fmt_label(fam, va),
                label_b: fmt_label(fam, vb),
                query: item.map_or(String::new(), |i| i.query.clone()),
                risk_summary: item.map_or(String::new(), |i| i.risk_summary.clone()),
                thinking: sample.map_or(String::new(), |s| s.thinking.clone()),
                response: sample.map_or(String::new(), |s| s.response.clone()),
                raw_a: fam.raw(va).unwrap_or("").into(),
                raw_b: fam.raw(vb).unwrap_or("").into(),
                human_label: String::new(),
                note: String::new(),
            });
        }
    }
    Ok((rows, notes))
}

/// Writes the disagreement sheet as CSV. An existing file is never overwritten: it may
/// hold a reviewer's labels.
pub fn write_sheet(path: &Path, rows: &[Disagreement]) -> Result<()> {
    if path.exists() {
        bail!("{} already exists (it may hold review labels); choose another --sheet path", path.display());
    }
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    if rows.is_empty() {
        // An empty sheet still says what its columns are.
        w.write_record(["item_id", "sample_index", "config", "scenario", "family", "label_a", "label_b", "query", "risk_summary", "thinking", "response", "raw_a", "raw_b", "human_label", "note"])?;
    }
    let csv = w.into_inner().map_err(|e| anyhow::anyhow!("writing the sheet: {e}"))?;
    crate::store::write_atomic(path, &csv)
}

fn num(x: f64, prec: usize) -> String {
    if x.is_nan() { "-".into() } else { format!("{x:.prec$}") }
}

fn interval(iv: &Interval, prec: usize) -> String {
    if iv[0].is_nan() { "-".into() } else { format!("[{}, {}]", num(iv[0], prec), num(iv[1], prec)) }
}

impl Agreement {
    /// The terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "judge agreement\n  A: {}\n  B: {}", self.a, self.b);
        let _ = writeln!(
            s,
            "  {} samples of {} items matched by (item, sample, configuration); {} only in A, {} only in B",
            self.matched, self.items, self.only_a, self.only_b
        );
        let ci = format!("{:.0}% CI", self.bootstrap.confidence * 100.0);
        let mut t = TextTable::new(["label family", "pairs", "agree%", &ci, "kappa", &ci, "unreadable"], 1);
        for f in &self.families {
            t.row([
                f.family.clone(),
                f.pairs.to_string(),
                num(f.agreement, 2),
                interval(&f.agreement_interval, 1),
                num(f.kappa, 3),
                interval(&f.kappa_interval, 2),
                format!("{}/{}/{}", f.invalid_a, f.invalid_b, f.invalid_both),
            ]);
        }
        let _ = write!(s, "\n{}", t.render(2));
        let _ = writeln!(s, "  (unreadable: A only / B only / both; such samples are left out of the pairs)");
        let aucs: Vec<String> = self
            .families
            .iter()
            .flat_map(|f| {
                [("A", "B", f.roc_auc_a, f.with_probs_a), ("B", "A", f.roc_auc_b, f.with_probs_b)].into_iter().filter(|x| x.3 > 0).map(move |(p, l, r, n)| match r {
                    Some(r) => format!("  {}: {p}'s P({}) against {l}'s labels: ROC AUC {:.3} ({} passing, {} not)", f.family, f.labels[0], r.auc, r.positives, r.negatives),
                    None => format!("  {}: {p}'s P({}) against {l}'s labels: no ROC AUC, {l}'s {n} label(s) are all of one class", f.family, f.labels[0]),
                })
            })
            .collect();
        if !aucs.is_empty() {
            let _ = writeln!(s, "\n  label probabilities (recorded by a judge under structured output)");
            for a in aucs {
                let _ = writeln!(s, "{a}");
            }
        }
        let _ = writeln!(s, "\n  confusion matrices (rows: A, columns: B)");
        for f in &self.families {
            let _ = writeln!(s, "\n  {}", f.family);
            let mut t = TextTable::new(std::iter::once("A \\ B").chain(f.labels.iter().map(String::as_str)), 1);
            for (l, row) in f.labels.iter().zip(&f.confusion) {
                t.row(std::iter::once(l.clone()).chain(row.iter().map(|c| c.to_string())));
            }
            let _ = write!(s, "{}", t.render(4));
        }
        let _ = writeln!(s, "\n  {} disagreement(s) (one per sample and label)", self.disagreements);
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }

    /// Per-family agreement keyed by family name, e.g. for JSON consumers.
    pub fn by_family(&self) -> BTreeMap<&str, &FamilyAgreement> {
        self.families.iter().map(|f| (f.family.as_str(), f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_auc_is_the_chance_a_positive_outscores_a_negative() {
        // Perfect, inverted and chance rankings.
        let perfect = [(0.9, true), (0.8, true), (0.3, false), (0.1, false)];
        assert_eq!(roc_auc(&perfect).unwrap(), RocAuc { auc: 1.0, positives: 2, negatives: 2 });
        let inverted: Vec<(f64, bool)> = perfect.iter().map(|&(s, p)| (s, !p)).collect();
        assert_eq!(roc_auc(&inverted).unwrap().auc, 0.0);
        // By hand: positives 0.8, 0.4; negatives 0.6, 0.4 (a tie), 0.2.
        // Pairs: 0.8 beats all 3; 0.4 beats 0.2, ties 0.4, loses to 0.6 -> (3 + 1.5) / 6.
        let mixed = [(0.8, true), (0.4, true), (0.6, false), (0.4, false), (0.2, false)];
        assert!((roc_auc(&mixed).unwrap().auc - 4.5 / 6.0).abs() < 1e-12);
        // All tied: one half.
        assert_eq!(roc_auc(&[(0.5, true), (0.5, false), (0.5, true)]).unwrap().auc, 0.5);
        // One class only: undefined.
        assert_eq!(roc_auc(&[(0.5, true), (0.7, true)]), None);
        assert_eq!(roc_auc(&[]), None);
    }

    #[test]
    fn kappa_matches_a_hand_computed_table() {
        // Classic 2x2: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no (n = 50).
        // po = 0.7; pe = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.4.
        let (po, k) = agreement_and_kappa(&[20.0, 5.0, 10.0, 15.0], 2);
        assert!((po - 0.7).abs() < 1e-12);
        assert!((k - 0.4).abs() < 1e-12);
        // Perfect agreement on a constant label: kappa undefined, not 1 or 0.
        let (po, k) = agreement_and_kappa(&[9.0, 0.0, 0.0, 0.0], 2);
        assert_eq!(po, 1.0);
        assert!(k.is_nan());
        // Three labels, perfect agreement: kappa 1.
        let (_, k) = agreement_and_kappa(&[3.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0], 3);
        assert!((k - 1.0).abs() < 1e-12);
    }
}
