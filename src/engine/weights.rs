//! Weights by role ([`W`]) and where they come from ([`WeightSource`]): HF safetensors through
//! a candle `VarBuilder`, or a llama.cpp GGUF file, quantized weights kept quantized.
//!
//! The tensor names are those of transformers' Llama-style models (`model.layers.{i}.…`) and
//! of llama.cpp's GGUF converter (`blk.{i}.…`, see its `gguf-py/gguf/tensor_mapping.py`);
//! Llama, Qwen2 and Qwen3 all use them.

use std::io::{Read, Seek};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::layers::{Linear, RmsNorm, RopeLayout};

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
    /// The weight's name in both schemes, side by side: (its layer, the HF safetensors
    /// name, the llama.cpp GGUF name), each to be completed with `.weight` / `.bias`; layer
    /// weights are prefixed `model.layers.{i}.` (HF) and `blk.{i}.` (GGUF).
    fn names(self) -> (Option<usize>, &'static str, &'static str) {
        match self {
            W::Embed => (None, "model.embed_tokens", "token_embd"),
            W::FinalNorm => (None, "model.norm", "output_norm"),
            W::LmHead => (None, "lm_head", "output"),
            W::AttnNorm(i) => (Some(i), "input_layernorm", "attn_norm"),
            W::FfnNorm(i) => (Some(i), "post_attention_layernorm", "ffn_norm"),
            W::Q(i) => (Some(i), "self_attn.q_proj", "attn_q"),
            W::K(i) => (Some(i), "self_attn.k_proj", "attn_k"),
            W::V(i) => (Some(i), "self_attn.v_proj", "attn_v"),
            W::O(i) => (Some(i), "self_attn.o_proj", "attn_output"),
            W::QNorm(i) => (Some(i), "self_attn.q_norm", "attn_q_norm"),
            W::KNorm(i) => (Some(i), "self_attn.k_norm", "attn_k_norm"),
            W::Gate(i) => (Some(i), "mlp.gate_proj", "ffn_gate"),
            W::Up(i) => (Some(i), "mlp.up_proj", "ffn_up"),
            W::Down(i) => (Some(i), "mlp.down_proj", "ffn_down"),
        }
    }

    /// HF safetensors prefix (append `.weight` / `.bias`).
    fn hf(self) -> String {
        match self.names() {
            (Some(i), name, _) => format!("model.layers.{i}.{name}"),
            (None, name, _) => name.into(),
        }
    }

    /// llama.cpp GGUF prefix (append `.weight` / `.bias`).
    fn gguf(self) -> String {
        match self.names() {
            (Some(i), _, name) => format!("blk.{i}.{name}"),
            (None, _, name) => name.into(),
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
        embed_q: Option<Arc<QTensor>>,
    },
}

impl WeightSource<'_> {
    /// Activation dtype of the model built from these weights.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            WeightSource::Hf(vb) => vb.dtype(),
            // Quantized matmuls take and return f32.
            WeightSource::Gguf { .. } => DType::F32,
        }
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            WeightSource::Hf(vb) => vb.device().clone(),
            WeightSource::Gguf { device, .. } => device.clone(),
        }
    }

    /// The rotary layout of these weights: HF checkpoints are half-split; GGUF files have
    /// their architecture's `gguf_layout` (see [`RopeLayout`]).
    pub(crate) fn rope_layout(&self, gguf_layout: RopeLayout) -> RopeLayout {
        match self {
            WeightSource::Hf(_) => RopeLayout::HalfSplit,
            WeightSource::Gguf { .. } => gguf_layout,
        }
    }

    fn gguf_qtensor(&mut self, name: &str) -> Result<Option<QTensor>> {
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
                Linear::from_qtensor(Arc::new(q), &device, b)
            }
        }
    }

    pub(crate) fn norm(&mut self, w: W, size: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(w, "weight", &[size])?, eps))
    }

    /// The token embedding table, dense (quantized GGUF tables are dequantized).
    pub(crate) fn embedding(&mut self, cfg: &ModelConfig) -> Result<Tensor> {
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
                *embed_q = Some(Arc::new(q));
            }
            return Ok(t);
        }
        self.dense(W::Embed, "weight", &shape)
    }

    /// The output head; tied heads reuse the embedding (for GGUF, in its stored quantization,
    /// as llama.cpp does).
    pub(crate) fn lm_head(&mut self, cfg: &ModelConfig, embed: &Tensor) -> Result<Linear> {
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
    pub(crate) fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>> {
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
