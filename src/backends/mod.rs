//! Where completions come from: the local [`crate::engine`] ([`local`]) or any
//! OpenAI-compatible server ([`openai`]), behind one [`Backend`] interface. The stages
//! (generate, judge) build [`Request`]s and read [`Completion`]s; they never see a tokenizer,
//! a KV cache or an HTTP client. Model presets ([`preset`]) give both a known model's
//! recommended sampling and think tags.
//!
//! A new back end (another server protocol, an in-process library) is one file implementing
//! [`Backend`] and one arm in [`open`].

pub mod local;
pub mod openai;
pub mod preset;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::engine::sampler::{SamplingParams, StreamKey};
pub use crate::prompt::PromptSettings;
use crate::prompt::{split_completion, Message, SafetyRules, SplitCompletion, ThinkConvention};
use crate::records::{Decoding, FinishReason};
use preset::Preset;

/// One conversation and the samples to draw from it (locally they share one prefill).
#[derive(Debug, Clone)]
pub struct Request {
    /// What the request is for, in warnings and errors ("item a1").
    pub label: String,
    /// The conversation so far, without the system text (see [`PromptSettings::system`]).
    pub messages: Vec<Message>,
    /// Text the reply starts with; the model continues it (local backends only).
    pub reply_start: Option<String>,
    pub samples: Vec<SampleRequest>,
    /// A server's refusal of this one request ([`openai::Refusal`]: a content filter, a
    /// prompt too long) comes back as a [`Completion`] with `refused` set instead of failing
    /// the whole call. Local backends never refuse.
    pub accept_refusal: bool,
    /// Structured output: the reply must be a label in a JSON object (None: free text).
    pub label_format: Option<LabelFormat>,
}

/// A reply that is valid by construction: free analysis text (optionally), then one JSON
/// object `{"KEY": "LABEL"}` whose value is one of the labels, and nothing after it.
///
/// Locally it is a grammar the engine decodes under (llguidance; see
/// [`crate::engine::constraint`]); a server is sent it as `response_format` with a JSON
/// schema ([`LabelFormat::response_format`]), which OpenAI, vLLM and SGLang accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelFormat {
    /// The JSON key of the label (`Safe_Ans_Check`).
    pub key: String,
    /// The allowed values, in the order [`Completion::label_probs`] reports them. None
    /// holds a quote, a backslash or a control character (they would need escaping in the
    /// JSON).
    pub labels: Vec<String>,
    /// Free text before the object, at most this many tokens (the rubric's reasoning
    /// before its verdict); None: the reply is the object alone, and a local engine starts
    /// it in the prompt (`{"KEY": "`) so the first decoded token is the label's.
    pub analysis_tokens: Option<usize>,
}

/// Characters of a server's analysis per `analysis_tokens` (English text runs about four
/// characters a token).
pub const ANALYSIS_CHARS_PER_TOKEN: usize = 4;

impl LabelFormat {
    /// Whether `text` may be a key or a label: not blank, and nothing a JSON string would
    /// have to escape (a quote, a backslash, a control character), so the text the judge
    /// writes is the text the format names.
    pub fn is_plain(text: &str) -> bool {
        !text.trim().is_empty() && !text.chars().any(|c| c == '"' || c == '\\' || c.is_control())
    }

    /// The reply's start a local engine puts in the prompt for a label-only format.
    pub fn reply_start(&self) -> Option<String> {
        self.analysis_tokens.is_none().then(|| self.label_prefix())
    }

    /// The text the label follows in the reply: `{"KEY": "`.
    pub fn label_prefix(&self) -> String {
        format!("{{{}: \"", serde_json::to_string(&self.key).expect("a string"))
    }

    /// The OpenAI `response_format` of this format: a strict JSON schema with the key's
    /// value an enum of the labels and, with analysis, an `analysis` string before it
    /// (properties are generated in order, so the reasoning comes first), at most
    /// [`ANALYSIS_CHARS_PER_TOKEN`] characters per analysis token (a schema bounds
    /// characters, not tokens).
    pub fn response_format(&self) -> Value {
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        if let Some(n) = self.analysis_tokens {
            properties.insert("analysis".into(), serde_json::json!({"type": "string", "maxLength": n * ANALYSIS_CHARS_PER_TOKEN}));
            required.push("analysis".to_string());
        }
        properties.insert(self.key.clone(), serde_json::json!({"type": "string", "enum": self.labels}));
        required.push(self.key.clone());
        serde_json::json!({
            "type": "json_schema",
            "json_schema": {
                "name": "verdict",
                "strict": true,
                "schema": {"type": "object", "properties": properties, "required": required, "additionalProperties": false},
            },
        })
    }
}

/// One sample of a [`Request`].
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// The caller's handle, given back with the completion; unique within one call.
    pub tag: usize,
    /// Sampling, `max_new_tokens` and stop strings of this sample.
    pub decoding: Decoding,
    /// The local sampler's random stream (see [`StreamKey`]): (seed, item, sample index).
    pub stream: StreamKey,
    /// The `seed` a server is sent with this sample (None: the field is left out).
    pub seed: Option<u64>,
}

/// What one sample came back as.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tag: usize,
    /// What the model wrote: locally the decoded text (starting with the request's reply
    /// start, cut before a matched stop string); from a server its `content`.
    pub text: String,
    /// The thinking, when a server returned it apart from the content (`reasoning_content`).
    pub reasoning: Option<String>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The server's refusal of the request (its message); the text is empty. Only for
    /// requests with [`Request::accept_refusal`].
    pub refused: Option<String>,
    /// Under a [`LabelFormat`] on the local engine: each label's probability where the
    /// label starts, in [`LabelFormat::labels`] order (see
    /// [`crate::engine::constraint::Guide::choice_probs`]).
    pub label_probs: Option<Vec<f64>>,
    /// Why the sample ended with [`FinishReason::Error`] (the local engine's message, or
    /// why a server's reply could not be read).
    pub error: Option<String>,
}

impl Completion {
    /// The completion of a refused request: no text, the server's message.
    pub fn refused(tag: usize, message: String) -> Completion {
        Completion { tag, text: String::new(), reasoning: None, finish: FinishReason::Stop, prompt_tokens: 0, completion_tokens: 0, refused: Some(message), label_probs: None, error: None }
    }

    /// Thinking and response: the server's reasoning field when it has one, else the think
    /// tags in the text (an R1-style text with only `</think>` counts its first part as
    /// thinking).
    pub fn split(&self, think: &ThinkConvention) -> SplitCompletion {
        match self.reasoning.as_deref().filter(|r| !r.trim().is_empty()) {
            Some(r) => SplitCompletion {
                thinking: r.trim().to_string(),
                response: self.text.trim().to_string(),
                // Cut off while thinking: the length ran out before any answer.
                truncated_thinking: self.finish == FinishReason::Length && self.text.trim().is_empty(),
                had_think_tags: true,
            },
            None => split_completion(&self.text, think),
        }
    }

    /// The completion as one text: the reasoning put back between think tags when a server
    /// returned it apart.
    pub fn raw(&self, think: &ThinkConvention) -> String {
        match self.reasoning.as_deref().filter(|r| !r.trim().is_empty()) {
            Some(r) => format!("{}{r}{}{}", think.open, think.close, self.text),
            None => self.text.clone(),
        }
    }
}

/// Progress of a running [`Backend::complete`] (local engines report every step).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Tokens decoded in this step.
    pub decoded_tokens: usize,
    /// Sequences decoding now.
    pub running: usize,
    /// Prompt tokens computed in this step, and taken from the prefix cache instead.
    pub prefill: PrefillStats,
    /// Sequences preempted in this step for lack of KV-cache blocks (recomputed later).
    pub preempted: usize,
}

/// What a local engine prefilled (summed over steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefillStats {
    /// Tokens computed by prefill: prompts, and sequences set aside and recomputed.
    pub computed: usize,
    /// Tokens taken from the prefix cache instead of being computed.
    pub cached: usize,
}

impl PrefillStats {
    pub fn add(&mut self, other: PrefillStats) {
        self.computed += other.computed;
        self.cached += other.cached;
    }

    /// The share of prompt tokens taken from the cache, in [0, 1]; None before any prompt.
    pub fn hit_rate(&self) -> Option<f64> {
        let all = self.computed + self.cached;
        (all > 0).then(|| self.cached as f64 / all as f64)
    }

    /// "prefill: N tokens computed, M taken from the prefix cache (P% hit rate)", or None when
    /// no prompt went through a local engine.
    pub fn describe(&self) -> Option<String> {
        let rate = self.hit_rate()?;
        Some(format!("prefill: {} tokens computed, {} taken from the prefix cache ({:.1}% hit rate)", self.computed, self.cached, 100.0 * rate))
    }
}

/// A source of completions.
pub trait Backend {
    /// The model's name in verdicts and scores (a preset name, a path, a server's model).
    fn model_id(&self) -> &str;
    /// Where it runs, as the manifest's `device` records it (`Cpu`, `remote: URL`).
    fn device(&self) -> String;
    /// Where it runs, for messages ("the local engine", a server's base URL).
    fn location(&self) -> String;
    /// The model's preset, when it is a known model (its sampling defaults).
    fn preset(&self) -> Option<&Preset>;
    /// The think tags of its completions.
    fn think(&self) -> ThinkConvention;
    /// The manifest's `model` entry of a generation run.
    fn manifest_model(&self) -> Value;
    /// The manifest's `prompt` entry of a generation run: how prompts were built from
    /// `system_flag` (`--system`) and `rules` (`--safety-rules`).
    fn manifest_prompt(&self, system_flag: Option<&str>, rules: Option<&SafetyRules>) -> Value;
    /// The manifest's `judge` entry when this backend judges.
    fn manifest_judge(&self) -> Value;
    /// The local engine's KV cache and longest sequence (None for a server).
    fn cache_plan(&self) -> Option<&local::CachePlan> {
        None
    }
    /// Runs every request. Each completion goes to `on_completion` as soon as it is done,
    /// so callers can append it at once; an error from it stops the run (completions
    /// already handed over stay handed over). `on_progress` sees every engine step.
    fn complete(
        &mut self,
        requests: Vec<Request>,
        on_completion: &mut dyn FnMut(Completion) -> Result<()>,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<()>;
}

/// The engine's sampling parameters of a decoding.
pub fn sampling_params(d: &Decoding) -> SamplingParams {
    SamplingParams { temperature: d.temperature, top_k: d.top_k, top_p: d.top_p, min_p: d.min_p }
}

/// Opens the backend `spec` names: `openai:MODEL@BASE_URL` for a server, `local:MODEL` or a
/// bare MODEL (a .gguf, a model directory, a preset, a hub id) for the local engine. `flag`
/// names the option in errors.
pub fn open(spec: &str, flag: &str, prompt: &PromptSettings, local: &local::LocalOptions, remote: &openai::ClientOptions) -> Result<Box<dyn Backend>> {
    if spec.starts_with("openai:") {
        if local.adapter.is_some() {
            bail!("--adapter merges LoRA weights into a local model; with {flag} load the adapter on the server");
        }
        return Ok(Box::new(openai::OpenAiBackend::open(spec, flag, prompt, remote)?));
    }
    let model = spec.strip_prefix("local:").unwrap_or(spec);
    Ok(Box::new(local::LocalBackend::open(model, prompt, local)?))
}

/// Checks `spec` as [`open`] takes it, without loading the weights or calling a server: the
/// form of `openai:MODEL@BASE_URL` and its API key variable; for the local engine, that the
/// .gguf file (or the preset's) has a readable header and holds every tensor it lists, or
/// that the model directory (or the hub model, from the cache or fetched) has a valid
/// config.json, a tokenizer.json and weights. It takes well under a second: `bsa eval` and
/// `bsa sweep` check their judge with it before hours of generation; `flag` names the
/// option in errors.
pub fn check(spec: &str, flag: &str, remote: &openai::ClientOptions) -> Result<()> {
    if spec.starts_with("openai:") {
        openai::Client::new(openai::Endpoint::parse(spec, flag)?, remote.clone())?;
        return Ok(());
    }
    let model = spec.strip_prefix("local:").unwrap_or(spec);
    let path = std::path::Path::new(model);
    if !path.exists() && preset::find(model).is_none() {
        if model.ends_with(".gguf") || model.starts_with('.') || model.starts_with('/') || model.split('/').count() > 2 {
            bail!("{flag} {spec}: no such file or directory; check the path");
        }
        if model.split('/').count() != 2 || model.split('/').any(str::is_empty) {
            bail!("{flag} {spec:?} is not a file, a model directory, a preset (see `bsa models`) or a hub id OWNER/NAME");
        }
    }
    let (source, _) = local::resolve(model).with_context(|| format!("{flag} {spec}"))?;
    match source {
        local::ModelSource::Gguf(p) => check_gguf(&p).with_context(|| format!("{flag} {spec}")),
        local::ModelSource::Dir(d) => {
            let file = |name: &str| Ok(Some(d.join(name)).filter(|p| p.exists()));
            check_model_files(&d.display().to_string(), file, d.read_dir().map_or(false, |mut r| r.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "safetensors")))))
                .with_context(|| format!("{flag} {spec}"))
        }
        // A hub model's weights are resolved at load (possibly downloaded); its small files now.
        local::ModelSource::Hub(id) => check_model_files(&id, |name| crate::hub::resolve_model_file(&id, name), true).with_context(|| format!("{flag} {spec}")),
    }
}

/// A GGUF file's header, metadata and tensor table, and that the file is long enough for
/// every tensor (a cut-off download fails here, not at load).
pub(crate) fn check_gguf(p: &std::path::Path) -> Result<()> {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(p).map_err(|e| anyhow!("cannot read {}: {e}; check the path", p.display()))?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut f, &mut magic).map_err(|e| anyhow!("cannot read {}: {e}; give a .gguf model file", p.display()))?;
    if &magic != b"GGUF" {
        bail!("{} is not a GGUF file (it starts with {:?}, not \"GGUF\"); give a .gguf model file", p.display(), String::from_utf8_lossy(&magic));
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = std::io::BufReader::new(f);
    std::io::Seek::rewind(&mut r)?;
    let content = Content::read(&mut r).map_err(|e| anyhow!("{}: not a readable GGUF file ({e}); download it again", p.display()))?;
    for (name, t) in &content.tensor_infos {
        let bytes = (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64;
        let end = content.tensor_data_offset + t.offset + bytes;
        if end > len {
            bail!("{} is cut short: tensor {name} ends at byte {end}, the file has {len} bytes; download it again", p.display());
        }
    }
    Ok(())
}

/// A model directory's (or hub model's) config.json parses, and a tokenizer.json and weights
/// are there.
fn check_model_files(label: &str, file: impl Fn(&str) -> Result<Option<std::path::PathBuf>>, has_weights: bool) -> Result<()> {
    let need = "a model directory needs config.json, tokenizer.json, tokenizer_config.json and *.safetensors";
    let config = file("config.json")?.ok_or_else(|| anyhow!("{label}: no config.json; {need}"))?;
    let text = std::fs::read_to_string(&config).map_err(|e| anyhow!("cannot read {}: {e}", config.display()))?;
    crate::engine::config::ModelConfig::from_hf_config(&text).with_context(|| config.display().to_string())?;
    let tokenizer = file("tokenizer.json")?.ok_or_else(|| anyhow!("{label}: no tokenizer.json; {need}"))?;
    tokenizers::Tokenizer::from_file(&tokenizer).map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", tokenizer.display()))?;
    if !has_weights {
        bail!("{label}: no *.safetensors weights; {need}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(text: &str, reasoning: Option<&str>, finish: FinishReason) -> Completion {
        Completion { tag: 0, text: text.into(), reasoning: reasoning.map(str::to_string), finish, prompt_tokens: 3, completion_tokens: 1, refused: None, label_probs: None, error: None }
    }

    #[test]
    fn a_separate_reasoning_field_is_the_thinking_and_goes_back_between_tags() {
        let think = ThinkConvention::default();
        let c = completion("Answer.", Some(" Risky. "), FinishReason::Stop);
        let s = c.split(&think);
        assert_eq!((s.thinking.as_str(), s.response.as_str(), s.truncated_thinking), ("Risky.", "Answer.", false));
        assert_eq!(c.raw(&think), "<think> Risky. </think>Answer.");
        // Cut off while thinking: no answer, the length ran out.
        assert!(completion("", Some("Still thinking"), FinishReason::Length).split(&think).truncated_thinking);
        // Without the field, the tags in the text decide.
        let c = completion("<think>Risky.</think>Answer.", None, FinishReason::Stop);
        assert_eq!(c.split(&think).thinking, "Risky.");
        assert_eq!(c.raw(&think), c.text);
    }
}
