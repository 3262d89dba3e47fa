//! What is read out of judged runs: [`metrics`] (Safe@1/k, Think@1/k, F-score with bootstrap
//! intervals), [`agree`] (two labellings of the same samples), [`compare`] (two runs, paired),
//! [`report`] (markdown, HTML and SVG), and [`review`] (failing samples to read by hand).
//! [`judged_run`] loads a run for all of them.

pub mod agree;
pub mod bootstrap;
pub mod compare;
pub mod judged_run;
pub mod metrics;
pub mod report;
pub mod review;
pub mod stats;
pub mod sweep;
