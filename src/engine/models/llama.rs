//! Llama (Llama 2/3, SmolLM, Mistral-style dense models without sliding window).
//!
//! Pre-norm decoder: RMSNorm → grouped-query self-attention with rotary position embeddings
//! (optionally Llama 3 frequency scaling) → residual, RMSNorm → SwiGLU MLP → residual.
//! Projections have no biases unless the checkpoint sets `attention_bias`.
//!
//! GGUF files from llama.cpp store Q/K rows permuted for adjacent-pair rotation; the loader
//! picks the matching rotary layout (see [`RopeLayout`]), so the weights are used as stored.

use super::{ArchSpec, AttentionBiases};
use crate::engine::layers::RopeLayout;

pub const SPEC: ArchSpec = ArchSpec {
    hf_name: "LlamaForCausalLM",
    gguf_name: "llama",
    biases: AttentionBiases::AllIfConfigured,
    qk_norm: false,
    gguf_rope_layout: RopeLayout::Interleaved,
};
