//! `bsa`: the "Beyond Safe Answers" benchmark (arXiv 2505.19690) on your own hardware.
//!
//! The data flows one way: [`dataset`] -> prompts -> generation -> samples.jsonl ->
//! judge -> verdicts.jsonl -> [`metrics`] -> report. Every stage reads and writes plain
//! records kept by [`store`], so each can be run, resumed or replaced on its own.

pub mod agree;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod dataset;
pub mod engine;
pub mod generation;
pub mod gpu_check;
pub mod hub;
pub mod judge;
pub mod judged_run;
pub mod metrics;
pub mod official;
pub mod prompt;
pub mod reasoning;
pub mod serve;
pub mod report;
pub mod safety_rules;
pub mod store;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod sweep;
pub mod verdict;
