//! Attention over the paged KV cache.
//!
//! - [`cpu`]: the CPU loops that read K/V rows straight out of the cache pool.
//! - [`blocked`]: the CUDA kernel's blocking, modelled on the CPU (what CI tests).
//! - `cuda`: the CUDA kernel (`kernels/paged_attention.cu`) behind a candle op.

pub mod blocked;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::{cpu_f32_slice, paged_attention_cpu, AttnDims, SeqRows};
