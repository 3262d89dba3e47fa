//! The decoder every architecture runs: token embedding, `num_layers` pre-norm decoder
//! layers, final RMSNorm and output head.
//!
//! One layer:
//!
//! ```text
//! x = x + o_proj(attention(rope(qk_norm(q_proj(h))), rope(qk_norm(k_proj(h))), v_proj(h)))
//!     where h = input_layernorm(x)
//! x = x + down(silu(gate(h)) * up(h))     where h = post_attention_layernorm(x)
//! ```
//!
//! with grouped-query attention over the paged KV cache. What differs between
//! architectures is an [`ArchSpec`](super::ArchSpec) (biases, the per-head q/k norm, the
//! GGUF rotary layout) and the [`ModelConfig`] (sizes, RoPE base and scaling, tied
//! embeddings); compare transformers' `modeling_llama.py`, `modeling_qwen2.py` and
//! `modeling_qwen3.py`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::CausalLM;
use crate::engine::attention::PagedAttention;
use crate::engine::batch::{BatchCtx, BatchInput};
use crate::engine::config::ModelConfig;
use crate::engine::kv_cache::KvCache;
use crate::engine::layers::{Linear, RmsNorm, RotaryEmbedding, SwiGluMlp};
use crate::engine::weights::{WeightSource, W};

/// Per-head RMSNorm of queries and keys before RoPE (Qwen3's `q_norm` / `k_norm`).
struct QkNorm {
    q: RmsNorm,
    k: RmsNorm,
}

/// Self-attention of one layer: projections, optional q/k norm, RoPE, paged attention.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    qk_norm: Option<QkNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    attn: PagedAttention,
}

impl Attention {
    fn load(cfg: &ModelConfig, src: &mut WeightSource, layer: usize) -> Result<Self> {
        let (h, d, spec) = (cfg.hidden_size, cfg.head_dim, cfg.arch.spec());
        let (qkv_bias, o_bias) = spec.biases.qkv_and_o(cfg.attention_bias);
        let q_proj = src.linear(W::Q(layer), h, cfg.num_heads * d, qkv_bias)?;
        let k_proj = src.linear(W::K(layer), h, cfg.num_kv_heads * d, qkv_bias)?;
        let v_proj = src.linear(W::V(layer), h, cfg.num_kv_heads * d, qkv_bias)?;
        let o_proj = src.linear(W::O(layer), cfg.num_heads * d, h, o_bias)?;
        let qk_norm = if spec.qk_norm {
            Some(QkNorm {
                q: src.norm(W::QNorm(layer), d, cfg.rms_norm_eps)?,
                k: src.norm(W::KNorm(layer), d, cfg.rms_norm_eps)?,
            })
        } else {
            None
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qk_norm,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            attn: PagedAttention::new(cfg, layer),
        })
    }

    /// `x: [n_tokens, hidden]` (normed) -> `[n_tokens, hidden]`.
    fn forward(&self, x: &Tensor, ctx: &BatchCtx, cache: &KvCache) -> Result<Tensor> {
        let (q_norm, k_norm) = match &self.qk_norm {
            Some(n) => (Some(&n.q), Some(&n.k)),
            None => (None, None),
        };
        let q = self.rotated_heads(x, &self.q_proj, q_norm, self.n_heads, ctx)?;
        let k = self.rotated_heads(x, &self.k_proj, k_norm, self.n_kv_heads, ctx)?;
        let v = self.v_proj.forward(x)?;
        let y = self.attn.forward(&q, &k, &v, &ctx.attn, cache)?;
        self.o_proj.forward(&y)
    }

    /// `proj(x)`, each of its `heads` heads RMS-normed by `norm` if given, then rotated by
    /// each token's position.
    fn rotated_heads(
        &self,
        x: &Tensor,
        proj: &Linear,
        norm: Option<&RmsNorm>,
        heads: usize,
        ctx: &BatchCtx,
    ) -> Result<Tensor> {
        let y = proj.forward(x)?;
        let y = match norm {
            Some(norm) => norm.forward_heads(&y, self.head_dim)?,
            None => y,
        };
        ctx.rope.apply(&y, heads)
    }
}

/// One pre-norm decoder layer: attention and MLP, each with its RMSNorm and residual.
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGluMlp,
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, src: &mut WeightSource, layer: usize) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: src.norm(W::AttnNorm(layer), h, eps)?,
            self_attn: Attention::load(cfg, src, layer)?,
            post_attention_layernorm: src.norm(W::FfnNorm(layer), h, eps)?,
            mlp: SwiGluMlp::new(
                src.linear(W::Gate(layer), h, i, false)?,
                src.linear(W::Up(layer), h, i, false)?,
                src.linear(W::Down(layer), i, h, false)?,
            ),
        })
    }

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

/// A decoder-only language model of any supported architecture.
pub struct Decoder {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
}

impl Decoder {
    /// Loads the weights of `cfg`'s architecture from `src`.
    pub(crate) fn load(cfg: &ModelConfig, src: &mut WeightSource) -> Result<Self> {
        let embed = src.embedding(cfg)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(cfg, src, i).with_context(|| format!("loading layer {i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = src.norm(W::FinalNorm, cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = src.lm_head(cfg, &embed)?;
        let freq_factors = src.rope_freq_factors()?;
        let rope = RotaryEmbedding::new(
            cfg,
            src.rope_layout(cfg.arch.spec().gguf_rope_layout),
            freq_factors.as_deref(),
        )?;
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

    /// The `[0, vocab]` result of a batch that wants no logits.
    fn no_logits(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (0, self.cfg.vocab_size),
            DType::F32,
            &self.device,
        )?)
    }

    fn layers_and_head(
        &self,
        batch: &BatchInput,
        ctx: &BatchCtx,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for layer in &self.layers {
            x = layer.forward(&x, ctx, cache)?;
        }
        if ctx.logit_rows.is_empty() {
            return self.no_logits();
        }
        // Only the rows whose logits are wanted go through the (large) output head.
        let rows = Tensor::new(ctx.logit_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

impl CausalLM for Decoder {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> Result<Tensor> {
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
        let ctx = BatchCtx::new(
            batch,
            cache,
            &self.rope,
            self.dtype,
            &self.device,
            self.cfg.num_heads,
        )?;
        if batch.tokens.is_empty() {
            return self.no_logits();
        }
        let cache = &*cache;
        let run = || self.layers_and_head(batch, &ctx, cache);
        if self.device.is_cpu() {
            on_a_worker(run)
        } else {
            run()
        }
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
