//! The stages that write a run directory: [`generate`] (items -> samples.jsonl), [`judge`]
//! (samples.jsonl -> verdicts.jsonl) and [`sweep`] (a decoding grid generated in one pass,
//! judged, and scored per configuration).

pub mod decoding;
pub mod generate;
pub mod judge;
pub mod sweep;
