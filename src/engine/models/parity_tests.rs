//! Parity of the batched paged models with candle-transformers' one-sequence reference
//! implementations, on small random models.
//!
//! Each test loads the same weights into ours and into the reference, runs several sequences
//! of different lengths through ours as ONE flat batch per step, runs each sequence through its
//! own reference instance, and compares every logit row. Error measure: max|a - b| / max|b|.

use std::collections::HashMap;
use std::io::Cursor;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_transformers::models::{llama, quantized_llama, qwen2, qwen3};

use super::{load_gguf, load_safetensors, CausalLM};
use crate::engine::batch::{BatchInput, SeqInput};
use crate::engine::config::{Architecture, ModelConfig, RopeScaling};
use crate::engine::kv_cache::{block_hashes, BlockTable, KvCache};

const TOL_F32: f32 = 1e-4;
/// Both sides use the same Q8_0 weights, but the quantized kernels also quantize activations
/// to 8 bits, so tiny float differences can flip a rounding step.
const TOL_Q8: f32 = 1e-3;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness (candle's CPU RNG cannot be seeded)
// ---------------------------------------------------------------------------------------------

use crate::engine::test_rng::TestRng as Rng;

fn llama_json(tied: bool, scaling: bool) -> String {
    let scaling = if scaling {
        r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#
    } else {
        "null"
    };
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": {tied},
            "rope_scaling": {scaling}, "hidden_act": "silu"}}"#
    )
}

fn qwen2_json() -> String {
    r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "sliding_window": 256,
        "max_window_layers": 2, "tie_word_embeddings": true, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "use_sliding_window": false, "hidden_act": "silu"}"#
        .to_string()
}

fn qwen3_json() -> String {
    // head_dim 32 != hidden / heads = 16, as in real Qwen3 checkpoints.
    r#"{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "attention_bias": false,
        "max_position_embeddings": 256, "sliding_window": null, "max_window_layers": 2,
        "tie_word_embeddings": false, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "use_sliding_window": false, "hidden_act": "silu"}"#
        .to_string()
}

/// Random HF-named weights for `cfg`, kept in a VarMap. Scales are chosen so attention is
/// far from uniform (a wrong mask or rotation then shows in the logits).
fn random_weights(cfg: &ModelConfig, seed: u64) -> VarMap {
    let mut rng = Rng(seed);
    let mut varmap = VarMap::new();
    let dev = Device::Cpu;
    let mut put = |name: String, shape: &[usize], mean: f32, std: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
        let t = Tensor::from_vec(data, shape, &dev).unwrap();
        varmap
            .get(shape, &name, Init::Const(0.0), DType::F32, &dev)
            .unwrap();
        varmap.set_one(&name, &t).unwrap();
    };
    let (h, i, d, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (q_out, kv_out) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    put("model.embed_tokens.weight".into(), &[v, h], 0.0, 1.0);
    for l in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        put(p("input_layernorm.weight"), &[h], 1.0, 0.1);
        put(p("post_attention_layernorm.weight"), &[h], 1.0, 0.1);
        put(p("self_attn.q_proj.weight"), &[q_out, h], 0.0, 0.2);
        put(p("self_attn.k_proj.weight"), &[kv_out, h], 0.0, 0.2);
        put(p("self_attn.v_proj.weight"), &[kv_out, h], 0.0, 0.15);
        put(p("self_attn.o_proj.weight"), &[h, q_out], 0.0, 0.15);
        if cfg.arch == Architecture::Qwen2 {
            put(p("self_attn.q_proj.bias"), &[q_out], 0.0, 0.2);
            put(p("self_attn.k_proj.bias"), &[kv_out], 0.0, 0.2);
            put(p("self_attn.v_proj.bias"), &[kv_out], 0.0, 0.2);
        }
        if cfg.arch == Architecture::Qwen3 {
            put(p("self_attn.q_norm.weight"), &[d], 1.0, 0.1);
            put(p("self_attn.k_norm.weight"), &[d], 1.0, 0.1);
        }
        put(p("mlp.gate_proj.weight"), &[i, h], 0.0, 0.15);
        put(p("mlp.up_proj.weight"), &[i, h], 0.0, 0.15);
        put(p("mlp.down_proj.weight"), &[h, i], 0.0, 0.1);
    }
    put("model.norm.weight".into(), &[h], 1.0, 0.1);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, h], 0.0, 0.15);
    }
    varmap
}

/// A strict VarBuilder over the VarMap's tensors: a name the model asks for but the map lacks
/// is an error instead of a silently created variable.
fn strict_vb(varmap: &VarMap) -> VarBuilder<'static> {
    let ts: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// References: candle-transformers, one sequence per instance
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum RefModel {
    Llama(llama::Llama, llama::Config),
    Qwen2(qwen2::ModelForCausalLM),
    Qwen3(qwen3::ModelForCausalLM),
    QLlama(quantized_llama::ModelWeights),
}

impl RefModel {
    fn from_hf(json: &str, vb: VarBuilder) -> Result<Self> {
        let cfg = ModelConfig::from_hf_config(json)?;
        Ok(match cfg.arch {
            Architecture::Llama => {
                let c: llama::LlamaConfig = serde_json::from_str(json)?;
                let c = c.into_config(false);
                RefModel::Llama(llama::Llama::load(vb, &c)?, c)
            }
            Architecture::Qwen2 => {
                let c: qwen2::Config = serde_json::from_str(json)?;
                RefModel::Qwen2(qwen2::ModelForCausalLM::new(&c, vb)?)
            }
            Architecture::Qwen3 => {
                let c: qwen3::Config = serde_json::from_str(json)?;
                RefModel::Qwen3(qwen3::ModelForCausalLM::new(&c, vb)?)
            }
        })
    }

    fn sequence(&self) -> RefSeq {
        let cache = match self {
            RefModel::Llama(_, c) => {
                Some(llama::Cache::new(true, DType::F32, c, &Device::Cpu).unwrap())
            }
            _ => None,
        };
        RefSeq {
            model: self.clone(),
            cache,
            pos: 0,
        }
    }
}

/// One sequence on the reference, with its own KV cache.
struct RefSeq {
    model: RefModel,
    cache: Option<llama::Cache>,
    pos: usize,
}

impl RefSeq {
    /// Feeds `tokens`, returns the logits of the last one.
    fn feed(&mut self, tokens: &[u32]) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match &mut self.model {
            RefModel::Llama(m, _) => m.forward(&x, self.pos, self.cache.as_mut().unwrap()),
            RefModel::Qwen2(m) => m.forward(&x, self.pos),
            RefModel::Qwen3(m) => m.forward(&x, self.pos),
            RefModel::QLlama(m) => m.forward(&x, self.pos),
        }
        .unwrap();
        self.pos += tokens.len();
        logits.flatten_all().unwrap().to_vec1().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Driving our model
// ---------------------------------------------------------------------------------------------

fn new_tables(n: usize) -> Vec<BlockTable> {
    (0..n).map(|_| BlockTable::new()).collect()
}

/// Runs one forward over `work`: (sequence index, new tokens), all wanting logits.
fn step(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    tables: &mut [BlockTable],
    work: &[(usize, Vec<u32>)],
) -> Vec<Vec<f32>> {
    let mut batch = BatchInput::default();
    for (i, toks) in work {
        let t = &mut tables[*i];
        t.reserve(cache, toks.len()).unwrap();
        batch.seqs.push(SeqInput {
            start_pos: t.len(),
            len: toks.len(),
            block_table: t.blocks().to_vec(),
            want_logits: true,
        });
        batch.tokens.extend(toks);
    }
    let logits = model.forward(&batch, cache).unwrap();
    assert_eq!(logits.dims(), [work.len(), model.config().vocab_size]);
    assert_eq!(logits.dtype(), DType::F32);
    for (i, toks) in work {
        tables[*i].advance(toks.len());
    }
    logits.to_vec2().unwrap()
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = reference.iter().map(|b| b.abs()).fold(0f32, f32::max);
    diff / scale
}

/// Tracks the worst error of a test and fails past the tolerance.
struct Check {
    name: &'static str,
    tol: f32,
    worst: f32,
    rows: usize,
}

impl Check {
    fn new(name: &'static str, tol: f32) -> Self {
        Self {
            name,
            tol,
            worst: 0.0,
            rows: 0,
        }
    }

    fn row(&mut self, what: &str, ours: &[f32], reference: &[f32]) {
        let e = rel_err(ours, reference);
        assert!(
            e.is_finite() && e < self.tol,
            "{}: {what}: relative error {e:.3e} >= {:.0e}",
            self.name,
            self.tol
        );
        self.worst = self.worst.max(e);
        self.rows += 1;
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            eprintln!(
                "{}: {} logit rows, max relative error {:.2e} (tolerance {:.0e})",
                self.name, self.rows, self.worst, self.tol
            );
        }
    }
}

/// Prefills prompts of lengths 5, 11, 17 in one forward, decodes 4 steps with all of them in
/// one batch, and starts a fourth prompt (7 tokens) in the middle of decoding so a prefill
/// chunk and decode tokens share a batch. Compares every row with the reference.
fn batched_parity(name: &'static str, json: &str, seed: u64) {
    let cfg = ModelConfig::from_hf_config(json).unwrap();
    let varmap = random_weights(&cfg, seed);
    let vb = strict_vb(&varmap);
    let ours = load_safetensors(&cfg, vb.clone()).unwrap();
    let reference = RefModel::from_hf(json, vb).unwrap();
    let mut cache = KvCache::new(&cfg, 4, 64, DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng(seed ^ 0xABCD);
    let mut check = Check::new(name, TOL_F32);

    let lens = [5, 11, 17];
    let mut tables: Vec<BlockTable> = new_tables(4);
    let mut refs: Vec<RefSeq> = (0..4).map(|_| reference.sequence()).collect();
    let work: Vec<(usize, Vec<u32>)> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (i, rng.tokens(n, cfg.vocab_size)))
        .collect();
    let rows = step(ours.as_ref(), &mut cache, &mut tables, &work);
    for ((i, toks), row) in work.iter().zip(&rows) {
        check.row(&format!("prefill seq {i}"), row, &refs[*i].feed(toks));
    }
    for s in 0..4 {
        let mut work: Vec<(usize, Vec<u32>)> =
            (0..3).map(|i| (i, rng.tokens(1, cfg.vocab_size))).collect();
        if s == 1 {
            work.insert(1, (3, rng.tokens(7, cfg.vocab_size)));
        } else if s > 1 {
            work.push((3, rng.tokens(1, cfg.vocab_size)));
        }
        let rows = step(ours.as_ref(), &mut cache, &mut tables, &work);
        for ((i, toks), row) in work.iter().zip(&rows) {
            check.row(&format!("step {s} seq {i}"), row, &refs[*i].feed(toks));
        }
    }
    for t in &mut tables {
        t.release(&mut cache);
    }
    assert_eq!(cache.free_blocks(), cache.num_blocks());
}

/// Prefix caching: a prompt that starts from cached blocks gets the logits of the same prompt
/// computed from scratch, for shared prefixes of every length across three block boundaries
/// (block size 4), at the end of its prefill and in the decode steps after it. The cached
/// blocks were written by other prompts, in forwards of other lengths, and released (idle)
/// before they are taken. `tol`: None demands equal bits; candle's dense f32 matmul rounds a
/// row differently with the number of rows beside it, so a dense model gets a tolerance.
fn prefix_cache_parity(name: &'static str, model: &dyn CausalLM, tol: Option<f32>) {
    let cfg = model.config().clone();
    let mut rng = Rng(0x5EED);
    let base = rng.tokens(14, cfg.vocab_size);
    let mut cached = KvCache::new(&cfg, 4, 64, DType::F32, &Device::Cpu).unwrap();
    let mut plain = KvCache::new(&cfg, 4, 64, DType::F32, &Device::Cpu).unwrap();
    plain.set_prefix_caching(false);
    let mut check = Check::new(name, tol.unwrap_or(f32::INFINITY));
    let mut reused = 0;
    for shared in 1..=13 {
        let a = [&base[..shared], &rng.tokens(3, cfg.vocab_size)[..]].concat();
        let mut ta = new_tables(1);
        step(model, &mut cached, &mut ta, &[(0, a.clone())]);
        ta[0].commit_full_blocks(&mut cached, &a, &[]);
        ta[0].release(&mut cached);

        let b = [&base[..shared], &rng.tokens(5, cfg.vocab_size)[..]].concat();
        let mut tb = new_tables(1);
        let taken = tb[0].adopt_cached_prefix(&mut cached, &block_hashes(&b, 4), &b, (b.len() - 1) / 4);
        assert_eq!(taken, shared / 4 * 4, "{name}: shared prefix of {shared}: every full block of it is cached");
        reused += taken;
        let mut tp = new_tables(1);
        let mut rows = (step(model, &mut cached, &mut tb, &[(0, b[taken..].to_vec())]), step(model, &mut plain, &mut tp, &[(0, b.clone())]));
        for decode in 0..4 {
            let what = format!("shared prefix of {shared}, decode step {decode}");
            match tol {
                None => assert!(rows.0 == rows.1, "{name}: {what}: logits differ"),
                Some(_) => check.row(&what, &rows.0[0], &rows.1[0]),
            }
            let next = rng.tokens(1, cfg.vocab_size);
            rows = (step(model, &mut cached, &mut tb, &[(0, next.clone())]), step(model, &mut plain, &mut tp, &[(0, next)]));
        }
        tb[0].release(&mut cached);
        tp[0].release(&mut plain);
    }
    assert_eq!(reused, 4 * 4 + 8 * 4 + 12 * 2);
    assert_eq!((cached.free_blocks(), plain.free_blocks()), (64, 64));
}

#[test]
fn cached_prefix_logits_match_computed_ones() {
    let cfg = ModelConfig::from_hf_config(&llama_json(false, false)).unwrap();
    let varmap = random_weights(&cfg, 3);
    let ours = load_safetensors(&cfg, strict_vb(&varmap)).unwrap();
    prefix_cache_parity("prefix-cache-dense", ours.as_ref(), Some(TOL_F32));
}

/// On the real GGUF (our quantized kernels compute every row alone) a cached prefix gives
/// exactly the logits a computed one does.
#[test]
fn real_gguf_cached_prefix_logits_are_identical() {
    let Some(bytes) = real_gguf_bytes() else { return };
    prefix_cache_parity("prefix-cache-gguf", load_ours_gguf(&bytes).as_ref(), None);
}

#[test]
fn llama_batched_matches_reference() {
    batched_parity("llama", &llama_json(false, false), 1);
}

#[test]
fn llama3_rope_scaling_tied_matches_reference() {
    let json = llama_json(true, true);
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    assert!(cfg.tie_word_embeddings && cfg.rope_scaling.is_some());
    batched_parity("llama3-scaled-tied", &json, 2);
}

#[test]
fn qwen2_batched_matches_reference() {
    batched_parity("qwen2", &qwen2_json(), 3);
}

#[test]
fn qwen3_batched_matches_reference() {
    batched_parity("qwen3", &qwen3_json(), 4);
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let json = llama_json(false, false);
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    let varmap = random_weights(&cfg, 5);
    let vb = strict_vb(&varmap);
    let ours = load_safetensors(&cfg, vb.clone()).unwrap();
    let mut refseq = RefModel::from_hf(&json, vb).unwrap().sequence();
    let mut cache = KvCache::new(&cfg, 4, 32, DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng(55);
    let prompt = rng.tokens(17, cfg.vocab_size);
    let next = rng.tokens(1, cfg.vocab_size);
    let mut check = Check::new("chunked-prefill", TOL_F32);

    // Sequence 0 in one shot, sequence 1 as chunks of 6 and 11 (boundary mid-block); both
    // then decode the same token in one batch.
    let mut tables = new_tables(2);
    let one = step(
        ours.as_ref(),
        &mut cache,
        &mut tables,
        &[(0, prompt.clone())],
    );
    let first = step(
        ours.as_ref(),
        &mut cache,
        &mut tables,
        &[(1, prompt[..6].to_vec())],
    );
    check.row(
        "first chunk vs reference",
        &first[0],
        &refseq.feed(&prompt[..6]),
    );
    let second = step(
        ours.as_ref(),
        &mut cache,
        &mut tables,
        &[(1, prompt[6..].to_vec())],
    );
    check.row(
        "second chunk vs reference",
        &second[0],
        &refseq.feed(&prompt[6..]),
    );
    check.row("chunked vs one-shot", &second[0], &one[0]);
    let dec = step(
        ours.as_ref(),
        &mut cache,
        &mut tables,
        &[(0, next.clone()), (1, next.clone())],
    );
    check.row("decode after chunked vs one-shot", &dec[1], &dec[0]);
    check.row("decode vs reference", &dec[1], &refseq.feed(&next));
}

#[test]
fn forked_sequences_equal_running_from_scratch() {
    let json = qwen2_json();
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    let varmap = random_weights(&cfg, 6);
    let vb = strict_vb(&varmap);
    let ours = load_safetensors(&cfg, vb.clone()).unwrap();
    let reference = RefModel::from_hf(&json, vb).unwrap();
    let mut rng = Rng(66);
    let mut check = Check::new("fork", TOL_F32);

    // A 10-token prompt over blocks of 4 leaves its last block half full, so every fork's
    // first decode token triggers a copy-on-write.
    let prompt = rng.tokens(10, cfg.vocab_size);
    let mut cache = KvCache::new(&cfg, 4, 32, DType::F32, &Device::Cpu).unwrap();
    let mut tables = vec![BlockTable::new()];
    let prefill = step(
        ours.as_ref(),
        &mut cache,
        &mut tables,
        &[(0, prompt.clone())],
    );
    let used_by_prompt = cache.num_blocks() - cache.free_blocks();
    for _ in 0..3 {
        let f = tables[0].fork(&mut cache);
        tables.push(f);
    }
    assert_eq!(
        cache.num_blocks() - cache.free_blocks(),
        used_by_prompt,
        "forks share the prompt's blocks"
    );

    // Parent and three forks continue with different tokens, all in one batch per step.
    let mut continuations: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut shared_rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    for _ in 0..3 {
        let work: Vec<(usize, Vec<u32>)> =
            (0..4).map(|i| (i, rng.tokens(1, cfg.vocab_size))).collect();
        let rows = step(ours.as_ref(), &mut cache, &mut tables, &work);
        for ((i, toks), row) in work.iter().zip(rows) {
            continuations[*i].extend(toks);
            shared_rows[*i].push(row);
        }
    }
    // Full prompt stays shared (2 full blocks); the half-full block was copied for 3 of the 4.
    assert_eq!(cache.refcount(tables[0].blocks()[0]), 4);
    assert_eq!(cache.refcount(tables[0].blocks()[1]), 4);

    // From scratch: each full sequence alone in a fresh cache, and on the reference.
    for i in 0..4 {
        let mut fresh = KvCache::new(&cfg, 4, 32, DType::F32, &Device::Cpu).unwrap();
        let mut t = vec![BlockTable::new()];
        let mut r = reference.sequence();
        let p = step(ours.as_ref(), &mut fresh, &mut t, &[(0, prompt.clone())]);
        check.row("prefill", &prefill[0], &p[0]);
        check.row("prefill vs reference", &p[0], &r.feed(&prompt));
        for (k, &tok) in continuations[i].iter().enumerate() {
            let row = step(ours.as_ref(), &mut fresh, &mut t, &[(0, vec![tok])]);
            check.row(
                &format!("seq {i} step {k} forked vs scratch"),
                &shared_rows[i][k],
                &row[0],
            );
            check.row(
                &format!("seq {i} step {k} vs reference"),
                &shared_rows[i][k],
                &r.feed(&[tok]),
            );
        }
    }

    // Releasing frees the shared prompt blocks only with the last owner.
    for i in (1..4).rev() {
        let mut t = std::mem::take(&mut tables[i]);
        t.release(&mut cache);
        assert!(cache.refcount(tables[0].blocks()[0]) >= 1);
    }
    tables[0].release(&mut cache);
    assert_eq!(cache.free_blocks(), cache.num_blocks());
}

#[test]
fn bf16_weights_and_cache_stay_close_to_f32() {
    // The GPU build will run bf16; on CPU this only checks that every op takes the dtype and
    // that results stay within bf16 precision of the f32 model.
    let json = qwen3_json();
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    let varmap = random_weights(&cfg, 12);
    let f32_model = load_safetensors(&cfg, strict_vb(&varmap)).unwrap();
    let bf16_model = load_safetensors(&cfg, strict_vb(&varmap).set_dtype(DType::BF16)).unwrap();
    let mut rng = Rng(1212);
    let mut c32 = KvCache::new(&cfg, 4, 32, DType::F32, &Device::Cpu).unwrap();
    let mut c16 = KvCache::new(&cfg, 4, 32, DType::BF16, &Device::Cpu).unwrap();
    let (mut t32, mut t16) = (new_tables(2), new_tables(2));
    let mut check = Check::new("bf16-vs-f32", 5e-2);
    let mut work: Vec<(usize, Vec<u32>)> = vec![
        (0, rng.tokens(9, cfg.vocab_size)),
        (1, rng.tokens(6, cfg.vocab_size)),
    ];
    for s in 0..3 {
        let a = step(f32_model.as_ref(), &mut c32, &mut t32, &work);
        let b = step(bf16_model.as_ref(), &mut c16, &mut t16, &work);
        for i in 0..2 {
            check.row(&format!("step {s} seq {i}"), &b[i], &a[i]);
        }
        work = (0..2).map(|i| (i, rng.tokens(1, cfg.vocab_size))).collect();
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// llama.cpp's converter reorders each head's Q/K rows from `[half0 | half1]` to interleaved
/// pairs so that its adjacent-pair rotation reproduces HF's half-split one.
fn permute_for_llama_cpp(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes the HF-named weights as a llama.cpp-style GGUF file (2D weights in `dtype`).
fn write_gguf(cfg: &ModelConfig, varmap: &VarMap, dtype: GgmlDType) -> Vec<u8> {
    write_gguf_with(cfg, varmap, dtype, Vec::new())
}

fn write_gguf_with(
    cfg: &ModelConfig,
    varmap: &VarMap,
    dtype: GgmlDType,
    extra: Vec<(String, QTensor)>,
) -> Vec<u8> {
    use gguf_file::Value;
    let a = cfg.arch.gguf_name();
    let u = |x: usize| Value::U32(x as u32);
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.block_count"), u(cfg.num_layers)),
        (format!("{a}.attention.head_count"), u(cfg.num_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads)),
        (format!("{a}.attention.key_length"), u(cfg.head_dim)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
    ];
    let data = varmap.data().lock().unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        let gname = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("self_attn.q_norm", "attn_q_norm")
            .replace("self_attn.k_norm", "attn_k_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        assert_ne!(&gname, name, "unmapped tensor {name}");
        let mut t = t.clone();
        if cfg.arch == Architecture::Llama {
            if gname.ends_with("attn_q.weight") {
                t = permute_for_llama_cpp(&t, cfg.num_heads);
            } else if gname.ends_with("attn_k.weight") {
                t = permute_for_llama_cpp(&t, cfg.num_kv_heads);
            }
        }
        let q = if t.rank() == 2 {
            QTensor::quantize(&t, dtype).unwrap()
        } else {
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        tensors.push((gname, q));
    }
    tensors.extend(extra);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

/// A random model of `json` written as a GGUF of `dtype`: its config, weights, file bytes, and
/// ours loaded from the bytes.
fn gguf_model(json: &str, seed: u64, dtype: GgmlDType) -> (ModelConfig, VarMap, Vec<u8>, Box<dyn CausalLM>) {
    let cfg = ModelConfig::from_hf_config(json).unwrap();
    let varmap = random_weights(&cfg, seed);
    let bytes = write_gguf(&cfg, &varmap, dtype);
    let ours = load_ours_gguf(&bytes);
    (cfg, varmap, bytes, ours)
}

fn load_ours_gguf(bytes: &[u8]) -> Box<dyn CausalLM> {
    let mut cur = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cur).unwrap();
    let cfg = ModelConfig::from_gguf(&content).unwrap();
    load_gguf(&cfg, &content, &mut cur, &Device::Cpu).unwrap()
}

fn load_quantized_llama(bytes: &[u8]) -> RefModel {
    let mut cur = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cur).unwrap();
    RefModel::QLlama(
        quantized_llama::ModelWeights::from_gguf(content, &mut cur, &Device::Cpu).unwrap(),
    )
}

/// Batched prefill (5, 11, 17) plus 3 decode steps of `ours` against one or more references.
fn compare_runs(check: &mut Check, ours: &dyn CausalLM, refs: &[(&str, &RefModel)], seed: u64) {
    let cfg = ours.config().clone();
    let mut cache = KvCache::new(&cfg, 4, 48, DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng(seed);
    let mut tables = new_tables(3);
    let mut ref_seqs: Vec<Vec<RefSeq>> = refs
        .iter()
        .map(|(_, r)| (0..3).map(|_| r.sequence()).collect())
        .collect();
    let mut work: Vec<(usize, Vec<u32>)> = [5, 11, 17]
        .iter()
        .enumerate()
        .map(|(i, &n)| (i, rng.tokens(n, cfg.vocab_size)))
        .collect();
    for s in 0..4 {
        let rows = step(ours, &mut cache, &mut tables, &work);
        for ((i, toks), row) in work.iter().zip(&rows) {
            for ((rname, _), seqs) in refs.iter().zip(ref_seqs.iter_mut()) {
                check.row(
                    &format!("step {s} seq {i} vs {rname}"),
                    row,
                    &seqs[*i].feed(toks),
                );
            }
        }
        work = (0..3).map(|i| (i, rng.tokens(1, cfg.vocab_size))).collect();
    }
}

#[test]
fn gguf_f32_llama_matches_quantized_llama_and_hf_llama() {
    // The GGUF holds llama.cpp-permuted Q/K; the HF reference gets the original weights. Both
    // agreeing with ours shows the rotary layout chosen for GGUF undoes the permutation.
    let json = llama_json(false, false);
    let (_, varmap, bytes, ours) = gguf_model(&json, 7, GgmlDType::F32);
    let gcfg = ours.config();
    assert_eq!((gcfg.arch, gcfg.vocab_size, gcfg.num_layers, gcfg.num_kv_heads, gcfg.head_dim, gcfg.tie_word_embeddings),
        (Architecture::Llama, 300, 3, 2, 16, false));
    let qref = load_quantized_llama(&bytes);
    let hf = RefModel::from_hf(&json, strict_vb(&varmap)).unwrap();
    let mut check = Check::new("gguf-f32-llama", TOL_F32);
    compare_runs(&mut check, ours.as_ref(), &[("quantized_llama", &qref), ("hf llama", &hf)], 77);
}

#[test]
fn gguf_q8_0_tied_llama_matches_quantized_llama() {
    let (_, _, bytes, ours) = gguf_model(&llama_json(true, false), 8, GgmlDType::Q8_0);
    assert!(ours.config().tie_word_embeddings, "no output.weight means a tied head");
    let qref = load_quantized_llama(&bytes);
    let mut check = Check::new("gguf-q8_0-llama-tied", TOL_Q8);
    compare_runs(&mut check, ours.as_ref(), &[("quantized_llama", &qref)], 88);
}

#[test]
fn gguf_qwen2_and_qwen3_match_hf_reference() {
    // Qwen GGUFs keep HF's Q/K order and half-split rotation; this checks the GGUF names of the
    // Qwen2 biases and the Qwen3 q/k norms and the explicit head_dim (`key_length`).
    for (name, json, seed) in [
        ("gguf-f32-qwen2", qwen2_json(), 9),
        ("gguf-f32-qwen3", qwen3_json(), 10),
    ] {
        let (cfg, varmap, _, ours) = gguf_model(&json, seed, GgmlDType::F32);
        let gcfg = ours.config();
        assert_eq!(gcfg.attention_bias, cfg.arch == Architecture::Qwen2);
        assert_eq!(gcfg.head_dim, cfg.head_dim);
        assert_eq!(gcfg.tie_word_embeddings, cfg.tie_word_embeddings);
        let hf = RefModel::from_hf(&json, strict_vb(&varmap)).unwrap();
        let mut check = Check::new(name, TOL_F32);
        compare_runs(&mut check, ours.as_ref(), &[("hf reference", &hf)], seed * 11);
    }
}

#[test]
fn gguf_rope_freqs_reproduce_llama3_scaling() {
    // llama.cpp's converter stores Llama 3 scaling as per-frequency divisors in
    // `rope_freqs.weight` (metadata keeps only the base). Written that way, our GGUF model must
    // match the HF reference that applies `rope_scaling` itself.
    let json = llama_json(false, true);
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    let s = cfg.rope_scaling.clone().unwrap();
    let old = s.original_max_position_embeddings as f64;
    let factors: Vec<f32> = (0..cfg.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / s.high_freq_factor {
                1.0
            } else if wavelen > old / s.low_freq_factor {
                s.factor as f32
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
            }
        })
        .collect();
    assert!(
        factors.iter().any(|&f| f > 1.0 && f < s.factor as f32),
        "test should cover the blended band"
    );
    let freqs = Tensor::new(factors.as_slice(), &Device::Cpu).unwrap();
    let varmap = random_weights(&cfg, 13);
    let extra = vec![(
        "rope_freqs.weight".to_string(),
        QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    )];
    let bytes = write_gguf_with(&cfg, &varmap, GgmlDType::F32, extra);
    let ours = load_ours_gguf(&bytes);
    assert!(
        ours.config().rope_scaling.is_none(),
        "GGUF config carries no rope_scaling"
    );
    let hf = RefModel::from_hf(&json, strict_vb(&varmap)).unwrap();
    let mut check = Check::new("gguf-llama3-rope-freqs", TOL_F32);
    compare_runs(&mut check, ours.as_ref(), &[("hf llama3-scaled", &hf)], 131);
}

// ---------------------------------------------------------------------------------------------
// Config parsing and input validation
// ---------------------------------------------------------------------------------------------

#[test]
fn hf_config_parsing() {
    let cfg = ModelConfig::from_hf_config(&llama_json(true, true)).unwrap();
    assert_eq!(cfg.arch, Architecture::Llama);
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 16));
    assert_eq!(
        cfg.rope_scaling,
        Some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        })
    );
    assert!(!cfg.attention_bias);
    let q2 = ModelConfig::from_hf_config(&qwen2_json()).unwrap();
    assert!(q2.attention_bias && q2.tie_word_embeddings);
    assert_eq!(q2.rope_theta, 1e6);
    let q3 = ModelConfig::from_hf_config(&qwen3_json()).unwrap();
    assert_eq!((q3.head_dim, q3.attention_bias), (32, false));

    // Defaults: kv heads = heads, head_dim = hidden / heads, rope_theta 1e4, untied.
    let minimal = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 32, "rope_scaling": {"rope_type": "default"}}"#;
    let m = ModelConfig::from_hf_config(minimal).unwrap();
    assert_eq!(
        (
            m.num_kv_heads,
            m.head_dim,
            m.rope_theta,
            m.tie_word_embeddings
        ),
        (2, 4, 1e4, false)
    );
    assert!(m.rope_scaling.is_none());

    assert_eq!(
        Architecture::from_gguf_name("qwen3"),
        Some(Architecture::Qwen3)
    );
    assert_eq!(
        Architecture::from_hf_name("Qwen2ForCausalLM"),
        Some(Architecture::Qwen2)
    );
}

#[test]
fn hf_config_errors_say_what_is_wrong() {
    let err = |json: &str| format!("{:#}", ModelConfig::from_hf_config(json).unwrap_err());
    let unknown = err(r#"{"architectures": ["GPT2LMHeadModel"]}"#);
    assert!(
        unknown.contains("GPT2LMHeadModel")
            && unknown.contains("LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        "{unknown}"
    );
    let missing = err(&llama_json(false, false).replace(r#""hidden_size": 64,"#, ""));
    assert!(
        missing.contains("config.json") && missing.contains("`hidden_size`"),
        "{missing}"
    );
    let bad =
        err(&llama_json(false, false).replace(r#""vocab_size": 300"#, r#""vocab_size": "many""#));
    assert!(
        bad.contains("config.json") && bad.contains("`vocab_size`"),
        "{bad}"
    );
    let rope = err(&llama_json(false, false).replace("null", r#"{"type": "yarn", "factor": 4.0}"#));
    assert!(rope.contains("yarn") && rope.contains("llama3"), "{rope}");
    assert!(err("[1]").contains("config.json"));
    assert_eq!(Architecture::from_gguf_name("gemma"), None);
    let mut gguf = Cursor::new(Vec::new());
    let arch = gguf_file::Value::String("gemma".into());
    gguf_file::write(&mut gguf, &[("general.architecture", &arch)], &[]).unwrap();
    gguf.set_position(0);
    let content = gguf_file::Content::read(&mut gguf).unwrap();
    let e = format!("{:#}", ModelConfig::from_gguf(&content).unwrap_err());
    assert!(
        e.contains("gemma") && e.contains("llama, qwen2, qwen3"),
        "{e}"
    );
}

#[test]
fn forward_rejects_bad_batches() {
    let json = llama_json(false, false);
    let cfg = ModelConfig::from_hf_config(&json).unwrap();
    let varmap = random_weights(&cfg, 11);
    let ours = load_safetensors(&cfg, strict_vb(&varmap)).unwrap();
    let mut cache = KvCache::new(&cfg, 4, 8, DType::F32, &Device::Cpu).unwrap();
    let seq = |len, blocks: Vec<u32>| SeqInput {
        start_pos: 0,
        len,
        block_table: blocks,
        want_logits: true,
    };
    let run = |cache: &mut KvCache, tokens: Vec<u32>, seqs| {
        format!(
            "{:#}",
            ours.forward(&BatchInput { tokens, seqs }, cache)
                .unwrap_err()
        )
    };
    let e = run(&mut cache, vec![1, 2, 3, 4, 5], vec![seq(5, vec![0])]);
    assert!(e.contains("reserve"), "{e}");
    let e = run(&mut cache, vec![1, 2], vec![seq(3, vec![0])]);
    assert!(e.contains("add up"), "{e}");
    let e = run(&mut cache, vec![1, 999], vec![seq(2, vec![0])]);
    assert!(e.contains("999") && e.contains("vocabulary"), "{e}");
    let e = run(&mut cache, vec![1], vec![seq(1, vec![8])]);
    assert!(e.contains("outside the KV cache"), "{e}");
    // A sequence without want_logits contributes no row.
    let mut t = BlockTable::new();
    t.reserve(&mut cache, 3).unwrap();
    let batch = BatchInput {
        tokens: vec![1, 2, 3],
        seqs: vec![SeqInput {
            start_pos: 0,
            len: 3,
            block_table: t.blocks().to_vec(),
            want_logits: false,
        }],
    };
    assert_eq!(
        ours.forward(&batch, &mut cache).unwrap().dims(),
        [0, cfg.vocab_size]
    );
}

// ---------------------------------------------------------------------------------------------
// Real checkpoint (manual): SmolLM2-135M-Instruct Q4_1
// ---------------------------------------------------------------------------------------------

/// The GGUF `bytes` again with every tensor dequantized to f32 (same metadata, tokenizer
/// included): the exact model the quantized weights stand for.
fn dense_copy(bytes: &[u8]) -> Vec<u8> {
    let mut cur = Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cur).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content.tensor(&mut cur, name, &Device::Cpu).unwrap();
            let dense = t.dequantize(&Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&dense, GgmlDType::F32).unwrap())
        })
        .collect();
    let md: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

/// The real SmolLM2 GGUF (scripts/fetch-smollm2.sh; BSA_SMOLLM2_GGUF names another path), or
/// None with a loud note (BSA_REQUIRE_MODEL=1 fails instead).
fn real_gguf_bytes() -> Option<Vec<u8>> {
    let path = std::env::var_os("BSA_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::backends::local::model_cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.exists() {
        assert!(std::env::var("BSA_REQUIRE_MODEL").is_err(), "SmolLM2 GGUF absent at {} and BSA_REQUIRE_MODEL is set", path.display());
        eprintln!("\n*** SKIPPED: SmolLM2 GGUF absent at {} (run scripts/fetch-smollm2.sh) ***\n", path.display());
        return None;
    }
    Some(std::fs::read(&path).unwrap())
}

/// Greedy decoding of the real SmolLM2 GGUF, batched on ours vs one sequence at a time on
/// quantized_llama (the model comes from scripts/fetch-smollm2.sh; BSA_SMOLLM2_GGUF names
/// another path), both measured against the dense model the quantized weights stand for (our
/// model on a dequantized copy, which tests/gguf_dense_parity.rs and the f32 parity tests tie
/// to the references). With `CANDLE_DEQUANTIZE_ALL=1` both sides use dense weights and the
/// logits must agree at the f32 tolerance.
#[test]
fn real_gguf_greedy_matches_quantized_llama() {
    let Some(bytes) = real_gguf_bytes() else { return };
    let ours = load_ours_gguf(&bytes);
    let qref = load_quantized_llama(&bytes);
    let truth = load_ours_gguf(&dense_copy(&bytes));
    let cfg = ours.config().clone();
    eprintln!("{cfg:?}");
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173],
        vec![1, 4093, 2, 504, 3458, 282, 4649, 314],
        vec![
            504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 1701,
        ],
    ];
    let steps = 12;
    let mut cache = KvCache::new(&cfg, 16, 64, DType::F32, &Device::Cpu).unwrap();
    let mut tables = new_tables(prompts.len());
    let mut truth_cache = KvCache::new(&cfg, 16, 64, DType::F32, &Device::Cpu).unwrap();
    let mut truth_tables = new_tables(prompts.len());
    // The quantized kernels round activations to 8 bits, so the logits are discontinuous in
    // their inputs: a one-ulp difference anywhere can flip a rounding and, over 30 layers, move
    // logits by several 1e-2 of their range. So ours and candle's quantized path are compared
    // as approximations of the dense model: ours must be as close to it as candle's is, and
    // pick the same greedy tokens except where candle itself is torn between two. With
    // CANDLE_DEQUANTIZE_ALL=1 (dense weights everywhere) the two agree to ~5e-6.
    let dense = std::env::var("CANDLE_DEQUANTIZE_ALL").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut near_ties = 0;
    let mut check = Check::new("real-gguf", if dense { TOL_F32 } else { f32::INFINITY });
    // Per row: (ours vs the dense model, candle's quantized path vs the dense model).
    let mut quant_errs: Vec<(f32, f32)> = Vec::new();
    // Greedy tokens equal to the dense model's: (ours, candle's quantized path).
    let mut truth_picks = (0usize, 0usize);
    let mut ref_seqs: Vec<RefSeq> = prompts.iter().map(|_| qref.sequence()).collect();
    let mut work: Vec<(usize, Vec<u32>)> = prompts.iter().cloned().enumerate().collect();
    let mut ours_out = vec![Vec::new(); prompts.len()];
    let mut ref_out = vec![Vec::new(); prompts.len()];
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32
    };
    for s in 0..steps {
        let rows = step(ours.as_ref(), &mut cache, &mut tables, &work);
        let truth_rows = step(truth.as_ref(), &mut truth_cache, &mut truth_tables, &work);
        let mut next = Vec::new();
        for (((i, toks), row), t) in work.iter().zip(&rows).zip(&truth_rows) {
            let r = ref_seqs[*i].feed(toks);
            check.row(&format!("step {s} seq {i}"), row, &r);
            quant_errs.push((rel_err(row, t), rel_err(&r, t)));
            truth_picks.0 += (argmax(row) == argmax(t)) as usize;
            truth_picks.1 += (argmax(&r) == argmax(t)) as usize;
            let (o, g) = (argmax(row) as usize, argmax(&r) as usize);
            if o != g {
                // Allowed only where the reference itself is torn between the two tokens.
                let scale = r.iter().map(|x| x.abs()).fold(0f32, f32::max);
                let gap = (r[g] - r[o]) / scale;
                eprintln!("step {s} seq {i}: ours picks {o}, reference {g}; reference's own gap {gap:.2e} of max|logit|");
                assert!(!dense && gap < 1e-2, "greedy token differs at step {s} of sequence {i} without a near-tie (gap {gap:.2e})");
                near_ties += 1;
            }
            ours_out[*i].push(argmax(row));
            ref_out[*i].push(argmax(&r));
            // Both continue with the reference's choice so a near-tie flip does not snowball.
            next.push((*i, vec![argmax(&r)]));
        }
        work = next;
    }
    for i in 0..prompts.len() {
        eprintln!(
            "seq {i}: ours {:?}\n       ref  {:?}",
            ours_out[i], ref_out[i]
        );
    }
    let total = prompts.len() * steps;
    eprintln!(
        "greedy tokens: {} of {total} equal, {near_ties} near-tie flips",
        total - near_ties
    );
    assert!(
        near_ties * 10 <= total,
        "too many near-tie flips: {near_ties} of {total}"
    );
    if !dense {
        let n = quant_errs.len() as f32;
        let mean = |f: fn(&(f32, f32)) -> f32| quant_errs.iter().map(f).sum::<f32>() / n;
        let max = |f: fn(&(f32, f32)) -> f32| quant_errs.iter().map(f).fold(0f32, f32::max);
        let (ours_mean, ref_mean) = (mean(|e| e.0), mean(|e| e.1));
        let (ours_max, ref_max) = (max(|e| e.0), max(|e| e.1));
        eprintln!(
            "against the dense model: ours mean error {ours_mean:.3e}, max {ours_max:.3e}, \
             {} of {total} greedy tokens equal; candle's quantized path mean {ref_mean:.3e}, \
             max {ref_max:.3e}, {} equal",
            truth_picks.0, truth_picks.1
        );
        assert!(
            truth_picks.0 + 1 >= truth_picks.1,
            "ours picks the dense model's token less often than candle's quantized path"
        );
        // Both quantized paths carry the int8 activation error (a few 1e-2 here); ours may
        // round differently, not worse.
        assert!(
            ours_mean <= 1.25 * ref_mean && ours_max <= 1.5 * ref_max,
            "ours is further from the dense model than candle's quantized path"
        );
    }
}
