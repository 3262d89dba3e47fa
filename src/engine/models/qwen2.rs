//! Qwen2 / Qwen2.5.
//!
//! Same decoder as Llama (pre-norm, grouped-query attention with half-split rotary
//! embeddings, SwiGLU MLP), except that the q/k/v projections always carry biases (o does
//! not) and the rotary base is usually 1e6. Qwen GGUF files keep the HF Q/K row order, so
//! the same rotary layout serves both formats.

use super::{ArchSpec, AttentionBiases};
use crate::engine::layers::RopeLayout;

pub const SPEC: ArchSpec = ArchSpec {
    hf_name: "Qwen2ForCausalLM",
    gguf_name: "qwen2",
    biases: AttentionBiases::QkvAlways,
    qk_norm: false,
    gguf_rope_layout: RopeLayout::HalfSplit,
};
