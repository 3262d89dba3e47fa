//! `bsa merge`: combine the shard runs of one job.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bsa::store;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The new run directory to create.
    pub out: PathBuf,
    /// The shard runs to combine.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
}

pub(super) fn run(a: MergeArgs) -> Result<()> {
    let s = store::merge(&a.out, &a.runs)?;
    outln!("merged {} runs into {}: {} samples, {} verdicts", a.runs.len(), a.out.display(), s.samples, s.verdicts);
    if !s.missing_shards.is_empty() {
        eprintln!("warning: shard(s) {} are missing: the merged run is partial", s.missing_shards.join(", "));
    }
    Ok(())
}
