//! The candle engine: model loading, the paged KV cache, batched models, the scheduler.
//! The device (CPU, CUDA, Metal) is a parameter throughout, not a fork of the code.

pub mod attention;
pub mod attention_blocked;
#[cfg(feature = "cuda")]
pub mod cuda_attention;
pub mod kv_cache;
pub mod load;
pub mod lora;
pub mod models;
pub mod quant;
pub mod scheduler;
pub mod tokenizer;
