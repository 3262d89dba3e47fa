//! Where completions come from: the local [`crate::engine`] ([`local`]) or any
//! OpenAI-compatible server ([`openai`]). Model presets ([`preset`]) give both a known
//! model's recommended sampling and think tags.

pub mod local;
pub mod openai;
pub mod preset;
