//! `bsa generate --backend openai:MODEL@BASE_URL`: the same samples.jsonl, produced by an
//! OpenAI-compatible server (a vLLM / SGLang cluster, `bsa serve`, a hosted API).
//!
//! Each (item, sample) is one request with `n = 1` and its own seed derived from the run's
//! seed, the item id and the sample index, so a server that honours `seed` (vLLM, `bsa
//! serve`) gives a sample the same text whichever other samples a resumed run still needs.
//! Records are appended as replies arrive; a failure after the retries stops the run with
//! what was already written kept, and the same command resumes it.

use std::time::Instant;

use anyhow::{Context, Result};

use super::{job_base, selected_items, GenerateOptions, GenerateSummary};
use crate::backends::openai::{ChatRequest, Client, Endpoint};
use crate::backends::preset;
use crate::engine::sampler::fnv1a64;
use crate::pipeline::decoding;
use crate::prompt::{Message, ThinkConvention};
use crate::records::{Decoding, SampleRecord};
use crate::store::RunDir;

/// The request seed of sample `sample` of `item`, in 63 bits (OpenAI's seed is a signed
/// 64-bit integer).
pub fn request_seed(seed: u64, item: &str, sample: u32) -> u64 {
    fnv1a64(format!("{seed}:{item}:{sample}").as_bytes()) >> 1
}

pub fn generate(opts: &GenerateOptions, backend: &str) -> Result<GenerateSummary> {
    if opts.chat_template.is_some() {
        anyhow::bail!("--chat-template applies to the local engine; with --backend the server applies its own template");
    }
    if opts.adapter.is_some() {
        anyhow::bail!("--adapter merges LoRA weights into a local model; with --backend load the adapter on the server");
    }
    let (dataset, items) = selected_items(opts)?;
    // Safety rules go out as a system message; the server's template decides where it lands.
    let rules = opts.safety_rules.as_deref().map(crate::prompt::safety_rules::SafetyRules::load).transpose()?;
    let system = crate::prompt::safety_rules::SafetyRules::system_text(rules.as_ref(), opts.system.as_deref());
    let endpoint = Endpoint::parse(backend, "--backend")?;
    let client = Client::new(endpoint.clone(), opts.remote.clone())?;
    // A model named like a preset (or its hub id) gets the preset's sampling and think tags.
    let known = preset::find(&endpoint.model);
    let decoding: Decoding = decoding::resolve(known.as_ref(), &opts.decoding)?;
    let think = known.as_ref().map_or_else(ThinkConvention::default, |p| ThinkConvention { prefilled_open: false, ..p.think_convention() });
    let job = crate::store::JobSpec {
        model: Some(serde_json::json!({"id": endpoint.model, "backend": client.describe()})),
        decoding: Some(serde_json::to_value(&decoding)?),
        prompt: Some(serde_json::json!({
            "chat_template": "the server's",
            "system": opts.system,
            "safety_rules": crate::prompt::safety_rules::SafetyRules::manifest_entry(rules.as_ref(), crate::prompt::safety_rules::Placement::System),
            "enable_thinking": opts.enable_thinking,
        })),
        ..job_base(&dataset, opts)?
    };
    let mut run = RunDir::open(&opts.out, job, opts.on_existing)?;
    run.manifest.device = Some(format!("remote: {}", endpoint.base_url));
    run.save_manifest()?;
    let log = run.samples();
    let (_, done) = log.read_keyed::<SampleRecord>(SampleRecord::key)?;
    let config = crate::records::default_config();

    let mut requests = Vec::new();
    let mut skipped = 0;
    for item in &items {
        let mut messages = Vec::new();
        if let Some(sys) = &system {
            messages.push(Message::system(sys.clone()));
        }
        messages.push(Message::user(item.query.clone()));
        for s in 0..opts.samples {
            if done.contains(&crate::records::record_key(&item.id, s, &config)) {
                skipped += 1;
                continue;
            }
            let mut extra = serde_json::Map::new();
            if let Some(t) = opts.enable_thinking {
                extra.insert("chat_template_kwargs".into(), serde_json::json!({"enable_thinking": t}));
            }
            let req = ChatRequest {
                messages: messages.clone(),
                n: 1,
                temperature: decoding.temperature,
                top_p: decoding.top_p,
                top_k: decoding.top_k,
                min_p: decoding.min_p,
                max_tokens: decoding.max_new_tokens,
                seed: Some(request_seed(opts.seed, &item.id, s)),
                stop: decoding.stop.clone(),
                extra,
            };
            requests.push(((item, s), req));
        }
    }
    let mut summary = GenerateSummary { run: run.path.clone(), skipped, ..Default::default() };
    if requests.is_empty() {
        return Ok(summary);
    }
    let bar = super::progress_bar(opts.progress, requests.len() as u64);
    let mut appender = log.appender()?;
    let start = Instant::now();
    let result = client.chat_all(requests, &mut |(item, s), reply| {
        let choice = reply.choices.first().with_context(|| format!("{}: a reply with no choice for item {} sample {s}", endpoint.chat_url(), item.id))?;
        let split = choice.split(&think);
        let rec = SampleRecord {
            item_id: item.id.clone(),
            sample_index: s,
            config: config.clone(),
            scenario: item.scenario,
            categories: item.categories(),
            seed: opts.seed,
            decoding: decoding.clone(),
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            thinking: split.thinking,
            response: split.response,
            raw: choice.raw(&think),
            finish_reason: choice.finish(),
            truncated: split.truncated_thinking,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        appender.append(&rec)?;
        summary.written += 1;
        summary.prompt_tokens += rec.prompt_tokens;
        summary.completion_tokens += rec.completion_tokens;
        bar.inc(1);
        Ok(())
    });
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    result.with_context(|| {
        format!("generating through {}: {} samples were written and are kept; run the same command again to resume", endpoint.base_url, summary.written)
    })?;
    Ok(summary)
}
