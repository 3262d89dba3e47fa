//! `bsa sweep`: a decoding grid in one batched pass, judged and scored per configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{count, min_p, temperature, top_p, JudgeOpts, RunArgs, ScoreOpts};
use super::generate::{generate_options, GenerateArgs};
use super::judge::{judge_options, print_judge_summary};
use bsa::analysis::judged_run::{run_label, JudgedRun};
use bsa::analysis::metrics::Scorecard;
use bsa::analysis::report;
use bsa::store::{self, RunDir};

/// `bsa sweep`: like `bsa eval`, but the decoding flags take comma-separated lists.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Temperatures to sweep, e.g. 0.2,0.6,1.0 (default: the preset's single value).
    #[arg(long, value_delimiter = ',', value_parser = temperature)]
    pub temperature: Vec<f32>,
    /// Top-p values to sweep, e.g. 0.8,0.95,1.0.
    #[arg(long, value_delimiter = ',', value_parser = top_p)]
    pub top_p: Vec<f32>,
    /// Top-k values to sweep (0 = off), e.g. 0,20,50.
    #[arg(long, value_delimiter = ',', value_parser = count)]
    pub top_k: Vec<usize>,
    /// Min-p values to sweep; when given, configuration names get an _m suffix.
    #[arg(long, value_delimiter = ',', value_parser = min_p)]
    pub min_p: Vec<f32>,
    /// Everything else as for `bsa generate` (its --temperature/--top-p/--top-k/--min-p
    /// are replaced by the lists above).
    #[command(flatten)]
    pub generate: RunArgs,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub score: ScoreOpts,
}

pub(super) fn run(a: SweepArgs) -> Result<()> {
    let g = a.generate;
    let quiet = g.quiet;
    let judge = judge_options(&a.judge, PathBuf::new(), None, g.batch_size, &g.engine, g.quiet, &g.remote);
    // The grid supplies the decoding parameters; a sweep runs on the local engine.
    let g = GenerateArgs { run: g, temperature: None, top_p: None, top_k: None, min_p: None, backend: None };
    let opts = bsa::pipeline::sweep::SweepOptions {
        generate: generate_options(g)?,
        grid: bsa::pipeline::decoding::DecodingGrid { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, min_p: a.min_p },
        judge,
        score: a.score.options(),
    };
    let o = bsa::pipeline::sweep::sweep(&opts)?;
    let (gs, run) = (&o.generated, &o.run);
    outln!(
        "{}: {} configurations; wrote {} samples ({} already there) in {:.1} s",
        run.display(),
        gs.configs.len(),
        gs.written,
        gs.skipped,
        gs.seconds
    );
    print_judge_summary(&o.judged);
    // scores.json as `bsa score` writes it: one scorecard per configuration.
    let label = run_label(&RunDir::read(run)?);
    let cards: BTreeMap<String, Scorecard> = o.results.configs.iter().map(|c| (format!("{label}@{}", c.name), c.scorecard.clone())).collect();
    store::write_json_atomic(&run.join(store::SCORES), &cards)?;
    outln!("\n{}", bsa::analysis::sweep::table(&o.results));
    // The heatmaps: the same report `bsa report RUN` writes, into the run directory.
    let judged = JudgedRun::load(run)?;
    let rep = report::document::build(std::slice::from_ref(&judged), &report::document::ReportOptions { score: opts.score.clone(), progress: !quiet, reference: Default::default(), baseline: None })?;
    let w = report::document::write(&rep, run)?;
    outln!(
        "run directory: {} (samples.jsonl and verdicts.jsonl keyed by configuration, scores.json, {}); heatmaps in {} and {}",
        run.display(),
        bsa::analysis::sweep::SWEEP_JSON,
        w.html.display(),
        w.markdown.display()
    );
    Ok(())
}
