//! The inference engine: open-weight models run with candle on the CPU, CUDA or Metal,
//! many sequences at once.
//!
//! Self-contained: it imports nothing from the rest of the crate, and knows nothing of
//! benchmarks, judges or run directories. Its inputs are model files, token ids and
//! sampling parameters; its outputs are token ids.
//!
//! - [`load`]: a model from a GGUF file or a Hugging Face directory ([`lora`] merges a
//!   PEFT adapter into the weights), the device and dtype.
//! - [`config`]: architectures and hyper-parameters, from `config.json` or GGUF metadata.
//! - [`models`]: the batched decoder (one for Llama, Qwen2 and Qwen3; a file per
//!   architecture says what differs), built from [`weights`] (safetensors or GGUF) out of
//!   [`layers`] (projections, RMSNorm, SwiGLU, RoPE).
//! - [`batch`]: the flat batch a forward runs over (no padding) and its per-forward context.
//! - [`attention`], [`quant`]: the hot paths: paged attention, quantized matmuls.
//! - [`kv_cache`]: the paged KV cache (block pool, block tables, copy-on-write forks).
//! - [`scheduler`]: continuous batching: admit, prefill, decode, sample, retire.
//! - [`sampler`]: temperature / top-k / top-p / min-p, exact, from per-sample streams.
//! - [`tokenizer`]: tokenizers from GGUF metadata, prompt tokenization.
//! - [`constraint`]: structured output: a grammar (llguidance) masks each decode step.

pub mod attention;
pub mod batch;
pub mod config;
pub mod constraint;
pub mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod load;
pub mod lora;
pub mod memory;
pub mod models;
pub mod quant;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;
#[cfg(test)]
pub(crate) mod test_rng;
