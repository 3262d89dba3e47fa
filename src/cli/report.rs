//! `bsa report`: report.md, report.html and SVG plots for one or more runs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::args::ScoreOpts;
use bsa::analysis::reference::Reference;
use bsa::analysis::report;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (or verdicts.jsonl files); runs with several decoding
    /// configurations also get sweep heatmaps.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where to write report.md, report.html and plots/ (default: the run directory when
    /// there is one run).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Published results to draw next to the runs in the Safe@1 vs Think@1 scatter:
    /// `paper` (the leaderboard of arXiv 2505.19690, as grey crosses, with a table) or
    /// `none`.
    #[arg(long, value_name = "paper|none", default_value = "none", value_parser = Reference::parse)]
    pub reference: Reference,
    /// The run the others are weighed against in the safety-tax section, named as the
    /// report names it (`label` or `label@config`); default: the first.
    #[arg(long, value_name = "NAME")]
    pub baseline: Option<String>,
    #[command(flatten)]
    pub opts: ScoreOpts,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub(super) fn run(a: ReportArgs) -> Result<()> {
    use bsa::analysis::judged_run::JudgedRun;
    let out = match (&a.out, a.runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [one]) if one.is_dir() => one.clone(),
        (None, [one]) => one.parent().map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()),
        (None, _) => bail!("{} runs given: say where the report goes with --out DIR", a.runs.len()),
    };
    let runs = a.runs.iter().map(|r| JudgedRun::load(r)).collect::<Result<Vec<_>>>()?;
    let opts = report::document::ReportOptions { score: a.opts.options(), progress: !a.quiet, reference: a.reference, baseline: a.baseline };
    let rep = report::document::build(&runs, &opts)?;
    let w = report::document::write(&rep, &out)?;
    out!("{}", report::document::summary_table(&rep));
    outln!("wrote {} and {} ({} plots in {})", w.markdown.display(), w.html.display(), w.plots.len(), out.join("plots").display());
    Ok(())
}
