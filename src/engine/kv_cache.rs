//! Paged KV cache: fixed-size blocks of key/value rows shared by many sequences.
//!
//! Each layer owns one preallocated K pool and one V pool of `num_blocks * block_size` rows
//! (a row is one token: `n_kv_heads * head_dim` values). A sequence addresses its tokens through
//! a [`BlockTable`]: token `p` lives in row `blocks[p / block_size] * block_size + p % block_size`.
//! Blocks are reference counted so that the k samples of one query can share the prompt's
//! prefill ([`BlockTable::fork`]); the first write into a shared, partly filled block copies it
//! (copy-on-write) so the other owners keep seeing their own tokens.
//!
//! Copy-on-write copies are queued by [`BlockTable::reserve`] and carried out by
//! [`KvCache::apply_pending_copies`], which every model forward calls before it writes. Queuing
//! keeps `reserve` free of device work (it only fails when blocks run out) and lets one forward
//! do all copies of a scheduling step as a single gather/scatter per layer.
//!
//! **Prefix caching.** A full block is content-addressed: its [`BlockHash`] chains the hash of
//! the block before it with its own tokens, so equal hashes mean equal tokens at equal
//! positions, hence equal keys and values. [`BlockTable::commit_full_blocks`] registers every
//! block a sequence has filled; [`BlockTable::adopt_cached_prefix`] lets a new sequence start
//! from the registered blocks of its prefix instead of computing them (vLLM's automatic prefix
//! caching, the same idea as SGLang's radix tree). A registered block whose last owner released
//! it is not freed but kept, evictable: it is handed out again, least recently used first, only
//! when no free block is left. Registered blocks are always full, and sequences only write past
//! their last full block, so a cached block is never written. An address names tokens, not
//! weights: a cache serves one model ([`KvCache::clear_prefix_cache`] if its weights change).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;

/// The paged K/V storage of one model, plus the block allocator.
pub struct KvCache {
    /// Per layer: `[num_blocks * block_size, n_kv_heads * head_dim]`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// Free block ids; popped from the end, so low ids are handed out first.
    free: Vec<u32>,
    /// Owners of each block (block tables holding it); 0 means free.
    refcount: Vec<u32>,
    /// Queued copy-on-write copies `(src, dst)`. Sources always name pre-flush contents
    /// (see [`KvCache::queue_copy`]), so all of them can run as one gather then one scatter.
    pending: Vec<(u32, u32)>,
    /// The content-addressed blocks; None when prefix caching is off.
    prefix: Option<PrefixIndex>,
}

/// Content address of a full KV block: a 128-bit hash of the previous block's address and this
/// block's token ids ([`block_hash`]).
pub type BlockHash = u128;

/// The address of the block holding `tokens` (one block's worth) after the block `parent`
/// (None: the first block of a sequence). Two passes of std's `DefaultHasher` (fixed keys)
/// after distinct domain bytes give 128 bits; stable within a process, which is all the cache
/// needs.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let half = |domain: u8| {
        let mut h = std::hash::DefaultHasher::new();
        domain.hash(&mut h);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish() as u128
    };
    (half(1) << 64) | half(2)
}

/// The chained addresses of every full block of `tokens` (a partial last block has none).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
    for chunk in tokens.chunks_exact(block_size) {
        out.push(block_hash(out.last().copied(), chunk));
    }
    out
}

/// What a registered block holds, checked on every hit so that a hash collision can never hand
/// out the wrong keys and values.
#[derive(Debug)]
struct BlockKey {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

/// The prefix cache's index over the pool.
#[derive(Debug, Default)]
struct PrefixIndex {
    by_hash: HashMap<BlockHash, u32>,
    /// Per block: its content when registered.
    key: Vec<Option<BlockKey>>,
    /// Registered blocks no table holds, by the tick they were released at (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Per idle block: its key in `idle`.
    idle_tick: Vec<u64>,
    tick: u64,
    evictions: u64,
}

impl PrefixIndex {
    fn new(num_blocks: usize) -> Self {
        PrefixIndex { key: (0..num_blocks).map(|_| None).collect(), idle_tick: vec![0; num_blocks], ..Default::default() }
    }

    /// The registered block with this address, if its content is the one asked for.
    fn find(&self, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) -> Option<u32> {
        let &b = self.by_hash.get(&hash)?;
        let key = self.key[b as usize].as_ref().expect("indexed blocks have keys");
        (key.parent == parent && *key.tokens == *tokens).then_some(b)
    }
}

/// The cached part of a prefix ([`KvCache::cached_prefix`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    /// Leading full blocks found.
    pub blocks: usize,
    /// Of those, blocks no sequence holds: taking them lowers [`KvCache::free_blocks`].
    pub idle: usize,
}

/// Prefix-cache counters of a [`KvCache`] since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Blocks registered now (held by a sequence or idle).
    pub cached_blocks: usize,
    /// Of those, blocks no sequence holds (evictable).
    pub idle_blocks: usize,
    /// Idle blocks handed out again for other contents.
    pub evictions: u64,
}

/// Not enough free blocks for a [`BlockTable::reserve`]; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    /// Fresh blocks the reservation needed.
    pub needed: usize,
    /// Free blocks there were.
    pub free: usize,
}

impl fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KV cache out of blocks: needed {} free blocks, {} available; finish or release some \
             sequences before scheduling more tokens, or give the KV cache more memory",
            self.needed, self.free
        )
    }
}

impl std::error::Error for OutOfBlocks {}

impl KvCache {
    /// Allocates the pools: `num_blocks` blocks of `block_size` tokens for every layer.
    pub fn new(
        cfg: &ModelConfig,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            block_size > 0,
            "KV cache block_size must be at least 1 token"
        );
        ensure!(
            num_blocks > 0,
            "KV cache needs at least one block; give it more memory (one block of {block_size} \
             tokens takes {} bytes)",
            Self::block_bytes(cfg, block_size, dtype)
        );
        // Cache rows are addressed with u32 indices (candle's index ops take u32).
        let rows = num_blocks
            .checked_mul(block_size)
            .filter(|&r| r <= u32::MAX as usize)
            .with_context(|| {
                format!(
                    "a KV cache of {num_blocks} blocks x {block_size} tokens exceeds the 2^32                      addressable token rows; lower the KV cache memory budget"
                )
            })?;
        let width = cfg.num_kv_heads * cfg.head_dim;
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let alloc = || {
                Tensor::zeros((rows, width), dtype, device).with_context(|| {
                    format!(
                        "allocating the KV cache pool of layer {layer} ({rows} x {width} {dtype:?}); \
                         lower the KV cache memory budget"
                    )
                })
            };
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(Self {
            k,
            v,
            block_size,
            num_blocks,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
            device: device.clone(),
            free: (0..num_blocks as u32).rev().collect(),
            refcount: vec![0; num_blocks],
            pending: Vec::new(),
            prefix: Some(PrefixIndex::new(num_blocks)),
        })
    }

    /// Turns prefix caching on (the default) or off. Turning it off forgets every cached
    /// block (idle ones become free); sequences keep what they hold.
    pub fn set_prefix_caching(&mut self, on: bool) {
        match (on, self.prefix.is_some()) {
            (true, false) => self.prefix = Some(PrefixIndex::new(self.num_blocks)),
            (false, true) => {
                let index = self.prefix.take().expect("checked");
                self.free.extend(index.idle.into_values());
            }
            _ => {}
        }
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    /// Forgets every cached block (for a cache whose model's weights changed).
    pub fn clear_prefix_cache(&mut self) {
        if self.prefix.is_some() {
            self.set_prefix_caching(false);
            self.set_prefix_caching(true);
        }
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix.as_ref().map_or_else(Default::default, |p| PrefixCacheStats { cached_blocks: p.by_hash.len(), idle_blocks: p.idle.len(), evictions: p.evictions })
    }

    /// The leading blocks of `hashes` (the [`block_hashes`] of `tokens`) the cache holds, at
    /// most `max_blocks` of them.
    pub fn cached_prefix(&self, hashes: &[BlockHash], tokens: &[u32], max_blocks: usize) -> CachedPrefix {
        let mut hit = CachedPrefix::default();
        for b in self.cached_run(hashes, tokens, 0..max_blocks.min(hashes.len())) {
            hit.blocks += 1;
            hit.idle += usize::from(self.refcount[b as usize] == 0);
        }
        hit
    }

    /// The cached blocks holding blocks `range` of `hashes` (the [`block_hashes`] of
    /// `tokens`), in order, up to the first one the cache has not got; none while prefix
    /// caching is off.
    fn cached_run<'a>(&'a self, hashes: &'a [BlockHash], tokens: &'a [u32], range: std::ops::Range<usize>) -> impl Iterator<Item = u32> + 'a {
        let bs = self.block_size;
        range.map_while(move |i| self.prefix.as_ref()?.find(hashes[i], i.checked_sub(1).map(|p| hashes[p]), &tokens[i * bs..(i + 1) * bs]))
    }

    /// Bytes one block takes over all layers, K and V together.
    pub fn block_bytes(cfg: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    /// How many blocks fit in `bytes`, so callers can size the pool from a memory budget.
    pub fn blocks_for_bytes(
        cfg: &ModelConfig,
        block_size: usize,
        bytes: usize,
        dtype: DType,
    ) -> usize {
        bytes
            .checked_div(Self::block_bytes(cfg, block_size, dtype))
            .unwrap_or(0)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks a reservation can take: free ones and idle cached ones (which are evicted).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, |p| p.idle.len())
    }

    pub fn num_layers(&self) -> usize {
        self.k.len()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Values per cached token row (`n_kv_heads * head_dim`).
    pub(crate) fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub(crate) fn row_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Whether this cache was built for a model with these K/V dimensions.
    pub(crate) fn check_compatible(&self, cfg: &ModelConfig) -> Result<()> {
        if self.k.len() != cfg.num_layers
            || self.n_kv_heads != cfg.num_kv_heads
            || self.head_dim != cfg.head_dim
        {
            bail!(
                "KV cache shape ({} layers, {} kv heads, head_dim {}) does not match the model \
                 ({} layers, {} kv heads, head_dim {}); build the cache from this model's config",
                self.k.len(),
                self.n_kv_heads,
                self.head_dim,
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim
            )
        }
        Ok(())
    }

    /// Reference count of a block (number of block tables holding it).
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// A block for new contents: a free one, else the least recently used idle cached one.
    fn alloc(&mut self) -> u32 {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let index = self.prefix.as_mut().expect("caller checked the free count");
                let (_, b) = index.idle.pop_first().expect("caller checked the free count");
                let key = index.key[b as usize].take().expect("idle blocks are registered");
                index.by_hash.remove(&key.hash);
                index.evictions += 1;
                b
            }
        };
        debug_assert_eq!(self.refcount[b as usize], 0);
        self.refcount[b as usize] = 1;
        b
    }

    fn incref(&mut self, block: u32) {
        if self.refcount[block as usize] == 0 {
            // Only an idle cached block is taken from nobody: it is in use again.
            let index = self.prefix.as_mut().expect("a block with no owner is handed out only from the prefix cache");
            index.idle.remove(&index.idle_tick[block as usize]);
        }
        self.refcount[block as usize] += 1;
    }

    fn decref(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(
            *rc > 0,
            "KV cache block {block} released more often than it was taken"
        );
        *rc -= 1;
        if *rc == 0 {
            match self.prefix.as_mut().filter(|p| p.key[block as usize].is_some()) {
                Some(index) => {
                    index.tick += 1;
                    index.idle_tick[block as usize] = index.tick;
                    index.idle.insert(index.tick, block);
                }
                None => self.free.push(block),
            }
        }
    }

    /// Registers the full block `block` as holding `tokens` after `parent`, unless that
    /// content is cached already (in another block, which then stays the one found).
    fn register(&mut self, block: u32, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) {
        let Some(index) = self.prefix.as_mut() else { return };
        if index.key[block as usize].is_some() || index.by_hash.contains_key(&hash) {
            return;
        }
        index.by_hash.insert(hash, block);
        index.key[block as usize] = Some(BlockKey { hash, parent, tokens: tokens.into() });
    }

    /// Queues "copy block `src` into block `dst`" for the next [`Self::apply_pending_copies`].
    fn queue_copy(&mut self, src: u32, dst: u32) {
        // If `src` is itself still waiting to be filled, copy from its own source instead: every
        // queued source then refers to contents as they are before the flush, so the flush may
        // read all sources before writing any destination.
        let src = self
            .pending
            .iter()
            .rev()
            .find(|&&(_, d)| d == src)
            .map_or(src, |&(s, _)| s);
        // A queued copy into `dst` is stale: `dst` was freed and handed out again since.
        self.pending.retain(|&(_, d)| d != dst);
        self.pending.push((src, dst));
    }

    /// Number of queued copy-on-write block copies.
    pub fn pending_copies(&self) -> usize {
        self.pending.len()
    }

    /// Carries out the queued copy-on-write copies (one gather and one scatter per layer and
    /// K/V). Model forwards call this before writing; call it yourself before reading the cache
    /// any other way.
    pub fn apply_pending_copies(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let width = self.row_width();
        let mut src_rows = Vec::with_capacity(self.pending.len() * bs);
        let mut dst_rows = Vec::with_capacity(self.pending.len() * bs);
        for &(s, d) in &self.pending {
            src_rows.extend((0..bs).map(|i| s * bs as u32 + i as u32));
            dst_rows.extend((0..bs).map(|i| d * bs as u32 + i as u32));
        }
        let src = Tensor::from_vec(src_rows, self.pending.len() * bs, &self.device)?;
        let dst = row_index(&dst_rows, width, &self.device)?;
        for pool in self.k.iter().chain(self.v.iter()) {
            let rows = pool.index_select(&src, 0)?;
            pool.scatter_set(&dst, &rows, 0)?;
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes token rows `k`, `v` (`[n, n_kv_heads * head_dim]`) of `layer` at the cache rows
    /// named by `rows`, a `[n, width]` u32 index from [`row_index`].
    pub(crate) fn write(&self, layer: usize, rows: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let k = k.to_dtype(self.dtype)?.contiguous()?;
        let v = v.to_dtype(self.dtype)?.contiguous()?;
        self.k[layer].scatter_set(rows, &k, 0)?;
        self.v[layer].scatter_set(rows, &v, 0)?;
        Ok(())
    }

    /// The K and V pools of `layer`, `[num_blocks * block_size, n_kv_heads * head_dim]` each,
    /// for kernels that read cache rows in place instead of gathering them.
    pub(crate) fn pools(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Reads the cache rows listed in `rows` (a `[m]` u32 tensor) of `layer`: `([m, width], [m, width])`.
    pub(crate) fn gather(&self, layer: usize, rows: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k[layer].index_select(rows, 0)?,
            self.v[layer].index_select(rows, 0)?,
        ))
    }
}

/// Expands cache row ids into the `[n, width]` index that `Tensor::scatter_set` wants (it needs
/// one index per written element).
pub(crate) fn row_index(rows: &[u32], width: usize, device: &Device) -> Result<Tensor> {
    let mut idx = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        idx.extend(std::iter::repeat_n(r, width));
    }
    Ok(Tensor::from_vec(idx, (rows.len(), width), device)?)
}

/// The blocks holding one sequence's cached tokens, in order.
///
/// A table owns one reference on each of its blocks: call [`BlockTable::release`] when the
/// sequence is done, or the blocks stay taken.
///
/// Deliberately not `Clone`: a copy would own the blocks without holding references on them.
/// Use [`BlockTable::fork`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// Addresses of the leading full blocks committed so far (see
    /// [`BlockTable::commit_full_blocks`]); empty while prefix caching is off.
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens already written to the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Block ids, covering at least `len()` tokens (more after a `reserve`).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Cache row of token position `pos` (which must be covered by the blocks).
    pub fn row(&self, pos: usize, block_size: usize) -> u32 {
        self.blocks[pos / block_size] * block_size as u32 + (pos % block_size) as u32
    }

    /// A new table sharing this one's written tokens (one more reference on each of their
    /// blocks). Blocks reserved beyond `len()` are not shared: the fork reserves its own.
    pub fn fork(&self, cache: &mut KvCache) -> BlockTable {
        let used = self.len.div_ceil(cache.block_size);
        let blocks = self.blocks[..used].to_vec();
        for &b in &blocks {
            cache.incref(b);
        }
        BlockTable {
            blocks,
            len: self.len,
            hashes: self.hashes.clone(),
        }
    }

    /// Starts an empty table on the cached blocks of its prefix: takes the leading blocks of
    /// `hashes` (the [`block_hashes`] of `tokens`) that the cache holds, at most `max_blocks`,
    /// as if their tokens had been written. The table must not have been written yet (or
    /// must end on a block boundary with nothing reserved past it). Returns the tokens
    /// taken.
    pub fn adopt_cached_prefix(&mut self, cache: &mut KvCache, hashes: &[BlockHash], tokens: &[u32], max_blocks: usize) -> usize {
        let bs = cache.block_size;
        let start = self.blocks.len();
        if self.len != start * bs || self.hashes.len() != start {
            return 0;
        }
        let found: Vec<u32> = cache.cached_run(hashes, tokens, start..max_blocks.min(hashes.len())).collect();
        for (i, &b) in (start..).zip(&found) {
            cache.incref(b);
            self.blocks.push(b);
            self.hashes.push(hashes[i]);
        }
        self.len += found.len() * bs;
        found.len() * bs
    }

    /// Registers the blocks this table has filled since the last call in the prefix cache.
    /// The sequence's tokens are `head` followed by `tail` (a prompt and its generated tokens),
    /// at least `len()` of them. Does nothing while prefix caching is off.
    pub fn commit_full_blocks(&mut self, cache: &mut KvCache, head: &[u32], tail: &[u32]) {
        if cache.prefix.is_none() {
            return;
        }
        let bs = cache.block_size;
        let full = self.len / bs;
        debug_assert!(head.len() + tail.len() >= self.len);
        let mut buf = Vec::with_capacity(bs);
        for i in self.hashes.len()..full {
            let (a, b) = (i * bs, (i + 1) * bs);
            buf.clear();
            buf.extend_from_slice(&head[a.min(head.len())..b.min(head.len())]);
            buf.extend_from_slice(&tail[a.saturating_sub(head.len())..b.saturating_sub(head.len())]);
            let parent = self.hashes.last().copied();
            let hash = block_hash(parent, &buf);
            cache.register(self.blocks[i], hash, parent, &buf);
            self.hashes.push(hash);
        }
    }

    /// Makes positions `len..len + new_tokens` writable: allocates missing blocks and replaces
    /// every shared block in that range by a private one (copying its written tokens, queued
    /// until the next forward). On error nothing has changed.
    pub fn reserve(&mut self, cache: &mut KvCache, new_tokens: usize) -> Result<(), OutOfBlocks> {
        if new_tokens == 0 {
            return Ok(());
        }
        let bs = cache.block_size;
        let end = self.len + new_tokens;
        let needed = end.div_ceil(bs);
        let first_written = self.len / bs;
        let shared: Vec<usize> = (first_written..self.blocks.len().min(needed))
            .filter(|&i| cache.refcount(self.blocks[i]) > 1)
            .collect();
        let fresh = needed.saturating_sub(self.blocks.len());
        let want = shared.len() + fresh;
        if want > cache.free_blocks() {
            return Err(OutOfBlocks {
                needed: want,
                free: cache.free_blocks(),
            });
        }
        for i in shared {
            let old = self.blocks[i];
            let new = cache.alloc();
            // Only a block that already holds some of our tokens needs its contents; one that
            // lies wholly past `len` is just swapped.
            if i * bs < self.len {
                cache.queue_copy(old, new);
            }
            cache.decref(old);
            self.blocks[i] = new;
        }
        for _ in 0..fresh {
            let b = cache.alloc();
            self.blocks.push(b);
        }
        Ok(())
    }

    /// Records that a forward wrote `n` more tokens. They must have been reserved: the table
    /// does not know the block size, so the model forward is what checks that the blocks cover
    /// `start_pos + len`.
    pub fn advance(&mut self, n: usize) {
        assert!(
            n == 0 || !self.blocks.is_empty(),
            "BlockTable::advance({n}) on a table without blocks; call reserve first"
        );
        self.len += n;
    }

    /// Gives back this table's references; blocks whose last owner this was become free, or
    /// idle when cached. The tail is released first, so among one sequence's idle blocks the
    /// later ones are evicted first (a prefix is worth more than its continuations).
    pub fn release(&mut self, cache: &mut KvCache) {
        for b in self.blocks.drain(..).rev() {
            cache.decref(b);
        }
        self.len = 0;
        self.hashes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{Architecture, ModelConfig};

    fn cfg() -> ModelConfig {
        ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            rope_scaling: None,
            attention_bias: false,
        }
    }

    fn cache(blocks: usize) -> KvCache {
        KvCache::new(&cfg(), 4, blocks, DType::F32, &Device::Cpu).unwrap()
    }

    /// Writes token `pos` of a table with K row = [pos + tag; width] and V = -(K).
    fn write_token(cache: &KvCache, t: &BlockTable, pos: usize, tag: f32) {
        let row = t.row(pos, cache.block_size());
        let w = cache.row_width();
        let idx = row_index(&[row], w, &Device::Cpu).unwrap();
        let k = Tensor::full(pos as f32 + tag, (1, w), &Device::Cpu).unwrap();
        for layer in 0..cache.num_layers() {
            cache.write(layer, &idx, &k, &k.neg().unwrap()).unwrap();
        }
    }

    /// First K value of every written token of `t`, per layer (checks all layers agree).
    fn read_tokens(cache: &KvCache, t: &BlockTable) -> Vec<f32> {
        let rows: Vec<u32> = (0..t.len()).map(|p| t.row(p, cache.block_size())).collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let mut out = None;
        for layer in 0..cache.num_layers() {
            let (k, v) = cache.gather(layer, &rows).unwrap();
            let first_head = |t: Tensor| -> Vec<f32> { t.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
            let (k, v) = (first_head(k), first_head(v));
            assert!(k.iter().zip(&v).all(|(a, b)| *a == -*b));
            if let Some(prev) = &out {
                assert_eq!(prev, &k);
            }
            out = Some(k);
        }
        out.unwrap()
    }

    fn fill(cache: &mut KvCache, t: &mut BlockTable, n: usize, tag: f32) {
        t.reserve(cache, n).unwrap();
        cache.apply_pending_copies().unwrap();
        for p in t.len()..t.len() + n {
            write_token(cache, t, p, tag);
        }
        t.advance(n);
    }

    #[test]
    fn allocation_and_free_accounting() {
        let mut c = cache(8);
        assert_eq!((c.num_blocks(), c.free_blocks(), c.block_size()), (8, 8, 4));
        let mut a = BlockTable::new();
        a.reserve(&mut c, 5).unwrap(); // 2 blocks
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(c.free_blocks(), 6);
        a.advance(5);
        a.reserve(&mut c, 3).unwrap(); // positions 5..8 fit in block 2
        assert_eq!(c.free_blocks(), 6);
        a.advance(3);
        a.reserve(&mut c, 1).unwrap(); // position 8 opens a third block
        assert_eq!(c.free_blocks(), 5);
        a.reserve(&mut c, 0).unwrap();
        assert_eq!(c.free_blocks(), 5);
        let mut b = BlockTable::new();
        b.reserve(&mut c, 4).unwrap();
        assert_eq!(c.free_blocks(), 4);
        assert!(a.blocks().iter().all(|x| !b.blocks().contains(x)));
        a.release(&mut c);
        assert_eq!(c.free_blocks(), 7);
        assert!(a.is_empty() && a.blocks().is_empty());
        b.release(&mut c);
        assert_eq!(c.free_blocks(), 8);
        assert!((0..8).all(|i| c.refcount(i) == 0));
    }

    #[test]
    fn blocks_for_bytes_matches_layout() {
        let cfg = cfg();
        // 2 (K,V) * 2 layers * 4 tokens * 1 head * 4 dims * 4 bytes = 256 bytes per block.
        assert_eq!(
            KvCache::blocks_for_bytes(&cfg, 4, 256 * 10 + 255, DType::F32),
            10
        );
        assert_eq!(
            KvCache::blocks_for_bytes(&cfg, 4, 256 * 10, DType::BF16),
            20
        );
    }

    #[test]
    fn fork_and_copy_on_write_keep_parent_intact() {
        let mut c = cache(8);
        let mut parent = BlockTable::new();
        fill(&mut c, &mut parent, 6, 0.0); // block 0 full, block 1 holds 2 tokens
        let before = read_tokens(&c, &parent);
        assert_eq!(before, vec![0., 1., 2., 3., 4., 5.]);

        let mut child = parent.fork(&mut c);
        assert_eq!(child.blocks(), parent.blocks());
        assert_eq!(child.len(), 6);
        assert!(parent.blocks().iter().all(|&b| c.refcount(b) == 2));
        assert_eq!(read_tokens(&c, &child), before, "child sees the shared prefix");

        // Child writes position 6 into the shared, partly filled block 1: it must get a copy.
        let free = c.free_blocks();
        fill(&mut c, &mut child, 2, 100.0);
        assert_eq!(c.free_blocks(), free - 1);
        assert_eq!(child.blocks()[0], parent.blocks()[0], "full prefix block stays shared");
        assert_ne!(child.blocks()[1], parent.blocks()[1]);
        assert_eq!(c.refcount(parent.blocks()[1]), 1);
        assert_eq!(read_tokens(&c, &child), vec![0., 1., 2., 3., 4., 5., 106., 107.]);
        assert_eq!(read_tokens(&c, &parent), before, "parent untouched by the child's writes");

        // Parent now continues in its own block 1 without another copy.
        let free = c.free_blocks();
        fill(&mut c, &mut parent, 1, 50.0);
        assert_eq!(c.free_blocks(), free);
        assert_eq!(read_tokens(&c, &parent), vec![0., 1., 2., 3., 4., 5., 56.]);
        assert_eq!(read_tokens(&c, &child), vec![0., 1., 2., 3., 4., 5., 106., 107.]);
    }

    #[test]
    fn chained_forks_before_a_flush_copy_the_right_contents() {
        let mut c = cache(8);
        let mut a = BlockTable::new();
        fill(&mut c, &mut a, 3, 0.0);
        let mut b = a.fork(&mut c);
        b.reserve(&mut c, 1).unwrap(); // queues a -> b copy
        let mut d = b.fork(&mut c); // shares b's not-yet-filled copy
        d.reserve(&mut c, 1).unwrap(); // must copy from a's block, not the unfilled one
        assert_eq!(c.pending_copies(), 2);
        c.apply_pending_copies().unwrap();
        assert_eq!(c.pending_copies(), 0);
        assert_eq!(read_tokens(&c, &d), vec![0., 1., 2.]);
        assert_eq!(read_tokens(&c, &b), vec![0., 1., 2.]);
    }

    #[test]
    fn release_frees_shared_blocks_only_at_last_owner() {
        let mut c = cache(8);
        let mut parent = BlockTable::new();
        fill(&mut c, &mut parent, 8, 0.0); // exactly two full blocks
        let mut forks: Vec<BlockTable> = (0..3).map(|_| parent.fork(&mut c)).collect();
        assert_eq!(c.free_blocks(), 6);
        for f in &mut forks {
            fill(&mut c, f, 1, 10.0); // each opens one private block, no copies (blocks full)
        }
        assert_eq!(c.pending_copies(), 0);
        assert_eq!(c.free_blocks(), 3);
        parent.release(&mut c);
        assert_eq!(c.free_blocks(), 3, "forks still hold the prefix");
        forks[0].release(&mut c);
        forks[1].release(&mut c);
        assert_eq!(c.free_blocks(), 5);
        assert_eq!(
            read_tokens(&c, &forks[2]),
            vec![0., 1., 2., 3., 4., 5., 6., 7., 18.]
        );
        forks[2].release(&mut c);
        assert_eq!(c.free_blocks(), 8);
    }

    #[test]
    fn out_of_blocks_is_an_error_without_state_change() {
        let mut c = cache(3);
        let mut a = BlockTable::new();
        fill(&mut c, &mut a, 6, 0.0); // 2 blocks
        let mut b = a.fork(&mut c);
        let snapshot_a = (a.blocks().to_vec(), a.len());
        let snapshot_b = (b.blocks().to_vec(), b.len());
        // 6 + 7 tokens need 4 blocks: a CoW copy of block 1 plus two fresh ones, 3 > 1 free.
        let err = b.reserve(&mut c, 7).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 3, free: 1 });
        assert!(err.to_string().contains("release some sequences"));
        assert_eq!((b.blocks().to_vec(), b.len()), snapshot_b);
        assert_eq!((a.blocks().to_vec(), a.len()), snapshot_a);
        assert_eq!(c.free_blocks(), 1);
        assert_eq!(c.pending_copies(), 0);
        assert!(a.blocks().iter().all(|&x| c.refcount(x) == 2));
        // A fresh table asking for too much fails the same way.
        let mut e = BlockTable::new();
        assert!(e.reserve(&mut c, 5).is_err());
        assert!(e.blocks().is_empty());
        // What fits still works.
        b.reserve(&mut c, 2).unwrap(); // only the CoW copy
        assert_eq!(c.free_blocks(), 0);
    }

    /// Fills `t` with `tokens` (K row = the token id) and registers its full blocks.
    fn fill_tokens(cache: &mut KvCache, t: &mut BlockTable, tokens: &[u32]) {
        let start = t.len();
        t.reserve(cache, tokens.len() - start).unwrap();
        cache.apply_pending_copies().unwrap();
        for p in start..tokens.len() {
            write_token(cache, t, p, tokens[p] as f32 - p as f32);
        }
        t.advance(tokens.len() - start);
        t.commit_full_blocks(cache, tokens, &[]);
    }

    #[test]
    fn full_blocks_are_found_by_content_and_shared() {
        let mut c = cache(16);
        let a_tokens: Vec<u32> = (100..110).collect(); // blocks [100..104) [104..108) + 2 tokens
        let mut a = BlockTable::new();
        fill_tokens(&mut c, &mut a, &a_tokens);
        assert_eq!(c.prefix_cache_stats().cached_blocks, 2, "only full blocks are registered");

        // Same first 6 tokens: one full block in common.
        let b_tokens: Vec<u32> = [&a_tokens[..6], &[7, 7, 7, 7, 7][..]].concat();
        let hashes = block_hashes(&b_tokens, 4);
        assert_eq!(hashes.len(), 2);
        assert_eq!(c.cached_prefix(&hashes, &b_tokens, 9), CachedPrefix { blocks: 1, idle: 0 });
        let mut b = BlockTable::new();
        assert_eq!(b.adopt_cached_prefix(&mut c, &hashes, &b_tokens, 9), 4);
        assert_eq!((b.len(), b.blocks()), (4, &a.blocks()[..1]));
        assert_eq!(c.refcount(a.blocks()[0]), 2);
        // The adopted block reads as b's own tokens; b goes on in a fresh block (no copy).
        let free = c.free_blocks();
        fill_tokens(&mut c, &mut b, &b_tokens);
        assert_eq!(c.pending_copies(), 0);
        assert_eq!(c.free_blocks(), free - 2);
        assert_eq!(read_tokens(&c, &b), b_tokens.iter().map(|&t| t as f32).collect::<Vec<_>>());
        assert_eq!(read_tokens(&c, &a)[..10], a_tokens.iter().map(|&t| t as f32).collect::<Vec<_>>()[..]);

        // A different first token shares nothing, though every later block is equal.
        let c_tokens: Vec<u32> = [&[1][..], &a_tokens[1..]].concat();
        assert_eq!(c.cached_prefix(&block_hashes(&c_tokens, 4), &c_tokens, 9).blocks, 0);
        // The limit holds, and a wrong content under a right address is not taken (the
        // check that stands between a hash collision and wrong keys and values).
        assert_eq!(c.cached_prefix(&block_hashes(&a_tokens, 4), &a_tokens, 1).blocks, 1);
        let wrong: Vec<u32> = (0..10).collect();
        assert_eq!(c.cached_prefix(&block_hashes(&a_tokens, 4), &wrong, 9).blocks, 0);
        let mut d = BlockTable::new();
        assert_eq!(d.adopt_cached_prefix(&mut c, &block_hashes(&a_tokens, 4), &wrong, 9), 0);
        assert!(d.blocks().is_empty());

        a.release(&mut c);
        b.release(&mut c);
        assert_eq!(c.free_blocks(), 16);
        assert!((0..16).all(|i| c.refcount(i) == 0));
    }

    #[test]
    fn released_blocks_stay_cached_until_space_is_needed_oldest_first() {
        let mut c = cache(6);
        let old: Vec<u32> = (0..8).collect(); // 2 full blocks
        let new: Vec<u32> = (50..58).collect();
        for tokens in [&old, &new] {
            let mut t = BlockTable::new();
            fill_tokens(&mut c, &mut t, tokens);
            t.release(&mut c);
        }
        let stats = c.prefix_cache_stats();
        assert_eq!((stats.cached_blocks, stats.idle_blocks, stats.evictions), (4, 4, 0));
        assert_eq!(c.free_blocks(), 6, "idle cached blocks count as free");
        // Taking one idle block back lowers the free count by one.
        let mut t = BlockTable::new();
        assert_eq!(c.cached_prefix(&block_hashes(&new, 4), &new, 1), CachedPrefix { blocks: 1, idle: 1 });
        assert_eq!(t.adopt_cached_prefix(&mut c, &block_hashes(&new, 4), &new, 1), 4);
        assert_eq!((c.free_blocks(), c.prefix_cache_stats().idle_blocks), (5, 3));
        t.release(&mut c);
        // Three fresh blocks: two truly free, then one eviction, of the least recently used
        // block: the tail of the older sequence (a prefix outlives its continuation).
        let mut f = BlockTable::new();
        f.reserve(&mut c, 12).unwrap();
        assert_eq!(c.prefix_cache_stats().evictions, 1);
        assert_eq!(c.cached_prefix(&block_hashes(&old, 4), &old, 2).blocks, 1, "the head of `old` is still cached");
        assert_eq!(c.cached_prefix(&block_hashes(&new, 4), &new, 2).blocks, 2);
        f.advance(12);
        f.reserve(&mut c, 4).unwrap();
        assert_eq!(c.prefix_cache_stats().evictions, 2);
        assert_eq!(c.cached_prefix(&block_hashes(&old, 4), &old, 2).blocks, 0);
        assert_eq!(c.cached_prefix(&block_hashes(&new, 4), &new, 2).blocks, 2);
        f.advance(4);
        assert_eq!(f.reserve(&mut c, 16), Err(OutOfBlocks { needed: 4, free: 2 }));
        f.release(&mut c);
        assert_eq!(c.free_blocks(), 6);
    }

    #[test]
    fn forks_carry_the_addresses_and_off_means_nothing_is_cached() {
        let mut c = cache(8);
        let tokens: Vec<u32> = (0..6).collect();
        let mut a = BlockTable::new();
        fill_tokens(&mut c, &mut a, &tokens);
        let mut b = a.fork(&mut c);
        // b's continuation fills block 1 in its own copy and registers it under b's content.
        let b_tokens: Vec<u32> = [&tokens[..], &[9, 9]].concat();
        fill_tokens(&mut c, &mut b, &b_tokens);
        assert_eq!(c.prefix_cache_stats().cached_blocks, 2);
        assert_eq!(c.cached_prefix(&block_hashes(&b_tokens, 4), &b_tokens, 2).blocks, 2);
        a.release(&mut c);
        b.release(&mut c);

        c.set_prefix_caching(false);
        assert!(!c.prefix_caching());
        assert_eq!((c.free_blocks(), c.prefix_cache_stats()), (8, PrefixCacheStats::default()));
        let mut d = BlockTable::new();
        fill_tokens(&mut c, &mut d, &b_tokens);
        assert_eq!(d.adopt_cached_prefix(&mut c, &block_hashes(&b_tokens, 4), &b_tokens, 2), 0);
        d.release(&mut c);
        assert_eq!(c.prefix_cache_stats(), PrefixCacheStats::default());
        c.set_prefix_caching(true);
        let mut e = BlockTable::new();
        fill_tokens(&mut c, &mut e, &b_tokens);
        e.release(&mut c);
        assert_eq!(c.prefix_cache_stats().idle_blocks, 2);
        c.clear_prefix_cache();
        assert_eq!((c.free_blocks(), c.prefix_cache_stats().cached_blocks), (8, 0));
    }
}
