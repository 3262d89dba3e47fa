//! The CUDA paged-attention kernel (`kernels/paged_attention.cu`) as a candle custom op over
//! `(q, k_pool, v_pool)`: it reads the cache pools in place through the batch's row list, so
//! nothing is gathered or padded. The Rust model of its blocking, and its tests, are in
//! [`super::blocked`]; on CPU tensors the op runs that model.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::blocked::{paged_attention_blocked, TokenContext, WARPS};
use super::cpu::AttnDims;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// One layer's attention launch. `rows`, `ctx_off`, `ctx_len` are u32 tensors on the
/// device (uploaded once per forward and shared by all layers).
pub struct PagedAttentionOp {
    pub rows: Tensor,
    pub ctx_off: Tensor,
    pub ctx_len: Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

fn u32_view<'a>(st: &'a Storage, lay: &Layout) -> candle_core::Result<CudaView<'a, u32>> {
    match st {
        Storage::Cuda(c) => Ok(c.as_cuda_slice::<u32>()?.slice(lay.start_offset()..)),
        _ => candle_core::bail!("paged attention: index tensors must be on the CUDA device"),
    }
}

impl PagedAttentionOp {
    /// Launches the kernel for element type `T` (`tag` names it) on the storage and layout
    /// of q, k and v.
    fn launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(&self, tag: &str, [(q, ql), (k, kl), (v, vl)]: [(&CudaStorage, &Layout); 3]) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &q.device;
        let (n, width) = ql.shape().dims2()?;
        let qv = q.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let kv = k.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let vv = v.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n * width)? };
        let (rs, rl) = self.rows.storage_and_layout();
        let (os, ol) = self.ctx_off.storage_and_layout();
        let (ls, ll) = self.ctx_len.storage_and_layout();
        let (rows, ctx_off, ctx_len) = (u32_view(&rs, rl)?, u32_view(&os, ol)?, u32_view(&ls, ll)?);
        let name = format!("bsa_paged_attention_{tag}_d{}", self.head_dim);
        let func = dev.get_or_load_custom_func(&name, "bsa_paged_attention", PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, self.kv_heads as u32, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, kv_heads) = (self.heads as u32, self.kv_heads as u32);
        let scale = 1.0f32 / (self.head_dim as f32).sqrt();
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&kv);
        b.arg(&vv);
        b.arg(&rows);
        b.arg(&ctx_off);
        b.arg(&ctx_len);
        b.arg(&out);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&scale);
        // SAFETY: the argument list matches the kernel's; q is [n, heads * d], the pools
        // [rows, kv_heads * d], and every context row index is inside the pool (checked by
        // BatchCtx::new against the cache's block count).
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n, width))))
    }

    fn check(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> candle_core::Result<()> {
        let (_, width) = ql.shape().dims2()?;
        let (_, kw) = kl.shape().dims2()?;
        if width != self.heads * self.head_dim || kw != self.kv_heads * self.head_dim || kl.shape() != vl.shape() {
            candle_core::bail!(
                "paged attention: q {:?} / pools {:?} do not match {} heads, {} kv heads of {}",
                ql.shape(),
                kl.shape(),
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        if !(ql.is_contiguous() && kl.is_contiguous() && vl.is_contiguous()) {
            candle_core::bail!("paged attention: tensors must be contiguous");
        }
        Ok(())
    }
}

impl CustomOp3 for PagedAttentionOp {
    fn name(&self) -> &'static str {
        "bsa-paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check(ql, kl, vl)?;
        let f = |s: &CpuStorage, l: &Layout| -> candle_core::Result<Vec<f32>> {
            Ok(s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + l.shape().elem_count()].to_vec())
        };
        let ctx = TokenContext {
            ctx_off: self.ctx_off.to_vec1()?,
            ctx_len: self.ctx_len.to_vec1()?,
        };
        let rows: Vec<u32> = self.rows.to_vec1()?;
        let dims = AttnDims { heads: self.heads, kv_heads: self.kv_heads, head_dim: self.head_dim, scale: 1.0 / (self.head_dim as f32).sqrt() };
        let y = paged_attention_blocked(&f(q, ql)?, &f(k, kl)?, &f(v, vl)?, &rows, &ctx, dims);
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.check(ql, kl, vl)?;
        let qkv = [(q, ql), (k, kl), (v, vl)];
        match q.dtype() {
            DType::BF16 => self.launch::<half::bf16>("bf16", qkv),
            DType::F16 => self.launch::<half::f16>("f16", qkv),
            DType::F32 => self.launch::<f32>("f32", qkv),
            d => candle_core::bail!("paged attention: no kernel for {d:?}"),
        }
    }
}

/// The batch's attention index on the device, built once per forward for all layers.
pub struct DeviceIndex {
    rows: Tensor,
    ctx_off: Tensor,
    ctx_len: Tensor,
}

impl DeviceIndex {
    /// `context_rows`: every sequence's cache rows, one sequence after another; `seqs`:
    /// `(new tokens, offset in context_rows, context length)` per sequence.
    pub fn new(
        context_rows: &[u32],
        seqs: impl IntoIterator<Item = (usize, usize, usize)>,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let ctx = TokenContext::new(seqs);
        Ok(Self {
            rows: Tensor::new(context_rows, device)?,
            ctx_off: Tensor::new(ctx.ctx_off.as_slice(), device)?,
            ctx_len: Tensor::new(ctx.ctx_len.as_slice(), device)?,
        })
    }

    /// Attention of `q` (`[n, heads * d]`) over `layer`'s pools, in the pools' dtype.
    pub fn attend(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Tensor> {
        let op = PagedAttentionOp {
            rows: self.rows.clone(),
            ctx_off: self.ctx_off.clone(),
            ctx_len: self.ctx_len.clone(),
            heads,
            kv_heads,
            head_dim,
        };
        let q = q.to_dtype(k_pool.dtype())?.contiguous()?;
        q.apply_op3_no_bwd(k_pool, v_pool, &op)
    }
}
