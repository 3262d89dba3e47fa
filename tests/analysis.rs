//! The analysis commands on synthetic runs written here: `bsa agree` (agreement, kappa,
//! confusion, disagreement sheet), `bsa compare` (paired differences and McNemar tests)
//! and `bsa report` (report.md, report.html with inline SVG plots, parsed for structure).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bsa::analysis::compare::{compare, CompareOptions};
use bsa::data::Dataset;
use bsa::records::{Item, Scenario};
use bsa::records::{Decoding, SampleRecord};
use bsa::analysis::judged_run::JudgedRun;
use bsa::analysis::metrics::{self, ScoreOptions};
use bsa::analysis::report::document::{self, ReportOptions};
use bsa::store::{self, DatasetRef, JobSpec, Manifest};
use bsa::records::{SafetyLabel, ThinkingLabel, Verdict};

mod common;
use common::{fails, ok};

fn bsa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bsa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("run bsa")
}

fn sample_data() -> Dataset {
    Dataset::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample.csv").to_str().unwrap()).unwrap()
}

fn decoding(t: f32, p: f32, k: usize) -> Decoding {
    Decoding { temperature: t, top_p: p, top_k: k, min_p: 0.0, max_new_tokens: 512, stop: vec![], ignore_eos: false }
}

/// The labels of one sample: (item index, sample index, configuration index) -> labels.
type Labeller<'a> = &'a dyn Fn(usize, u32, usize) -> (Option<SafetyLabel>, Option<bool>);

/// Writes a run over `items` of data/sample.csv: manifest, verdicts, and (with
/// `with_samples`) samples.jsonl carrying each configuration's decoding.
fn write_run(dir: &Path, model: &str, items: &[Item], configs: &[(&str, Decoding)], k: u32, with_samples: bool, label: Labeller) -> PathBuf {
    let ds = sample_data();
    std::fs::create_dir_all(dir).unwrap();
    let job = JobSpec {
        dataset: Some(DatasetRef { source: ds.path.display().to_string(), sha256: ds.sha256.clone(), items: ds.items.len() }),
        model: Some(serde_json::json!({ "id": model })),
        samples: Some(k),
        ..Default::default()
    };
    store::write_json_atomic(&dir.join(store::MANIFEST), &Manifest::new(job)).unwrap();
    let mut verdicts = String::new();
    let mut samples = String::new();
    for (ci, (cfg, dec)) in configs.iter().enumerate() {
        for (ii, it) in items.iter().enumerate() {
            for s in 0..k {
                let (safety, thinking_ok) = label(ii, s, ci);
                let thinking = thinking_ok.map(|ok| {
                    let allowed = ThinkingLabel::allowed(it.scenario);
                    if ok { allowed[0] } else { allowed[allowed.len() - 1] }
                });
                let v = Verdict {
                    item_id: it.id.clone(),
                    sample_index: s,
                    config: cfg.to_string(),
                    scenario: it.scenario,
                    categories: it.categories(),
                    safety,
                    thinking,
                    judge: "synthetic".into(),
                    raw_safety: Some(format!("{{\"label\": \"{}\"}}", safety.map_or("??", |x| x.as_str()))),
                    raw_thinking: Some(format!("thinking verdict for {}#{s}", it.id)),
                    prompt_sha256: None,
                    response_missing: false,
                    safety_probs: None,
                    thinking_probs: None,
                };
                verdicts += &serde_json::to_string(&v).unwrap();
                verdicts.push('\n');
                let rec = SampleRecord {
                    item_id: it.id.clone(),
                    sample_index: s,
                    config: cfg.to_string(),
                    scenario: it.scenario,
                    categories: it.categories(),
                    seed: 0,
                    decoding: dec.clone(),
                    prompt_tokens: 10,
                    completion_tokens: 20,
                    thinking: format!("thinking of sample {s}"),
                    response: format!("response of sample {s}"),
                    raw: String::new(),
                    finish_reason: bsa::records::FinishReason::Stop,
                    truncated: false,
                    elapsed_s: 0.1,
                    error: None,
                };
                samples += &serde_json::to_string(&rec).unwrap();
                samples.push('\n');
            }
        }
    }
    std::fs::write(dir.join(store::VERDICTS), verdicts).unwrap();
    if with_samples {
        std::fs::write(dir.join(store::SAMPLES), samples).unwrap();
    }
    dir.to_path_buf()
}

fn safe(b: bool) -> Option<SafetyLabel> {
    Some(if b { SafetyLabel::Safe } else { SafetyLabel::Unsafe })
}

/// A deterministic pattern of labels that differs across items, samples and configurations.
fn base_label(i: usize, s: u32, c: usize) -> (Option<SafetyLabel>, Option<bool>) {
    let h = (i * 7 + s as usize * 3 + c * 5) % 10;
    (safe(h < 7), Some(h % 3 == 0))
}

fn one_config() -> Vec<(&'static str, Decoding)> {
    vec![("default", decoding(0.6, 0.95, 0))]
}

#[test]
fn agree_counts_agreement_kappa_confusion_and_writes_the_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let a = write_run(&dir.path().join("a"), "judge-a", &items, &one_config(), 5, true, &base_label);
    // B: safety flipped on every sample 0 of even items (12 flips), thinking unreadable on
    // sample 1 of item 0, and item 23's samples missing.
    let b_label = |i: usize, s: u32, c: usize| {
        let (sf, th) = base_label(i, s, c);
        let sf = if s == 0 && i % 2 == 0 { safe(sf != Some(SafetyLabel::Safe)) } else { sf };
        let th = if i == 0 && s == 1 { None } else { th };
        (sf, th)
    };
    let b = write_run(&dir.path().join("b"), "judge-b", &items[..23], &one_config(), 5, true, &b_label);
    let ra = JudgedRun::load(&a).unwrap();
    let rb = JudgedRun::load(&b).unwrap();
    let ag = bsa::analysis::agree::agree(&ra, &rb, &bsa::analysis::agree::AgreeOptions { resamples: 300, ..Default::default() }).unwrap();
    assert_eq!(ag.matched, 23 * 5);
    assert_eq!((ag.only_a, ag.only_b), (5, 0));
    let fam = ag.by_family();
    let safety = fam["response safety"];
    assert_eq!(safety.pairs, 115);
    assert_eq!(safety.pairs - safety.agreeing, 12);
    assert!((safety.agreement - 100.0 * 103.0 / 115.0).abs() < 1e-9);
    // Kappa from the confusion matrix by hand.
    let c = &safety.confusion;
    let n = 115.0;
    let po = (c[0][0] + c[1][1]) as f64 / n;
    let pe = ((c[0][0] + c[0][1]) as f64 * (c[0][0] + c[1][0]) as f64 + (c[1][0] + c[1][1]) as f64 * (c[0][1] + c[1][1]) as f64) / (n * n);
    assert!((safety.kappa - (po - pe) / (1.0 - pe)).abs() < 1e-12);
    assert!(safety.kappa_interval[0] <= safety.kappa && safety.kappa <= safety.kappa_interval[1]);
    assert!(safety.kappa < 1.0 && safety.kappa > 0.3, "{}", safety.kappa);
    // Thinking: item 0 is Risk Omission; one unreadable B label there, all else agrees.
    let ro = fam["thinking, Risk Omission"];
    assert_eq!((ro.invalid_a, ro.invalid_b, ro.invalid_both), (0, 1, 0));
    assert_eq!(ro.agreement, 100.0);
    assert_eq!(fam["thinking identified (pooled)"].pairs, 114);
    // The sheet: 12 safety disagreements and the unreadable thinking label, with the query.
    assert_eq!(ag.disagreements, 13);
    let row = ag.sheet.iter().find(|r| r.family == "thinking").unwrap();
    assert_eq!(row.label_b, "(unreadable)");
    assert_eq!(row.query, items[0].query);
    assert_eq!(row.response, "response of sample 1");
    assert!(ag.notes.is_empty(), "{:?}", ag.notes);

    // Through the binary: the sheet is written, and never overwritten.
    let sheet = dir.path().join("review.csv");
    let out = ok(&bsa(&["agree", a.to_str().unwrap(), b.to_str().unwrap(), "--sheet", sheet.to_str().unwrap(), "--resamples", "100"]));
    assert!(out.contains("response safety") && out.contains("kappa") && out.contains("13 disagreement"), "{out}");
    let mut rd = csv::Reader::from_path(&sheet).unwrap();
    assert!(rd.headers().unwrap().iter().any(|h| h == "human_label"));
    assert_eq!(rd.records().count(), 13);
    std::fs::write(&sheet, "reviewed by hand\n").unwrap();
    let err = fails(&bsa(&["agree", a.to_str().unwrap(), b.to_str().unwrap(), "--sheet", sheet.to_str().unwrap()]));
    assert!(err.contains("already exists") && err.contains("review.csv"), "{err}");
    assert_eq!(std::fs::read_to_string(&sheet).unwrap(), "reviewed by hand\n");
    // Two verdict files work too, and --json is one object.
    let js = ok(&bsa(&["agree", a.join("verdicts.jsonl").to_str().unwrap(), b.join("verdicts.jsonl").to_str().unwrap(), "--json", "--resamples", "50"]));
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["matched"], 115);
    assert_eq!(v["families"][0]["confusion"].as_array().unwrap().len(), 2);
}

/// A judge's recorded label probabilities are scored against the other labelling: ROC AUC
/// of A's P(Safe) against B's labels, equal to the same from the confusion matrix by hand
/// (two score levels: ties count half).
#[test]
fn agree_reports_the_roc_auc_of_label_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let a = write_run(&dir.path().join("a"), "judge-a", &items, &one_config(), 5, false, &base_label);
    let b_label = |i: usize, s: u32, c: usize| {
        let (sf, th) = base_label(i, s, c);
        (if s == 0 && i % 2 == 0 { safe(sf != Some(SafetyLabel::Safe)) } else { sf }, th)
    };
    let b = write_run(&dir.path().join("b"), "judge-b", &items, &one_config(), 5, false, &b_label);
    // A's P(Safe): 0.9 where A said Safe, 0.2 where it said Unsafe.
    let path = a.join("verdicts.jsonl");
    let with_probs: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let p = if v["safety"] == "Safe" { 0.9 } else { 0.2 };
            v["safety_probs"] = serde_json::json!({"Safe": p, "Unsafe": 1.0 - p});
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&path, with_probs).unwrap();
    let js = ok(&bsa(&["agree", a.to_str().unwrap(), b.to_str().unwrap(), "--json", "--resamples", "20"]));
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    let safety = &v["families"][0];
    let c: Vec<Vec<f64>> = safety["confusion"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect();
    let (pos, neg) = (c[0][0] + c[1][0], c[0][1] + c[1][1]);
    let expect = (c[0][0] * c[1][1] + 0.5 * (c[0][0] * c[0][1] + c[1][0] * c[1][1])) / (pos * neg);
    let auc = &safety["roc_auc_a"];
    assert!((auc["auc"].as_f64().unwrap() - expect).abs() < 1e-12, "{auc} vs {expect}");
    assert_eq!((auc["positives"].as_f64(), auc["negatives"].as_f64()), (Some(pos), Some(neg)));
    assert!(safety["roc_auc_b"].is_null(), "B recorded no probabilities");
    assert!(v["families"][1]["roc_auc_a"].is_null(), "no thinking probabilities either");
    let text = ok(&bsa(&["agree", a.to_str().unwrap(), b.to_str().unwrap(), "--resamples", "20"]));
    assert!(text.contains(&format!("A's P(Safe) against B's labels: ROC AUC {expect:.3}")), "{text}");
    // Against a labelling of one class there is no AUC, and the table says why.
    let c = write_run(&dir.path().join("c"), "judge-c", &items, &one_config(), 5, false, &|_, _, _| (safe(true), Some(true)));
    let text = ok(&bsa(&["agree", a.to_str().unwrap(), c.to_str().unwrap(), "--resamples", "20"]));
    assert!(text.contains("A's P(Safe) against B's labels: no ROC AUC, B's 120 label(s) are all of one class"), "{text}");
}

#[test]
fn agree_refuses_runs_without_common_samples() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let a = write_run(&dir.path().join("a"), "a", &items[..4], &one_config(), 2, false, &base_label);
    let b = write_run(&dir.path().join("b"), "b", &items[4..8], &one_config(), 2, false, &base_label);
    let err = fails(&bsa(&["agree", a.to_str().unwrap(), b.to_str().unwrap()]));
    assert!(err.contains("share no sample"), "{err}");
}

/// Scores of a subset of a run's items, straight from the metrics.
fn score_items(run: &Path, keep: &[String]) -> metrics::Scorecard {
    let r = JudgedRun::load(run).unwrap();
    let vs: Vec<Verdict> = r.verdicts.into_iter().filter(|v| keep.contains(&v.item_id)).collect();
    metrics::score(&vs, &ScoreOptions { resamples: 0, ..Default::default() }).unwrap()
}

#[test]
fn compare_measures_a_real_change_and_not_noise() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let a = write_run(&dir.path().join("a"), "base", &items[..22], &one_config(), 5, false, &base_label);
    // Same labels on items 1..24: a shift of item sets only, no change in the model.
    let same = |i: usize, s: u32, c: usize| base_label(i + 1, s, c);
    let b_same = write_run(&dir.path().join("same"), "base-again", &items[1..], &one_config(), 5, false, &same);
    // A mitigation: every sample safe, thinking unchanged.
    let better = |i: usize, s: u32, c: usize| (safe(true), base_label(i, s, c).1);
    let b_better = write_run(&dir.path().join("better"), "with-rules", &items[..22], &one_config(), 5, false, &better);
    let opts = CompareOptions { score: ScoreOptions { resamples: 500, ..Default::default() }, config_a: None, config_b: None, progress: false };

    let ra = JudgedRun::load(&a).unwrap();
    let c = compare(&ra, &JudgedRun::load(&b_same).unwrap(), &opts).unwrap();
    assert_eq!((c.shared_items, c.only_a_items, c.only_b_items), (21, 1, 2));
    for m in &c.metrics {
        assert!(m.diff.abs() < 1e-9 && !m.distinguishable, "{m:?}");
    }
    assert!(c.tests.iter().all(|t| t.a_only == 0 && t.b_only == 0 && t.p_value == 1.0));

    let c = compare(&ra, &JudgedRun::load(&b_better).unwrap(), &opts).unwrap();
    let ids: Vec<String> = items[..22].iter().map(|i| i.id.clone()).collect();
    let (sa, sb) = (score_items(&a, &ids), score_items(&b_better, &ids));
    let safe1 = c.metrics.iter().find(|m| m.group == "overall" && m.metric == "Safe@1").unwrap();
    assert!((safe1.diff - (sb.headline.safe_at_1 - sa.headline.safe_at_1)).abs() < 1e-9);
    assert!((safe1.a - sa.headline.safe_at_1).abs() < 1e-9 && safe1.b == 100.0);
    assert!(safe1.distinguishable && safe1.interval[0] > 0.0, "{safe1:?}");
    let think1 = c.metrics.iter().find(|m| m.group == "overall" && m.metric == "Think@1").unwrap();
    assert!(think1.diff.abs() < 1e-9 && !think1.distinguishable);
    // Per scenario and category rows exist, with their item counts.
    let ro = c.metrics.iter().find(|m| m.group == "Risk Omission" && m.metric == "Safe@1").unwrap();
    assert_eq!(ro.items, items[..22].iter().filter(|i| i.scenario == Scenario::RiskOmission).count());
    assert!(c.metrics.iter().any(|m| m.group_kind == "category"));
    // McNemar: B gained "safe" on every unsafe sample of A and lost none.
    let t = c.tests.iter().find(|t| t.group == "overall" && t.label == "safe").unwrap();
    let unsafe_in_a = (0..22).flat_map(|i| (0..5).map(move |s| (i, s))).filter(|&(i, s)| base_label(i, s, 0).0 == safe(false)).count();
    assert_eq!((t.a_only, t.b_only), (0, unsafe_in_a));
    assert!(t.p_value < 1e-6, "{t:?}");

    let out = ok(&bsa(&["compare", a.to_str().unwrap(), b_better.to_str().unwrap(), "--resamples", "200"]));
    assert!(out.contains("22 items in both runs") && out.contains("Safe@1") && out.contains("*"), "{out}");
    let js: serde_json::Value = serde_json::from_str(&ok(&bsa(&["compare", a.to_str().unwrap(), b_better.to_str().unwrap(), "--json", "--resamples", "50"]))).unwrap();
    assert_eq!(js["shared_items"], 22);
    // The safety tax: thinking unchanged, so no reasoning was bought; what B changed is
    // read off the manifests.
    let tax = &js["safety_tax"];
    assert!(tax["reasoning"].as_array().is_some_and(|r| !r.is_empty()), "{tax}");
    assert!(["no change", "cannot tell"].contains(&tax["verdict"].as_str().unwrap()), "{tax}");
    assert_eq!(js["changes"], serde_json::json!(["model.id: base -> with-rules"]));
    assert!(out.contains("safety alignment tax") && out.contains("verdict: ") && out.contains("B differs from A in: model.id: base -> with-rules"), "{out}");
}

fn sweep_configs() -> Vec<(&'static str, Decoding)> {
    vec![
        ("t0.2-p0.8-k0", decoding(0.2, 0.8, 0)),
        ("t0.2-p1-k0", decoding(0.2, 1.0, 0)),
        ("t1-p0.8-k0", decoding(1.0, 0.8, 0)),
        ("t1-p1-k0", decoding(1.0, 1.0, 0)),
        ("t0.2-p0.8-k20", decoding(0.2, 0.8, 20)),
        ("t0.2-p1-k20", decoding(0.2, 1.0, 20)),
        ("t1-p0.8-k20", decoding(1.0, 0.8, 20)),
        ("t1-p1-k20", decoding(1.0, 1.0, 20)),
    ]
}

#[test]
fn compare_asks_which_configuration_of_a_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let sweep = write_run(&dir.path().join("sweep"), "m", &items, &sweep_configs(), 3, true, &base_label);
    let base = write_run(&dir.path().join("base"), "m", &items, &one_config(), 3, false, &base_label);
    let err = fails(&bsa(&["compare", base.to_str().unwrap(), sweep.to_str().unwrap()]));
    assert!(err.contains("--config-b") && err.contains("t1-p1-k20"), "{err}");
    let out = ok(&bsa(&["compare", base.to_str().unwrap(), sweep.to_str().unwrap(), "--config-b", "t1-p1-k20", "--resamples", "50"]));
    assert!(out.contains("[config t1-p1-k20]"), "{out}");
    // Two configurations of one sweep: what changed is their decoding, printed as the f32
    // values they were (0.2, not 0.20000000298023224).
    let out = ok(&bsa(&["compare", sweep.to_str().unwrap(), sweep.to_str().unwrap(), "--config-a", "t0.2-p0.8-k0", "--config-b", "t1-p1-k20", "--resamples", "50"]));
    assert!(out.contains("B differs from A in: decoding.temperature: 0.2 -> 1; decoding.top_k: 0 -> 20; decoding.top_p: 0.8 -> 1"), "{out}");
}

fn find<'a>(doc: &'a roxmltree::Document, tag: &str, id: &str) -> Option<roxmltree::Node<'a, 'a>> {
    doc.descendants().find(|n| n.has_tag_name(tag) && n.attribute("id") == Some(id))
}

fn texts(n: roxmltree::Node) -> Vec<String> {
    n.descendants().filter(|d| d.has_tag_name("text")).map(|d| d.text().unwrap_or("").trim().to_string()).collect()
}

#[test]
fn report_of_three_kinds_of_run_has_every_plot_and_consistent_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let single = write_run(&dir.path().join("single"), "model-a", &items, &one_config(), 5, true, &base_label);
    let sweep = write_run(&dir.path().join("sweep"), "model-b", &items, &sweep_configs(), 3, true, &|i, s, c| base_label(i, s, c / 2));
    let bare = write_run(&dir.path().join("bare"), "model-c", &items[..12], &one_config(), 5, false, &|i, s, _| base_label(i, s + 1, 0));
    let runs: Vec<JudgedRun> = [&single, &sweep, &bare].iter().map(|p| JudgedRun::load(p).unwrap()).collect();
    assert!(runs[2].decodings.is_empty());
    let so = ScoreOptions { resamples: 200, ..Default::default() };
    let rep = document::build(&runs, &ReportOptions { score: so.clone(), progress: false, reference: Default::default(), baseline: None }).unwrap();
    assert_eq!(rep.entities.len(), 1 + 8 + 1);
    let out = dir.path().join("report");
    let w = document::write(&rep, &out).unwrap();
    assert_eq!(w.plots.len(), rep.figures.len());
    let html = std::fs::read_to_string(&w.html).unwrap();
    assert!(!html.contains("http://") || html.matches("http://").count() == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(), "no external assets");
    let doc = roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).expect("report.html is well-formed");

    // The scatter: one point per run/configuration, each labelled by its key number.
    let scatter = find(&doc, "figure", "ssa-scatter").expect("scatter");
    assert_eq!(scatter.descendants().filter(|n| n.has_tag_name("circle")).count(), 10);
    let t = texts(scatter);
    for i in 1..=10 {
        assert!(t.contains(&i.to_string()), "point {i} labelled: {t:?}");
    }
    // The points cluster (Safe@1 50-80), so a zoomed copy frames them.
    let zoomed = find(&doc, "figure", "ssa-scatter-zoomed").expect("zoomed scatter");
    assert_eq!(zoomed.descendants().filter(|n| n.has_tag_name("circle")).count(), 10);
    // Per-scenario bars (10 entities fit one chart per metric) and category heatmaps.
    for id in ["scenario-safe_at_1", "scenario-think_at_1", "categories-model-a", "categories-model-c", "categories-model-b-t1-p1-k20"] {
        let f = find(&doc, "figure", id).unwrap_or_else(|| panic!("figure {id} missing"));
        assert!(f.descendants().any(|n| n.has_tag_name("svg")), "{id} has an inline svg");
    }
    // Sweep heatmaps: temperature x top_p, one panel per top_k, for Safe@1 and Think@1;
    // each cell shows the configuration's score.
    let sweep_cards: std::collections::HashMap<String, &metrics::Scorecard> =
        rep.entities.iter().filter(|e| e.run == 1).map(|e| (e.config.clone(), &e.card)).collect();
    for (metric, k) in [("safe_at_1", "0"), ("safe_at_1", "20"), ("think_at_1", "0"), ("think_at_1", "20")] {
        let id = format!("sweep-model-b-{metric}-top-k-{k}");
        let f = find(&doc, "figure", &id).unwrap_or_else(|| panic!("figure {id} missing"));
        let cell_texts = texts(f);
        for t in ["0.2", "1"] {
            for p in ["0.8", "1"] {
                let card = sweep_cards[&format!("t{t}-p{p}-k{k}")];
                let v = if metric == "safe_at_1" { card.headline.safe_at_1 } else { card.headline.think_at_1 };
                assert!(cell_texts.contains(&format!("{v:.1}")), "{id}: {v:.1} in {cell_texts:?}");
            }
        }
        // 4 cells + the background.
        assert_eq!(f.descendants().filter(|n| n.has_tag_name("rect")).count(), 5, "{id}");
    }
    // The headline table agrees with scoring each run on its own.
    let table = doc.descendants().find(|n| n.has_tag_name("table")).unwrap();
    let rows: Vec<Vec<String>> = table
        .children()
        .filter(|n| n.has_tag_name("tr"))
        .skip(1)
        .map(|tr| tr.children().filter(|c| c.has_tag_name("td")).map(|c| c.text().unwrap_or("").to_string()).collect())
        .collect();
    assert_eq!(rows.len(), 10);
    let bare_card = metrics::score(&runs[2].verdicts, &so).unwrap();
    let bare_row = rows.iter().find(|r| r[0] == "model-c").unwrap();
    assert!(bare_row[3].starts_with(&format!("{:.2} [", bare_card.headline.safe_at_1)), "{bare_row:?}");
    assert!(bare_row[5].starts_with(&format!("{:.2} [", bare_card.headline.think_at_1)), "{bare_row:?}");
    assert!(bare_row[8].starts_with(&format!("{:.2} [", bare_card.headline.safe_at_1 - bare_card.headline.think_at_1)), "{bare_row:?}");
    // The analysis sections: signatures, the link (one chart of all ten units, numbered as
    // in the scatter), consistency gaps; the link table agrees with scoring the run alone.
    let headings: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("h2")).filter_map(|n| n.text()).collect();
    for h in ["Failure signatures", "The reasoning-safety link", "Consistency across samples", "The safety alignment tax"] {
        assert!(headings.contains(&h), "{h} in {headings:?}");
    }
    let link = find(&doc, "figure", "link").expect("one link chart for ten units");
    assert!(texts(link).contains(&"10".to_string()));
    let cells: Vec<Vec<String>> = doc
        .descendants()
        .filter(|n| n.has_tag_name("tr"))
        .map(|tr| tr.children().filter(|c| c.has_tag_name("td")).map(|c| c.text().unwrap_or("").to_string()).collect())
        .collect();
    let l = &bare_card.reasoning_safety_link.overall;
    let row = cells.iter().find(|r| r.len() == 7 && r[0] == "model-c" && r[1] == "overall").expect("link row of model-c");
    assert_eq!(row[2], l.samples.to_string());
    assert!(row[3].starts_with(&format!("{:.2} [", l.p_safe_given_identified)) && row[4].starts_with(&format!("{:.2} [", l.p_safe_given_missed)), "{row:?}");
    // The tax of every unit but the baseline (the first), with bsa compare's numbers.
    let tax_rows: Vec<&Vec<String>> = cells.iter().filter(|r| r.len() == 6 && r[0] != "run (B)").collect();
    assert_eq!(tax_rows.len(), 9, "{tax_rows:?}");
    let c = compare(&runs[0], &runs[2], &CompareOptions { score: so.clone(), ..Default::default() }).unwrap();
    let row = tax_rows.iter().find(|r| r[0] == "model-c").unwrap();
    let ro = c.safety_tax.reasoning.iter().find(|m| m.group == "Risk Omission").unwrap();
    assert!(row[1] == "12" && row[2].starts_with(&format!("{:+.2} [", ro.diff)) && row[5] == c.safety_tax.summary(), "{row:?}");
    let gaps = bare_card.consistency_gaps;
    let row = cells.iter().find(|r| r.len() == 9 && r[0] == "model-c" && r[1] == "overall").expect("consistency row of model-c");
    assert!(row[7].starts_with(&format!("{:.2} [", gaps.safe.value)) && row[8].starts_with(&format!("{:.2} [", gaps.think.value)), "{row:?}");
    // The SSA gap is called out, and the markdown links every plot that was written.
    let callout = doc.descendants().find(|n| n.attribute("class") == Some("callout")).expect("gap callout");
    assert_eq!(callout.children().filter(|n| n.has_tag_name("p")).count(), 10);
    let md = std::fs::read_to_string(&w.markdown).unwrap();
    for p in &w.plots {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(md.contains(&format!("(plots/{name})")), "{name} linked from report.md");
        assert!(std::fs::read_to_string(p).unwrap().contains("<svg"));
    }
}

#[test]
fn report_command_on_the_sample_run_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let stdout = ok(&bsa(&["report", "data/sample-run", "--out", out.to_str().unwrap(), "--resamples", "100"]));
    assert!(stdout.contains("illustrative-model") && stdout.contains("SSA gap"), "{stdout}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).unwrap();
    assert!(html.contains("id=\"ssa-scatter\""));
    assert!(!html.contains("DeepSeek-R1"), "no reference layer unless asked");
    // The paper's leaderboard as a reference layer: every published model named in the
    // scatter and listed in a table.
    ok(&bsa(&["report", "data/sample-run", "--out", out.to_str().unwrap(), "--resamples", "100", "--reference", "paper"]));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let doc = roxmltree::Document::parse_with_options(&html, roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() }).unwrap();
    let t = texts(find(&doc, "figure", "ssa-scatter").unwrap());
    for r in bsa::analysis::reference::PAPER {
        assert!(t.contains(&r.model.to_string()), "{} in the scatter: {t:?}", r.model);
        assert!(html.contains(&format!("<td class=\"n\">{:.2}</td>", r.think_at_1)), "{} in the table", r.model);
    }
    let err = fails(&bsa(&["report", "data/sample-run", "--out", out.to_str().unwrap(), "--reference", "leaderboard"]));
    assert!(err.contains("--reference") && err.contains("paper"), "{err}");
    // Two runs of one model: told apart by their directories, each with its own plots,
    // and either one a baseline by its directory.
    let copy = dir.path().join("again");
    common::copy_dir(std::path::Path::new("data/sample-run"), &copy);
    let two = dir.path().join("two");
    let stdout = ok(&bsa(&["report", "data/sample-run", copy.to_str().unwrap(), "--out", two.to_str().unwrap(), "--resamples", "50", "--baseline", copy.to_str().unwrap()]));
    assert!(stdout.contains("illustrative-model (data/sample-run)") && stdout.contains(&format!("illustrative-model ({})", copy.display())), "{stdout}");
    let written = std::fs::read_dir(two.join("plots")).unwrap().count();
    assert!(stdout.contains(&format!("({written} plots in")), "every plot its own file: {written}: {stdout}");
    let md = std::fs::read_to_string(two.join("report.md")).unwrap();
    assert!(md.contains(&format!("Each run against the baseline illustrative-model ({})", copy.display())), "baseline by directory");
    let err = fails(&bsa(&["report", "data/sample-run", "--out", out.to_str().unwrap(), "--baseline", "nope"]));
    assert!(err.contains("--baseline \"nope\"") && err.contains("illustrative-model"), "{err}");
    // Several runs need --out; a missing run is named.
    let err = fails(&bsa(&["report", "data/sample-run", "data/sample-run"]));
    assert!(err.contains("--out"), "{err}");
    let err = fails(&bsa(&["report", "no/such/run", "--out", out.to_str().unwrap()]));
    assert!(err.contains("no/such/run"), "{err}");
}

#[test]
fn report_sweeps_over_one_parameter_and_runs_without_samples() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let temps = vec![("t0.2", decoding(0.2, 0.95, 0)), ("t0.6", decoding(0.6, 0.95, 0)), ("t1.0", decoding(1.0, 0.95, 0))];
    let one = write_run(&dir.path().join("one"), "m1", &items, &temps, 2, true, &base_label);
    // Two configurations but no samples.jsonl: listed by name, no heatmap.
    let blind = write_run(&dir.path().join("blind"), "m2", &items, &temps[..2], 2, false, &base_label);
    let runs: Vec<JudgedRun> = [&one, &blind].iter().map(|p| JudgedRun::load(p).unwrap()).collect();
    let rep = document::build(&runs, &ReportOptions { score: ScoreOptions { resamples: 50, ..Default::default() }, progress: false, reference: Default::default(), baseline: None }).unwrap();
    let ids: Vec<&str> = rep.figures.iter().map(|f| f.id.as_str()).collect();
    assert!(ids.contains(&"sweep-m1-safe_at_1") && ids.contains(&"sweep-m1-think_at_1"), "{ids:?}");
    assert!(!ids.iter().any(|i| i.starts_with("sweep-m2")), "{ids:?}");
    let svg = &rep.figures.iter().find(|f| f.id == "sweep-m1-think_at_1").unwrap().svg;
    // One row of three cells (plus the background), with the temperatures as columns.
    assert_eq!(svg.matches("<rect").count(), 4, "{svg}");
    for t in ["0.2", "0.6", "1"] {
        assert!(svg.contains(&format!("\n{t}\n")), "column {t}: {svg}");
    }
    let md = document::markdown(&rep);
    assert!(md.contains("2 of 2 configurations have no samples"), "{md}");
    assert!(md.contains("| configuration | temperature |"), "{md}");
}

/// A sample whose response never came is not safe by default, whatever the judge said of
/// the empty response; the run's samples.jsonl marks verdicts written without the field,
/// and every policy and count shows in the scores.
#[test]
fn missing_responses_are_not_safe_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let items = sample_data().items;
    let all_safe = |_: usize, _: u32, _: usize| (safe(true), Some(true));
    let run = write_run(&dir.path().join("r"), "m", &items, &one_config(), 5, true, &all_safe);
    // Cut three samples by the token limit: thinking open (2) or no response text (1); a
    // fourth hit the limit with its response there, which counts as a response.
    let path = run.join(store::SAMPLES);
    let mut lines: Vec<serde_json::Value> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let cut = |v: &mut serde_json::Value, truncated: bool, response: &str| {
        v["finish_reason"] = "length".into();
        v["truncated"] = truncated.into();
        v["response"] = response.into();
    };
    cut(&mut lines[0], true, "");
    cut(&mut lines[1], true, "");
    cut(&mut lines[7], false, "  ");
    cut(&mut lines[12], false, "A full answer that ran to the limit.");
    std::fs::write(&path, lines.iter().map(|v| v.to_string() + "\n").collect::<String>()).unwrap();
    let missing: Vec<bool> = JudgedRun::load(&run).unwrap().verdicts.iter().map(|v| v.response_missing).collect();
    assert_eq!(missing.iter().filter(|m| **m).count(), 3);
    assert!(missing[0] && missing[1] && missing[7] && !missing[12]);

    let n_items = items.len() as f64;
    // Item 0 lost two of five, item 1 one of five.
    let failing = 100.0 * (n_items - 2.0 + 3.0 / 5.0 + 4.0 / 5.0) / n_items;
    let card = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["score", run.to_str().unwrap(), "--json", "--resamples", "10"];
        args.extend_from_slice(extra);
        serde_json::from_str::<serde_json::Value>(&ok(&bsa(&args))).unwrap()["m"].clone()
    };
    let close = |a: &serde_json::Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-9;
    let c = card(&[]);
    assert!(close(&c["safe_at_1"], failing), "{} vs {failing}", c["safe_at_1"]);
    assert!(close(&c["safe_at_k"], 100.0 * (n_items - 2.0) / n_items));
    assert!(close(&c["think_at_1"], 100.0), "the thinking is judged as usual");
    assert_eq!((c["truncated_policy"].as_str(), c["truncated"].as_u64()), (Some("fail"), Some(3)));
    let per_scenario: u64 = c["scenarios"].as_object().unwrap().values().map(|g| g["truncated"].as_u64().unwrap()).sum();
    assert_eq!(per_scenario, 3);
    let c = card(&["--truncated", "judge"]);
    assert!(close(&c["safe_at_1"], 100.0) && c["truncated_policy"] == "judge");
    let c = card(&["--truncated", "exclude"]);
    assert!(close(&c["safe_at_1"], 100.0) && close(&c["safe_at_k"], 100.0), "{c}");
    let table = ok(&bsa(&["score", run.to_str().unwrap(), "--resamples", "10"]));
    assert!(table.contains("3 of 120 sample(s)") && table.contains("--truncated fail") && table.contains("no response %"), "{table}");
    let e = fails(&bsa(&["score", run.to_str().unwrap(), "--truncated", "maybe"]));
    assert!(e.contains("--truncated") && e.contains("judge"), "{e}");
}
