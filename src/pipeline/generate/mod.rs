//! `bsa generate`: benchmark items -> prompts -> the local engine -> samples.jsonl.
//!
//! Each (item, sample index, decoding config) is one record, appended as soon as it is
//! finished; a rerun skips the records already there. Sample i of item x always draws from
//! the random stream (seed, x, i), so what a sample says does not depend on the batch it
//! ran in or on which samples a resumed run still had to do.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use super::decoding::{self, sampling_params, DecodingGrid, DecodingOverrides};
use crate::backends::local::LocalModel;
use crate::data::{Dataset, Selection};
use crate::engine::kv_cache::KvCache;
use crate::engine::load;
use crate::engine::sampler::StreamKey;
use crate::engine::scheduler::{self, PromptGroup, SampleSpec, SchedulerConfig};
use crate::prompt::{split_completion, Placement, Prompter, SafetyRules};
use crate::records::{Decoding, Item, SampleRecord};
use crate::store::{DatasetRef, JobSpec, OnExisting, RunDir};

pub mod remote;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub data: String,
    pub selection: Selection,
    pub samples: u32,
    pub seed: u64,
    pub decoding: DecodingOverrides,
    pub batch_size: usize,
    pub prefill_chunk: usize,
    pub kv_cache_mb: usize,
    pub block_size: usize,
    pub chat_template: Option<PathBuf>,
    pub system: Option<String>,
    /// `--safety-rules default|FILE`: rules put before the query (see [`crate::safety_rules`]).
    pub safety_rules: Option<String>,
    /// `--adapter DIR`: a PEFT LoRA adapter merged into the weights at load.
    pub adapter: Option<PathBuf>,
    pub enable_thinking: Option<bool>,
    pub out: PathBuf,
    pub on_existing: OnExisting,
    pub progress: bool,
    /// `openai:MODEL@BASE_URL`: generate through an OpenAI-compatible server instead.
    pub backend: Option<String>,
    pub remote: crate::backends::openai::ClientOptions,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateSummary {
    pub run: PathBuf,
    pub written: usize,
    pub skipped: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
    /// The decoding configurations of the run: ("default", its decoding) outside sweeps.
    pub configs: Vec<(String, Decoding)>,
}

/// Runs (or resumes) a generation into `opts.out`.
pub fn generate(opts: &GenerateOptions) -> Result<GenerateSummary> {
    if let Some(backend) = &opts.backend {
        return remote::generate(opts, backend);
    }
    generate_grid(opts, None)
}

/// Runs (or resumes) a generation; with a `grid`, every configuration of the decoding sweep
/// in one engine pass: each item is one prompt group (one prefill) holding the samples of
/// all configurations, and rows with different decoding parameters share batches. Sample i
/// of item x draws from the stream (seed, x, i) whatever its configuration, so a
/// configuration's samples are those a plain run with its parameters would produce.
pub fn generate_grid(opts: &GenerateOptions, grid: Option<&DecodingGrid>) -> Result<GenerateSummary> {
    if opts.backend.is_some() {
        bail!("a decoding sweep runs on the local engine; drop --backend (or run one `bsa generate --backend ...` per configuration)");
    }
    let (dataset, items) = selected_items(opts)?;
    let device = load::device(&opts.device)?;
    let dtype = load::dtype(&opts.dtype, &device)?;
    let local = LocalModel::load_with_adapter(&opts.model, opts.adapter.as_deref(), &device, dtype)?;
    let decoding = decoding::resolve(local.preset.as_ref(), &opts.decoding)?;
    let m = &local.loaded;
    let configs: Vec<(String, Decoding)> = match grid {
        None => vec![(crate::records::default_config(), decoding.clone())],
        Some(g) => g.configs(&decoding)?,
    };
    let decoding_entry = match grid {
        None => serde_json::to_value(&decoding)?,
        Some(g) => g.manifest_entry(&decoding, &configs),
    };
    let rules = opts.safety_rules.as_deref().map(SafetyRules::load).transpose()?;
    let system = SafetyRules::system_text(rules.as_ref(), opts.system.as_deref());
    let prompter = Prompter::new(&local.prompt_format(), opts.chat_template.as_deref(), system.clone(), opts.enable_thinking)?;
    let placement = Placement::for_template(prompter.system_role());

    let job = JobSpec {
        model: Some(serde_json::json!({
            "id": m.description.id,
            "architecture": m.description.architecture,
            "files": m.description.files.iter().map(|f| serde_json::json!({"name": PathBuf::from(&f.path).file_name().map(|n| n.to_string_lossy().into_owned()), "sha256": f.sha256})).collect::<Vec<_>>(),
            // "none", not null: a run without an adapter must not resume with one.
            "adapter": m.description.adapter.as_ref().map_or(serde_json::json!("none"), |a| serde_json::to_value(a).expect("adapter serialises")),
        })),
        decoding: Some(decoding_entry),
        prompt: Some(serde_json::json!({
            "chat_template_sha256": prompter.template_sha256(),
            "system": opts.system,
            "system_placement": if system.is_some() { Some(if prompter.system_role() { "system message" } else { "prepended to the user turn" }) } else { None },
            "safety_rules": SafetyRules::manifest_entry(rules.as_ref(), placement),
            "enable_thinking": prompter.enable_thinking(),
            "think_tags": [prompter.think().open, prompter.think().close],
        })),
        ..job_base(&dataset, opts)?
    };
    let mut run = RunDir::open(&opts.out, job, opts.on_existing)?;
    run.manifest.device = Some(m.description.device.clone());
    run.save_manifest()?;
    let log = run.samples();
    let (_, done) = log.read_keyed::<SampleRecord>(SampleRecord::key)?;

    // Work list: every missing (item, sample, config) of the selection.
    struct Pending<'a> {
        item: &'a Item,
        sample: u32,
        config: usize,
        prompt_tokens: usize,
    }
    let mut pending: Vec<Pending> = Vec::new();
    let mut groups: Vec<PromptGroup> = Vec::new();
    let mut skipped = 0;
    for item in &items {
        let missing: Vec<(usize, u32)> = (0..configs.len())
            .flat_map(|c| (0..opts.samples).map(move |s| (c, s)))
            .filter(|&(c, s)| !done.contains(&crate::records::record_key(&item.id, s, &configs[c].0)))
            .collect();
        skipped += configs.len() * opts.samples as usize - missing.len();
        if missing.is_empty() {
            continue;
        }
        let text = prompter.render(&item.query)?;
        let prompt = m.tokenize_prompt(&text)?;
        if prompt.len() + decoding.max_new_tokens > m.config.max_position_embeddings {
            eprintln!(
                "warning: item {}: prompt ({} tokens) + --max-new-tokens {} exceeds the model's context of {}",
                item.id, prompt.len(), decoding.max_new_tokens, m.config.max_position_embeddings
            );
        }
        let samples = missing
            .iter()
            .map(|&(c, s)| {
                pending.push(Pending { item, sample: s, config: c, prompt_tokens: prompt.len() });
                SampleSpec {
                    tag: pending.len() - 1,
                    params: sampling_params(&configs[c].1),
                    stream: StreamKey::new(opts.seed, &item.id, s),
                    max_new_tokens: decoding.max_new_tokens,
                }
            })
            .collect();
        groups.push(PromptGroup { prompt, samples });
    }
    let mut summary = GenerateSummary { run: run.path.clone(), skipped, configs: configs.clone(), ..Default::default() };
    if pending.is_empty() {
        return Ok(summary);
    }

    let block_size = opts.block_size.max(1);
    let kv_dtype = if device.is_cpu() { candle_core::DType::F32 } else { dtype };
    let blocks = KvCache::blocks_for_bytes(&m.config, block_size, opts.kv_cache_mb << 20, kv_dtype);
    let mut cache = KvCache::new(&m.config, block_size, blocks, kv_dtype, &device)?;
    let sched = SchedulerConfig { max_batch: opts.batch_size, prefill_chunk: opts.prefill_chunk, eos: m.eos_ids.clone() };

    let bar = progress_bar(opts.progress, pending.len() as u64);
    let mut appender = log.appender()?;
    let start = Instant::now();
    let stop_strings = decoding.stop.clone();
    let tokenizer = &m.tokenizer;
    let mut stop = |_: usize, toks: &[u32]| -> bool {
        if stop_strings.is_empty() {
            return false;
        }
        let text = tokenizer.decode(toks, false).unwrap_or_default();
        stop_strings.iter().any(|s| text.contains(s.as_str()))
    };
    let mut decoded_tokens = 0usize;
    let think = prompter.think().clone();
    let written = std::cell::Cell::new(0usize);
    let mut on_done = |f: scheduler::Finished| -> Result<()> {
        let p = &pending[f.tag];
        let mut raw = tokenizer.decode(&f.tokens, false).map_err(|e| anyhow::anyhow!("decoding a completion: {e}"))?;
        if f.finish == scheduler::FinishReason::StopString {
            if let Some(cut) = stop_strings.iter().filter_map(|s| raw.find(s.as_str())).min() {
                raw.truncate(cut);
            }
        }
        let split = split_completion(&raw, &think);
        let rec = SampleRecord {
            item_id: p.item.id.clone(),
            sample_index: p.sample,
            config: configs[p.config].0.clone(),
            scenario: p.item.scenario,
            categories: p.item.categories(),
            seed: opts.seed,
            decoding: configs[p.config].1.clone(),
            prompt_tokens: p.prompt_tokens,
            completion_tokens: f.tokens.len(),
            thinking: split.thinking,
            response: split.response,
            raw,
            finish_reason: f.finish.into(),
            truncated: split.truncated_thinking,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        appender.append(&rec)?;
        written.set(written.get() + 1);
        bar.inc(1);
        Ok(())
    };
    let mut on_step = |s: scheduler::StepStats| {
        decoded_tokens += s.decode_tokens;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.1} tok/s, {} running", decoded_tokens as f64 / secs, s.running));
    };
    scheduler::run(m.model.as_ref(), &mut cache, &sched, groups, &mut stop, &mut on_done, &mut on_step)?;
    bar.finish_and_clear();
    summary.written = written.get();
    summary.seconds = start.elapsed().as_secs_f64();
    let (recs, _) = log.read_keyed::<SampleRecord>(SampleRecord::key)?;
    let this_pass: HashSet<String> = pending.iter().map(|p| crate::records::record_key(&p.item.id, p.sample, &configs[p.config].0)).collect();
    for r in recs.iter().filter(|r| this_pass.contains(&r.key())) {
        summary.prompt_tokens += r.prompt_tokens;
        summary.completion_tokens += r.completion_tokens;
    }
    Ok(summary)
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
        bail!("--samples must be at least 1 (the paper uses 5)");
    }
    let dataset = Dataset::load(&opts.data)?;
    let items = dataset.select(&opts.selection)?;
    if items.is_empty() {
        bail!("the selection matches no item of {}; loosen --scenario/--category/--ids/--shard", dataset.source);
    }
    Ok((dataset, items))
}

fn progress_bar(enabled: bool, len: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    // indicatif hides itself when stderr is not a terminal (CI logs stay clean).
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} samples {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
            .expect("valid template"),
    );
    bar
}
