//! What `scripts/gpu/check.sh` asks of the binary on a GPU machine, as library functions
//! that also run (smaller) on the CPU so CI exercises them:
//!
//! * [`sampler_report`]: the device sampler against its Rust model ([`radix`]) and the
//!   exact CPU sampler on identical logits and streams (how often tokens differ), a
//!   chi-square of its draws against the exact truncated distribution, and its speed
//!   against one read of the logits.
//! * [`dump_logits`]: our logits for given token ids on a Hugging Face checkpoint directory
//!   (config.json and safetensors only, no tokenizer needed), through prefill and then
//!   decode steps, for comparison with transformers' logits on the same ids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};

use bsa::engine::batch::{BatchInput, SeqInput};
use bsa::engine::config::ModelConfig;
use bsa::engine::kv_cache::{BlockTable, KvCache};
use bsa::engine::models;
use bsa::engine::sampler::radix::{self, Drawn};
use bsa::analysis::stats::{chi_square_p_value, chi_square_stat};
use bsa::engine::sampler::{cpu, SamplingParams, StreamKey};

/// The parameter sets the report covers (the two, and the other truncations).
pub fn report_param_sets() -> Vec<(&'static str, SamplingParams)> {
    let p = |temperature, top_k, top_p, min_p| SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
    };
    vec![
        ("T=0.6 top-k 20 top-p 0.95", p(0.6, 20, 0.95, 0.0)),
        ("T=0.6 top-p 0.95", p(0.6, 0, 0.95, 0.0)),
        ("T=1", p(1.0, 0, 1.0, 0.0)),
        ("T=1 min-p 0.05", p(1.0, 0, 1.0, 0.05)),
        ("greedy", SamplingParams::greedy()),
    ]
}

/// LLM-like logits: Gaussian noise with a few spikes, fixed seed.
pub fn synthetic_logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 2.0).unwrap();
    (0..rows * vocab)
        .map(|_| normal.sample(&mut rng) + if rng.random_range(0..2000) == 0 { 8.0 } else { 0.0 })
        .collect()
}

/// Samples every row of `logits` (`[rows, vocab]` on `device`) with the device sampler:
/// the CUDA kernel on a CUDA device, its Rust model elsewhere.
pub fn device_sample(logits: &Tensor, params: &[SamplingParams], keys: &[StreamKey], steps: &[u64], plain: bool) -> Result<Vec<Drawn>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let rows: Vec<usize> = (0..params.len()).collect();
        let (t, l) = bsa::engine::sampler::device::sample_on_cuda(logits, &rows, params, keys, steps, plain)?;
        return Ok(t
            .into_iter()
            .zip(l)
            .map(|(token, logprob)| Drawn { token, logprob })
            .collect());
    }
    let _ = plain;
    let (_, vocab) = logits.dims2()?;
    let host: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    Ok(radix::sample_batch(&host, vocab, params, keys, steps))
}

/// Seconds per launch of the device kernel alone, or `None` off CUDA.
fn kernel_seconds(logits: &Tensor, params: &[SamplingParams], keys: &[StreamKey], steps: &[u64], iters: usize) -> Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let op = bsa::engine::sampler::cuda::SampleOp {
            params: params.to_vec(),
            keys: keys.to_vec(),
            steps: steps.to_vec(),
            plain: false,
        };
        return Ok(Some(op.kernel_seconds(logits, iters)?));
    }
    let _ = (logits, params, keys, steps, iters);
    Ok(None)
}

fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Sizes of a sampler report.
#[derive(Debug, Clone, Copy)]
pub struct SamplerReportSize {
    pub rows: usize,
    pub vocab: usize,
    pub repeat: usize,
    /// Draws per row for the chi-square (0: skip it).
    pub draws: usize,
    /// Rows tested by chi-square.
    pub chi_rows: usize,
}

/// Reads `[rows, vocab]` f32 little-endian logits written by another program (the torch
/// baseline), so both samplers are timed on the same data.
pub fn read_logits(path: &Path, rows: usize, vocab: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        bytes.len() == rows * vocab * 4,
        "{}: {} bytes, expected {rows} x {vocab} f32 = {} bytes; pass the --rows and --vocab it was written with",
        path.display(),
        bytes.len(),
        rows * vocab * 4
    );
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The device sampler's agreement, statistics and timing as JSON (see the module docs).
/// `logits`: the `[rows, vocab]` input, or `None` for [`synthetic_logits`].
pub fn sampler_report(device: &Device, size: SamplerReportSize, logits: Option<Vec<f32>>) -> Result<Value> {
    let SamplerReportSize {
        rows,
        vocab,
        repeat,
        draws,
        chi_rows,
    } = size;
    let host = logits.unwrap_or_else(|| synthetic_logits(rows, vocab, 5));
    ensure!(
        host.len() == rows * vocab,
        "sampler report: {} logits for {rows} x {vocab}",
        host.len()
    );
    let logits = Tensor::from_vec(host.clone(), (rows, vocab), device)?;
    let keys: Vec<StreamKey> = (0..rows).map(|r| StreamKey::new(1, "bench", r as u32)).collect();
    let steps = vec![3u64; rows];
    let logit_bytes = (rows * vocab * 4) as f64;
    let mut sets = Vec::new();
    for (name, p) in report_param_sets() {
        let ps = vec![p; rows];
        // Agreement on identical logits and streams.
        let ours = device_sample(&logits, &ps, &keys, &steps, false)?;
        let plain = device_sample(&logits, &ps, &keys, &steps, true)?;
        let model = radix::sample_batch(&host, vocab, &ps, &keys, &steps);
        let exact = cpu::sample_batch(&host, vocab, &ps, &keys, &steps);
        let count = |f: &dyn Fn(usize) -> bool| (0..rows).filter(|&r| f(r)).count();
        let vs_model = count(&|r| ours[r].token != model[r].token);
        let vs_plain = count(&|r| ours[r].token != plain[r].token);
        let vs_exact = count(&|r| ours[r].token != exact[r]);
        let model_vs_exact = count(&|r| model[r].token != exact[r]);
        let logprob_err = (0..rows)
            .filter(|&r| ours[r].token == model[r].token && model[r].logprob.is_finite())
            .map(|r| (ours[r].logprob - model[r].logprob).abs())
            .fold(0f32, f32::max);
        // Timing: the whole call (parameter upload, kernel, ids back) per batch.
        let time = |plain: bool| -> Result<(f64, f64)> {
            let mut t = Vec::new();
            for _ in 0..repeat.max(1) {
                synchronize(device)?;
                let s = Instant::now();
                std::hint::black_box(device_sample(&logits, &ps, &keys, &steps, plain)?);
                t.push(s.elapsed().as_secs_f64());
            }
            t.sort_by(f64::total_cmp);
            Ok((t[0], t[t.len() / 2]))
        };
        let (best, median) = time(false)?;
        let (plain_best, _) = time(true)?;
        let kernel = kernel_seconds(&logits, &ps, &keys, &steps, repeat)?;
        // Chi-square: each tested row copied into a full batch with distinct sample
        // streams, launched until it has `draws` draws.
        let mut chi = Vec::new();
        if draws > 0 && p.temperature > 0.0 {
            for r in 0..chi_rows.min(rows) {
                let row = &host[r * vocab..(r + 1) * vocab];
                let copies = rows.min(draws);
                let batch = logits.narrow(0, r, 1)?.broadcast_as((copies, vocab))?.contiguous()?;
                let mut counts = vec![0u64; vocab];
                let mut launched = 0;
                while launched < draws {
                    let ks: Vec<StreamKey> = (0..copies)
                        .map(|i| StreamKey::new(9, &format!("chi{r}"), (launched + i) as u32))
                        .collect();
                    for d in device_sample(&batch, &vec![p; copies], &ks, &vec![0; copies], false)? {
                        counts[d.token as usize] += 1;
                    }
                    launched += copies;
                }
                let mut probs = vec![0.0; vocab];
                for (id, pr) in cpu::truncated_distribution(row, &p) {
                    probs[id as usize] = pr;
                }
                let (stat, df) = chi_square_stat(&counts, &probs);
                chi.push(json!({"row": r, "draws": launched, "chi2": stat, "df": df, "p_value": chi_square_p_value(stat, df)}));
            }
        }
        sets.push(json!({
            "params": name,
            "rows": rows,
            "vocab": vocab,
            "tokens_differ_from_rust_model": vs_model,
            "tokens_differ_plain_vs_aggregated": vs_plain,
            "tokens_differ_from_exact_cpu_sampler": vs_exact,
            "rust_model_differs_from_exact_cpu_sampler": model_vs_exact,
            "max_logprob_abs_diff_vs_rust_model": logprob_err,
            "best_s": best,
            "median_s": median,
            "plain_atomics_best_s": plain_best,
            "logits_read_gb_per_s": logit_bytes / best / 1e9,
            "kernel_only_s": kernel,
            "chi_square": chi,
        }));
    }
    Ok(json!({"device": format!("{device:?}"), "logit_bytes": logit_bytes, "sets": sets}))
}

/// A Hugging Face checkpoint directory's config and weight files.
fn checkpoint_files(dir: &Path) -> Result<(ModelConfig, Vec<PathBuf>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg = ModelConfig::from_hf_config(&text).with_context(|| cfg_path.display().to_string())?;
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((cfg, vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!(
            "{}: no model.safetensors and no model.safetensors.index.json",
            dir.display()
        );
    }
    let shards = bsa::engine::load::shard_names(&index)?;
    Ok((cfg, shards.into_iter().map(|s| dir.join(s)).collect()))
}

/// Runs `sequences` through the model as one batch: a prefill of the first `prefill`
/// tokens of each, then one decode step per remaining token, and writes the logits of
/// positions `prefill - 1 ..= len - 1` of every sequence, sequences one after another, as
/// little-endian f32 to `out`. Returns the number of logit rows written and the vocab size.
pub fn dump_logits(
    dir: &Path,
    device: &Device,
    dtype: DType,
    sequences: &[Vec<u32>],
    prefill: usize,
    out: &Path,
) -> Result<(usize, usize)> {
    ensure!(prefill >= 1, "--prefill must be at least 1");
    for (i, s) in sequences.iter().enumerate() {
        ensure!(
            s.len() >= prefill,
            "sequence {i} has {} tokens, fewer than --prefill {prefill}",
            s.len()
        );
    }
    if dtype != DType::F32 && device.is_cpu() {
        bail!("--dtype {dtype:?} is not supported on the CPU; use f32");
    }
    let (cfg, files) = checkpoint_files(dir)?;
    // SAFETY: the files are memory-mapped read-only and not modified while the model lives.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
    let model =
        models::load_safetensors(&cfg, vb).with_context(|| format!("{}: loading the weights", dir.display()))?;
    let block_size = 16;
    let max_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let blocks = sequences.len() * (max_len.div_ceil(block_size) + 1) + 1;
    let kv_dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let mut cache = KvCache::new(&cfg, block_size, blocks, kv_dtype, device)?;
    let mut tables: Vec<BlockTable> = sequences.iter().map(|_| BlockTable::new()).collect();
    let mut rows: Vec<Vec<Vec<f32>>> = sequences.iter().map(|_| Vec::new()).collect();
    let mut pos = 0;
    while pos < max_len {
        let mut batch = BatchInput::default();
        let mut who = Vec::new();
        for (i, s) in sequences.iter().enumerate() {
            let len = if pos == 0 { prefill } else { 1 };
            if pos + len > s.len() || (pos > 0 && pos < prefill) {
                continue;
            }
            tables[i].reserve(&mut cache, len).map_err(anyhow::Error::from)?;
            batch.tokens.extend_from_slice(&s[pos..pos + len]);
            batch.seqs.push(SeqInput {
                start_pos: pos,
                len,
                block_table: tables[i].blocks().to_vec(),
                want_logits: true,
            });
            who.push((i, len));
        }
        let logits = model.forward(&batch, &mut cache)?.to_dtype(DType::F32)?;
        for (r, &(i, len)) in who.iter().enumerate() {
            rows[i].push(logits.get(r)?.to_vec1()?);
            tables[i].advance(len);
        }
        pos = if pos == 0 { prefill } else { pos + 1 };
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let mut n = 0;
    for seq in &rows {
        for row in seq {
            for x in row {
                f.write_all(&x.to_le_bytes())?;
            }
            n += 1;
        }
    }
    f.flush()?;
    Ok((n, cfg.vocab_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report runs end to end on the CPU (the device sampler is then its Rust model),
    /// so the GPU script's command is exercised by CI.
    #[test]
    fn sampler_report_on_cpu() {
        let v = sampler_report(
            &Device::Cpu,
            SamplerReportSize {
                rows: 8,
                vocab: 500,
                repeat: 1,
                draws: 4000,
                chi_rows: 1,
            },
            None,
        )
        .unwrap();
        let sets = v["sets"].as_array().unwrap();
        assert_eq!(sets.len(), report_param_sets().len());
        for s in sets {
            assert_eq!(s["tokens_differ_from_rust_model"], 0, "{s}");
            assert_eq!(s["tokens_differ_plain_vs_aggregated"], 0, "{s}");
            assert_eq!(
                s["tokens_differ_from_exact_cpu_sampler"],
                s["rust_model_differs_from_exact_cpu_sampler"]
            );
            for c in s["chi_square"].as_array().unwrap() {
                assert!(c["p_value"].as_f64().unwrap() > 1e-4, "{s}");
                assert_eq!(c["draws"], 4000);
            }
        }
        assert!(
            sets[4]["chi_square"].as_array().unwrap().is_empty(),
            "greedy has no chi-square"
        );
    }

    #[test]
    fn logits_file_size_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.f32");
        std::fs::write(&p, [0u8; 24]).unwrap();
        assert_eq!(read_logits(&p, 2, 3).unwrap(), vec![0.0; 6]);
        let e = read_logits(&p, 2, 4).unwrap_err().to_string();
        assert!(e.contains("24 bytes, expected 2 x 4 f32 = 32 bytes"), "{e}");
    }

    /// A tiny random Qwen2 checkpoint directory (config.json + model.safetensors).
    fn tiny_qwen2(dir: &Path) {
        let (h, layers, heads, kv, inter, vocab) = (32usize, 2, 4, 2, 48, 64);
        let d = h / heads;
        std::fs::write(
            dir.join("config.json"),
            json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
                   "hidden_act": "silu"})
            .to_string(),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut t = |shape: &[usize], scale: f32| {
            let n: usize = shape.iter().product();
            Tensor::from_vec(
                (0..n).map(|_| (rng.random::<f32>() - 0.5) * scale).collect::<Vec<_>>(),
                shape,
                &Device::Cpu,
            )
            .unwrap()
        };
        let mut w = std::collections::HashMap::new();
        w.insert("model.embed_tokens.weight".to_string(), t(&[vocab, h], 2.0));
        w.insert("model.norm.weight".to_string(), (t(&[h], 0.2) + 1.0).unwrap());
        w.insert("lm_head.weight".to_string(), t(&[vocab, h], 0.5));
        for i in 0..layers {
            let l = |n: &str| format!("model.layers.{i}.{n}");
            for (n, shape) in [
                ("self_attn.q_proj.weight", vec![heads * d, h]),
                ("self_attn.k_proj.weight", vec![kv * d, h]),
                ("self_attn.v_proj.weight", vec![kv * d, h]),
                ("self_attn.o_proj.weight", vec![h, heads * d]),
                ("mlp.gate_proj.weight", vec![inter, h]),
                ("mlp.up_proj.weight", vec![inter, h]),
                ("mlp.down_proj.weight", vec![h, inter]),
                ("self_attn.q_proj.bias", vec![heads * d]),
                ("self_attn.k_proj.bias", vec![kv * d]),
                ("self_attn.v_proj.bias", vec![kv * d]),
            ] {
                w.insert(l(n), t(&shape, 0.6));
            }
            w.insert(l("input_layernorm.weight"), (t(&[h], 0.2) + 1.0).unwrap());
            w.insert(l("post_attention_layernorm.weight"), (t(&[h], 0.2) + 1.0).unwrap());
        }
        candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    }

    /// Prefill then decode steps, sequences of different lengths in one batch: each
    /// sequence's last row equals a one-shot prefill of that sequence alone.
    #[test]
    fn dump_logits_decode_matches_one_shot_prefill() {
        let d = tempfile::tempdir().unwrap();
        tiny_qwen2(d.path());
        let seqs = vec![vec![5u32, 9, 1, 33, 7, 2, 60], vec![3u32, 3, 40, 12, 8]];
        let out = d.path().join("l.f32");
        let (rows, vocab) = dump_logits(d.path(), &Device::Cpu, DType::F32, &seqs, 3, &out).unwrap();
        assert_eq!((rows, vocab), (5 + 3, 64));
        let all = read_logits(&out, rows, vocab).unwrap();
        for (i, s) in seqs.iter().enumerate() {
            let one = d.path().join(format!("one{i}.f32"));
            assert_eq!(
                dump_logits(d.path(), &Device::Cpu, DType::F32, std::slice::from_ref(s), s.len(), &one).unwrap(),
                (1, 64)
            );
            let want = read_logits(&one, 1, vocab).unwrap();
            let last = if i == 0 { 4 } else { 7 };
            let got = &all[last * vocab..(last + 1) * vocab];
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "sequence {i}: max abs diff {err}");
        }
        let e = dump_logits(d.path(), &Device::Cpu, DType::F32, &seqs, 6, &out)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "sequence 1 has 5 tokens, fewer than --prefill 6");
    }

    #[test]
    fn checkpoint_without_weights_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = checkpoint_files(d.path()).unwrap_err();
        assert!(format!("{e:#}").contains("config.json"), "{e:#}");
    }
}
