//! `bsa judge`: label every sample of a run with a judge model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{positive, EngineArgs, JudgeOpts, RemoteArgs};
use bsa::pipeline::judge::run::{self as judge_run, JudgeOptions, JudgeSummary};

#[derive(Debug, Args)]
pub struct JudgeArgs {
    /// The run directory (its samples.jsonl is judged into verdicts.jsonl).
    pub run: PathBuf,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The data file, if it moved since generation (it must be the same file, by sha256).
    #[arg(long)]
    pub data: Option<String>,
    /// Most judge requests decoding at once (local judge).
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// If RUN holds verdicts, leave them: copy its samples to RUN-2 (RUN-3, ...) and judge
    /// the copy. To judge a run again with other judge settings.
    #[arg(long)]
    pub new_run: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub(super) fn judge_options(j: &JudgeOpts, run: PathBuf, data: Option<String>, batch_size: usize, engine: &EngineArgs, quiet: bool, remote: &RemoteArgs) -> JudgeOptions {
    JudgeOptions {
        judge: j.judge.clone(),
        rubrics_dir: j.judge_prompts.clone(),
        data,
        max_new_tokens: j.judge_max_new_tokens,
        retries: j.judge_retries,
        format: j.judge_format,
        analysis_tokens: j.judge_analysis_tokens,
        structured: j.judge_structured,
        // A judge's prompts are short and every request is one sample: the defaults serve.
        local: engine.local(batch_size, 512, 16, None),
        run,
        new_run: false,
        progress: !quiet,
        remote: remote.options(),
    }
}

pub(super) fn print_judge_summary(s: &JudgeSummary) {
    let run = &s.run;
    if s.written == 0 {
        outln!("{}: all {} samples were already judged; nothing to do", run.display(), s.skipped);
    } else {
        outln!(
            "{}: judged {} samples ({} already judged) with {} judge calls in {:.1} s; {} label(s) unreadable after retries{}",
            run.display(),
            s.written,
            s.skipped,
            s.judge_calls,
            s.seconds,
            s.invalid_labels,
            if s.refused > 0 { format!(" ({} refused by the judge server; their verdicts keep its message)", s.refused) } else { String::new() }
        );
        if let Some(prefill) = s.prefill.describe() {
            outln!("  judge {prefill}");
        }
    }
}

pub(super) fn run(a: JudgeArgs) -> Result<()> {
    let opts = JudgeOptions { new_run: a.new_run, ..judge_options(&a.judge, a.run, a.data, a.batch_size, &a.engine, a.quiet, &a.remote) };
    let s = judge_run::judge(&opts)?;
    if s.run != opts.run {
        outln!("{} holds verdicts: judged a copy of its samples, {}", opts.run.display(), s.run.display());
    }
    print_judge_summary(&s);
    Ok(())
}
