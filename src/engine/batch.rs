//! The flat batch a forward runs over ([`BatchInput`]: the new tokens of every sequence
//! concatenated, no padding) and what the layers need about it, computed once per forward
//! ([`BatchCtx`]).

use anyhow::{ensure, Result};
use candle_core::{DType, Device};

use super::attention::AttnMetadata;
use super::kv_cache::KvCache;
use super::layers::{RopeTables, RotaryEmbedding};

/// One sequence's part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqInput {
    /// Tokens of this sequence already in the cache (the position of its first new token).
    pub start_pos: usize,
    /// New tokens of this sequence in this step.
    pub len: usize,
    /// The sequence's `BlockTable::blocks()`, already reserved for `start_pos + len` tokens.
    pub block_table: Vec<u32>,
    /// Return the logits of this sequence's last new token.
    pub want_logits: bool,
}

/// A flat batch: the new tokens of all sequences concatenated in `seqs` order, no padding.
/// Prefill chunks and single decode tokens can be mixed freely.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqInput>,
}

/// What every layer needs about a batch, computed once per forward.
pub(crate) struct BatchCtx {
    /// cos/sin of every new token's position.
    pub(crate) rope: RopeTables,
    /// Cache rows and masks for attention.
    pub(crate) attn: AttnMetadata,
    /// Batch rows whose logits are wanted (the last new token of each sequence that wants
    /// them), in `seqs` order.
    pub(crate) logit_rows: Vec<u32>,
}

impl BatchCtx {
    /// Errors: token count disagreeing with the sequences' lengths, and the per-sequence
    /// errors of [`AttnMetadata::new`].
    pub(crate) fn new(
        batch: &BatchInput,
        cache: &KvCache,
        rope: &RotaryEmbedding,
        dtype: DType,
        device: &Device,
        heads: usize,
    ) -> Result<Self> {
        let total: usize = batch.seqs.iter().map(|s| s.len).sum();
        ensure!(
            total == batch.tokens.len(),
            "batch has {} tokens but its sequences add up to {total}",
            batch.tokens.len()
        );
        let attn = AttnMetadata::new(batch, cache, heads, device)?;
        let mut positions = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        let mut tok_off = 0;
        for s in &batch.seqs {
            positions.extend((s.start_pos..s.start_pos + s.len).map(|p| p as u32));
            if s.want_logits {
                logit_rows.push((tok_off + s.len - 1) as u32);
            }
            tok_off += s.len;
        }
        Ok(Self {
            rope: rope.tables(&positions, dtype, device)?,
            attn,
            logit_rows,
        })
    }
}
