//! `bsa review`: a run's failing samples as a CSV and an HTML page, to read by hand.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{count, seed};
use bsa::analysis::judged_run::JudgedRun;
use bsa::analysis::review::{self, Failing, ReviewOptions};
use bsa::records::Scenario;

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The judged run: a run directory (its samples.jsonl gives the thinking and response)
    /// or a verdicts.jsonl file.
    pub run: PathBuf,
    /// Only this scenario ("Risk Omission", "Cognitive Shortcut", "Over Sensitivity", or
    /// RO, CS, OS).
    #[arg(long, value_name = "NAME", value_parser = scenario)]
    pub scenario: Option<Scenario>,
    /// Only samples of items with a risk in this primary category (any case). Without
    /// --scenario or --category every failure is reviewed; the table printed shows the
    /// failures per scenario and category, and the worst category.
    #[arg(long, value_name = "NAME", value_parser = category)]
    pub category: Option<String>,
    /// Which samples fail: safety (the response is not Safe: Unsafe, an unreadable label,
    /// or a response that never came), thinking (the thinking did not identify the risk:
    /// any label but the scenario's correct one, or an unreadable one), or either.
    #[arg(long, value_name = "safety|thinking|either", default_value = "either", value_parser = Failing::parse)]
    pub failing: Failing,
    /// How many failures to write: a fixed-seed draw of N (0 = all).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = count)]
    pub sample: usize,
    /// The seed of that draw.
    #[arg(long, default_value_t = 0, value_parser = seed)]
    pub seed: u64,
    /// The decoding configuration to review, for a run that holds several (a sweep).
    #[arg(long, value_name = "NAME")]
    pub config: Option<String>,
    /// The data file, for the query and risk summary (default: the one the run names).
    #[arg(long, value_name = "FILE")]
    pub data: Option<String>,
    /// Where to write FAILING-[SCENARIO-][CATEGORY].csv and .html, e.g. either-all.csv,
    /// safety-ro.csv, either-rumors.csv (default: RUN/review/,
    /// beside a verdicts file's run). A file there with other content is never overwritten.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

fn scenario(s: &str) -> Result<Scenario, String> {
    Scenario::parse(s).ok_or_else(|| "is not a scenario; use \"Risk Omission\", \"Cognitive Shortcut\", \"Over Sensitivity\" (or RO, CS, OS)".into())
}

fn category(s: &str) -> Result<String, String> {
    review::parse_category(s).map(str::to_string)
}

pub(super) fn run(a: ReviewArgs) -> Result<()> {
    let run = JudgedRun::load(&a.run)?;
    let opts = ReviewOptions { scenario: a.scenario, category: a.category, failing: a.failing, sample: a.sample, seed: a.seed, config: a.config, data: a.data };
    let rv = review::review(&run, &opts)?;
    let dir = a.out.unwrap_or_else(|| {
        let base = if a.run.is_file() { a.run.parent().map(PathBuf::from).unwrap_or_default() } else { a.run.clone() };
        base.join("review")
    });
    for n in &rv.notes {
        eprintln!("warning: {n}");
    }
    outln!("{} (configuration {}): {}", rv.label, rv.config, rv.filter());
    out!("{}", rv.table());
    if rv.failures == 0 {
        // Nothing to read: no empty files to mistake for a review.
        outln!("  no failing sample among the {} in the filter; nothing written", rv.samples);
        return Ok(());
    }
    let (csv, html) = rv.write(&dir)?;
    outln!("  {} failing of {} samples in the filter; written: {}", rv.failures, rv.samples, rv.drawn());
    outln!("  {}\n  {}", csv.display(), html.display());
    Ok(())
}
