//! The inference engine: open-weight models run with candle on the CPU, CUDA or Metal,
//! many sequences at once.
//!
//! Self-contained: it imports nothing from the rest of the crate, and knows nothing of
//! benchmarks, judges or run directories. Its inputs are model files, token ids and
//! sampling parameters; its outputs are token ids.
//!
//! - [`load`]: a model from a GGUF file or a Hugging Face directory ([`lora`] merges a
//!   PEFT adapter into the weights), the device and dtype.
//! - [`models`]: the batched decoder (Llama, Qwen2, Qwen3) over a flat batch of tokens.
//! - [`attention`], [`quant`]: the hot paths: paged attention, quantized matmuls.
//! - [`kv_cache`]: the paged KV cache (block pool, block tables, copy-on-write forks).
//! - [`scheduler`]: continuous batching: admit, prefill, decode, sample, retire.
//! - [`sampler`]: temperature / top-k / top-p / min-p, exact, from per-sample streams.
//! - [`tokenizer`]: tokenizers from GGUF metadata, prompt tokenization.

pub mod attention;
pub mod kv_cache;
pub mod load;
pub mod lora;
pub mod models;
pub mod quant;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
