//! Generation. The sampler is model-agnostic; the local candle engine and the remote
//! OpenAI-compatible backend land on top of it.

pub mod local;
pub mod preset;
pub mod sampler;
pub mod remote;
