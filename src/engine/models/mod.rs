//! Batched decoder-only transformers over the paged KV cache: one decoder
//! ([`decoder::Decoder`]) for every architecture, and per architecture a file that says what
//! differs ([`ArchSpec`]).
//!
//! A forward takes a flat batch: the new tokens of every sequence concatenated, no padding.
//! Projections and MLPs see the whole batch as one `[n_tokens, hidden]` matrix, so every
//! weight is read once per step however many sequences there are; only attention works per
//! sequence, over that sequence's cached tokens fetched through its block table.
//!
//! Adding an architecture whose decoder has this shape: a file here with its `SPEC`, and in
//! `config.rs` a variant of [`Architecture`](crate::engine::config::Architecture), listed in
//! its `ALL` and mapped to the `SPEC` by
//! [`Architecture::spec`](crate::engine::config::Architecture::spec).

use std::io::{Read, Seek};

use anyhow::Result;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::batch::BatchInput;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::layers::RopeLayout;
use super::weights::WeightSource;

pub mod decoder;
pub mod llama;
pub mod qwen2;
pub mod qwen3;

#[cfg(test)]
mod parity_tests;

/// A causal language model that runs flat batches over a paged KV cache.
pub trait CausalLM: Send {
    fn config(&self) -> &ModelConfig;
    fn device(&self) -> &Device;
    /// Writes the K/V of every new token into `cache` (through its sequence's block table),
    /// attends causally over the sequence's cached and new tokens, and returns f32 logits
    /// `[m, vocab]`: one row per sequence with `want_logits`, in `seqs` order.
    fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> Result<Tensor>;
}

/// What one architecture's decoder does differently from the others; each architecture file
/// holds one as its `SPEC`, [`Architecture::spec`](crate::engine::config::Architecture::spec)
/// finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchSpec {
    /// The `architectures` entry of a Hugging Face `config.json`.
    pub hf_name: &'static str,
    /// The `general.architecture` value of a GGUF file (and the prefix of its metadata keys).
    pub gguf_name: &'static str,
    /// Which attention projections carry biases.
    pub biases: AttentionBiases,
    /// RMSNorm over each query and key head before RoPE (`q_norm` / `k_norm` weights).
    pub qk_norm: bool,
    /// How the Q/K rows of this architecture's GGUF files pair dimensions for RoPE (HF
    /// checkpoints are always [`RopeLayout::HalfSplit`]).
    pub gguf_rope_layout: RopeLayout,
}

/// Which attention projections carry biases, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBiases {
    /// q, k, v and o, when the checkpoint sets `attention_bias` (GGUF: when the file has them).
    AllIfConfigured,
    /// q, k and v always, o never. HF configs do not mention them ([`ModelConfig`] sets
    /// `attention_bias`); a GGUF file without them is trusted.
    QkvAlways,
}

impl AttentionBiases {
    /// Whether (the q/k/v projections, the o projection) load a bias, given
    /// [`ModelConfig::attention_bias`].
    pub fn qkv_and_o(self, attention_bias: bool) -> (bool, bool) {
        match self {
            AttentionBiases::AllIfConfigured => (attention_bias, attention_bias),
            AttentionBiases::QkvAlways => (attention_bias, false),
        }
    }
}

fn build(cfg: &ModelConfig, src: &mut WeightSource) -> Result<Box<dyn CausalLM>> {
    Ok(Box::new(decoder::Decoder::load(cfg, src)?))
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
