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

use std::fmt;

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
        })
    }

    /// Bytes one block takes over all layers, K and V together.
    fn block_bytes(cfg: &ModelConfig, block_size: usize, dtype: DType) -> usize {
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

    pub fn free_blocks(&self) -> usize {
        self.free.len()
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

    fn alloc(&mut self) -> u32 {
        let b = self.free.pop().expect("caller checked the free count");
        debug_assert_eq!(self.refcount[b as usize], 0);
        self.refcount[b as usize] = 1;
        b
    }

    fn incref(&mut self, block: u32) {
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
            self.free.push(block);
        }
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

    /// Gives back this table's references; blocks whose last owner this was become free.
    pub fn release(&mut self, cache: &mut KvCache) {
        for b in self.blocks.drain(..) {
            cache.decref(b);
        }
        self.len = 0;
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
}
