//! Llama (Llama 2/3, SmolLM, Mistral-style dense models without sliding window).
//!
//! Pre-norm decoder: RMSNorm → grouped-query self-attention with rotary position embeddings
//! (optionally Llama 3 frequency scaling) → residual, RMSNorm → SwiGLU MLP → residual.
//! Projections have no biases unless the checkpoint sets `attention_bias`.
//!
//! GGUF files from llama.cpp store Q/K rows permuted for adjacent-pair rotation; the loader
//! picks the matching rotary layout (see [`super::RotaryEmbedding`]), so the weights are used
//! as stored.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::{
    Backbone, BatchCtx, BatchInput, CausalLM, DecoderBlock, Linear, ModelConfig, PagedAttention,
    RmsNorm, SwiGluMlp, WeightSource, W,
};
use crate::engine::kv_cache::KvCache;

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    attn: PagedAttention,
}

impl Attention {
    fn new(cfg: &ModelConfig, src: &mut WeightSource, layer: usize) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        Ok(Self {
            q_proj: src.linear(W::Q(layer), h, cfg.num_heads * d, bias)?,
            k_proj: src.linear(W::K(layer), h, cfg.num_kv_heads * d, bias)?,
            v_proj: src.linear(W::V(layer), h, cfg.num_kv_heads * d, bias)?,
            o_proj: src.linear(W::O(layer), cfg.num_heads * d, h, bias)?,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            attn: PagedAttention::new(cfg, layer),
        })
    }

    fn forward(&self, x: &Tensor, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor> {
        let q = ctx.rope.apply(&self.q_proj.forward(x)?, self.n_heads)?;
        let k = ctx.rope.apply(&self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = self.v_proj.forward(x)?;
        let y = self.attn.forward(&q, &k, &v, ctx, cache)?;
        self.o_proj.forward(&y)
    }
}

type Mlp = SwiGluMlp;

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, src: &mut WeightSource, layer: usize) -> Result<Self> {
        Ok(Self {
            input_layernorm: src.norm(W::AttnNorm(layer), cfg.hidden_size, cfg.rms_norm_eps)?,
            self_attn: Attention::new(cfg, src, layer)?,
            post_attention_layernorm: src.norm(
                W::FfnNorm(layer),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(cfg, src, layer)?,
        })
    }
}

impl DecoderBlock for DecoderLayer {
    fn forward(&self, x: &Tensor, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, cache)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

/// A Llama-family model.
pub struct Llama(Backbone<DecoderLayer>);

impl Llama {
    pub(crate) fn load(cfg: &ModelConfig, src: &mut WeightSource) -> Result<Self> {
        Ok(Self(Backbone::load(cfg, src, DecoderLayer::new)?))
    }
}

impl CausalLM for Llama {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn device(&self) -> &Device {
        self.0.device()
    }

    fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> Result<Tensor> {
        self.0.forward(batch, cache)
    }
}
