//! Attention over the paged KV cache.
//!
//! - This module: [`PagedAttention`], one layer's attention over a flat batch, and the
//!   per-forward [`AttnMetadata`] it reads (cache rows to write and to read, causal masks);
//!   which back end runs is decided once per forward from the cache's device and dtype.
//! - [`cpu`]: the CPU loops that read K/V rows straight out of the cache pool.
//! - [`blocked`]: the CUDA kernel's blocking, modelled on the CPU (what CI tests).
//! - `cuda`: the CUDA kernel (`kernels/paged_attention.cu`) behind a candle op.
//!
//! The back ends: CPU caches in f32 run [`paged_attention_cpu`]; CUDA caches of a shape the
//! kernel handles run it; anything else (bf16 on the CPU, Metal, ...) runs candle ops over
//! K/V gathered from the cache.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::batch::BatchInput;
use super::config::ModelConfig;
use super::kv_cache::{row_index, KvCache};

pub mod blocked;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::{cpu_f32_slice, paged_attention_cpu, AttnDims, SeqRows};

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

/// What attention needs about a batch, computed once per forward for all layers.
pub struct AttnMetadata {
    /// `[n_tokens, kv_width]` cache rows to write each new token's K/V to.
    write_rows: Tensor,
    /// Cache rows of every sequence's whole context, sequences one after another (a
    /// sequence's are `context_rows[kv_off..kv_off + kv_len]`).
    context_rows: Vec<u32>,
    /// `context_rows` as a tensor for the candle-op attention path; `None` when attention runs
    /// the CPU kernel, which reads the pool through `context_rows` in place.
    gather_rows: Option<Tensor>,
    seqs: Vec<SeqSpan>,
    /// The CUDA attention kernel's index (on CUDA caches whose shape it handles).
    #[cfg(feature = "cuda")]
    kernel_index: Option<cuda::DeviceIndex>,
}

impl AttnMetadata {
    /// Resolves every sequence's block table into cache rows and picks the back end for
    /// `cache` and `heads` query heads.
    ///
    /// Errors: a sequence without new tokens, a block table too short for its tokens (not
    /// reserved), a block outside the cache.
    pub fn new(batch: &BatchInput, cache: &KvCache, heads: usize, device: &Device) -> Result<Self> {
        let bs = cache.block_size();
        let cuda_kernel = uses_cuda_attention_kernel(cache, heads);
        let candle_path = !uses_cpu_attention_kernel(cache) && !cuda_kernel;
        let mut write_rows = Vec::with_capacity(batch.tokens.len());
        let mut gather_rows = Vec::new();
        let mut seqs = Vec::with_capacity(batch.seqs.len());
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
            tok_off += s.len;
            kv_off += kv_len;
        }
        #[cfg(feature = "cuda")]
        let kernel_index = cuda_kernel
            .then(|| {
                cuda::DeviceIndex::new(
                    &gather_rows,
                    seqs.iter().map(|s| (s.len, s.kv_off, s.kv_len)),
                    device,
                )
            })
            .transpose()?;
        Ok(Self {
            #[cfg(feature = "cuda")]
            kernel_index,
            write_rows: row_index(&write_rows, cache.row_width(), device)?,
            gather_rows: candle_path
                .then(|| Tensor::new(gather_rows.as_slice(), device))
                .transpose()?,
            context_rows: gather_rows,
            seqs,
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
        && blocked::kernel_supports(heads, cache.n_kv_heads(), cache.head_dim())
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
        meta: &AttnMetadata,
        cache: &KvCache,
    ) -> Result<Tensor> {
        cache.write(self.layer, &meta.write_rows, k, v)?;
        #[cfg(feature = "cuda")]
        if let Some(ix) = &meta.kernel_index {
            let (k_pool, v_pool) = cache.pools(self.layer);
            let y = ix.attend(q, k_pool, v_pool, self.n_heads, self.n_kv_heads, self.head_dim)?;
            return Ok(y.to_dtype(k.dtype())?);
        }
        let Some(gather_rows) = &meta.gather_rows else {
            return self.forward_cpu_kernel(q, k.dtype(), meta, cache);
        };
        let (k_all, v_all) = cache.gather(self.layer, gather_rows)?;
        // Scores and softmax in f32 whatever the cache or activation dtype.
        let k_all = k_all.to_dtype(DType::F32)?;
        let v_all = v_all.to_dtype(DType::F32)?;
        let q = q.to_dtype(DType::F32)?;
        let (hk, d) = (self.n_kv_heads, self.head_dim);
        let group = self.n_heads / hk;
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(meta.seqs.len());
        for s in &meta.seqs {
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
        meta: &AttnMetadata,
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
        let seqs: Vec<SeqRows> = meta
            .seqs
            .iter()
            .map(|s| SeqRows {
                tok_off: s.tok_off,
                len: s.len,
                rows: &meta.context_rows[s.kv_off..s.kv_off + s.kv_len],
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
