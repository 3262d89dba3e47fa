//! `bsa score`: every metric of a run, or of the authors' scorer CSV.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::ScoreOpts;
use bsa::analysis::judged_run::score_run;
use bsa::analysis::metrics::{self, Scorecard};
use bsa::analysis::report;
use bsa::data::{official, Dataset};
use bsa::store::{self, RunDir};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A run directory with verdicts.jsonl (scores.json is written into it).
    #[arg(conflicts_with = "official_csv")]
    pub run: Option<PathBuf>,
    /// Score the authors' scorer input (model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge).
    #[arg(long, value_name = "FILE")]
    pub official_csv: Option<PathBuf>,
    /// With --official-csv: the data file, to add per-category metrics and check the ids.
    #[arg(long, value_name = "DATA")]
    pub data: Option<String>,
    /// With --official-csv: read labels in any case and spacing (`safe`, ` TRUE`), instead
    /// of exactly as the authors' scorer does (where other spellings fail).
    #[arg(long)]
    pub lenient_labels: bool,
    /// Print one JSON object keyed by model name.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opts: ScoreOpts,
}

pub(super) fn run(a: ScoreArgs) -> Result<()> {
    let opts = a.opts.options();
    opts.validate()?;
    if a.run.is_none() && a.official_csv.is_none() {
        anyhow::bail!("nothing to score: give a run directory (bsa score runs/NAME) or the authors' scorer CSV (bsa score --official-csv FILE)");
    }
    if a.official_csv.is_some() && a.opts.truncated.is_some() {
        anyhow::bail!("--truncated needs the samples' responses, which the authors' scorer CSV does not have; drop it (every label in the CSV is taken as the judge gave it)");
    }
    if a.lenient_labels && a.official_csv.is_none() {
        anyhow::bail!("--lenient-labels is for --official-csv FILE (labels in a run are read by the judge); drop it or score the scorer CSV");
    }
    let cards: BTreeMap<String, Scorecard> = if let Some(csv) = &a.official_csv {
        let items = a.data.as_deref().map(Dataset::load).transpose()?;
        let labels = if a.lenient_labels { official::Labels::Lenient } else { official::Labels::Exact };
        let read = official::read(csv, items.as_ref().map(|d| d.items.as_slice()), labels)?;
        if let Some(w) = read.variants_warning(csv) {
            eprintln!("warning: {w}");
        }
        read.by_model
            .into_iter()
            .map(|(m, vs)| Ok((m.clone(), metrics::score(&vs, &opts).with_context(|| format!("scoring {m}"))?)))
            .collect::<Result<_>>()?
    } else {
        let dir = a.run.as_deref().expect("checked above");
        let run = RunDir::read(dir)?;
        let cards = score_run(&run, &opts)?;
        store::write_json_atomic(&dir.join(store::SCORES), &cards)?;
        if !a.json {
            eprintln!("wrote {}", dir.join(store::SCORES).display());
        }
        cards
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&cards)?);
    } else {
        for (name, sc) in &cards {
            outln!("{}", report::scorecard_table(name, sc));
        }
    }
    Ok(())
}
