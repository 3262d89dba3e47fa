//! The command line: clap definitions (one struct per subcommand) and the thin glue that
//! calls the library and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::dataset::{self, DataStats, Dataset, Scenario, Selection, Shard};
use crate::metrics::{self, ScoreOptions, Scorecard, AUTHORS_F_ALPHA};
use crate::store::{self, RunDir};
use crate::verdict::Verdict;
use crate::{bench, generation, official, report};

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
    Data(DataCommand),
    /// Sample completions for benchmark items with the local engine into a run directory.
    Generate(GenerateArgs),
    /// Label every sample of a run (response safety, thinking) with a judge model.
    Judge(JudgeArgs),
    /// The whole benchmark in one command: generate, judge, score (each stage resumes).
    Eval(EvalArgs),
    /// A decoding grid (temperature x top-p x top-k [x min-p]) in one batched engine pass,
    /// judged and scored per configuration, with intervals.
    Sweep(SweepArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models,
    /// /health); concurrent requests share one continuous batch.
    Serve(ServeArgs),
    /// List the model presets (models/*.toml): hub id, architecture, recommended sampling.
    Models(ModelsArgs),
    /// Compute every metric from a run's verdicts or from the authors' scorer CSV.
    Score(ScoreArgs),
    /// Write a run's verdicts in the authors' scorer format.
    Export(ExportArgs),
    /// Combine the runs of the shards of one job (see --shard) into one run.
    Merge(MergeArgs),
    /// Judge agreement on the same samples: Cohen's kappa, confusion, a review sheet.
    Agree(AgreeArgs),
    /// Did run B move the metrics, or only the noise? Paired intervals and McNemar tests.
    Compare(CompareArgs),
    /// Write report.md, a self-contained report.html and SVG plots for one or more runs.
    Report(ReportArgs),
    /// Benchmarks (never part of the tests).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Developer checks run by scripts/gpu/check.sh (parity with transformers).
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Our logits for token ids on a checkpoint directory (config.json + safetensors):
    /// prefill then decode steps; raw little-endian f32 rows for comparison with transformers.
    Logits(DevLogitsArgs),
}

#[derive(Debug, Args)]
pub struct DevLogitsArgs {
    /// Checkpoint directory (config.json, model.safetensors or its index).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: a list of token-id lists (one per sequence).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Tokens of each sequence fed as one prefill; the rest are fed one decode step each.
    #[arg(long)]
    pub prefill: usize,
    /// Output file: rows of positions prefill-1 .. len-1 per sequence, f32 little-endian.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a data file and print items per scenario and risks per primary category.
    Stats(StatsArgs),
}

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
    /// Keep the first N items (after the filters above, before sharding).
    #[arg(long, value_name = "N")]
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
        let ids = self.ids.as_deref().map(dataset::read_id_file).transpose()?;
        Ok(Selection { scenarios, categories: self.category.clone(), limit: self.limit, ids, shard: self.shard })
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Sampling temperature (0 = greedy). Default: the preset's, else 0.6.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (1 = off). Default: the preset's, else 0.95.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off). Default: the preset's, else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p times the top probability (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Generate through an OpenAI-compatible server instead of the local engine:
    /// openai:MODEL@BASE_URL (vLLM, SGLang, llama.cpp server, bsa serve, a hosted API).
    #[arg(long, value_name = "openai:MODEL@BASE_URL")]
    pub backend: Option<String>,
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
    #[arg(long, default_value_t = 5)]
    pub samples: u32,
    /// Seed of the per-sample random streams (seed, item id, sample index).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most new tokens per sample. Default: the preset's, else 4096.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Stop a sample when its text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Most prompt tokens prefilled per step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
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
    /// Memory for the KV cache, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mb: usize,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16; GGUF weights keep their quantization.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// How `bsa` talks to an OpenAI-compatible server (--backend openai:..., --judge openai:...).
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// The environment variable that holds the server's API key (default: OPENAI_API_KEY
    /// when set). The key is sent in a header and never written anywhere.
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Requests in flight at once to the server.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds one request may take before it is retried.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Retries of a request after a 429, a 5xx, a timeout or a broken connection
    /// (exponential backoff with jitter; the server's Retry-After wins).
    #[arg(long, default_value_t = 5)]
    pub http_retries: u32,
}

impl RemoteArgs {
    pub fn options(&self) -> crate::engine::remote::ClientOptions {
        crate::engine::remote::ClientOptions {
            api_key_env: self.api_key_env.clone(),
            concurrency: self.concurrency,
            retries: self.http_retries,
            timeout: std::time::Duration::from_secs(self.request_timeout.max(1)),
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A .gguf file, a model directory, a preset or a hub id (as for generate).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The name clients send as `model` (default: the preset name or the model's id).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// The address to listen on (0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free port, printed on start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request but /health.
    #[arg(long, value_name = "KEY", env = "BSA_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Most prompt tokens prefilled per step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Most samples queued or decoding at once; requests beyond it get 429 (retry later).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most samples per request (n).
    #[arg(long, default_value_t = 16)]
    pub max_n: u32,
    /// Most new tokens per sample (max_tokens), also the default when a request has none.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
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

/// `bsa sweep`: like `bsa eval`, but the decoding flags take comma-separated lists.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Temperatures to sweep, e.g. 0.2,0.6,1.0 (default: the preset's single value).
    #[arg(long, value_delimiter = ',')]
    pub temperature: Vec<f32>,
    /// Top-p values to sweep, e.g. 0.8,0.95,1.0.
    #[arg(long, value_delimiter = ',')]
    pub top_p: Vec<f32>,
    /// Top-k values to sweep (0 = off), e.g. 0,20,50.
    #[arg(long, value_delimiter = ',')]
    pub top_k: Vec<usize>,
    /// Min-p values to sweep; when given, configuration names get an _m suffix.
    #[arg(long, value_delimiter = ',')]
    pub min_p: Vec<f32>,
    /// Everything else as for `bsa generate` (its --temperature/--top-p/--top-k/--min-p
    /// are replaced by the lists above).
    #[command(flatten)]
    pub generate: RunArgs,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub score: ScoreOpts,
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
    /// {risk_summary}, {answer}, {reasoning_thinking}; literal braces doubled.
    #[arg(long, value_name = "DIR")]
    pub judge_prompts: Option<PathBuf>,
    /// Most tokens of one judge reply.
    #[arg(long, default_value_t = 384)]
    pub judge_max_new_tokens: usize,
    /// How often an unreadable judge reply is asked again before it is recorded as invalid.
    #[arg(long, default_value_t = 2)]
    pub judge_retries: u32,
    /// Local judges: start each reply with the label's JSON key ({"Safe_Ans_Check": "), so
    /// the judge answers with its label at once (at most 16 tokens). Fast, and readable even
    /// from small judges, but the judge writes no reasoning before its label.
    #[arg(long)]
    pub judge_prefill: bool,
}

#[derive(Debug, Args)]
pub struct JudgeArgs {
    /// The run directory (its samples.jsonl is judged into verdicts.jsonl).
    pub run: PathBuf,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The data file, if it moved since generation (it must be the same file, by sha256).
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub generate: GenerateArgs,
    #[command(flatten)]
    pub judge: JudgeOpts,
    #[command(flatten)]
    pub score: ScoreOpts,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A .csv or .jsonl file in the BSA format, or hub:OWNER/NAME[/FILE].
    pub data: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScoreOpts {
    /// k of Safe@k / Think@k (the paper samples 5 times per query).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Exponent a of F = Think@1^a * Safe@1^(1-a). Default: the authors' scorer value;
    /// their published leaderboard fits 0.610.
    #[arg(long, default_value_t = AUTHORS_F_ALPHA)]
    pub f_alpha: f64,
    /// Bootstrap resamples for the confidence intervals (0 = none).
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Seed of the bootstrap (fixed so that reruns print the same intervals).
    #[arg(long, default_value_t = ScoreOptions::default().seed)]
    pub bootstrap_seed: u64,
    /// Confidence level of the intervals.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Refuse items with fewer than k valid samples instead of reporting them.
    #[arg(long)]
    pub strict: bool,
}

impl ScoreOpts {
    fn options(&self) -> ScoreOptions {
        ScoreOptions {
            k: self.k,
            f_alpha: self.f_alpha,
            resamples: self.resamples,
            seed: self.bootstrap_seed,
            confidence: self.confidence,
            strict: self.strict,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A run directory with verdicts.jsonl (scores.json is written into it).
    #[arg(required_unless_present = "official_csv", conflicts_with = "official_csv")]
    pub run: Option<PathBuf>,
    /// Score the authors' scorer input (model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge).
    #[arg(long, value_name = "FILE")]
    pub official_csv: Option<PathBuf>,
    /// With --official-csv: the data file, to add per-category metrics and check the ids.
    #[arg(long, value_name = "DATA")]
    pub data: Option<String>,
    /// Print one JSON object keyed by model name.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opts: ScoreOpts,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Where to write the authors' scorer CSV.
    #[arg(long, value_name = "OUT")]
    pub official_csv: PathBuf,
    /// The model_name column (default: the run's model, or the directory name).
    #[arg(long)]
    pub model_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The new run directory to create.
    pub out: PathBuf,
    /// The shard runs to combine.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgreeArgs {
    /// The first labelling: a run directory or a verdicts.jsonl file.
    pub a: PathBuf,
    /// The second labelling of the same samples (matched by item, sample index, configuration).
    pub b: PathBuf,
    /// Write the disagreements to this CSV for human review (query, risk summary, thinking,
    /// response, both labels, both raw judge outputs, empty human_label/note columns).
    /// An existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub sheet: Option<PathBuf>,
    /// The data file, for the sheet's query and risk summary (default: the run's own).
    #[arg(long)]
    pub data: Option<String>,
    /// Bootstrap resamples (items resampled) for the intervals (0 = none).
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    #[arg(long, default_value_t = ScoreOptions::default().seed)]
    pub bootstrap_seed: u64,
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The baseline: a run directory or a verdicts.jsonl file.
    pub a: PathBuf,
    /// The changed run (differences are B - A).
    pub b: PathBuf,
    /// The configuration of A to use when it holds several (a sweep).
    #[arg(long, value_name = "NAME")]
    pub config_a: Option<String>,
    /// The configuration of B to use when it holds several.
    #[arg(long, value_name = "NAME")]
    pub config_b: Option<String>,
    #[command(flatten)]
    pub opts: ScoreOpts,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (or verdicts.jsonl files); runs with several decoding
    /// configurations also get sweep heatmaps.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where to write report.md, report.html and plots/ (default: the run directory when
    /// there is one run).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ScoreOpts,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time scoring on synthetic verdicts (default: the full benchmark's size).
    Score(BenchScoreArgs),
    /// Time the CPU sampler on random logits at a real shape (default: 256 x 152,064).
    Sampler(BenchSamplerArgs),
    /// Our batched Q4_1 matmul against candle's QMatMul at SmolLM2's shapes.
    Quant,
    /// Prefill and decode throughput of the local engine: single stream and batched on
    /// synthetic prompts, and a BSA-like job on the sample data's real prompts.
    Engine(BenchEngineArgs),
    /// Requests/s and tokens/s of `bsa serve` (in-process, on 127.0.0.1) at several
    /// numbers of concurrent clients, and the mean decode batch that shows they share steps.
    Serve(BenchServeArgs),
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Concurrent clients to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests_per_client: usize,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// temperature of every request (0 = greedy, as in bench engine; sampling adds the
    /// sampler's cost to every step).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// The prompts: the queries of this data file, in turn.
    #[arg(long, default_value = "data/sample.csv")]
    pub data: String,
    /// The server's KV cache in MiB (SmolLM2 needs about 45 KiB per token; the default holds
    /// 64 clients' sequences without setting any aside).
    #[arg(long, default_value_t = 800)]
    pub kv_cache_mb: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Batch sizes to measure on synthetic prompts (1 = single stream).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Synthetic prompt length in tokens.
    #[arg(long, default_value_t = 100)]
    pub prompt_len: usize,
    /// New tokens per sequence (end-of-sequence ignored).
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Also run the BSA-like job: every item of DATA x --job-samples samples, batch --job-batch.
    #[arg(long)]
    pub job_data: Option<String>,
    #[arg(long, default_value_t = 5)]
    pub job_samples: u32,
    #[arg(long, default_value_t = 64)]
    pub job_batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Samples per synthetic prompt; above 1 they sample BSA-like (T 0.6, top-p 0.95)
    /// and share the prompt's prefill, and a batch of B sequences holds B / samples prompts.
    #[arg(long, default_value_t = 1)]
    pub samples: u32,
    /// Weights dtype: auto (f32 on the CPU, bf16 on a GPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Also write the synthetic runs' results to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchSamplerArgs {
    #[arg(long, default_value_t = 152_064)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub rows: usize,
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Run the device sampler (the CUDA kernel on cuda, its Rust model on cpu) and report
    /// its agreement with the exact CPU sampler, a chi-square of its draws and its timing
    /// as JSON (implied by --device other than cpu and by --json).
    #[arg(long)]
    pub check: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Draws per tested row for the chi-square of --check (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    pub draws: usize,
    /// Rows tested by the chi-square of --check.
    #[arg(long, default_value_t = 2)]
    pub chi_rows: usize,
    /// Also write the --check report to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,    /// --check on these logits (`[rows, vocab]` f32 little-endian) instead of synthetic ones.
    #[arg(long)]
    pub logits: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchScoreArgs {
    #[arg(long, default_value_t = 2000)]
    pub items: usize,
    #[arg(long, default_value_t = 5)]
    pub samples: u32,
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Repetitions; the best and median are reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCommand::Stats(a)) => data_stats(a),
        Command::Generate(a) => generate(a).map(|_| ()),
        Command::Judge(a) => judge(a),
        Command::Eval(a) => eval(a),
        Command::Sweep(a) => sweep(a),
        Command::Serve(a) => serve(a),
        Command::Models(a) => models(a),
        Command::Score(a) => score(a),
        Command::Export(a) => export(a),
        Command::Merge(a) => merge(a),
        Command::Agree(a) => agree(a),
        Command::Compare(a) => compare(a),
        Command::Report(a) => report_cmd(a),
        Command::Bench(BenchCommand::Score(a)) => bench_score(a),
        Command::Bench(BenchCommand::Sampler(a)) => bench_sampler(a),
        Command::Bench(BenchCommand::Engine(a)) => bench_engine(a),
        Command::Bench(BenchCommand::Quant) => bench_quant(),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve(a),
        Command::Dev(DevCommand::Logits(a)) => dev_logits(a),
    }
}

fn judge_options(j: &JudgeOpts, run: PathBuf, data: Option<String>, batch_size: usize, engine: &EngineArgs, quiet: bool, remote: &RemoteArgs) -> crate::judge::run::JudgeOptions {
    crate::judge::run::JudgeOptions {
        judge: j.judge.clone(),
        rubrics_dir: j.judge_prompts.clone(),
        data,
        max_new_tokens: j.judge_max_new_tokens,
        retries: j.judge_retries,
        prefill: j.judge_prefill,
        batch_size,
        kv_cache_mb: engine.kv_cache_mb,
        device: engine.device.clone(),
        dtype: engine.dtype.clone(),
        run,
        progress: !quiet,
        remote: remote.options(),
    }
}

fn print_judge_summary(run: &std::path::Path, s: &crate::judge::run::JudgeSummary) {
    if s.written == 0 {
        println!("{}: all {} samples were already judged; nothing to do", run.display(), s.skipped);
    } else {
        println!(
            "{}: judged {} samples ({} already judged) with {} judge calls in {:.1} s; {} label(s) unreadable after retries",
            run.display(),
            s.written,
            s.skipped,
            s.judge_calls,
            s.seconds,
            s.invalid_labels
        );
    }
}

fn judge(a: JudgeArgs) -> Result<()> {
    let opts = judge_options(&a.judge, a.run.clone(), a.data, a.batch_size, &a.engine, a.quiet, &a.remote);
    let s = crate::judge::run::judge(&opts)?;
    print_judge_summary(&a.run, &s);
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let g = &a.generate.run;
    let (batch, engine, quiet, remote) = (g.batch_size, g.engine.clone(), g.quiet, g.remote.clone());
    let score_opts = a.score.options();
    score_opts.validate()?;
    let run = generate(a.generate)?;
    let opts = judge_options(&a.judge, run.clone(), None, batch, &engine, quiet, &remote);
    let s = crate::judge::run::judge(&opts)?;
    print_judge_summary(&run, &s);
    let dir = RunDir::read(&run)?;
    let cards = score_run(&dir, &score_opts)?;
    store::write_json_atomic(&run.join(store::SCORES), &cards)?;
    for (name, sc) in &cards {
        println!("\n{}", report::scorecard_table(name, sc));
    }
    println!("run directory: {} (manifest.json, samples.jsonl, verdicts.jsonl, scores.json)", run.display());
    Ok(())
}

fn generate_options(a: GenerateArgs) -> Result<generation::GenerateOptions> {
    let r = a.run;
    Ok(generation::GenerateOptions {
        model: r.model,
        device: r.engine.device,
        dtype: r.engine.dtype,
        data: r.data,
        selection: r.select.to_selection()?,
        samples: r.samples,
        seed: r.seed,
        decoding: generation::DecodingOverrides {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            max_new_tokens: r.max_new_tokens,
            stop: r.stop,
        },
        batch_size: r.batch_size,
        prefill_chunk: r.prefill_chunk,
        kv_cache_mb: r.engine.kv_cache_mb,
        block_size: r.block_size,
        chat_template: r.chat_template,
        system: r.system,
        safety_rules: r.mitigation.safety_rules,
        adapter: r.mitigation.adapter,
        enable_thinking: r.enable_thinking,
        out: r.out,
        on_existing: if r.new_run { store::OnExisting::NewRun } else { store::OnExisting::Resume },
        progress: !r.quiet,
        backend: a.backend,
        remote: r.remote.options(),
    })
}

fn sweep(a: SweepArgs) -> Result<()> {
    let g = a.generate;
    let quiet = g.quiet;
    let judge = judge_options(&a.judge, PathBuf::new(), None, g.batch_size, &g.engine, g.quiet, &g.remote);
    // The grid supplies the decoding parameters; a sweep runs on the local engine.
    let g = GenerateArgs { run: g, temperature: None, top_p: None, top_k: None, min_p: None, backend: None };
    let opts = crate::sweep::SweepOptions {
        generate: generate_options(g)?,
        grid: crate::sweep::DecodingGrid { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, min_p: a.min_p },
        judge,
        score: a.score.options(),
    };
    let o = crate::sweep::sweep(&opts)?;
    let (gs, run) = (&o.generated, &o.run);
    println!(
        "{}: {} configurations; wrote {} samples ({} already there) in {:.1} s",
        run.display(),
        gs.configs.len(),
        gs.written,
        gs.skipped,
        gs.seconds
    );
    print_judge_summary(run, &o.judged);
    // scores.json as `bsa score` writes it: one scorecard per configuration.
    let label = run_label(&RunDir::read(run)?);
    let cards: BTreeMap<String, Scorecard> = o.results.configs.iter().map(|c| (format!("{label}@{}", c.name), c.scorecard.clone())).collect();
    store::write_json_atomic(&run.join(store::SCORES), &cards)?;
    println!("\n{}", crate::sweep::table(&o.results));
    // The heatmaps: the same report `bsa report RUN` writes, into the run directory.
    let judged = crate::judged_run::JudgedRun::load(run)?;
    let rep = report::document::build(std::slice::from_ref(&judged), &report::document::ReportOptions { score: opts.score.clone(), progress: !quiet })?;
    let w = report::document::write(&rep, run)?;
    println!(
        "run directory: {} (samples.jsonl and verdicts.jsonl keyed by configuration, scores.json, {}); heatmaps in {} and {}",
        run.display(),
        crate::sweep::SWEEP_JSON,
        w.html.display(),
        w.markdown.display()
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<PathBuf> {
    let opts = generate_options(a)?;
    let s = generation::generate(&opts)?;
    if s.written == 0 {
        println!("{}: all {} samples were already there; nothing to do", s.run.display(), s.skipped);
    } else {
        println!(
            "{}: wrote {} samples ({} already there) in {:.1} s: {} completion tokens, {:.1} tok/s",
            s.run.display(),
            s.written,
            s.skipped,
            s.seconds,
            s.completion_tokens,
            s.completion_tokens as f64 / s.seconds.max(1e-9)
        );
    }
    Ok(s.run)
}

fn serve(a: ServeArgs) -> Result<()> {
    crate::serve::serve(crate::serve::ServeOptions {
        model: a.model,
        served_model_name: a.served_model_name,
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        device: a.engine.device,
        dtype: a.engine.dtype,
        batch_size: a.batch_size,
        prefill_chunk: a.prefill_chunk,
        kv_cache_mb: a.engine.kv_cache_mb,
        max_queue: a.max_queue,
        max_n: a.max_n,
        max_tokens: a.max_tokens,
        ..Default::default()
    })
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    eprintln!("bsa serve in-process on 127.0.0.1, {} threads{}", rayon::current_num_threads(), debug_note());
    for r in crate::serve::bench(&a.model, &a.device, &a.data, a.kv_cache_mb, &a.clients, a.requests_per_client, a.max_tokens, a.temperature)? {
        println!("{r}");
    }
    Ok(())
}

fn models(a: ModelsArgs) -> Result<()> {
    let ps = crate::engine::preset::all();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ps)?);
        return Ok(());
    }
    println!("{:<22} {:<42} {:<6} {:>5} {:>5} {:>5} {:>6}  think", "preset", "hub id", "arch", "T", "top-p", "top-k", "max");
    for p in ps {
        let s = &p.sampling;
        let think = if !p.reasoning { "none".to_string() } else if p.think.prefilled { format!("{} pre-filled", p.think.open) } else { p.think.open.clone() };
        println!("{:<22} {:<42} {:<6} {:>5} {:>5} {:>5} {:>6}  {think}", p.name, p.hub_id, p.architecture, s.temperature, s.top_p, s.top_k, s.max_new_tokens);
    }
    Ok(())
}

fn data_stats(a: StatsArgs) -> Result<()> {
    let ds = Dataset::load(&a.data)?;
    let items = ds.select(&a.select.to_selection()?)?;
    let st = DataStats::of(&items);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"source": ds.source, "sha256": ds.sha256, "stats": st}))?);
    } else {
        print!("{}", report::stats_table(&ds.source, &st));
        println!("\n  sha256 {}", ds.sha256);
    }
    Ok(())
}

fn run_label(run: &RunDir) -> String {
    crate::judged_run::run_label(run)
}

/// Reads a run's verdicts grouped by decoding configuration.
pub fn run_verdicts(run: &RunDir) -> Result<BTreeMap<String, Vec<Verdict>>> {
    let log = run.verdicts();
    if !log.exists() {
        bail!("{} has no verdicts.jsonl yet: judge the samples first (bsa judge)", run.path.display());
    }
    let mut by_config: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
    for v in crate::judged_run::read_verdicts(&log)? {
        by_config.entry(v.config.clone()).or_default().push(v);
    }
    Ok(by_config)
}

/// Scores a run, one scorecard per decoding configuration, keyed `model` or `model@config`.
pub fn score_run(run: &RunDir, opts: &ScoreOptions) -> Result<BTreeMap<String, Scorecard>> {
    let label = run_label(run);
    let by_config = run_verdicts(run)?;
    let single = by_config.len() == 1;
    by_config
        .into_iter()
        .map(|(cfg, vs)| {
            let key = if single && cfg == "default" { label.clone() } else { format!("{label}@{cfg}") };
            let sc = metrics::score(&vs, opts).with_context(|| format!("scoring {key}"))?;
            Ok((key, sc))
        })
        .collect()
}

fn score(a: ScoreArgs) -> Result<()> {
    let opts = a.opts.options();
    opts.validate()?;
    let cards: BTreeMap<String, Scorecard> = if let Some(csv) = &a.official_csv {
        let items = a.data.as_deref().map(Dataset::load).transpose()?;
        let by_model = official::read(csv, items.as_ref().map(|d| d.items.as_slice()))?;
        by_model
            .into_iter()
            .map(|(m, vs)| Ok((m.clone(), metrics::score(&vs, &opts).with_context(|| format!("scoring {m}"))?)))
            .collect::<Result<_>>()?
    } else {
        let dir = a.run.as_deref().expect("clap requires a run or --official-csv");
        let run = RunDir::read(dir)?;
        let cards = score_run(&run, &opts)?;
        store::write_json_atomic(&dir.join(store::SCORES), &cards)?;
        if !a.json {
            eprintln!("wrote {}", dir.join(store::SCORES).display());
        }
        cards
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cards)?);
    } else {
        for (name, sc) in &cards {
            println!("{}", report::scorecard_table(name, sc));
        }
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let run = RunDir::read(&a.run)?;
    let label = a.model_name.clone().unwrap_or_else(|| run_label(&run));
    let by_config = run_verdicts(&run)?;
    if a.official_csv.exists() {
        bail!("{} already exists; choose another path (nothing was written)", a.official_csv.display());
    }
    let single = by_config.len() == 1;
    let groups: Vec<(String, Vec<Verdict>)> = by_config
        .into_iter()
        .map(|(cfg, vs)| (if single && cfg == "default" { label.clone() } else { format!("{label}@{cfg}") }, vs))
        .collect();
    let rows = official::write(&a.official_csv, &groups)?;
    eprintln!("wrote {rows} rows to {}", a.official_csv.display());
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let s = store::merge(&a.out, &a.runs)?;
    println!("merged {} runs into {}: {} samples, {} verdicts", a.runs.len(), a.out.display(), s.samples, s.verdicts);
    if !s.missing_shards.is_empty() {
        eprintln!("warning: shard(s) {} are missing: the merged run is partial", s.missing_shards.join(", "));
    }
    Ok(())
}

fn agree(a: AgreeArgs) -> Result<()> {
    use crate::judged_run::JudgedRun;
    if let Some(p) = &a.sheet {
        if p.exists() {
            bail!("{} already exists (it may hold review labels); choose another --sheet path (nothing was written)", p.display());
        }
    }
    let (ra, rb) = (JudgedRun::load(&a.a)?, JudgedRun::load(&a.b)?);
    let opts = crate::agree::AgreeOptions {
        resamples: a.resamples,
        seed: a.bootstrap_seed,
        confidence: a.confidence,
        data: a.data,
        sheet_text: a.sheet.is_some(),
        progress: !a.quiet && !a.json,
    };
    let ag = crate::agree::agree(&ra, &rb, &opts)?;
    if let Some(p) = &a.sheet {
        crate::agree::write_sheet(p, &ag.sheet)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ag)?);
    } else {
        print!("{}", ag.table());
        match &a.sheet {
            Some(p) => println!("  sheet for human review: {}", p.display()),
            None if ag.disagreements > 0 => println!("  (write them for review with --sheet FILE.csv)"),
            None => {}
        }
    }
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    use crate::judged_run::JudgedRun;
    let (ra, rb) = (JudgedRun::load(&a.a)?, JudgedRun::load(&a.b)?);
    let opts = crate::compare::CompareOptions { score: a.opts.options(), config_a: a.config_a, config_b: a.config_b, progress: !a.quiet && !a.json };
    let c = crate::compare::compare(&ra, &rb, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", c.table());
    }
    Ok(())
}

fn report_cmd(a: ReportArgs) -> Result<()> {
    use crate::judged_run::JudgedRun;
    let out = match (&a.out, a.runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [one]) if one.is_dir() => one.clone(),
        (None, [one]) => one.parent().map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()),
        (None, _) => bail!("{} runs given: say where the report goes with --out DIR", a.runs.len()),
    };
    let runs = a.runs.iter().map(|r| JudgedRun::load(r)).collect::<Result<Vec<_>>>()?;
    let opts = report::document::ReportOptions { score: a.opts.options(), progress: !a.quiet };
    let rep = report::document::build(&runs, &opts)?;
    let w = report::document::write(&rep, &out)?;
    print!("{}", report::document::summary_table(&rep));
    println!("wrote {} and {} ({} plots in {})", w.markdown.display(), w.html.display(), w.plots.len(), out.join("plots").display());
    Ok(())
}

fn bench_score(a: BenchScoreArgs) -> Result<()> {
    let r = bench::score(a.items, a.samples, a.resamples, a.repeat)?;
    println!("{r}{}", debug_note());
    Ok(())
}

fn bench_sampler(a: BenchSamplerArgs) -> Result<()> {
    if a.check || a.device != "cpu" || a.json.is_some() {
        let device = crate::engine::local::load::device(&a.device)?;
        let size = crate::gpu_check::SamplerReportSize { rows: a.rows, vocab: a.vocab, repeat: a.repeat, draws: a.draws, chi_rows: a.chi_rows };
        let logits = a.logits.as_deref().map(|p| crate::gpu_check::read_logits(p, a.rows, a.vocab)).transpose()?;
        let report = crate::gpu_check::sampler_report(&device, size, logits)?;
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(p) = &a.json {
            std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
        }
        println!("{text}");
        return Ok(());
    }
    for r in bench::sampler(a.vocab, a.rows, a.repeat) {
        println!("{r}{}", debug_note());
    }
    Ok(())
}

fn bench_engine(a: BenchEngineArgs) -> Result<()> {
    use crate::engine::local::load;
    use crate::engine::sampler::SamplingParams;
    let device = load::device(&a.device)?;
    let dtype = load::dtype(&a.dtype, &device)?;
    let m = load::load(&a.model, &device, dtype)?;
    let bsa_like = SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, min_p: 0.0 };
    let (samples, synthetic_params) = if a.samples > 1 { (a.samples, bsa_like) } else { (1, SamplingParams::greedy()) };
    eprintln!(
        "{} on {:?} ({dtype:?}), {} threads, {}, end-of-sequence ignored{}",
        m.description.id,
        device,
        rayon::current_num_threads(),
        if samples > 1 { format!("{samples} samples per prompt at T 0.6, top-p 0.95") } else { "greedy".to_string() },
        debug_note()
    );
    let mut results = Vec::new();
    // Synthetic prompts: a fixed token pattern of the requested length, distinct per sequence.
    let vocab = m.config.vocab_size as u32;
    for &b in &a.batch_sizes {
        let n_prompts = (b / samples as usize).max(1);
        let prompts: Vec<Vec<u32>> = (0..n_prompts).map(|i| (0..a.prompt_len).map(|j| ((i * 7919 + j * 104_729) as u32 % (vocab - 1)) + 1).collect()).collect();
        let r = bench::engine(&m, &format!("batch {b}"), &prompts, samples, a.new_tokens, b, synthetic_params)?;
        println!("{r}");
        results.push(serde_json::json!({
            "batch": b, "sequences": r.sequences, "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens,
            "prefill_s": r.prefill_s, "total_s": r.total_s, "prefill_tok_s": r.prefill_tok_s(), "decode_tok_s": r.decode_tok_s(),
            "prompts": prompts,
        }));
        // Rewritten after every batch size, so a run cut short keeps what it measured.
        if let Some(p) = &a.json {
            let v = serde_json::json!({"model": m.description.id, "device": format!("{device:?}"), "dtype": format!("{dtype:?}"), "samples": samples, "new_tokens": a.new_tokens, "runs": results});
            std::fs::write(p, serde_json::to_string_pretty(&v)?).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    if let Some(data) = &a.job_data {
        let ds = Dataset::load(data)?;
        let prompter = generation::Prompter::new(&m, None, None, None)?;
        let prompts = ds.items.iter().map(|it| generation::tokenize_prompt(&m, &prompter.render(&it.query)?)).collect::<Result<Vec<_>>>()?;
        let what = format!("BSA-like job: {} queries x {} samples, batch {}", prompts.len(), a.job_samples, a.job_batch);
        // The job samples as the model's preset says (the k samples of a query must differ).
        let params = m.preset.as_ref().map_or(SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, min_p: 0.0 }, |p| p.sampling.params());
        let r = bench::engine(&m, &what, &prompts, a.job_samples, a.new_tokens, a.job_batch, params)?;
        println!("{r}");
    }
    Ok(())
}

fn dev_logits(a: DevLogitsArgs) -> Result<()> {
    use crate::engine::local::load;
    let text = std::fs::read_to_string(&a.tokens).with_context(|| format!("cannot read {}", a.tokens.display()))?;
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of token-id lists", a.tokens.display()))?;
    let device = load::device(&a.device)?;
    let dtype = load::dtype(&a.dtype, &device)?;
    let (rows, vocab) = crate::gpu_check::dump_logits(&a.model, &device, dtype, &seqs, a.prefill, &a.out)?;
    println!("{}", serde_json::json!({"rows": rows, "vocab": vocab, "device": format!("{device:?}"), "dtype": format!("{dtype:?}"), "out": a.out}));
    Ok(())
}

fn bench_quant() -> Result<()> {
    for (out, inp) in [(1536, 576), (576, 1536), (576, 576)] {
        for (n, ours, candle) in crate::engine::local::quant::bench(out, inp, &[1, 2, 4, 8, 32, 128]) {
            println!("Q4_1 {out}x{inp}, {n:3} rows: ours {:9.1} us, candle {:9.1} us, {:.1}x{}", ours * 1e6, candle * 1e6, candle / ours, debug_note());
        }
    }
    Ok(())
}

fn debug_note() -> &'static str {
    if cfg!(debug_assertions) { "  [debug build: use --release for real numbers]" } else { "" }
}
