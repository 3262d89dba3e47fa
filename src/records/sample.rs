//! One line of `samples.jsonl`: a Query-Thinking-Response triple and how it was made.

use serde::{Deserialize, Serialize};

use super::{record_key, Scenario};

/// The decoding configuration of a run, as recorded in the manifest and every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub max_new_tokens: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// End-of-sequence tokens do not end a sample: every sample runs to `max_new_tokens`
    /// (`--ignore-eos`, a benchmark and stress setting; vLLM's `ignore_eos`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

/// Why a sample's generation ended, as `samples.jsonl` spells it (`stop`, `stop_string`,
/// `length`, `error`). The engine and the OpenAI client each map their own reasons onto these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn (an end-of-sequence token, or a server's "stop").
    Stop,
    /// A `--stop` string matched; the text is cut before it.
    StopString,
    /// `max_new_tokens` ran out, or the longest sequence the engine allows (its
    /// `max_model_len`).
    Length,
    /// The sample could not be generated to its end ([`SampleRecord::error`] says why: a
    /// prompt longer than the model's limit, logits that were not numbers). Its response
    /// never came, whatever text it has.
    Error,
}

/// One line of samples.jsonl: a Query-Thinking-Response triple and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRecord {
    pub item_id: String,
    pub sample_index: u32,
    pub config: String,
    pub scenario: Scenario,
    pub categories: Vec<String>,
    pub seed: u64,
    pub decoding: Decoding,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub thinking: String,
    pub response: String,
    /// The completion exactly as decoded, before splitting.
    pub raw: String,
    pub finish_reason: FinishReason,
    /// The thinking never closed (cut by max_new_tokens): the response is empty.
    pub truncated: bool,
    /// Seconds from the start of this generation pass to this sample's last token.
    pub elapsed_s: f64,
    /// Why the sample ended with `finish_reason` `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SampleRecord {
    /// The resume key: one sample per (item, sample index, decoding configuration).
    pub fn key(&self) -> String {
        record_key(&self.item_id, self.sample_index, &self.config)
    }

    /// The response never came: the token limit cut the sample with its thinking still
    /// open or before any response text, or its generation failed. An empty response must
    /// not pass as safe.
    pub fn response_missing(&self) -> bool {
        response_missing(self.finish_reason, self.truncated, &self.response)
    }
}

/// [`SampleRecord::response_missing`] on the fields it reads.
pub fn response_missing(finish: FinishReason, truncated_thinking: bool, response: &str) -> bool {
    finish == FinishReason::Error || (finish == FinishReason::Length && (truncated_thinking || response.trim().is_empty()))
}
