//! `bsa compare`: paired differences between two runs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{OutputArgs, ScoreOpts};

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
    #[command(flatten)]
    pub output: OutputArgs,
}

pub(super) fn run(a: CompareArgs) -> Result<()> {
    use bsa::analysis::judged_run::JudgedRun;
    let (ra, rb) = (JudgedRun::load(&a.a)?, JudgedRun::load(&a.b)?);
    let opts = bsa::analysis::compare::CompareOptions { score: a.opts.options(), config_a: a.config_a, config_b: a.config_b, progress: a.output.progress() };
    let c = bsa::analysis::compare::compare(&ra, &rb, &opts)?;
    if a.output.json {
        outln!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        out!("{}", c.table());
    }
    Ok(())
}
