//! `bsa compare`: paired differences between two runs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::ScoreOpts;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The baseline: a run directory or a verdicts.jsonl file.
    pub a: PathBuf,
    /// The changed run (differences are B - A).
    pub b: PathBuf,
    /// The configuration of A to use when it holds several (a sweep).
    #[arg(long, value_name = "NAME")]
    pub config_a: Option<String>,
    /// The configuration of B to use when it holds several.
    #[arg(long, value_name = "NAME")]
    pub config_b: Option<String>,
    #[command(flatten)]
    pub opts: ScoreOpts,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub(super) fn run(a: CompareArgs) -> Result<()> {
    use bsa::analysis::judged_run::JudgedRun;
    let (ra, rb) = (JudgedRun::load(&a.a)?, JudgedRun::load(&a.b)?);
    let opts = bsa::analysis::compare::CompareOptions { score: a.opts.options(), config_a: a.config_a, config_b: a.config_b, progress: !a.quiet && !a.json };
    let c = bsa::analysis::compare::compare(&ra, &rb, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", c.table());
    }
    Ok(())
}
