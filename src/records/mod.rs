//! The plain types every stage reads and writes: the benchmark [`Item`], one generated
//! [`SampleRecord`] (a line of `samples.jsonl`) and one judged [`Verdict`] (a line of
//! `verdicts.jsonl`), and the key that ties a verdict to its sample. Nothing here loads,
//! runs or prints anything; every other module may import these, and they import nothing
//! of the crate.

mod item;
mod sample;
mod verdict;

pub use item::{Item, Risk, Scenario, PRIMARY_CATEGORIES};
pub use sample::{response_missing, Decoding, FinishReason, SampleRecord};
pub use verdict::{LabelProbs, SafetyLabel, ThinkingLabel, Verdict};

/// The configuration name of a run without a decoding sweep.
pub fn default_config() -> String {
    "default".to_string()
}

/// The key of a sample or verdict record in a run: `item#sample@config`.
pub fn record_key(item_id: &str, sample_index: u32, config: &str) -> String {
    format!("{item_id}#{sample_index}@{config}")
}

/// The lower-case hex sha256 of `bytes`: how manifests and verdicts name the data, rubrics,
/// templates and rules they were made with.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
