//! Qwen3 (dense).
//!
//! Like Qwen2 but without the q/k/v biases (unless `attention_bias`), with an explicit
//! `head_dim` that need not equal `hidden_size / num_heads`, and with RMSNorm applied to each
//! query and key head (q_norm / k_norm) before the rotary embedding. GGUF files keep the HF
//! Q/K row order.

use super::{ArchSpec, AttentionBiases};
use crate::engine::layers::RopeLayout;

pub const SPEC: ArchSpec = ArchSpec {
    hf_name: "Qwen3ForCausalLM",
    gguf_name: "qwen3",
    biases: AttentionBiases::AllIfConfigured,
    qk_norm: true,
    gguf_rope_layout: RopeLayout::HalfSplit,
};
