//! The building blocks of the decoder: projections ([`Linear`], dense or quantized),
//! [`RmsNorm`], the SwiGLU MLP and rotary position embeddings (RoPE).
//!
//! Everything here works on a flat batch, `[n_tokens, features]`, with no sequence
//! dimension: rows are tokens of any sequence, so one matmul serves the whole batch.

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::config::ModelConfig;
use super::quant::{Q4_1Matrix, Q8_0Matrix};

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
    Q4_1(Arc<Q4_1Matrix>),
    /// GGUF Q8_0 weight on the CPU (typically the tied output head), through our batched
    /// kernel: candle's runs its dot once per row of a batch.
    Q8_0(Arc<Q8_0Matrix>),
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
        weight: Arc<QTensor>,
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
                let weight = LinearWeight::Q4_1(Arc::new(m));
                return Ok(Self { weight, bias });
            }
            if let Some(m) = Q8_0Matrix::from_qtensor(&weight)? {
                let weight = LinearWeight::Q8_0(Arc::new(m));
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

    /// RMSNorm of every head of `x: [n, heads * head_dim]` on its own (the weight is
    /// `[head_dim]`), as Qwen3's q/k norms.
    pub fn forward_heads(&self, x: &Tensor, head_dim: usize) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        self.forward(&x.reshape((n * width / head_dim, head_dim))?)?
            .reshape((n, width))
            .map_err(Into::into)
    }
}

/// The gated MLP of Llama-style decoders: `down(silu(gate(x)) * up(x))` (Shazeer 2020,
/// "GLU Variants Improve Transformer").
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGluMlp {
    /// `gate`, `up`: `[hidden] -> [intermediate]`; `down`: `[intermediate] -> [hidden]`.
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        Self { gate, up, down }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// Which dimensions of a head rotate together under RoPE.
///
/// HF checkpoints (and llama.cpp's Qwen GGUFs) pair `i` with `i + d/2`; llama.cpp's converter
/// permutes the Q/K rows of Llama GGUFs so that pairs become adjacent `(2i, 2i + 1)`, which is
/// what candle's `rope_i` rotates. Using the layout the weights were stored for keeps them
/// as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(i, i + d/2)`: candle's `rope` (GPT-NeoX style).
    HalfSplit,
    /// `(2i, 2i + 1)`: candle's `rope_i` (the original RoFormer / GPT-J pairing).
    Interleaved,
}

/// Rotary position embedding frequencies and layout (Su et al. 2021, "RoFormer").
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    layout: RopeLayout,
}

impl RotaryEmbedding {
    /// `freq_factors`: per-frequency divisors stored by llama.cpp as `rope_freqs.weight`
    /// (how it encodes Llama 3 scaling); when given, `cfg.rope_scaling` is not applied again.
    pub fn new(
        cfg: &ModelConfig,
        layout: RopeLayout,
        freq_factors: Option<&[f32]>,
    ) -> Result<Self> {
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
            layout,
        })
    }

    /// cos/sin for the given token positions, shaped `[n, 1, d/2]`: each token acts as its own
    /// batch entry of candle's rope kernels, which is how per-token positions get in.
    pub fn tables(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<RopeTables> {
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
            layout: self.layout,
        })
    }
}

/// Per-forward rotary tables for the batch's tokens.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    layout: RopeLayout,
}

impl RopeTables {
    /// Rotates `x: [n_tokens, heads * head_dim]` by each token's position.
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (n, width) = x.dims2()?;
        let x4 = x.reshape((n, heads, 1, width / heads))?.contiguous()?;
        let y = match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &self.cos, &self.sin)?,
            RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&x4, &self.cos, &self.sin)?,
        };
        Ok(y.reshape((n, width))?)
    }
}
