//! `bsa sweep`: a grid of decoding configurations (temperature x top-p x top-k [x min-p])
//! generated in one engine pass, judged, and scored per configuration with intervals.
//!
//! Every (item, sample, configuration) is a row of the same scheduler run; an item's samples
//! of all configurations share one prefill. Records carry a readable configuration name
//! (`t0.6_p0.95_k20`, plus `_m0.05` when min-p is swept) and its decoding, so the run is
//! resumed, judged and scored per configuration. `sweep.json` holds, per configuration, its
//! name, decoding and scorecard ([`crate::analysis::sweep`]); `bsa report RUN` draws the
//! heatmaps.

use std::path::PathBuf;

use anyhow::Result;

use super::decoding::{DecodingGrid, GRID_AXES};
use super::generate::{generate_grid, GenerateOptions, GenerateSummary};
use super::judge::run::{judge, JudgeOptions, JudgeSummary};
use crate::analysis::metrics::ScoreOptions;
use crate::analysis::sweep::{score_configs, SweepResults, SWEEP_JSON};
use crate::store::{self, RunDir};

#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub generate: GenerateOptions,
    pub grid: DecodingGrid,
    /// The judge's settings (`run` is filled in with the run directory).
    pub judge: JudgeOptions,
    pub score: ScoreOptions,
}

pub struct SweepOutcome {
    pub run: PathBuf,
    pub generated: GenerateSummary,
    pub judged: JudgeSummary,
    pub results: SweepResults,
}

/// Generates the grid (one engine pass), judges every sample, scores each configuration,
/// and writes sweep.json. Each stage resumes.
pub fn sweep(opts: &SweepOptions) -> Result<SweepOutcome> {
    opts.score.validate()?;
    opts.grid.check()?;
    // The judge's settings are checked before the grid is generated, not after.
    super::judge::run::check_options(&opts.judge)?;
    let generated = generate_grid(&opts.generate, Some(&opts.grid))?;
    let run = generated.run.clone();
    let judged = judge(&JudgeOptions { run: run.clone(), ..opts.judge.clone() })?;
    let dir = RunDir::read(&run)?;
    let results = score_configs(&dir, &generated.configs, &opts.score)?;
    let results = SweepResults {
        grid: GRID_AXES
            .iter()
            .filter_map(|&k| Some((k.to_string(), dir.manifest.job.decoding.as_ref()?.get(k)?.clone())))
            .collect(),
        samples: opts.generate.samples,
        configs: results,
    };
    store::write_json_atomic(&run.join(SWEEP_JSON), &results)?;
    Ok(SweepOutcome { run, generated, judged, results })
}

