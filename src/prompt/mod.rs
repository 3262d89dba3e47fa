//! From a benchmark query to the text a model reads, and from the text it writes back to
//! its thinking and its response.
//!
//! - [`template`]: the model's own Hugging Face chat template, rendered with minijinja as
//!   `transformers` would (`pyjinja`: the Python semantics it adds to minijinja).
//! - [`safety_rules`]: the paper's safety-rules mitigation, put before every query.
//! - [`prompter`]: one model's template, system text and think tags, as one [`Prompter`].
//! - [`reasoning`]: splitting a completion into thinking and response at the think tags.

pub mod prompter;
mod pyjinja;
pub mod reasoning;
pub mod safety_rules;
pub mod template;

pub use prompter::{PresetPrompting, PromptFormat, PromptSettings, Prompter};
pub use reasoning::{split_completion, SplitCompletion, ThinkConvention};
pub use safety_rules::{Placement, SafetyRules};
pub use template::{with_system, ChatTemplate, Message, RenderOptions, SystemPlacement};
