//! Model presets (`models/*.toml`): for each open model on the authors' leaderboard, where
//! to get it, its architecture, its think-tag convention and the sampling its authors
//! recommend. A preset is a default; every command-line flag overrides it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::sampler::SamplingParams;
use crate::prompt::ThinkConvention;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub hub_id: String,
    pub architecture: String,
    /// Whether the model writes a thinking trace (false for the SmolLM2 demo model).
    pub reasoning: bool,
    /// A GGUF file name, for presets whose weights come as one GGUF file.
    #[serde(default)]
    pub gguf_file: Option<String>,
    pub think: ThinkTags,
    pub template: TemplateDefaults,
    pub sampling: SamplingDefaults,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinkTags {
    pub open: String,
    pub close: String,
    /// The chat template already writes the opening tag (the R1 distills, QwQ).
    pub prefilled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateDefaults {
    /// Whether the model's authors support a system turn (DeepSeek advises against one).
    pub system_role: bool,
    #[serde(default)]
    pub enable_thinking: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub max_new_tokens: usize,
}

impl Preset {
    /// The think tags as the prompt module uses them (`prefilled_open` as the preset says; a
    /// local prompter checks it against the rendered template).
    pub fn think_convention(&self) -> ThinkConvention {
        ThinkConvention { open: self.think.open.clone(), close: self.think.close.clone(), prefilled_open: self.think.prefilled }
    }
}

impl SamplingDefaults {
    pub fn params(&self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, min_p: self.min_p }
    }
}

/// The presets shipped in `models/`, embedded so the binary works from anywhere.
const EMBEDDED: &[(&str, &str)] = &[
    ("smollm2-135m", include_str!("../../models/smollm2-135m.toml")),
    ("r1-distill-qwen-1.5b", include_str!("../../models/r1-distill-qwen-1.5b.toml")),
    ("r1-distill-qwen-7b", include_str!("../../models/r1-distill-qwen-7b.toml")),
    ("r1-distill-qwen-14b", include_str!("../../models/r1-distill-qwen-14b.toml")),
    ("r1-distill-qwen-32b", include_str!("../../models/r1-distill-qwen-32b.toml")),
    ("r1-distill-llama-8b", include_str!("../../models/r1-distill-llama-8b.toml")),
    ("r1-distill-llama-70b", include_str!("../../models/r1-distill-llama-70b.toml")),
    ("qwen3-0.6b", include_str!("../../models/qwen3-0.6b.toml")),
    ("qwen3-1.7b", include_str!("../../models/qwen3-1.7b.toml")),
    ("qwen3-4b", include_str!("../../models/qwen3-4b.toml")),
    ("qwen3-8b", include_str!("../../models/qwen3-8b.toml")),
    ("qwen3-14b", include_str!("../../models/qwen3-14b.toml")),
    ("qwen3-32b", include_str!("../../models/qwen3-32b.toml")),
    ("qwq-32b", include_str!("../../models/qwq-32b.toml")),
];

pub fn parse(file: &str, text: &str) -> Result<Preset> {
    let p: Preset = toml::from_str(text).with_context(|| format!("{file}: not a valid model preset"))?;
    if let Err(e) = p.sampling.params().validate() {
        bail!("{file}: [sampling] {e}");
    }
    if !["llama", "qwen2", "qwen3"].contains(&p.architecture.as_str()) {
        bail!("{file}: architecture {:?} is not supported; use llama, qwen2 or qwen3", p.architecture);
    }
    Ok(p)
}

pub fn all() -> Vec<Preset> {
    EMBEDDED.iter().map(|(n, t)| parse(&format!("models/{n}.toml"), t).expect("embedded presets are valid")).collect()
}

/// A preset by name (`qwen3-8b`) or hub id (`Qwen/Qwen3-8B`), any case.
pub fn find(name: &str) -> Option<Preset> {
    let n = name.to_ascii_lowercase();
    all().into_iter().find(|p| p.name == n || p.hub_id.to_ascii_lowercase() == n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_preset_parses_and_is_embedded() {
        let ps = all();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let on_disk = std::fs::read_dir(&dir).unwrap().filter(|e| {
            e.as_ref().unwrap().path().extension().is_some_and(|x| x == "toml")
        }).count();
        assert_eq!(ps.len(), on_disk, "every models/*.toml must be listed in EMBEDDED");
        assert_eq!(find("Qwen/Qwen3-8B").unwrap().sampling.top_k, 20);
        assert!(find("r1-distill-qwen-7b").unwrap().think.prefilled);
        assert!(find("nope").is_none());
    }

    #[test]
    fn bad_presets_are_named() {
        let e = parse("x.toml", "name = 1").unwrap_err();
        assert!(format!("{e:#}").contains("x.toml"));
        let good = include_str!("../../models/qwen3-8b.toml");
        let e = parse("x.toml", &good.replace("top_p = 0.95", "top_p = 1.5")).unwrap_err();
        assert!(format!("{e:#}").contains("top_p"), "{e:#}");
    }
}
