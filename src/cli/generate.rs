//! `bsa generate`: sample completions into a run directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::{count, min_p, temperature, top_p, RunArgs};
use bsa::pipeline::decoding::DecodingOverrides;
use bsa::pipeline::generate::{self as generation};
use bsa::store;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Sampling temperature (0 = greedy). Default: the preset's, else 0.6.
    #[arg(long, value_parser = temperature)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (1 = off). Default: the preset's, else 0.95.
    #[arg(long, value_parser = top_p)]
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off). Default: the preset's, else 0.
    #[arg(long, value_parser = count)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p times the top probability (0 = off).
    #[arg(long, value_parser = min_p)]
    pub min_p: Option<f32>,
    /// Generate through an OpenAI-compatible server instead of the local engine:
    /// openai:MODEL@BASE_URL (vLLM, SGLang, llama.cpp server, bsa serve, a hosted API).
    #[arg(long, value_name = "openai:MODEL@BASE_URL")]
    pub backend: Option<String>,
}

pub(super) fn generate_options(a: GenerateArgs) -> Result<generation::GenerateOptions> {
    let r = a.run;
    Ok(generation::GenerateOptions {
        local: r.engine.local(r.batch_size, r.prefill_chunk, r.block_size, r.prompt.mitigation.adapter.clone()),
        model: r.model,
        data: r.data,
        selection: r.select.to_selection()?,
        samples: r.samples,
        seed: r.seed,
        decoding: DecodingOverrides {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            max_new_tokens: r.max_new_tokens,
            stop: r.stop,
            ignore_eos: r.ignore_eos,
        },
        prompt: r.prompt.settings(),
        safety_rules: r.prompt.mitigation.safety_rules.clone(),
        out: r.out,
        on_existing: if r.new_run { store::OnExisting::NewRun } else { store::OnExisting::Resume },
        progress: !r.quiet,
        backend: a.backend,
        remote: r.remote.options(),
    })
}

pub(super) fn generate(a: GenerateArgs) -> Result<PathBuf> {
    let opts = generate_options(a)?;
    let s = generation::generate(&opts)?;
    if s.written == 0 {
        outln!("{}: all {} samples were already there; nothing to do", s.run.display(), s.skipped);
    } else {
        outln!(
            "{}: wrote {} samples ({} already there) in {:.1} s: {} completion tokens, {:.1} tok/s",
            s.run.display(),
            s.written,
            s.skipped,
            s.seconds,
            s.completion_tokens,
            s.completion_tokens as f64 / s.seconds.max(1e-9)
        );
        if let Some(prefill) = s.prefill.describe() {
            outln!("  {prefill}");
        }
        if let Some(plan) = &s.cache {
            outln!("  {}", plan.describe());
            outln!("  preemptions: {} (sequences whose KV blocks were taken back for older ones and recomputed later)", s.preempted);
        }
        if s.errors > 0 {
            outln!("  {} sample(s) ended with finish reason error; their records say why (\"error\"), and their response counts as missing; a resume keeps them as they are (to generate them again under other settings, start a new run: --new-run)", s.errors);
        }
    }
    Ok(s.run)
}

pub(super) fn run(a: GenerateArgs) -> Result<()> {
    generate(a).map(|_| ())
}
