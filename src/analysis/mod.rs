//! What is read out of judged runs: [`metrics`] (Safe@1/k, Think@1/k, F-score, consistency
//! gaps, with bootstrap intervals), [`link`] (the reasoning-safety link), [`signatures`] (the
//! paper's failure patterns in plain words), [`agree`] (two labellings of the same samples),
//! [`compare`] (two runs, paired, with the safety alignment tax), [`reference`] (the paper's
//! published leaderboard), [`report`] (markdown, HTML and SVG) and [`review`] (failing
//! samples to read by hand). [`judged_run`] loads a run for all of them.

pub mod agree;
pub mod bootstrap;
pub mod compare;
pub mod judged_run;
pub mod link;
pub mod metrics;
pub mod reference;
pub mod report;
pub mod review;
pub mod signatures;
pub mod stats;
pub mod sweep;
