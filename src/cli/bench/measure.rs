//! Benchmarks behind `bsa bench` (timings are never asserted in tests).

use std::fmt;
use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use bsa::records::{PRIMARY_CATEGORIES, Scenario};
use bsa::engine::sampler::{sample_batch, SamplingParams, StreamKey};
use bsa::analysis::metrics::{self, ScoreOptions};
use bsa::records::{SafetyLabel, ThinkingLabel, Verdict};

/// Best and median wall time of repeated runs of one workload.
#[derive(Debug, Clone)]
pub struct Timing {
    pub what: String,
    pub best_s: f64,
    pub median_s: f64,
    pub runs: usize,
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: best {:.4} s, median {:.4} s ({} runs, {} threads)",
            self.what,
            self.best_s,
            self.median_s,
            self.runs,
            rayon::current_num_threads()
        )
    }
}

fn time_it(what: String, repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    let mut times = Vec::new();
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Timing { what, best_s: times[0], median_s: times[times.len() / 2], runs: times.len() })
}

/// Synthetic verdicts in the benchmark's mix (30% RO, 60% CS, 10% OS, nine categories).
pub fn synthetic_verdicts(items: usize, samples: u32, seed: u64) -> Vec<Verdict> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vs = Vec::with_capacity(items * samples as usize);
    for i in 0..items {
        let scenario = match i * 10 / items.max(1) {
            0..=2 => Scenario::RiskOmission,
            3..=8 => Scenario::CognitiveShortcut,
            _ => Scenario::OverSensitivity,
        };
        let cats: Vec<String> =
            (0..scenario.risk_count()).map(|j| PRIMARY_CATEGORIES[(i + j * 4) % 9].to_string()).collect();
        let p_safe: f64 = rng.random();
        let p_think: f64 = rng.random();
        let allowed = ThinkingLabel::allowed(scenario);
        for s in 0..samples {
            let think = if rng.random::<f64>() < p_think { allowed[0] } else { allowed[1] };
            // Drawn in this order (think, then safe) so the synthetic set stays as it was.
            let safe = rng.random::<f64>() < p_safe;
            let safety = Some(if safe { SafetyLabel::Safe } else { SafetyLabel::Unsafe });
            vs.push(Verdict::labelled(&format!("{i:032x}"), s, scenario, cats.clone(), safety, Some(think), "bench"));
        }
    }
    vs
}

/// Scoring `items` x `samples` verdicts with `resamples` bootstrap resamples.
pub fn score(items: usize, samples: u32, resamples: usize, repeat: usize) -> Result<Timing> {
    let vs = synthetic_verdicts(items, samples, 7);
    let opts = ScoreOptions { resamples, ..Default::default() };
    time_it(format!("score {items} items x {samples} samples, {resamples} resamples"), repeat, || {
        std::hint::black_box(metrics::score(&vs, &opts)?);
        Ok(())
    })
}

/// The CPU sampler on [rows x vocab] random logits, for the parameter sets that matter.
pub fn sampler(vocab: usize, rows: usize, repeat: usize) -> Vec<Timing> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let normal = Normal::new(0.0f32, 2.0).unwrap();
    // A few spikes above Gaussian noise, roughly like real next-token logits.
    let logits: Vec<f32> = (0..vocab * rows)
        .map(|_| normal.sample(&mut rng) + if rng.random_range(0..2000) == 0 { 8.0 } else { 0.0 })
        .collect();
    let keys: Vec<StreamKey> = (0..rows).map(|r| StreamKey::new(1, "bench", r as u32)).collect();
    let steps = vec![3u64; rows];
    let sets = [
        ("greedy", SamplingParams::greedy()),
        ("T=1", SamplingParams::default()),
        ("T=0.6 top-k 20 top-p 0.95", SamplingParams { temperature: 0.6, top_k: 20, top_p: 0.95, min_p: 0.0 }),
        ("T=0.6 top-p 0.95", SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.95, min_p: 0.0 }),
        ("T=1 min-p 0.05", SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.05 }),
    ];
    sets.iter()
        .map(|(name, p)| {
            let ps = vec![*p; rows];
            time_it(format!("sampler {rows} x {vocab}, {name}"), repeat, || {
                std::hint::black_box(sample_batch(&logits, vocab, &ps, &keys, &steps));
                Ok(())
            })
            .expect("sampling cannot fail on valid input")
        })
        .collect()
}

/// Throughput of the local engine on one workload.
#[derive(Debug, Clone)]
pub struct EngineThroughput {
    pub what: String,
    pub sequences: usize,
    pub prompt_tokens: usize,
    /// Of the prompt tokens, those the prefix cache supplied (not computed).
    pub cached_prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub total_s: f64,
}

impl EngineThroughput {
    /// Prompt tokens computed per second of the prefill pass (cached ones are not counted).
    pub fn prefill_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_prompt_tokens) as f64 / self.prefill_s.max(1e-9)
    }
    /// Decode throughput: the tokens after the first of each sequence, over the time
    /// after prefill.
    pub fn decode_tok_s(&self) -> f64 {
        let decode_tokens = self.new_tokens.saturating_sub(self.sequences);
        decode_tokens as f64 / (self.total_s - self.prefill_s).max(1e-9)
    }
}

impl fmt::Display for EngineThroughput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} sequences, {} prompt ({} from the prefix cache) + {} new tokens in {:.2} s; prefill {:.1} tok/s computed, decode {}, overall {:.1} new tok/s",
            self.what,
            self.sequences,
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.new_tokens,
            self.total_s,
            self.prefill_tok_s(),
            // The decode time is a difference of two passes' times: under a tenth of the
            // whole, timing noise swamps it.
            if self.total_s - self.prefill_s >= 0.1 * self.total_s {
                format!("{:.1} tok/s", self.decode_tok_s())
            } else {
                "too short to time (more --new-tokens)".to_string()
            },
            self.new_tokens as f64 / self.total_s.max(1e-9)
        )
    }
}

/// Runs `groups` through the scheduler twice: once with one new token (the prefill alone),
/// once to the end with end-of-sequence ignored, so every sample makes `new_tokens`.
pub fn engine(
    m: &bsa::engine::load::LoadedModel,
    what: &str,
    prompts: &[Vec<u32>],
    samples: u32,
    new_tokens: usize,
    batch: usize,
    params: SamplingParams,
    prefix_cache: bool,
) -> Result<EngineThroughput> {
    use bsa::engine::kv_cache::KvCache;
    use bsa::engine::scheduler::{self, PromptGroup, SchedulerConfig};
    let groups = |max_new: usize| PromptGroup::uniform(prompts, samples, params, max_new, 0, "bench");
    let device = m.model.device().clone();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + new_tokens;
    let block_size = 16;
    let blocks = (max_len.div_ceil(block_size) + 1) * batch.max(samples as usize) + 64;
    let cfg = SchedulerConfig { max_batch: batch, prefill_chunk: 2048, eos: Vec::new(), max_model_len: None };
    // The cache in the weights' dtype on a GPU (as `bsa generate` does), f32 on the CPU.
    let kv_dtype = match (device.is_cpu(), m.description.dtype.as_str()) {
        (false, "bf16") => candle_core::DType::BF16,
        (false, "f16") => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    };
    // Each pass starts from an empty cache: only prefixes shared within the workload hit.
    let pass = |max_new: usize| -> Result<(f64, usize, usize)> {
        let mut cache = KvCache::new(m.model.config(), block_size, blocks, kv_dtype, &device)?;
        cache.set_prefix_caching(prefix_cache);
        let (mut produced, mut cached) = (0usize, 0usize);
        let t = Instant::now();
        scheduler::run(m.model.as_ref(), &mut cache, &cfg, groups(max_new), &mut |_, _, _| false, &mut |f| {
            produced += f.tokens.len();
            Ok(())
        }, &mut |s| cached += s.cached_prefill_tokens)?;
        Ok((t.elapsed().as_secs_f64(), produced, cached))
    };
    let (prefill_s, _, cached_prompt_tokens) = pass(1)?;
    let (total_s, produced, _) = pass(new_tokens)?;
    Ok(EngineThroughput {
        what: what.to_string(),
        sequences: prompts.len() * samples as usize,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        cached_prompt_tokens,
        new_tokens: produced,
        prefill_s,
        total_s,
    })
}
