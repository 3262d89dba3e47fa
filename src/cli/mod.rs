//! The `bsa` command line: one file per command, each with its clap arguments and the glue
//! that calls the library and prints. Flag groups several commands share are in [`args`].
//! This module belongs to the binary, not the library.

/// `print!` for a command's results, written with [`write_stdout`].
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_stdout(format_args!($($t)*)) };
}

/// `println!` for a command's results, written with [`write_stdout`].
macro_rules! outln {
    () => { $crate::cli::write_stdout(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::write_stdout(format_args!("{}\n", format_args!($($t)*))) };
}

mod agree;
mod args;
mod bench;
mod compare;
mod data;
mod dev;
mod eval;
mod export;
mod generate;
mod gpu_check;
mod judge;
mod merge;
mod models;
mod report;
mod review;
mod score;
mod serve;
mod sweep;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Writes to standard output. A reader that went away (`bsa models | head -1`) ends nothing:
/// the command finishes its work, whose files are what matter, and exits as it would have.
/// Any other failure to write (a full disk under `> file`) stops the process with a message
/// instead of a panic; what the command wrote to its own files stays.
pub(crate) fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write to standard output: {e}; what the command wrote to its files is kept");
            std::process::exit(1);
        }
        _ => {}
    }
}

/// An error as one line of causes, outermost first ("reading X: parsing Y: bad value"), as
/// `{:#}` prints it, but without the backtraces some causes write into their own message
/// (candle's errors do when RUST_BACKTRACE is set): the message is the same in every
/// environment.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    e.chain().map(|c| without_backtrace(&c.to_string())).filter(|c| !c.is_empty()).collect::<Vec<_>>().join(": ")
}

/// `text` without the lines of a std backtrace: frames ("  12: candle_core::error::Error::bt"),
/// their locations ("at /path/file.rs:260:25") and the headers around them.
fn without_backtrace(text: &str) -> String {
    let frame = |l: &str| {
        let t = l.trim_start();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        (digits > 0 && t[digits..].starts_with(": ") && l.starts_with(' '))
            || (t.starts_with("at ") && l.starts_with("  ") && t.rsplit(':').next().is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit())))
            || t == "stack backtrace:"
            || t.starts_with("note: Some details are omitted")
            || t == "<unknown>"
    };
    // The backtrace stands on lines of its own inside the message ("{inner}\n{backtrace}"),
    // so the text after it joins the text before it again.
    let mut out = String::new();
    let mut cut = false;
    for line in text.lines() {
        if frame(line) {
            cut = true;
            continue;
        }
        if !out.is_empty() && !cut {
            out.push('\n');
        }
        out.push_str(if cut { line.trim_start() } else { line });
        cut = false;
    }
    out.trim().to_string()
}

#[derive(Debug, Parser)]
#[command(
    name = "bsa",
    version,
    about = "Beyond Safe Answers: is a reasoning model safe for the right reasons?",
    long_about = "Beyond Safe Answers (arXiv 2505.19690) on your own hardware.\n\n\
Each benchmark query is sampled k times; a judge labels every sample's response (Safe/Unsafe) \
and its thinking (did it identify the annotated risks). bsa reports Safe@1, Safe@k, Think@1, \
Think@k per scenario and per risk category, and the F-score, with bootstrap intervals.\n\n\
A run lives in one directory (runs/NAME): manifest.json, samples.jsonl, verdicts.jsonl, \
scores.json. Every stage appends as it goes and resumes where it stopped."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and validate benchmark data.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Sample completions for benchmark items with the local engine into a run directory.
    Generate(generate::GenerateArgs),
    /// Label every sample of a run (response safety, thinking) with a judge model.
    Judge(judge::JudgeArgs),
    /// The whole benchmark in one command: generate, judge, score (each stage resumes).
    Eval(eval::EvalArgs),
    /// A decoding grid (temperature x top-p x top-k [x min-p]) in one batched engine pass,
    /// judged and scored per configuration, with intervals.
    Sweep(sweep::SweepArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models,
    /// /health); concurrent requests share one continuous batch.
    Serve(serve::ServeArgs),
    /// List the model presets (models/*.toml): hub id, architecture, recommended sampling.
    Models(models::ModelsArgs),
    /// Compute every metric from a run's verdicts or from the authors' scorer CSV.
    Score(score::ScoreArgs),
    /// Write a run's verdicts in the authors' scorer format.
    Export(export::ExportArgs),
    /// Combine the runs of the shards of one job (see --shard) into one run.
    Merge(merge::MergeArgs),
    /// Judge agreement on the same samples: Cohen's kappa, confusion, a review sheet.
    Agree(agree::AgreeArgs),
    /// Did run B move the metrics, or only the noise? Paired intervals and McNemar tests.
    Compare(compare::CompareArgs),
    /// Write report.md, a self-contained report.html and SVG plots for one or more runs.
    Report(report::ReportArgs),
    /// Write a run's failing samples (of a scenario or category) as a CSV with columns for
    /// your notes and a readable HTML page: read the failures before trying a fix.
    Review(review::ReviewArgs),
    /// Benchmarks (never part of the tests).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Developer checks run by scripts/gpu/check.sh (parity with transformers).
    #[command(subcommand, hide = true)]
    Dev(dev::DevCommand),
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(c) => data::run(c),
        Command::Generate(a) => generate::run(a),
        Command::Judge(a) => judge::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Models(a) => models::run(a),
        Command::Score(a) => score::run(a),
        Command::Export(a) => export::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Agree(a) => agree::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Report(a) => report::run(a),
        Command::Review(a) => review::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Dev(c) => dev::run(c),
    }
}

/// A note for timings printed by a debug build.
fn debug_note() -> &'static str {
    if cfg!(debug_assertions) { "  [debug build: use --release for real numbers]" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line as a shell splits it: words at blanks, double quotes group.
    fn shell_words(line: &str) -> Vec<String> {
        let (mut words, mut word, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    started = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if started {
                        words.push(std::mem::take(&mut word));
                    }
                    started = false;
                }
                c => {
                    word.push(c);
                    started = true;
                }
            }
        }
        if started {
            words.push(word);
        }
        words
    }

    #[test]
    fn the_readme_quick_profile_commands_parse() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme.split("## A quick profile first").nth(1).expect("the section");
        let block = section.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
        let lines: Vec<String> = block.replace("\\\n", " ").lines().filter(|l| l.starts_with("bsa ")).map(str::to_string).collect();
        assert_eq!(lines.len(), 6, "{lines:?}");
        for line in lines {
            if let Err(e) = Cli::try_parse_from(shell_words(&line)) {
                panic!("README: {line}: {e}");
            }
        }
    }

    #[test]
    fn an_error_chain_prints_without_backtrace_lines() {
        let bt = "   0: candle_core::error::Error::bt\n             at /root/.cargo/registry/src/candle-core-0.11.1/src/error.rs:260:25\n   1: <unknown>\n  12: std::rt::lang_start\n             at /rustc/abc/library/std/src/rt.rs:206:5\n";
        let e = anyhow::anyhow!("cannot read the header\n{bt}").context("loading model.gguf");
        assert_eq!(error_chain(&e), "loading model.gguf: cannot read the header");
        // A candle error written into the middle of a message: the text around it joins up.
        let e = anyhow::anyhow!("model.gguf: not a GGUF file (too short\n{bt}); check the file");
        assert_eq!(error_chain(&e), "model.gguf: not a GGUF file (too short); check the file");
        // Ordinary messages, file:line references included, are kept whole.
        let e = anyhow::anyhow!("data.csv:3: field \"label\" is empty\nfix the row").context("reading data.csv");
        assert_eq!(error_chain(&e), "reading data.csv: data.csv:3: field \"label\" is empty\nfix the row");
    }
}
