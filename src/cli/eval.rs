//! `bsa eval`: generate, judge and score in one command.

use anyhow::Result;
use clap::Args;

use super::args::{JudgeOpts, ScoreOpts};
use super::generate::{generate, GenerateArgs};
use super::judge::{judge_options, print_judge_summary};
use bsa::analysis::judged_run::score_run;
use bsa::analysis::report;
use bsa::store::{self, RunDir};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub generate: GenerateArgs,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub score: ScoreOpts,
}

pub(super) fn run(a: EvalArgs) -> Result<()> {
    let g = &a.generate.run;
    let (batch, engine, quiet, remote) = (g.batch_size, g.engine.clone(), g.quiet, g.remote.clone());
    let score_opts = a.score.options();
    score_opts.validate()?;
    // The judge's settings are checked before hours of generation, not after.
    bsa::pipeline::judge::run::check_options(&judge_options(&a.judge, Default::default(), None, batch, &engine, quiet, &remote))?;
    let run = generate(a.generate)?;
    let opts = judge_options(&a.judge, run.clone(), None, batch, &engine, quiet, &remote);
    let s = bsa::pipeline::judge::run::judge(&opts)?;
    print_judge_summary(&s);
    let dir = RunDir::read(&run)?;
    let cards = score_run(&dir, &score_opts)?;
    store::write_json_atomic(&run.join(store::SCORES), &cards)?;
    for (name, sc) in &cards {
        outln!("\n{}", report::scorecard_table(name, sc));
    }
    outln!("run directory: {} (manifest.json, samples.jsonl, verdicts.jsonl, scores.json)", run.display());
    Ok(())
}
