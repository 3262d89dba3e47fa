//! Qwen3 (dense).
//!
//! Like Qwen2 but without the q/k/v biases (unless `attention_bias`), with an explicit
//! `head_dim` that need not equal `hidden_size / num_heads`, and with RMSNorm applied to each
//! query and key head (q_norm / k_norm) before the rotary embedding.

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
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
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
            q_norm: src.norm(W::QNorm(layer), d, cfg.rms_norm_eps)?,
            k_norm: src.norm(W::KNorm(layer), d, cfg.rms_norm_eps)?,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            attn: PagedAttention::new(cfg, layer),
        })
    }

    /// RMSNorm of every head of `x: [n, heads * head_dim]` on its own.
    fn norm_heads(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        norm.forward(&x.reshape((n * width / self.head_dim, self.head_dim))?)?
            .reshape((n, width))
            .map_err(Into::into)
    }

    fn forward(&self, x: &Tensor, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor> {
        let q = self.norm_heads(&self.q_norm, &self.q_proj.forward(x)?)?;
        let k = self.norm_heads(&self.k_norm, &self.k_proj.forward(x)?)?;
        let q = ctx.rope.apply(&q, self.n_heads)?;
        let k = ctx.rope.apply(&k, self.n_kv_heads)?;
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

/// A Qwen3-family model.
pub struct Qwen3(Backbone<DecoderLayer>);

impl Qwen3 {
    pub(crate) fn load(cfg: &ModelConfig, src: &mut WeightSource) -> Result<Self> {
        Ok(Self(Backbone::load(cfg, src, DecoderLayer::new)?))
    }
}

impl CausalLM for Qwen3 {
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
