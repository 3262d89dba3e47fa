//! `bsa generate`: benchmark items -> prompts -> a backend -> samples.jsonl.
//!
//! The stage in order: select the items ([`crate::data`]), read the safety rules
//! ([`crate::prompt`]), open the backend (the local engine or a server, [`crate::backends`]),
//! resolve the decoding (flags over the model's preset, or a sweep's grid), open the run
//! directory with the job ([`crate::store`]), list the (item, sample, configuration) triples
//! it still lacks, and hand them to the backend, appending each sample as it finishes.
//!
//! Sample i of item x always draws from the random stream (seed, x, i) (locally; a server is
//! sent a seed derived from the same three), so what a sample says does not depend on the
//! batch it ran in, on its decoding configuration's neighbours, or on which samples a resumed
//! run still had to do. Locally, an item's samples of every configuration share one prefill.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::decoding::{self, DecodingGrid, DecodingOverrides};
use crate::backends::local::LocalOptions;
use crate::backends::openai::{request_seed, ClientOptions};
use crate::backends::{self, PromptSettings, Request, SampleRequest};
use crate::data::{Dataset, Selection};
use crate::engine::sampler::StreamKey;
use crate::progress::progress_bar_with_eta;
use crate::prompt::{Message, SafetyRules};
use crate::records::{default_config, record_key, Decoding, FinishReason, Item, SampleRecord};
use crate::store::{DatasetRef, JobSpec, OnExisting, RunDir};

/// Everything `bsa generate` (and the generation of `bsa sweep` / `bsa eval`) is told.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// `--model`: a .gguf file, a model directory, a preset or a hub id (the local engine).
    pub model: String,
    /// `--backend openai:MODEL@BASE_URL`: generate through an OpenAI-compatible server instead.
    pub backend: Option<String>,
    /// `--data`: a .csv/.jsonl file or `hub:OWNER/NAME[/FILE]`.
    pub data: String,
    pub selection: Selection,
    /// Samples per item (and per configuration in a sweep): the k of the metrics.
    pub samples: u32,
    /// The seed of the per-sample random streams.
    pub seed: u64,
    pub decoding: DecodingOverrides,
    /// `--chat-template`, `--system` (the safety rules go before it), `--enable-thinking`.
    pub prompt: PromptSettings,
    /// `--safety-rules default|FILE`: the paper's mitigation, put before every query (see
    /// [`SafetyRules`]).
    pub safety_rules: Option<String>,
    /// The local engine's device, batching, KV cache and `--adapter`.
    pub local: LocalOptions,
    /// The client of an `openai:` backend.
    pub remote: ClientOptions,
    pub out: PathBuf,
    pub on_existing: OnExisting,
    pub progress: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateSummary {
    pub run: PathBuf,
    pub written: usize,
    pub skipped: usize,
    /// Prompt and completion tokens of the samples written by this pass.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens the local engine computed and took from its prefix cache.
    pub prefill: backends::PrefillStats,
    /// Sequences the local engine preempted for lack of KV-cache blocks and recomputed.
    pub preempted: usize,
    /// Samples that ended with finish reason `error` (their records say why).
    pub errors: usize,
    /// The local engine's KV cache and longest sequence.
    pub cache: Option<backends::local::CachePlan>,
    pub seconds: f64,
    /// The decoding configurations of the run: ("default", its decoding) outside sweeps.
    pub configs: Vec<(String, Decoding)>,
}

/// Runs (or resumes) a generation into `opts.out`.
pub fn generate(opts: &GenerateOptions) -> Result<GenerateSummary> {
    generate_grid(opts, None)
}

/// Runs (or resumes) a generation; with a `grid`, every configuration of the decoding sweep
/// in one pass: rows with different decoding parameters share batches, and sample i of item
/// x draws from the stream (seed, x, i) whatever its configuration, so a configuration's
/// samples are those a plain run with its parameters would produce.
pub fn generate_grid(opts: &GenerateOptions, grid: Option<&DecodingGrid>) -> Result<GenerateSummary> {
    let (dataset, items) = selected_items(opts)?;
    // A resume with other data, selection, samples or seed is refused before a model loads.
    let base = job_base(&dataset, opts)?;
    RunDir::check(&opts.out, &base, opts.on_existing)?;
    let rules = opts.safety_rules.as_deref().map(SafetyRules::load).transpose()?;
    let settings = PromptSettings { system: SafetyRules::system_text(rules.as_ref(), opts.prompt.system.as_deref()), ..opts.prompt.clone() };
    let (spec, flag) = match &opts.backend {
        Some(b) => (b.as_str(), "--backend"),
        None => (opts.model.as_str(), "--model"),
    };
    let mut backend = backends::open(spec, flag, &settings, &opts.local, &opts.remote)?;

    let decoding = decoding::resolve(backend.preset(), &opts.decoding)?;
    let configs: Vec<(String, Decoding)> = match grid {
        None => vec![(default_config(), decoding.clone())],
        Some(g) => g.configs(&decoding)?,
    };
    let job = JobSpec {
        model: Some(backend.manifest_model()),
        decoding: Some(match grid {
            None => serde_json::to_value(&decoding)?,
            Some(g) => g.manifest_entry(&decoding, &configs),
        }),
        prompt: Some(backend.manifest_prompt(opts.prompt.system.as_deref(), rules.as_ref())),
        ..base
    };
    let mut run = RunDir::open(&opts.out, job, opts.on_existing)?;
    run.manifest.device = Some(backend.device());
    // Written with the first sample (a run that writes nothing stays as it was).
    run.manifest.engine = backend.cache_plan().map(backends::local::CachePlan::manifest_entry);
    if let (true, Some(plan)) = (opts.progress, backend.cache_plan()) {
        eprintln!("{}", plan.describe());
    }
    let log = run.samples();
    let (_, done) = log.read_keyed::<SampleRecord>(SampleRecord::key)?;

    let work = WorkList::missing(&items, &configs, opts, &done);
    let mut summary = GenerateSummary { run: run.path.clone(), skipped: work.skipped, configs: configs.clone(), cache: backend.cache_plan().cloned(), ..Default::default() };
    if work.samples.is_empty() {
        return Ok(summary);
    }

    let bar = progress_bar_with_eta(opts.progress, work.samples.len() as u64, "samples");
    // The manifest, with this command, is written with the first sample.
    let mut appender = run.appender(&log)?;
    let think = backend.think();
    let start = Instant::now();
    let mut decoded_tokens = 0usize;
    let mut prefill = backends::PrefillStats::default();
    let mut preempted = 0;
    let result = backend.complete(
        work.requests,
        &mut |c| {
            let (item, sample, config) = work.samples[c.tag];
            let split = c.split(&think);
            let rec = SampleRecord {
                item_id: item.id.clone(),
                sample_index: sample,
                config: configs[config].0.clone(),
                scenario: item.scenario,
                categories: item.categories(),
                seed: opts.seed,
                decoding: configs[config].1.clone(),
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                thinking: split.thinking,
                response: split.response,
                raw: c.raw(&think),
                finish_reason: c.finish,
                truncated: split.truncated_thinking,
                elapsed_s: start.elapsed().as_secs_f64(),
                error: c.error,
            };
            summary.errors += usize::from(rec.finish_reason == FinishReason::Error);
            appender.append(&rec)?;
            summary.written += 1;
            summary.prompt_tokens += rec.prompt_tokens;
            summary.completion_tokens += rec.completion_tokens;
            bar.inc(1);
            Ok(())
        },
        &mut |p| {
            decoded_tokens += p.decoded_tokens;
            prefill.add(p.prefill);
            preempted += p.preempted;
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.1} tok/s, {} running", decoded_tokens as f64 / secs, p.running));
        },
    );
    let closed = appender.close();
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    summary.prefill = prefill;
    summary.preempted = preempted;
    result.with_context(|| {
        format!("generating through {}: {} samples were written and are kept; run the same command again to resume", backend.location(), summary.written)
    })?;
    closed?;
    Ok(summary)
}

/// The samples a run still lacks, as backend requests: one per item (its missing samples of
/// every configuration), and per request tag the (item, sample index, configuration) it is.
struct WorkList<'a> {
    requests: Vec<Request>,
    samples: Vec<(&'a Item, u32, usize)>,
    skipped: usize,
}

impl<'a> WorkList<'a> {
    fn missing(items: &'a [Item], configs: &[(String, Decoding)], opts: &GenerateOptions, done: &HashSet<String>) -> WorkList<'a> {
        let mut w = WorkList { requests: Vec::new(), samples: Vec::new(), skipped: 0 };
        for item in items {
            let mut samples = Vec::new();
            for (c, (name, decoding)) in configs.iter().enumerate() {
                for s in 0..opts.samples {
                    if done.contains(&record_key(&item.id, s, name)) {
                        w.skipped += 1;
                        continue;
                    }
                    samples.push(SampleRequest {
                        tag: w.samples.len(),
                        decoding: decoding.clone(),
                        stream: StreamKey::new(opts.seed, &item.id, s),
                        seed: Some(request_seed(opts.seed, &item.id, s)),
                    });
                    w.samples.push((item, s, c));
                }
            }
            if !samples.is_empty() {
                w.requests.push(Request { label: format!("item {}", item.id), messages: vec![Message::user(item.query.clone())], reply_start: None, samples, accept_refusal: false, label_format: None });
            }
        }
        w
    }
}

/// The parts of a generation job that do not depend on the backend.
fn job_base(dataset: &Dataset, opts: &GenerateOptions) -> Result<JobSpec> {
    Ok(JobSpec {
        // The job's item count is the selection before sharding, so shards of one job agree.
        dataset: Some(DatasetRef {
            source: dataset.source.clone(),
            sha256: dataset.sha256.clone(),
            items: dataset.select(&opts.selection.without_shard())?.len(),
        }),
        selection: opts.selection.without_shard(),
        shard: opts.selection.shard,
        samples: Some(opts.samples),
        seed: Some(opts.seed),
        ..Default::default()
    })
}

/// The data and the items a generation works on, refusing an empty job.
fn selected_items(opts: &GenerateOptions) -> Result<(Dataset, Vec<Item>)> {
    if opts.samples == 0 {
        bail!("--samples 0: must be at least 1 (the paper uses 5)");
    }
    let dataset = Dataset::load(&opts.data)?;
    let (items, notes) = dataset.select_noting(&opts.selection)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    if items.is_empty() {
        bail!("the selection matches no item of {}; loosen --scenario/--category/--ids/--shard", dataset.source);
    }
    Ok((dataset, items))
}
