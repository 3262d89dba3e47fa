//! `bsa bench`: developer benchmarks (never part of the tests). The measuring code lives
//! here, in the binary, not in the library.

mod measure;
mod quant;
mod serve;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::args::{device, positive, positive_u32, temperature};
use super::debug_note;
use super::gpu_check;
use bsa::backends::local::LocalModel;
use bsa::data::Dataset;
use bsa::engine::load;
use bsa::engine::sampler::SamplingParams;
use bsa::prompt::Prompter;

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
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = positive)]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2, value_parser = positive)]
    pub requests_per_client: usize,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub max_tokens: usize,
    /// temperature of every request (0 = greedy, as in bench engine; sampling adds the
    /// sampler's cost to every step).
    #[arg(long, default_value_t = 0.0, value_parser = temperature)]
    pub temperature: f32,
    /// The prompts: the queries of this data file, in turn.
    #[arg(long, default_value = "data/sample.csv")]
    pub data: String,
    /// The server's KV cache in MiB (SmolLM2 needs about 45 KiB per token; the default holds
    /// 64 clients' sequences without setting any aside).
    #[arg(long, default_value_t = 800, value_parser = positive)]
    pub kv_cache_mb: usize,
    #[arg(long, default_value = "cpu", value_parser = device)]
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
    /// Compute every prompt in full (no automatic prefix caching), to compare.
    #[arg(long)]
    pub no_prefix_cache: bool,
}

#[derive(Debug, Args)]
pub struct BenchSamplerArgs {
    #[arg(long, default_value_t = 152_064, value_parser = positive)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256, value_parser = positive)]
    pub rows: usize,
    #[arg(long, default_value_t = 3, value_parser = positive)]
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
    #[arg(long, default_value_t = 2, value_parser = positive)]
    pub chi_rows: usize,
    /// Also write the --check report to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,    /// --check on these logits (`[rows, vocab]` f32 little-endian) instead of synthetic ones.
    #[arg(long)]
    pub logits: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchScoreArgs {
    #[arg(long, default_value_t = 2000, value_parser = positive)]
    pub items: usize,
    #[arg(long, default_value_t = 5, value_parser = positive_u32)]
    pub samples: u32,
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Repetitions; the best and median are reported.
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub repeat: usize,
}

fn bench_score(a: BenchScoreArgs) -> Result<()> {
    let r = measure::score(a.items, a.samples, a.resamples, a.repeat)?;
    outln!("{r}{}", debug_note());
    Ok(())
}

fn bench_sampler(a: BenchSamplerArgs) -> Result<()> {
    if a.check || a.device != "cpu" || a.json.is_some() {
        let device = bsa::engine::load::device(&a.device)?;
        let size = gpu_check::SamplerReportSize { rows: a.rows, vocab: a.vocab, repeat: a.repeat, draws: a.draws, chi_rows: a.chi_rows };
        let logits = a.logits.as_deref().map(|p| gpu_check::read_logits(p, a.rows, a.vocab)).transpose()?;
        let report = gpu_check::sampler_report(&device, size, logits)?;
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(p) = &a.json {
            std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
        }
        outln!("{text}");
        return Ok(());
    }
    for r in measure::sampler(a.vocab, a.rows, a.repeat) {
        outln!("{r}{}", debug_note());
    }
    Ok(())
}

fn bench_engine(a: BenchEngineArgs) -> Result<()> {
    let device = load::device(&a.device)?;
    let dtype = load::dtype(&a.dtype, &device)?;
    let local = LocalModel::load(&a.model, &device, dtype)?;
    let m = &local.loaded;
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
        let r = measure::engine(m, &format!("batch {b}"), &prompts, samples, a.new_tokens, b, synthetic_params, !a.no_prefix_cache)?;
        outln!("{r}");
        results.push(serde_json::json!({
            "batch": b, "sequences": r.sequences, "prompt_tokens": r.prompt_tokens, "cached_prompt_tokens": r.cached_prompt_tokens, "new_tokens": r.new_tokens,
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
        let prompter = Prompter::new(&local.prompt_format(), &Default::default())?;
        let prompts = ds.items.iter().map(|it| m.tokenize_prompt(&prompter.render(&it.query)?)).collect::<Result<Vec<_>>>()?;
        let what = format!("BSA-like job: {} queries x {} samples, batch {}", prompts.len(), a.job_samples, a.job_batch);
        // The job samples as the model's preset says (the k samples of a query must differ).
        let params = local.preset.as_ref().map_or(SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, min_p: 0.0 }, |p| p.sampling.params());
        let r = measure::engine(m, &what, &prompts, a.job_samples, a.new_tokens, a.job_batch, params, !a.no_prefix_cache)?;
        outln!("{r}");
    }
    Ok(())
}

fn bench_quant() -> Result<()> {
    for (out, inp) in [(1536, 576), (576, 1536), (576, 576)] {
        for (n, ours, candle) in quant::bench(out, inp, &[1, 2, 4, 8, 32, 128]) {
            outln!("Q4_1 {out}x{inp}, {n:3} rows: ours {:9.1} us, candle {:9.1} us, {:.1}x{}", ours * 1e6, candle * 1e6, candle / ours, debug_note());
        }
    }
    Ok(())
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    eprintln!("bsa serve in-process on 127.0.0.1, {} threads{}", rayon::current_num_threads(), debug_note());
    for r in serve::bench(&a.model, &a.device, &a.data, a.kv_cache_mb, &a.clients, a.requests_per_client, a.max_tokens, a.temperature)? {
        outln!("{r}");
    }
    Ok(())
}

pub(super) fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Score(a) => bench_score(a),
        BenchCommand::Sampler(a) => bench_sampler(a),
        BenchCommand::Engine(a) => bench_engine(a),
        BenchCommand::Quant => bench_quant(),
        BenchCommand::Serve(a) => bench_serve(a),
    }
}
