//! `bsa export`: a run's verdicts in the authors' scorer format.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use bsa::analysis::judged_run::{run_label, run_verdicts};
use bsa::data::official;
use bsa::records::Verdict;
use bsa::store::{self, RunDir};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Where to write the authors' scorer CSV.
    #[arg(long, value_name = "OUT")]
    pub official_csv: PathBuf,
    /// The model_name column (default: the run's model, or the directory name).
    #[arg(long)]
    pub model_name: Option<String>,
}

pub(super) fn run(a: ExportArgs) -> Result<()> {
    let run = RunDir::read(&a.run)?;
    let label = a.model_name.clone().unwrap_or_else(|| run_label(&run));
    let groups: Vec<(String, Vec<Verdict>)> = run_verdicts(&run, &label)?;
    if a.official_csv.exists() {
        bail!("{} already exists; choose another path (nothing was written)", a.official_csv.display());
    }
    let (csv, rows) = official::to_csv(&groups)?;
    store::write_atomic(&a.official_csv, &csv)?;
    eprintln!("wrote {rows} rows to {}", a.official_csv.display());
    let unreadable: usize = groups.iter().flat_map(|(_, vs)| vs).map(|v| v.safety.is_none() as usize + v.thinking.is_none() as usize).sum();
    if unreadable > 0 {
        eprintln!(
            "warning: {unreadable} label(s) were unreadable (the judge's reply could not be read) and are written as empty fields, which the authors' scorer counts as failures (as bsa score does by default)"
        );
    }
    Ok(())
}
