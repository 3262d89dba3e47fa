//! `bsa`: the "Beyond Safe Answers" benchmark (arXiv 2505.19690) on your own hardware.
//!
//! The modules follow the data, which flows one way:
//!
//! ```text
//! data ─► prompt ─► backends (engine | openai) ─► pipeline::generate ─► samples.jsonl
//!      ─► pipeline::judge ─► verdicts.jsonl ─► analysis (metrics, report) ─► scores, reports
//! ```
//!
//! In the order src/lib.rs declares them:
//! - [`records`]: the plain types every stage reads and writes (item, sample, verdict).
//! - [`hub`]: files from the Hugging Face hub cache; [`progress`]: progress bars.
//! - [`data`]: the benchmark data (CSV, JSONL, hub) and the authors' scorer CSV.
//! - [`prompt`]: chat templates, safety rules, splitting thinking from response.
//! - [`engine`]: the batched inference engine (models, KV cache, scheduler, sampler);
//!   self-contained, it knows nothing of benchmarks, judges or run directories.
//! - [`backends`]: where completions come from: the local engine or an OpenAI-compatible
//!   server, behind one interface.
//! - [`store`]: the run directory (manifest, append-only JSONL logs, resume, merge).
//! - [`analysis`]: what is read out of judged runs: metrics with intervals, judge
//!   agreement, run comparisons, sweep tables, reports with plots.
//! - [`pipeline`]: the stages that write a run: generate, judge, and the decoding sweep
//!   (which scores each configuration with [`analysis`]).
//! - [`serve`]: the local engine behind an OpenAI-compatible HTTP API.
//!
//! A module may import the ones declared before it, never one after it (the engine imports
//! none; tests/layout.rs checks both); ARCHITECTURE.md has the map.

pub mod records;
pub mod hub;
pub mod progress;
pub mod data;
pub mod prompt;
pub mod engine;
pub mod backends;
pub mod store;
pub mod analysis;
pub mod pipeline;
pub mod serve;
