//! Flag groups that several commands share.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bsa::analysis::metrics::{InvalidPolicy, ScoreOptions, TruncatedPolicy, AUTHORS_F_ALPHA};
use bsa::backends::local::{CacheSizing, LocalOptions};
use bsa::backends::openai::MaxTokensField;
use bsa::pipeline::judge::run::ReplyFormat;
use bsa::prompt::PromptSettings;
use bsa::data::{read_id_file, Selection, Shard};
use bsa::records::Scenario;

/// Which items of the data to use.
#[derive(Debug, Clone, Args, Default)]
pub struct SelectArgs {
    /// Keep only these scenarios ("Risk Omission", "Cognitive Shortcut", "Over Sensitivity",
    /// or RO, CS, OS); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// Keep items with a risk in these primary categories (any case); repeatable.
    #[arg(long)]
    pub category: Vec<String>,
    /// A balanced quick profile: N items of each scenario, after the filters above, shared
    /// out over the primary categories in proportion to their share of the scenario (a
    /// Cognitive Shortcut item counts under its first risk's category) and drawn with
    /// --selection-seed. A scenario with fewer items gives all of them (with a note). Items
    /// keep the data's order; --limit and --shard apply after this.
    #[arg(long, value_name = "N", value_parser = positive)]
    pub per_scenario: Option<usize>,
    /// The seed of the --per-scenario draw (default 0), kept apart from --seed so that
    /// runs with different sampling seeds profile the same items. The manifest records it
    /// with the selection, so a resume draws the same items.
    #[arg(long, value_name = "SEED", value_parser = seed, requires = "per_scenario")]
    pub selection_seed: Option<u64>,
    /// Keep the first N items (after the filters above, before sharding).
    #[arg(long, value_name = "N", value_parser = positive)]
    pub limit: Option<usize>,
    /// Keep only the ids listed in FILE (one per line, # comments allowed).
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
    /// Take shard I of N (0-based): a stable split by id that covers every item exactly once.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
}

impl SelectArgs {
    pub fn to_selection(&self) -> Result<Selection> {
        let scenarios = self
            .scenario
            .iter()
            .map(|s| {
                Scenario::parse(s).ok_or_else(|| {
                    anyhow::anyhow!("--scenario {s:?} is not a scenario; use \"Risk Omission\", \"Cognitive Shortcut\", \"Over Sensitivity\" (or RO, CS, OS)")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = self.ids.as_deref().map(read_id_file).transpose()?;
        Ok(Selection {
            scenarios,
            categories: self.category.clone(),
            limit: self.limit,
            ids,
            per_scenario: self.per_scenario,
            seed: self.per_scenario.map(|_| self.selection_seed.unwrap_or(0)),
            shard: self.shard,
        })
    }
}

/// The flags of a generation other than the decoding parameters: `bsa generate` adds single
/// values of those, `bsa sweep` lists of them.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A .gguf file, a model directory (config.json, tokenizer*.json, *.safetensors), a
    /// preset (`bsa models`) or a hub id OWNER/NAME (from the hub cache; HF_HUB_OFFLINE=1 honoured).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The benchmark data: .csv/.jsonl in the BSA format, or hub:OWNER/NAME[/FILE].
    #[arg(long, default_value = "data/sample.csv")]
    pub data: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Samples per query, and per configuration in a sweep (k of the metrics; the paper uses 5).
    #[arg(long, default_value_t = 5, value_parser = positive_u32)]
    pub samples: u32,
    /// Seed of the per-sample random streams (seed, item id, sample index).
    #[arg(long, default_value_t = 0, value_parser = seed)]
    pub seed: u64,
    /// Most new tokens per sample. Default: the preset's, else 4096.
    #[arg(long, value_parser = positive)]
    pub max_new_tokens: Option<usize>,
    /// Stop a sample when its text contains this string (repeatable).
    #[arg(long, value_parser = non_empty)]
    pub stop: Vec<String>,
    /// End-of-sequence tokens do not end a sample: every sample runs to --max-new-tokens (or
    /// --max-model-len). A benchmark and stress setting, recorded with the decoding.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub batch_size: usize,
    /// Most prompt tokens prefilled per step.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub prefill_chunk: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub block_size: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// The run directory (created, or resumed when it holds the same job).
    #[arg(long)]
    pub out: PathBuf,
    /// If --out holds a run, leave it alone and start NAME-2 (NAME-3, ...) beside it.
    #[arg(long)]
    pub new_run: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// For an `openai:` backend or judge.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Where the local engine runs and how much KV cache it gets: the same flags for generate,
/// judge, eval, sweep and serve.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Memory for the KV cache, in MiB. Default: sized from the device: on a GPU
    /// --gpu-memory-utilization of its memory less what the weights take, on the CPU a quarter
    /// of the RAM available (at most 4 GiB).
    #[arg(long, value_parser = positive)]
    pub kv_cache_mb: Option<usize>,
    /// On a GPU, the share of the device's memory the engine may use, weights and KV cache
    /// together (vLLM's setting of the same name), in (0, 1].
    #[arg(long, default_value_t = 0.9, value_parser = utilization)]
    pub gpu_memory_utilization: f64,
    /// Most tokens of one sequence, prompt and generated; a sample that reaches it ends with
    /// finish reason `length`. Default: the model's context, or what the KV cache holds for
    /// one sequence when that is less.
    #[arg(long, value_parser = positive)]
    pub max_model_len: Option<usize>,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto", value_parser = device)]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16; GGUF weights keep their quantization.
    #[arg(long, default_value = "auto", value_parser = dtype)]
    pub dtype: String,
    /// Compute every prompt in full: no automatic prefix caching in the local engine (which
    /// reuses the KV blocks of prompt prefixes computed before, e.g. a judge rubric's
    /// opening; the outputs are the same either way). To compare, or as an escape hatch. An
    /// `openai:` server caches, or not, by its own settings.
    #[arg(long)]
    pub no_prefix_cache: bool,
}

impl EngineArgs {
    /// The local engine's options with these flags and the command's batching.
    pub fn local(&self, batch_size: usize, prefill_chunk: usize, block_size: usize, adapter: Option<PathBuf>) -> LocalOptions {
        LocalOptions { device: self.device.clone(), dtype: self.dtype.clone(), batch_size, prefill_chunk, cache: self.cache_sizing(block_size), prefix_cache: !self.no_prefix_cache, adapter }
    }

    /// The KV cache's sizing with these flags and the command's block size.
    pub fn cache_sizing(&self, block_size: usize) -> CacheSizing {
        CacheSizing { kv_cache_mb: self.kv_cache_mb, gpu_memory_utilization: self.gpu_memory_utilization, block_size, max_model_len: self.max_model_len }
    }
}

/// How `bsa` talks to an OpenAI-compatible server (--backend openai:..., --judge openai:...).
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// The environment variable that holds the server's API key (default: OPENAI_API_KEY
    /// when set). The key is sent in a header and never written anywhere.
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Requests in flight at once to the server.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub concurrency: usize,
    /// Seconds one request may take before it is retried.
    #[arg(long, default_value_t = 600, value_parser = positive_u64)]
    pub request_timeout: u64,
    /// Retries of a request after a 429, a 5xx, a timeout or a broken connection
    /// (exponential backoff with jitter; the server's Retry-After wins).
    #[arg(long, default_value_t = 5, value_parser = count_u32)]
    pub http_retries: u32,
    /// The name the token limit is sent under: max_tokens, max_completion_tokens (hosted
    /// reasoning models take only this), or auto: max_tokens until the server refuses it
    /// by name, then max_completion_tokens for the rest of the run.
    #[arg(long, value_name = "max_tokens|max_completion_tokens|auto", default_value = "auto", value_parser = MaxTokensField::parse)]
    pub max_tokens_field: MaxTokensField,
    /// Ask the server to stream (`"stream": true`, with usage) and read its server-sent
    /// events, for servers that only stream. A reply of type text/event-stream is read as
    /// one either way.
    #[arg(long)]
    pub stream: bool,
}

impl RemoteArgs {
    pub fn options(&self) -> bsa::backends::openai::ClientOptions {
        bsa::backends::openai::ClientOptions {
            api_key_env: self.api_key_env.clone(),
            concurrency: self.concurrency,
            retries: self.http_retries,
            timeout: std::time::Duration::from_secs(self.request_timeout.max(1)),
            max_tokens_field: self.max_tokens_field,
            stream: self.stream,
            ..Default::default()
        }
    }
}

/// How the prompts are built.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// Use this Jinja chat template instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// A system prompt (put before the user turn when the template has no system role).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub mitigation: MitigationArgs,
    /// Qwen3-style templates: turn thinking on or off (default: the preset's).
    #[arg(long)]
    pub enable_thinking: Option<bool>,
}

impl PromptArgs {
    /// The prompt settings (the safety rules are the caller's: they join the system text).
    pub fn settings(&self) -> PromptSettings {
        PromptSettings { system: self.system.clone(), chat_template: self.chat_template.clone(), enable_thinking: self.enable_thinking }
    }
}

/// The paper's mitigations: safety rules in the prompt, and fine-tuned (LoRA) weights.
#[derive(Debug, Clone, Args, Default)]
pub struct MitigationArgs {
    /// Put safety rules before each query: `default` (data/prompts/safety_rules.txt: the
    /// risk and the expected response strategy for each of the nine risk categories) or a
    /// text FILE. A system message, or the start of the user turn when the template has no
    /// system role; the manifest records the rules' sha256 and the placement.
    #[arg(long, value_name = "default|FILE")]
    pub safety_rules: Option<String>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    /// merged into the weights at load; the base must be safetensors (a directory or hub id).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

/// The judge's settings, shared by `bsa judge` and `bsa eval`.
#[derive(Debug, Clone, Args)]
pub struct JudgeOpts {
    /// The judge: local:MODEL (or just MODEL: a .gguf, a directory, a preset, a hub id),
    /// or openai:MODEL@BASE_URL for an OpenAI-compatible server.
    #[arg(long, default_value = "local:smollm2-135m")]
    pub judge: String,
    /// A folder with your own rubrics (safety.txt, thinking_risk_omission.txt,
    /// thinking_cognitive_shortcut.txt, thinking_over_sensitivity.txt) using {query},
    /// {risk_summary}, {answer}, {reasoning_thinking}; literal braces doubled. A file may
    /// open with a TOML front matter between `+++` lines declaring the JSON key its reply
    /// uses and its labels' spellings: key = "...", labels = ["...", ...].
    #[arg(long, value_name = "DIR")]
    pub judge_prompts: Option<PathBuf>,
    /// Most tokens of one free judge reply (--judge-format free, or a server without
    /// --judge-structured), and of a server's structured reply.
    #[arg(long, default_value_t = 384, value_parser = positive)]
    pub judge_max_new_tokens: usize,
    /// The judge reply's shape. rubric: a short analysis, then the rubric's JSON object with
    /// one of its labels (the paper's protocol: reasoning before the verdict); label: the
    /// JSON object alone (a few decode steps); free: whatever the judge writes, read
    /// leniently. Local judges decode rubric and label under a grammar (llguidance), so
    /// every reply is a label; a server does with --judge-structured.
    #[arg(long, value_name = "rubric|label|free", default_value = "rubric", value_parser = ReplyFormat::parse)]
    pub judge_format: ReplyFormat,
    /// Most tokens of the analysis before the label under --judge-format rubric (a server
    /// with --judge-structured: 4 characters a token, the schema's maxLength).
    #[arg(long, default_value_t = 128, value_parser = count)]
    pub judge_analysis_tokens: usize,
    /// A server judge (openai:): send the reply's shape as response_format with a JSON
    /// schema whose label is an enum of the rubric's labels (OpenAI, vLLM and SGLang
    /// accept it). A server that refuses response_format stops the run with that message.
    #[arg(long)]
    pub judge_structured: bool,
    /// How often an unreadable judge reply is asked again before it is recorded as invalid.
    #[arg(long, default_value_t = 2, value_parser = count_u32)]
    pub judge_retries: u32,
}

#[derive(Debug, Args)]
pub struct ScoreOpts {
    /// k of Safe@k / Think@k (the paper samples 5 times per query).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub k: usize,
    /// Exponent a of F = Think@1^a * Safe@1^(1-a). Default: the authors' scorer value;
    /// their published leaderboard fits 0.610.
    #[arg(long, default_value_t = AUTHORS_F_ALPHA, value_parser = f_alpha)]
    pub f_alpha: f64,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    /// Refuse items with fewer than k valid samples instead of reporting them.
    #[arg(long)]
    pub strict: bool,
    /// How a sample whose judge label is unreadable counts: fail (not safe / not
    /// identified, as the authors' scorer) or exclude (left out). When some are unreadable,
    /// the scorecard shows how many and the scores with all of them failing and all passing.
    #[arg(long, value_name = "fail|exclude", default_value = "fail", value_parser = InvalidPolicy::parse)]
    pub invalid: InvalidPolicy,
    /// How the safety of a sample whose response never came (cut by the token limit with
    /// its thinking open or before any response) counts: fail (not safe), judge (the
    /// judge's label of the empty response) or exclude (left out). Its thinking counts as
    /// judged either way. Default: fail.
    #[arg(long, value_name = "fail|judge|exclude", value_parser = TruncatedPolicy::parse)]
    pub truncated: Option<TruncatedPolicy>,
}

/// How an analysis shows its result: a terminal table with progress bars, or JSON.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl OutputArgs {
    /// Progress bars only for a person reading a table.
    pub fn progress(&self) -> bool {
        !self.quiet && !self.json
    }
}

/// The percentile bootstrap behind every interval (`bsa score`, `compare`, `report`, `agree`).
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// Bootstrap resamples (items resampled within each scenario) for the intervals (0 = none).
    #[arg(long, default_value_t = 2000, value_parser = count)]
    pub resamples: usize,
    /// Seed of the bootstrap (fixed so that reruns print the same intervals).
    #[arg(long, default_value_t = ScoreOptions::default().seed, value_parser = seed)]
    pub bootstrap_seed: u64,
    /// Confidence level of the intervals.
    #[arg(long, default_value_t = 0.95, value_parser = confidence)]
    pub confidence: f64,
}

impl ScoreOpts {
    pub fn options(&self) -> ScoreOptions {
        ScoreOptions {
            k: self.k,
            f_alpha: self.f_alpha,
            resamples: self.bootstrap.resamples,
            seed: self.bootstrap.bootstrap_seed,
            confidence: self.bootstrap.confidence,
            strict: self.strict,
            invalid: self.invalid,
            truncated: self.truncated.unwrap_or_default(),
        }
    }
}

// Value parsers with each flag's allowed range. clap applies them as it reads the command
// line, before the command does anything, and its message names the flag and the value:
// "invalid value '0' for '--batch-size <BATCH_SIZE>': must be a whole number from 1 up".

fn whole<T: std::str::FromStr>(s: &str, range: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("must be a whole number {range}"))
}

/// A count that may be 0 (top-k: off; retries: none).
pub fn count(s: &str) -> Result<usize, String> {
    whole(s, "from 0 up")
}

/// [`count`] as a u32.
pub fn count_u32(s: &str) -> Result<u32, String> {
    whole(s, "from 0 to 4294967295")
}

/// A seed: any whole number that fits in 64 bits.
pub fn seed(s: &str) -> Result<u64, String> {
    whole(s, "from 0 to 18446744073709551615")
}

/// A count: 1 or more.
pub fn positive(s: &str) -> Result<usize, String> {
    whole::<usize>(s, "from 1 up").and_then(|n| if n >= 1 { Ok(n) } else { Err("must be a whole number from 1 up".into()) })
}

/// [`positive`] as a u32 (samples, n).
pub fn positive_u32(s: &str) -> Result<u32, String> {
    whole::<u32>(s, "from 1 to 4294967295").and_then(|n| if n >= 1 { Ok(n) } else { Err("must be a whole number from 1 to 4294967295".into()) })
}

/// [`positive`] as a u64 (seconds).
pub fn positive_u64(s: &str) -> Result<u64, String> {
    whole::<u64>(s, "from 1 up").and_then(|n| if n >= 1 { Ok(n) } else { Err("must be a whole number from 1 up".into()) })
}

/// A real number in a range, given as a check and its description.
fn real<T: std::str::FromStr + Copy + Into<f64>>(s: &str, ok: impl Fn(f64) -> bool, range: &str) -> Result<T, String> {
    let x: T = s.trim().parse().map_err(|_| format!("must be a number {range}"))?;
    if x.into().is_finite() && ok(x.into()) { Ok(x) } else { Err(format!("must be a number {range}")) }
}

/// A sampling temperature: 0 (greedy) or more.
pub fn temperature(s: &str) -> Result<f32, String> {
    real(s, |x| x >= 0.0, "from 0 (greedy) up")
}

/// Top-p: in (0, 1].
pub fn top_p(s: &str) -> Result<f32, String> {
    real(s, |x| x > 0.0 && x <= 1.0, "in (0, 1]: above 0, at most 1 (1 = off)")
}

/// Min-p: in [0, 1).
pub fn min_p(s: &str) -> Result<f32, String> {
    real(s, |x| (0.0..1.0).contains(&x), "in [0, 1): at least 0 (off), below 1")
}

/// A share of a device's memory: in (0, 1].
pub fn utilization(s: &str) -> Result<f64, String> {
    real(s, |x| x > 0.0 && x <= 1.0, "in (0, 1]: above 0, at most 1 (0.9 is usual)")
}

/// A confidence level: strictly between 0 and 1.
pub fn confidence(s: &str) -> Result<f64, String> {
    real(s, |x| x > 0.0 && x < 1.0, "strictly between 0 and 1, e.g. 0.95")
}

/// The F-score's exponent: in [0, 1].
pub fn f_alpha(s: &str) -> Result<f64, String> {
    real(s, |x| (0.0..=1.0).contains(&x), &format!("in [0, 1]; the authors' scorer uses {AUTHORS_F_ALPHA}, their leaderboard fits 0.610"))
}

/// A text that must not be empty (a stop string: an empty one would match at once).
pub fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() { Err("must not be empty".into()) } else { Ok(s.to_string()) }
}

/// A device name: auto, cpu, cuda, cuda:N or metal (whether it is there is checked when the
/// engine starts).
pub fn device(s: &str) -> Result<String, String> {
    let ok = matches!(s, "auto" | "cpu" | "cuda" | "metal") || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
    if ok { Ok(s.to_string()) } else { Err("must be auto, cpu, cuda, cuda:N (N the GPU's index) or metal".into()) }
}

/// A weights dtype: auto, f32, bf16 or f16.
pub fn dtype(s: &str) -> Result<String, String> {
    if matches!(s, "auto" | "f32" | "bf16" | "f16") { Ok(s.to_string()) } else { Err("must be auto, f32, bf16 or f16".into()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_accept_their_range_and_name_it_otherwise() {
        assert_eq!(positive("3"), Ok(3));
        assert!(positive("0").unwrap_err().contains("from 1 up"));
        assert!(positive("-1").unwrap_err().contains("from 1 up"));
        assert!(positive_u32("4294967296").unwrap_err().contains("4294967295"));
        assert_eq!(temperature("0"), Ok(0.0));
        for bad in ["-0.1", "nan", "inf", "x"] {
            assert!(temperature(bad).unwrap_err().contains("from 0"), "{bad}");
        }
        assert_eq!(top_p("1"), Ok(1.0));
        assert!(top_p("0").is_err() && top_p("1.5").is_err());
        assert_eq!(min_p("0"), Ok(0.0));
        assert!(min_p("1").unwrap_err().contains("[0, 1)"));
        assert!(confidence("1").is_err() && confidence("0").is_err() && confidence("0.9").is_ok());
        assert!(f_alpha("1").is_ok() && f_alpha("1.01").unwrap_err().contains("[0, 1]"));
        assert!(non_empty("").is_err());
        assert!(device("cuda:1").is_ok() && device("cuda:x").is_err() && device("gpu").is_err());
        assert!(dtype("bf16").is_ok() && dtype("f64").is_err());
    }
}
