//! `bsa data stats`: validate a data file and count its items and risks.

use anyhow::Result;
use clap::{Args, Subcommand};

use super::args::SelectArgs;
use bsa::analysis::report;
use bsa::data::{DataStats, Dataset};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a data file and print items per scenario and risks per primary category.
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A .csv or .jsonl file in the BSA format, or hub:OWNER/NAME[/FILE].
    pub data: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn data_stats(a: StatsArgs) -> Result<()> {
    let ds = Dataset::load(&a.data)?;
    let selection = a.select.to_selection()?;
    let (items, notes) = ds.select_noting(&selection)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    let st = DataStats::of(&items);
    if a.json {
        // The selection and the ids it picked, so a draw can be checked or reused (--ids).
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({"source": ds.source, "sha256": ds.sha256, "selection": selection, "stats": st, "ids": ids}))?);
    } else {
        out!("{}", report::stats_table(&ds.source, &st));
        outln!("\n  sha256 {}", ds.sha256);
    }
    Ok(())
}

pub(super) fn run(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Stats(a) => data_stats(a),
    }
}
