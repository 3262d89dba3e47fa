//! The prompt side of a model: its chat template and special tokens, the system text (and
//! where it goes), and its think-tag convention, turned into the exact prompt text.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::reasoning::ThinkConvention;
use super::template::{with_system, ChatTemplate, Message, RenderOptions};

/// What is known about prompting one model: its chat template and special tokens (from its
/// files) and, for a known model, its preset's advice. Backends fill this in; the prompter
/// needs nothing else of the model.
#[derive(Debug, Clone, Default)]
pub struct PromptFormat {
    /// The model's name, for error messages.
    pub model_id: String,
    /// The Jinja chat template of its tokenizer_config.json or GGUF metadata.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// What the model's preset says; `None`: ask the template (system role), think tags
    /// `<think>` / `</think>`, the template's own `enable_thinking`.
    pub preset: Option<PresetPrompting>,
}

/// A model preset's advice on prompting it (`models/*.toml`).
#[derive(Debug, Clone)]
pub struct PresetPrompting {
    /// Whether the model's authors support a system turn (DeepSeek advises against one).
    pub system_role: bool,
    /// Qwen3-style `enable_thinking` default (a flag overrides it).
    pub enable_thinking: Option<bool>,
    pub think: ThinkConvention,
}

/// What the user asked of the prompt side, whatever the backend.
#[derive(Debug, Clone, Default)]
pub struct PromptSettings {
    /// Text put before every conversation: the safety rules and `--system`, joined (see
    /// [`super::SafetyRules::system_text`]). A local model places it by its template (system
    /// message, or the start of the user turn); a server gets a system message.
    pub system: Option<String>,
    /// `--chat-template FILE`: a local model's template replaced (refused by servers, which
    /// apply their own).
    pub chat_template: Option<PathBuf>,
    /// Qwen3-style `enable_thinking`: a local template variable, or the server's
    /// `chat_template_kwargs` (None: the model's default, nothing sent).
    pub enable_thinking: Option<bool>,
}

/// Renders prompts for one model (see [`PromptFormat`]).
pub struct Prompter {
    template: ChatTemplate,
    template_source: String,
    system_role: bool,
    enable_thinking: Option<bool>,
    system: Option<String>,
    think: ThinkConvention,
}

impl Prompter {
    /// `settings` may replace the template (`--chat-template FILE`), put system text before
    /// every conversation (a system message, or the start of the user turn when the template
    /// has no system role) and override the format's `enable_thinking`.
    ///
    /// Errors: no template at all (the model has none and no FILE was given), an unreadable
    /// FILE, a template that does not parse or render.
    pub fn new(format: &PromptFormat, settings: &PromptSettings) -> Result<Prompter> {
        let (system, enable_thinking) = (settings.system.clone(), settings.enable_thinking);
        let source = match settings.chat_template.as_deref() {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read --chat-template {}", p.display()))?,
            None => format.chat_template.clone().ok_or_else(|| {
                anyhow::anyhow!("the model {} has no chat template; pass one with --chat-template FILE (a Jinja file like the chat_template of tokenizer_config.json)", format.model_id)
            })?,
        };
        let template = ChatTemplate::new(&source, format.bos_token.as_deref().unwrap_or(""), format.eos_token.as_deref().unwrap_or(""))?;
        let preset = format.preset.as_ref();
        let system_role = preset.map_or_else(|| template.supports_system_role(), |p| p.system_role);
        let enable_thinking = enable_thinking.or(preset.and_then(|p| p.enable_thinking));
        let mut think = preset.map_or_else(ThinkConvention::default, |p| p.think.clone());
        let mut p = Prompter { template, template_source: source, system_role, enable_thinking, system, think: think.clone() };
        // Whether the template pre-fills the think tag is read off a rendered prompt, since
        // revisions of one model's template differ (the R1 distills changed in 2025).
        let probe = p.render("hello")?;
        think.prefilled_open = probe.trim_end().ends_with(think.open.as_str());
        p.think = think;
        Ok(p)
    }

    /// The prompt for one benchmark query (with the system text, if any).
    pub fn render(&self, query: &str) -> Result<String> {
        self.render_messages(&[Message::user(query)])
    }

    /// The prompt for a conversation, ending with the assistant's turn to speak.
    pub fn render_messages(&self, messages: &[Message]) -> Result<String> {
        self.render_messages_with(messages, self.enable_thinking, Default::default())
    }

    /// [`Self::render_messages`] with a request's own `enable_thinking` and further template
    /// variables (a server's `chat_template_kwargs`); a variable the renderer reserves
    /// (`messages`, `bos_token`, ...) is an error naming it.
    pub fn render_messages_with(&self, messages: &[Message], enable_thinking: Option<bool>, extra: serde_json::Map<String, serde_json::Value>) -> Result<String> {
        let messages = match &self.system {
            Some(sys) => with_system(messages, sys, self.system_role).0,
            None => messages.to_vec(),
        };
        let opts = RenderOptions { add_generation_prompt: true, enable_thinking, extra };
        self.template.render(&messages, &opts)
    }

    /// Whether the template has a system role (else system text goes into the user turn).
    pub fn system_role(&self) -> bool {
        self.system_role
    }

    /// The system text put before every conversation, if any.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The `enable_thinking` the template is rendered with (`None`: its own default).
    pub fn enable_thinking(&self) -> Option<bool> {
        self.enable_thinking
    }

    /// The think tags, with `prefilled_open` read off a rendered prompt.
    pub fn think(&self) -> &ThinkConvention {
        &self.think
    }

    /// The sha256 of the template text in use (the manifest records it).
    pub fn template_sha256(&self) -> String {
        crate::records::hex_sha256(self.template_source.as_bytes())
    }
}
