//! Batched decoder-only transformers (Llama, Qwen2, Qwen3) over the paged KV cache.
//!
//! A forward takes a flat batch: the new tokens of every sequence concatenated, no padding.
//! Projections and MLPs see the whole batch as one `[n_tokens, hidden]` matrix, so every
//! weight is read once per step however many sequences there are; only attention works per
//! sequence, over that sequence's cached tokens fetched through its block table.
//!
//! This module holds what the three architectures share: configuration, the weight type,
//! RMSNorm, rotary embeddings, the SwiGLU MLP, paged attention, weight loading (safetensors
//! and GGUF) and the embedding → layers → head driver. The per-architecture files only say
//! how one attention block and one decoder layer are put together.

use std::io::{Read, Seek};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::attention::{cpu_f32_slice, paged_attention_cpu, AttnDims, SeqRows};
use super::kv_cache::{row_index, KvCache};
use super::quant::{Q4_1Matrix, Q8_0Matrix};

pub mod llama;
pub mod qwen2;
pub mod qwen3;

#[cfg(test)]
mod parity_tests;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The model families this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// The `architectures` entry of a Hugging Face `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `general.architecture` value of a GGUF file.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// The architecture named by a `config.json` `architectures` entry, if supported.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    /// The architecture named by a GGUF `general.architecture` value, if supported.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.gguf_name() == name)
    }

    /// "A, B, C": the supported names, for error messages.
    fn supported(name: fn(Architecture) -> &'static str) -> String {
        Self::ALL.map(name).join(", ")
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Architecture hyper-parameters, from a HF `config.json` or GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the attention projections: q/k/v for Qwen2 (always there), q/k/v/o for Llama
    /// and Qwen3 (when the checkpoint says `attention_bias: true`).
    pub attention_bias: bool,
}

/// Field readers for `config.json` whose errors name the field and the file.
struct HfFields<'a>(&'a serde_json::Map<String, Value>);

impl HfFields<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                anyhow!("config.json: field `{key}` must be a non-negative integer, found {v}")
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| anyhow!("config.json: required field `{key}` is missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("config.json: field `{key}` must be a number, found {v}")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                anyhow!("config.json: field `{key}` must be true or false, found {v}")
            }),
        }
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(json: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(json).context("config.json is not valid JSON")?;
        let obj = root
            .as_object()
            .ok_or_else(|| anyhow!("config.json must hold a JSON object"))?;
        let f = HfFields(obj);

        let arch_names = obj
            .get("architectures")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                anyhow!("config.json: required field `architectures` (a list of names) is missing")
            })?;
        let arch_name = arch_names
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("config.json: field `architectures` is empty or not strings"))?;
        let arch = Architecture::from_hf_name(arch_name).ok_or_else(|| {
            anyhow!(
                "config.json: unsupported architecture `{arch_name}`; supported: {}",
                Architecture::supported(Architecture::hf_name)
            )
        })?;

        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            ensure!(
                act == "silu",
                "config.json: field `hidden_act` is `{act}`, only `silu` is supported"
            );
        }
        if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
            bail!(
                "config.json: `use_sliding_window` is true; sliding-window attention is not \
                 supported, use a checkpoint with full attention"
            );
        }

        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        ensure!(
            num_heads > 0,
            "config.json: field `num_attention_heads` must be positive"
        );
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                ensure!(
                    hidden_size.is_multiple_of(num_heads),
                    "config.json: `hidden_size` ({hidden_size}) is not a multiple of \
                     `num_attention_heads` ({num_heads}) and no `head_dim` is given"
                );
                hidden_size / num_heads
            }
        };
        let attention_bias = match arch {
            // Qwen2 always has q/k/v biases; its config does not say so.
            Architecture::Qwen2 => true,
            _ => f.opt_bool("attention_bias")?.unwrap_or(false),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings: f.usize("max_position_embeddings")?,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            rope_scaling: parse_rope_scaling(obj.get("rope_scaling"))?,
            attention_bias,
        };
        cfg.validate().context("config.json")?;
        Ok(cfg)
    }

    /// Reads the hyper-parameters of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(key).ok_or_else(|| {
                anyhow!("GGUF metadata key `{key}` is missing; the file is incomplete or not a llama.cpp model")
            })
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|_| anyhow!("GGUF metadata `general.architecture` is not a string"))?;
        let arch = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            anyhow!(
                "GGUF architecture `{arch_name}` is not supported; supported: {}",
                Architecture::supported(Architecture::gguf_name)
            )
        })?;
        let a = arch.gguf_name();
        let usize_key = |key: String| -> Result<usize> { gguf_usize(get(&key)?, &key) };
        let opt_usize_key = |key: String| -> Result<Option<usize>> {
            md.get(&key).map(|v| gguf_usize(v, &key)).transpose()
        };
        let opt_f64_key = |key: String| -> Result<Option<f64>> {
            md.get(&key).map(|v| gguf_f64(v, &key)).transpose()
        };

        let hidden_size = usize_key(format!("{a}.embedding_length"))?;
        let num_heads = usize_key(format!("{a}.attention.head_count"))?;
        ensure!(
            num_heads > 0,
            "GGUF metadata `{a}.attention.head_count` must be positive"
        );
        let num_kv_heads =
            opt_usize_key(format!("{a}.attention.head_count_kv"))?.unwrap_or(num_heads);
        let head_dim = match opt_usize_key(format!("{a}.attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        if let Some(rope_dim) = opt_usize_key(format!("{a}.rope.dimension_count"))? {
            ensure!(
                rope_dim == head_dim,
                "GGUF model rotates only {rope_dim} of {head_dim} head dimensions (partial \
                 rotary embedding), which is not supported"
            );
        }
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| {
                    anyhow!("GGUF file has neither a `token_embd.weight` tensor nor `tokenizer.ggml.tokens`; cannot tell the vocabulary size")
                })?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_key(format!("{a}.feed_forward_length"))?,
            num_layers: usize_key(format!("{a}.block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: opt_f64_key(format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: gguf_f64(
                get(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
                &format!("{a}.attention.layer_norm_rms_epsilon"),
            )?,
            max_position_embeddings: opt_usize_key(format!("{a}.context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            // llama.cpp stores Llama 3 frequency scaling as the `rope_freqs.weight` tensor,
            // which `load_gguf` applies; there is nothing to read here.
            rope_scaling: None,
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        cfg.validate().context("GGUF metadata")?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.num_kv_heads > 0 && self.num_heads.is_multiple_of(self.num_kv_heads),
            "{} attention heads cannot be grouped over {} key/value heads",
            self.num_heads,
            self.num_kv_heads
        );
        ensure!(
            self.head_dim > 0 && self.head_dim.is_multiple_of(2),
            "head_dim must be a positive even number for rotary embeddings, got {}",
            self.head_dim
        );
        ensure!(
            self.vocab_size > 0 && self.hidden_size > 0 && self.num_layers > 0,
            "vocab_size, hidden_size and the number of layers must be positive"
        );
        Ok(())
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<RopeScaling>> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => bail!("config.json: field `rope_scaling` must be an object, found {other}"),
    };
    // transformers accepts both spellings of the type key.
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = HfFields(obj);
            let num = |key: &str| -> Result<f64> {
                f.opt_f64(key)?.ok_or_else(|| {
                    anyhow!("config.json: `rope_scaling.{key}` is missing for llama3 rope scaling")
                })
            };
            Ok(Some(RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: f
                    .opt_usize("original_max_position_embeddings")?
                    .ok_or_else(|| {
                        anyhow!("config.json: `rope_scaling.original_max_position_embeddings` is missing")
                    })?,
            }))
        }
        other => bail!(
            "config.json: `rope_scaling` type `{other}` is not supported (supported: llama3); \
             running it with plain RoPE would give wrong results"
        ),
    }
}

fn gguf_usize(v: &gguf_file::Value, key: &str) -> Result<usize> {
    use gguf_file::Value as V;
    let x: i128 = match v {
        V::U8(x) => *x as i128,
        V::I8(x) => *x as i128,
        V::U16(x) => *x as i128,
        V::I16(x) => *x as i128,
        V::U32(x) => *x as i128,
        V::I32(x) => *x as i128,
        V::U64(x) => *x as i128,
        V::I64(x) => *x as i128,
        other => bail!("GGUF metadata `{key}` must be an integer, found {other:?}"),
    };
    usize::try_from(x).map_err(|_| anyhow!("GGUF metadata `{key}` is out of range: {x}"))
}

fn gguf_f64(v: &gguf_file::Value, key: &str) -> Result<f64> {
    use gguf_file::Value as V;
    Ok(match v {
        V::F32(x) => *x as f64,
        V::F64(x) => *x,
        other => gguf_usize(other, key)
            .map_err(|_| anyhow!("GGUF metadata `{key}` must be a number, found {other:?}"))?
            as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// Batch description and the model trait
// ---------------------------------------------------------------------------------------------

/// One sequence's part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInput {
    /// Tokens of this sequence already in the cache (the position of its first new token).
    pub start_pos: usize,
    /// New tokens of this sequence in this step.
    pub len: usize,
    /// The sequence's `BlockTable::blocks()`, already reserved for `start_pos + len` tokens.
    pub block_table: Vec<u32>,
    /// Return the logits of this sequence's last new token.
    pub want_logits: bool,
}

/// A flat batch: the new tokens of all sequences concatenated in `seqs` order, no padding.
/// Prefill chunks and single decode tokens can be mixed freely.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqInput>,
}

/// A causal language model that runs flat batches over a paged KV cache.
pub trait CausalLM: Send {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Writes the K/V of every new token into `cache` (through its sequence's block table),
    /// attends causally over the sequence's cached and new tokens, and returns f32 logits
    /// `[m, vocab]`: one row per sequence with `want_logits`, in `seqs` order.
    fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> Result<Tensor>;
}

// ---------------------------------------------------------------------------------------------
// Weights and building blocks
// ---------------------------------------------------------------------------------------------

/// A projection weight `y = x W^T (+ b)` over a flat batch `[n_tokens, in] -> [n_tokens, out]`.
///
/// All projections go through here, one matmul for the whole batch, so a faster quantized or
/// fused kernel only has to be slotted in at this one place.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]` in the model's activation dtype.
    Dense(Tensor),
    /// GGUF weight; candle keeps f32/f16 ones dequantized and quantized ones packed.
    Quantized(QMatMul),
    /// GGUF Q4_1 weight on the CPU, through our batched kernel (see [`crate::engine::quant`]):
    /// candle's Q4_1 dot is scalar and re-reads the weights for every row of a batch.
    Q4_1(std::sync::Arc<Q4_1Matrix>),
    /// GGUF Q8_0 weight on the CPU (typically the tied output head), through our batched
    /// kernel: candle's runs its dot once per row of a batch.
    Q8_0(std::sync::Arc<Q8_0Matrix>),
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    pub fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Quantized(weight),
            bias,
        }
    }

    /// A GGUF weight: Q4_1 and Q8_0 on the CPU go to our kernels (candle's quantized operands,
    /// see [`crate::engine::quant`] for the arithmetic), anything else to candle's
    /// QMatMul.
    /// `CANDLE_DEQUANTIZE_ALL(_F16)` (dense reference runs) and `BSA_NO_QUANT_KERNEL` (A/B
    /// timing) keep candle's path.
    pub fn from_qtensor(
        weight: std::sync::Arc<QTensor>,
        device: &Device,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let env_set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
        let ours = device.is_cpu()
            && !env_set("CANDLE_DEQUANTIZE_ALL")
            && !env_set("CANDLE_DEQUANTIZE_ALL_F16")
            && !env_set("BSA_NO_QUANT_KERNEL");
        if ours {
            if let Some(m) = Q4_1Matrix::from_qtensor(&weight)? {
                let weight = LinearWeight::Q4_1(std::sync::Arc::new(m));
                return Ok(Self { weight, bias });
            }
            if let Some(m) = Q8_0Matrix::from_qtensor(&weight)? {
                let weight = LinearWeight::Q8_0(std::sync::Arc::new(m));
                return Ok(Self { weight, bias });
            }
        }
        Ok(Self::quantized(QMatMul::from_arc(weight)?, bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(q) => {
                // Quantized kernels take f32 activations.
                let dtype = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            LinearWeight::Q4_1(m) => {
                let dtype = x.dtype();
                m.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            LinearWeight::Q8_0(m) => {
                let dtype = x.dtype();
                m.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

/// RMSNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// The gated MLP all three families use: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGluMlp {
    fn load(cfg: &ModelConfig, src: &mut WeightSource, layer: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: src.linear(W::Gate(layer), h, i, false)?,
            up: src.linear(W::Up(layer), h, i, false)?,
            down: src.linear(W::Down(layer), i, h, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// Rotary position embedding frequencies and layout.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// Which dimension pairs rotate together. HF checkpoints (and llama.cpp's Qwen GGUFs) pair
    /// `i` with `i + d/2`; llama.cpp's converter permutes the Q/K rows of Llama GGUFs so that
    /// pairs become adjacent `(2i, 2i + 1)`, which is what candle's `rope_i` rotates.
    interleaved: bool,
}

impl RotaryEmbedding {
    /// `freq_factors`: per-frequency divisors stored by llama.cpp as `rope_freqs.weight`
    /// (how it encodes Llama 3 scaling); when given, `cfg.rope_scaling` is not applied again.
    pub fn new(cfg: &ModelConfig, interleaved: bool, freq_factors: Option<&[f32]>) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(factors) = freq_factors {
            ensure!(
                factors.len() == inv_freq.len(),
                "rope_freqs.weight has {} entries, expected head_dim / 2 = {}",
                factors.len(),
                inv_freq.len()
            );
            for (f, s) in inv_freq.iter_mut().zip(factors) {
                *f /= *s as f64;
            }
        } else if let Some(s) = &cfg.rope_scaling {
            // Llama 3: slow down low frequencies (long wavelengths) by `factor`, keep high
            // frequencies, and blend linearly in between.
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        Ok(Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            interleaved,
        })
    }

    /// cos/sin for the given token positions, shaped `[n, 1, d/2]`: each token acts as its own
    /// batch entry of candle's rope kernels, which is how per-token positions get in.
    fn tables(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // An f32 product, as HF transformers computes the angles at training time.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), 1, half);
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
            interleaved: self.interleaved,
        })
    }
}

/// Per-forward rotary tables for the batch's tokens.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl RopeTables {
    /// Rotates `x: [n_tokens, heads * head_dim]` by each token's position.
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        let x4 = x.reshape((n, heads, 1, width / heads))?.contiguous()?;
        let y = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x4, &self.cos, &self.sin)?
        } else {
            candle_nn::rotary_emb::rope(&x4, &self.cos, &self.sin)?
        };
        Ok(y.reshape((n, width))?)
    }
}

/// One sequence's slice of the flat batch, resolved for attention.
struct SeqSpan {
    /// First row of this sequence in the batch's token rows.
    tok_off: usize,
    len: usize,
    /// First row of this sequence in the gathered K/V rows.
    kv_off: usize,
    /// Cached plus new tokens.
    kv_len: usize,
    /// Additive causal mask `[len, kv_len]` for the candle-op path; `None` for a single new
    /// token (it sees everything) and for the CPU kernel (which masks by position itself).
    mask: Option<Tensor>,
}

/// What every layer needs about a batch, computed once per forward.
pub struct BatchCtx {
    pub rope: RopeTables,
    /// `[n_tokens, kv_width]` cache rows to write each new token's K/V to.
    write_rows: Tensor,
    /// Cache rows of every sequence's whole context, sequences one after another (a
    /// sequence's are `context_rows[kv_off..kv_off + kv_len]`).
    context_rows: Vec<u32>,
    /// `context_rows` as a tensor for the candle-op attention path; `None` when attention runs
    /// the CPU kernel, which reads the pool through `context_rows` in place.
    gather_rows: Option<Tensor>,
    seqs: Vec<SeqSpan>,
    /// Batch rows whose logits are wanted.
    logit_rows: Vec<u32>,
    /// The CUDA attention kernel's index (on CUDA caches whose shape it handles).
    #[cfg(feature = "cuda")]
    kernel_index: Option<super::attention::cuda::DeviceIndex>,
}

impl BatchCtx {
    fn new(
        batch: &BatchInput,
        cache: &KvCache,
        rope: &RotaryEmbedding,
        dtype: DType,
        device: &Device,
        heads: usize,
    ) -> Result<Self> {
        let total: usize = batch.seqs.iter().map(|s| s.len).sum();
        ensure!(
            total == batch.tokens.len(),
            "batch has {} tokens but its sequences add up to {total}",
            batch.tokens.len()
        );
        let bs = cache.block_size();
        let cuda_kernel = uses_cuda_attention_kernel(cache, heads);
        let candle_path = !uses_cpu_attention_kernel(cache) && !cuda_kernel;
        let mut positions = Vec::with_capacity(total);
        let mut write_rows = Vec::with_capacity(total);
        let mut gather_rows = Vec::new();
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let mut logit_rows = Vec::new();
        let (mut tok_off, mut kv_off) = (0, 0);
        for (i, s) in batch.seqs.iter().enumerate() {
            ensure!(s.len > 0, "sequence {i} of the batch has no new tokens");
            let kv_len = s.start_pos + s.len;
            ensure!(
                s.block_table.len() * bs >= kv_len,
                "sequence {i}: its {} blocks of {bs} tokens do not cover {kv_len} tokens; \
                 call BlockTable::reserve before the forward",
                s.block_table.len()
            );
            if let Some(&b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks())
            {
                bail!(
                    "sequence {i}: block {b} is outside the KV cache ({} blocks)",
                    cache.num_blocks()
                );
            }
            let row = |p: usize| s.block_table[p / bs] * bs as u32 + (p % bs) as u32;
            gather_rows.extend((0..kv_len).map(row));
            write_rows.extend((s.start_pos..kv_len).map(row));
            positions.extend((s.start_pos..kv_len).map(|p| p as u32));
            let mask = (candle_path && s.len > 1)
                .then(|| causal_mask(s.start_pos, s.len, device))
                .transpose()?;
            seqs.push(SeqSpan {
                tok_off,
                len: s.len,
                kv_off,
                kv_len,
                mask,
            });
            if s.want_logits {
                logit_rows.push((tok_off + s.len - 1) as u32);
            }
            tok_off += s.len;
            kv_off += kv_len;
        }
        #[cfg(feature = "cuda")]
        let kernel_index = cuda_kernel
            .then(|| {
                super::attention::cuda::DeviceIndex::new(
                    &gather_rows,
                    seqs.iter().map(|s| (s.len, s.kv_off, s.kv_len)),
                    device,
                )
            })
            .transpose()?;
        Ok(Self {
            #[cfg(feature = "cuda")]
            kernel_index,
            rope: rope.tables(&positions, dtype, device)?,
            write_rows: row_index(&write_rows, cache.row_width(), device)?,
            gather_rows: candle_path
                .then(|| Tensor::new(gather_rows.as_slice(), device))
                .transpose()?,
            context_rows: gather_rows,
            seqs,
            logit_rows,
        })
    }
}

/// Whether attention over this cache runs [`paged_attention_cpu`], reading the pool in place:
/// CPU caches in f32. Other devices and cache dtypes take the candle-op path.
/// `BSA_NO_ATTN_KERNEL=1` forces the candle-op path everywhere (A/B timing, debugging).
fn uses_cpu_attention_kernel(cache: &KvCache) -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let disabled = *DISABLED.get_or_init(|| {
        std::env::var("BSA_NO_ATTN_KERNEL").is_ok_and(|v| !v.is_empty() && v != "0")
    });
    !disabled && cache.device().is_cpu() && cache.dtype() == DType::F32
}

/// Whether attention runs the CUDA paged-attention kernel: CUDA caches of a shape it handles
/// (`BSA_NO_ATTN_KERNEL=1` turns it off too).
fn uses_cuda_attention_kernel(cache: &KvCache, heads: usize) -> bool {
    let disabled = std::env::var("BSA_NO_ATTN_KERNEL").is_ok_and(|v| !v.is_empty() && v != "0");
    cfg!(feature = "cuda")
        && !disabled
        && cache.device().is_cuda()
        && super::attention::blocked::kernel_supports(heads, cache.n_kv_heads(), cache.head_dim())
}

/// `[len, start + len]` additive mask: new token `i` (position `start + i`) sees keys `0..=start + i`.
pub(crate) fn causal_mask(start: usize, len: usize, device: &Device) -> Result<Tensor> {
    let kv_len = start + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (len, kv_len), device)?)
}

/// Attention over the paged cache, with grouped-query heads.
#[derive(Debug, Clone)]
pub struct PagedAttention {
    layer: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl PagedAttention {
    pub fn new(cfg: &ModelConfig, layer: usize) -> Self {
        Self {
            layer,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// `q: [n, heads * d]`, `k`, `v: [n, kv_heads * d]` (rotated, for the batch's new tokens).
    /// Stores k/v in the cache, then per sequence computes `softmax(q k^T / sqrt(d) + mask) v`
    /// over that sequence's whole context. Returns `[n, heads * d]`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &BatchCtx,
        cache: &KvCache,
    ) -> Result<Tensor> {
        cache.write(self.layer, &ctx.write_rows, k, v)?;
        #[cfg(feature = "cuda")]
        if let Some(ix) = &ctx.kernel_index {
            let (k_pool, v_pool) = cache.pools(self.layer);
            let y = ix.attend(q, k_pool, v_pool, self.n_heads, self.n_kv_heads, self.head_dim)?;
            return Ok(y.to_dtype(k.dtype())?);
        }
        let Some(gather_rows) = &ctx.gather_rows else {
            return self.forward_cpu_kernel(q, k.dtype(), ctx, cache);
        };
        let (k_all, v_all) = cache.gather(self.layer, gather_rows)?;
        // Scores and softmax in f32 whatever the cache or activation dtype.
        let k_all = k_all.to_dtype(DType::F32)?;
        let v_all = v_all.to_dtype(DType::F32)?;
        let q = q.to_dtype(DType::F32)?;
        let (hk, d) = (self.n_kv_heads, self.head_dim);
        let group = self.n_heads / hk;
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(ctx.seqs.len());
        for s in &ctx.seqs {
            // Query head h reads kv head h / group, so view the queries as
            // [kv_heads, group * len, d] and run one batched matmul per kv head.
            let qs = q
                .narrow(0, s.tok_off, s.len)?
                .reshape((s.len, hk, group, d))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((hk, group * s.len, d))?;
            let to_heads = |t: &Tensor| -> Result<Tensor> {
                Ok(t.narrow(0, s.kv_off, s.kv_len)?
                    .reshape((s.kv_len, hk, d))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let ks = to_heads(&k_all)?;
            let vs = to_heads(&v_all)?;
            let mut att = (qs.matmul(&ks.t()?)? * scale)?;
            if let Some(mask) = &s.mask {
                att = att
                    .reshape((hk, group, s.len, s.kv_len))?
                    .broadcast_add(mask)?
                    .reshape((hk, group * s.len, s.kv_len))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&vs)?
                .reshape((hk, group, s.len, d))?
                .permute((2, 0, 1, 3))?
                .reshape((s.len, self.n_heads * d))?;
            outs.push(y);
        }
        let y = if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(y.to_dtype(k.dtype())?)
    }

    /// The CPU f32-cache path: one [`paged_attention_cpu`] call over all sequences, reading
    /// this layer's K/V pools in place (the new tokens' rows are already written).
    fn forward_cpu_kernel(
        &self,
        q: &Tensor,
        out_dtype: DType,
        ctx: &BatchCtx,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let q = q.to_dtype(DType::F32)?.contiguous()?;
        let (n, width) = q.dims2()?;
        ensure!(
            width == self.n_heads * d,
            "attention queries are {width} wide, expected {} heads x {d}",
            self.n_heads
        );
        let seqs: Vec<SeqRows> = ctx
            .seqs
            .iter()
            .map(|s| SeqRows {
                tok_off: s.tok_off,
                len: s.len,
                rows: &ctx.context_rows[s.kv_off..s.kv_off + s.kv_len],
            })
            .collect();
        let (k_pool, v_pool) = cache.pools(self.layer);
        let y = {
            // Read guards on the storages, held only while the kernel borrows their data.
            let (q_st, q_lay) = q.storage_and_layout();
            let (k_st, k_lay) = k_pool.storage_and_layout();
            let (v_st, v_lay) = v_pool.storage_and_layout();
            paged_attention_cpu(
                cpu_f32_slice(&q_st, q_lay)?,
                cpu_f32_slice(&k_st, k_lay)?,
                cpu_f32_slice(&v_st, v_lay)?,
                &seqs,
                AttnDims {
                    heads: self.n_heads,
                    kv_heads: self.n_kv_heads,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                },
            )
        };
        Ok(Tensor::from_vec(y, (n, width), q.device())?.to_dtype(out_dtype)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Weight loading
// ---------------------------------------------------------------------------------------------

/// A weight, named independently of the checkpoint format.
#[derive(Debug, Clone, Copy)]
pub(crate) enum W {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    FfnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QNorm(usize),
    KNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl W {
    /// HF safetensors prefix (append `.weight` / `.bias`).
    fn hf(self) -> String {
        let l = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
        match self {
            W::Embed => "model.embed_tokens".into(),
            W::FinalNorm => "model.norm".into(),
            W::LmHead => "lm_head".into(),
            W::AttnNorm(i) => l(i, "input_layernorm"),
            W::FfnNorm(i) => l(i, "post_attention_layernorm"),
            W::Q(i) => l(i, "self_attn.q_proj"),
            W::K(i) => l(i, "self_attn.k_proj"),
            W::V(i) => l(i, "self_attn.v_proj"),
            W::O(i) => l(i, "self_attn.o_proj"),
            W::QNorm(i) => l(i, "self_attn.q_norm"),
            W::KNorm(i) => l(i, "self_attn.k_norm"),
            W::Gate(i) => l(i, "mlp.gate_proj"),
            W::Up(i) => l(i, "mlp.up_proj"),
            W::Down(i) => l(i, "mlp.down_proj"),
        }
    }

    /// llama.cpp GGUF prefix (append `.weight` / `.bias`).
    fn gguf(self) -> String {
        let l = |i: usize, rest: &str| format!("blk.{i}.{rest}");
        match self {
            W::Embed => "token_embd".into(),
            W::FinalNorm => "output_norm".into(),
            W::LmHead => "output".into(),
            W::AttnNorm(i) => l(i, "attn_norm"),
            W::FfnNorm(i) => l(i, "ffn_norm"),
            W::Q(i) => l(i, "attn_q"),
            W::K(i) => l(i, "attn_k"),
            W::V(i) => l(i, "attn_v"),
            W::O(i) => l(i, "attn_output"),
            W::QNorm(i) => l(i, "attn_q_norm"),
            W::KNorm(i) => l(i, "attn_k_norm"),
            W::Gate(i) => l(i, "ffn_gate"),
            W::Up(i) => l(i, "ffn_up"),
            W::Down(i) => l(i, "ffn_down"),
        }
    }
}

pub(crate) trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// Where the weights come from; hides the two naming schemes and storage formats.
pub(crate) enum WeightSource<'a> {
    Hf(VarBuilder<'a>),
    Gguf {
        content: &'a gguf_file::Content,
        reader: &'a mut dyn ReadSeek,
        device: Device,
        /// `token_embd.weight` as stored, kept for a tied output head.
        embed_q: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    },
}

impl WeightSource<'_> {
    /// Activation dtype of the model built from these weights.
    fn dtype(&self) -> DType {
        match self {
            WeightSource::Hf(vb) => vb.dtype(),
            // Quantized matmuls take and return f32.
            WeightSource::Gguf { .. } => DType::F32,
        }
    }

    fn device(&self) -> Device {
        match self {
            WeightSource::Hf(vb) => vb.device().clone(),
            WeightSource::Gguf { device, .. } => device.clone(),
        }
    }

    /// Rotary layout for this architecture and weight format (see [`RotaryEmbedding`]).
    fn rope_interleaved(&self, arch: Architecture) -> bool {
        matches!(self, WeightSource::Gguf { .. }) && arch == Architecture::Llama
    }

    fn gguf_qtensor(&mut self, name: &str) -> Result<Option<candle_core::quantized::QTensor>> {
        match self {
            WeightSource::Gguf {
                content,
                reader,
                device,
                ..
            } => {
                if !content.tensor_infos.contains_key(name) {
                    return Ok(None);
                }
                let t = content
                    .tensor(reader, name, device)
                    .with_context(|| format!("reading tensor `{name}` from the GGUF file"))?;
                Ok(Some(t))
            }
            WeightSource::Hf(_) => Ok(None),
        }
    }

    /// A dense tensor (norm weights, biases, embeddings), dequantized to the activation dtype.
    fn dense(&mut self, w: W, suffix: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = self.dtype();
        let t = match self {
            WeightSource::Hf(vb) => {
                let name = format!("{}.{suffix}", w.hf());
                vb.get(shape, &name)
                    .with_context(|| format!("loading `{name}`"))?
            }
            WeightSource::Gguf { device, .. } => {
                let device = device.clone();
                let name = format!("{}.{suffix}", w.gguf());
                let q = self
                    .gguf_qtensor(&name)?
                    .ok_or_else(|| anyhow!("GGUF file lacks tensor `{name}`; it is not a complete model of this architecture"))?;
                let t = q.dequantize(&device)?.to_dtype(dtype)?;
                ensure!(
                    t.dims() == shape,
                    "GGUF tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                );
                t
            }
        };
        Ok(t)
    }

    pub(crate) fn linear(
        &mut self,
        w: W,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let b = if bias {
            Some(self.dense(w, "bias", &[out_dim])?)
        } else {
            None
        };
        match self {
            WeightSource::Hf(_) => Ok(Linear::dense(
                self.dense(w, "weight", &[out_dim, in_dim])?,
                b,
            )),
            WeightSource::Gguf { .. } => {
                let name = format!("{}.weight", w.gguf());
                let q = self
                    .gguf_qtensor(&name)?
                    .ok_or_else(|| anyhow!("GGUF file lacks tensor `{name}`; it is not a complete model of this architecture"))?;
                ensure!(
                    q.shape().dims() == [out_dim, in_dim],
                    "GGUF tensor `{name}` has shape {:?}, expected [{out_dim}, {in_dim}]",
                    q.shape().dims()
                );
                let device = self.device();
                Linear::from_qtensor(std::sync::Arc::new(q), &device, b)
            }
        }
    }

    pub(crate) fn norm(&mut self, w: W, size: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(w, "weight", &[size])?, eps))
    }

    /// The token embedding table, dense (quantized GGUF tables are dequantized).
    fn embedding(&mut self, cfg: &ModelConfig) -> Result<Tensor> {
        let shape = [cfg.vocab_size, cfg.hidden_size];
        if let WeightSource::Gguf { device, .. } = self {
            let device = device.clone();
            let q = self
                .gguf_qtensor("token_embd.weight")?
                .ok_or_else(|| anyhow!("GGUF file lacks tensor `token_embd.weight`"))?;
            let t = q.dequantize(&device)?;
            ensure!(
                t.dims() == shape,
                "GGUF `token_embd.weight` has shape {:?}, expected {shape:?}",
                t.dims()
            );
            if let WeightSource::Gguf { embed_q, .. } = self {
                *embed_q = Some(std::sync::Arc::new(q));
            }
            return Ok(t);
        }
        self.dense(W::Embed, "weight", &shape)
    }

    /// The output head; tied heads reuse the embedding (for GGUF, in its stored quantization,
    /// as llama.cpp does).
    fn lm_head(&mut self, cfg: &ModelConfig, embed: &Tensor) -> Result<Linear> {
        let tied = match self {
            WeightSource::Hf(_) => cfg.tie_word_embeddings,
            WeightSource::Gguf { content, .. } => {
                !content.tensor_infos.contains_key("output.weight")
            }
        };
        if !tied {
            return self.linear(W::LmHead, cfg.hidden_size, cfg.vocab_size, false);
        }
        match self {
            WeightSource::Gguf {
                embed_q: Some(q),
                device,
                ..
            } => Linear::from_qtensor(q.clone(), device, None),
            _ => Ok(Linear::dense(embed.clone(), None)),
        }
    }

    /// llama.cpp's per-frequency RoPE divisors (`rope_freqs.weight`), if the file has them.
    fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>> {
        let device = self.device();
        match self.gguf_qtensor("rope_freqs.weight")? {
            Some(q) => Ok(Some(
                q.dequantize(&device)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            )),
            None => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared model driver
// ---------------------------------------------------------------------------------------------

/// One decoder layer of some architecture.
pub(crate) trait DecoderBlock: Send + Sync {
    fn forward(&self, x: &Tensor, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor>;
}

/// Embedding, the decoder layers, final norm and output head: identical for all families.
pub(crate) struct Backbone<L> {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<L>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
}

impl<L: DecoderBlock> Backbone<L> {
    /// Loads the shared parts and builds each layer with `layer(cfg, src, index)`.
    pub(crate) fn load(
        cfg: &ModelConfig,
        src: &mut WeightSource,
        mut layer: impl FnMut(&ModelConfig, &mut WeightSource, usize) -> Result<L>,
    ) -> Result<Self> {
        let embed = src.embedding(cfg)?;
        let layers = (0..cfg.num_layers)
            .map(|i| layer(cfg, src, i).with_context(|| format!("loading layer {i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = src.norm(W::FinalNorm, cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = src.lm_head(cfg, &embed)?;
        let freq_factors = src.rope_freq_factors()?;
        let rope =
            RotaryEmbedding::new(cfg, src.rope_interleaved(cfg.arch), freq_factors.as_deref())?;
        Ok(Self {
            cfg: cfg.clone(),
            device: src.device(),
            dtype: src.dtype(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    pub(crate) fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> Result<Tensor> {
        cache.check_compatible(&self.cfg)?;
        if let Some(&t) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            bail!(
                "token id {t} is outside the model's vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        cache.apply_pending_copies()?;
        let ctx = BatchCtx::new(batch, cache, &self.rope, self.dtype, &self.device, self.cfg.num_heads)?;
        if batch.tokens.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let cache = &*cache;
        let run = || self.layers_and_head(batch, &ctx, cache);
        if self.device.is_cpu() {
            on_a_worker(run)
        } else {
            run()
        }
    }

    fn layers_and_head(&self, batch: &BatchInput, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor> {
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for layer in &self.layers {
            x = layer.forward(&x, ctx, cache)?;
        }
        if ctx.logit_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        // Only the rows whose logits are wanted go through the (large) output head.
        let rows = Tensor::new(ctx.logit_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

/// Runs `f` on one of rayon's worker threads (directly if already on one). The CPU kernels
/// split each matmul and attention call over rayon; called from outside the pool, every one of
/// those ~200 calls per forward parks the caller and wakes a worker, two context switches each,
/// and the caller plus the workers are more threads than cores. From inside, the caller is a
/// worker and takes its share of each split. (Measured on 2 cores: single-stream decode
/// spent about a fifth of its samples in the scheduler before this.) Results do not change:
/// no kernel result depends on which thread computes it.
fn on_a_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}

// ---------------------------------------------------------------------------------------------
// Loaders
// ---------------------------------------------------------------------------------------------

fn build(cfg: &ModelConfig, src: &mut WeightSource) -> Result<Box<dyn CausalLM>> {
    Ok(match cfg.arch {
        Architecture::Llama => Box::new(llama::Llama::load(cfg, src)?),
        Architecture::Qwen2 => Box::new(qwen2::Qwen2::load(cfg, src)?),
        Architecture::Qwen3 => Box::new(qwen3::Qwen3::load(cfg, src)?),
    })
}

/// Builds a model from Hugging Face safetensors weights (HF tensor names). The activation
/// dtype is `vb.dtype()`.
pub fn load_safetensors(cfg: &ModelConfig, vb: VarBuilder) -> Result<Box<dyn CausalLM>> {
    build(cfg, &mut WeightSource::Hf(vb))
}

/// Builds a model from a llama.cpp GGUF file (`content` read from `reader`). Quantized weights
/// stay quantized; the embedding table is dequantized to f32; activations are f32.
pub fn load_gguf(
    cfg: &ModelConfig,
    content: &gguf_file::Content,
    reader: &mut (impl Read + Seek),
    device: &Device,
) -> Result<Box<dyn CausalLM>> {
    build(
        cfg,
        &mut WeightSource::Gguf {
            content,
            reader,
            device: device.clone(),
            embed_q: None,
        },
    )
}
