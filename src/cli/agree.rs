//! `bsa agree`: judge agreement on the same samples.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::args::{BootstrapArgs, OutputArgs};

#[derive(Debug, Args)]
pub struct AgreeArgs {
    /// The first labelling: a run directory or a verdicts.jsonl file.
    pub a: PathBuf,
    /// The second labelling of the same samples (matched by item, sample index, configuration).
    pub b: PathBuf,
    /// Write the disagreements to this CSV for human review (query, risk summary, thinking,
    /// response, both labels, both raw judge outputs, empty human_label/note columns).
    /// An existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub sheet: Option<PathBuf>,
    /// The data file, for the sheet's query and risk summary (default: the run's own).
    #[arg(long)]
    pub data: Option<String>,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub(super) fn run(a: AgreeArgs) -> Result<()> {
    use bsa::analysis::judged_run::JudgedRun;
    if let Some(p) = &a.sheet {
        if p.exists() {
            bail!("{} already exists (it may hold review labels); choose another --sheet path (nothing was written)", p.display());
        }
    }
    let (ra, rb) = (JudgedRun::load(&a.a)?, JudgedRun::load(&a.b)?);
    let opts = bsa::analysis::agree::AgreeOptions {
        resamples: a.bootstrap.resamples,
        seed: a.bootstrap.bootstrap_seed,
        confidence: a.bootstrap.confidence,
        data: a.data,
        sheet_text: a.sheet.is_some(),
        progress: a.output.progress(),
    };
    let ag = bsa::analysis::agree::agree(&ra, &rb, &opts)?;
    if let Some(p) = &a.sheet {
        bsa::analysis::agree::write_sheet(p, &ag.sheet)?;
    }
    if a.output.json {
        outln!("{}", serde_json::to_string_pretty(&ag)?);
    } else {
        out!("{}", ag.table());
        match &a.sheet {
            Some(p) => outln!("  sheet for human review: {}", p.display()),
            None if ag.disagreements > 0 => outln!("  (write them for review with --sheet FILE.csv)"),
            None => {}
        }
    }
    Ok(())
}
