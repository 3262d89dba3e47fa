//! The local backend: `--model` resolved (a file, a model directory, a preset, a hub id),
//! loaded into the [`crate::engine`], and prompted through its own chat template.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use super::preset::{self, Preset};
use crate::engine::load::{load_dir, load_gguf, LoadedModel};
use crate::engine::lora::LoraAdapter;
use crate::hub;
use crate::prompt::PromptFormat;
use crate::records::FinishReason;

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    Dir(PathBuf),
    /// A hub model id; its files are resolved through the cache.
    Hub(String),
}

/// Where fetched GGUF presets live (scripts/fetch-smollm2.sh puts SmolLM2 there).
pub fn model_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BSA_MODEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("bsa").join("models")
}

/// Interprets `--model`: a path, then a preset name, then a hub id.
pub fn resolve(spec: &str) -> Result<(ModelSource, Option<Preset>)> {
    let p = Path::new(spec);
    if p.exists() {
        if p.is_dir() {
            if !p.join("config.json").exists() {
                bail!(
                    "{}: the model directory has no config.json; a model directory needs config.json, tokenizer.json, tokenizer_config.json and *.safetensors",
                    p.display()
                );
            }
            return Ok((ModelSource::Dir(p.to_path_buf()), None));
        }
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Ok((ModelSource::Gguf(p.to_path_buf()), None));
        }
        bail!("{}: not a .gguf file or a model directory", p.display());
    }
    if let Some(pr) = preset::find(spec) {
        if let Some(file) = &pr.gguf_file {
            let path = model_cache_dir().join(file);
            if !path.exists() {
                bail!(
                    "the preset {} uses {} which is not at {}; fetch it with scripts/fetch-smollm2.sh (or set BSA_MODEL_CACHE)",
                    pr.name,
                    file,
                    path.display()
                );
            }
            return Ok((ModelSource::Gguf(path), Some(pr)));
        }
        return Ok((ModelSource::Hub(pr.hub_id.clone()), Some(pr)));
    }
    if spec.ends_with(".gguf") || spec.starts_with('.') || spec.starts_with('/') {
        bail!("{spec}: no such file; check the path given to --model");
    }
    if spec.split('/').count() == 2 && !spec.starts_with('/') {
        return Ok((ModelSource::Hub(spec.to_string()), None));
    }
    bail!("--model {spec:?} is not a file, a model directory, a preset (see `bsa models`) or a hub id OWNER/NAME")
}

/// A loaded model and, when `--model` named a preset, that preset (its sampling, template
/// and think-tag defaults).
pub struct LocalModel {
    pub loaded: LoadedModel,
    pub preset: Option<Preset>,
}

impl LocalModel {
    /// Loads `--model` (see [`resolve`]).
    pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<LocalModel> {
        LocalModel::load_with_adapter(spec, None, device, dtype)
    }

    /// Loads `--model` with an optional PEFT LoRA adapter merged into its weights.
    pub fn load_with_adapter(spec: &str, adapter: Option<&Path>, device: &Device, dtype: DType) -> Result<LocalModel> {
        let (source, preset) = resolve(spec)?;
        // The adapter is read first: its mistakes show before a large base model loads.
        let adapter = adapter.map(LoraAdapter::open).transpose()?;
        let mut m = match &source {
            ModelSource::Gguf(p) => {
                if let Some(a) = &adapter {
                    let base = a
                        .description
                        .base_model_name_or_path
                        .as_deref()
                        .map_or(String::new(), |b| format!(" ({b}, as adapter_config.json says)"));
                    bail!(
                    "--adapter {}: the base {} is a GGUF file, and LoRA adapters merge only into safetensors weights (merging into quantized weights would requantize every matrix and no longer equal the fine-tuned model); pass the base model's Hugging Face directory or hub id{base} as --model",
                    a.dir.display(),
                    p.display()
                );
                }
                load_gguf(p, device)?
            }
            ModelSource::Dir(d) => load_dir(
                &d.display().to_string(),
                |name| {
                    let p = d.join(name);
                    Ok(p.exists().then_some(p))
                },
                device,
                dtype,
                adapter,
            )?,
            ModelSource::Hub(id) => load_dir(id, |name| hub::resolve_model_file(id, name), device, dtype, adapter)?,
        };
        if let Some(pr) = &preset {
            m.description.id = pr.name.clone();
        }
        Ok(LocalModel { loaded: m, preset })
    }
}

impl LocalModel {
    /// How to prompt this model: its template and special tokens, and its preset's defaults.
    pub fn prompt_format(&self) -> PromptFormat {
        let m = &self.loaded;
        PromptFormat {
            model_id: m.description.id.clone(),
            chat_template: m.chat_template.clone(),
            bos_token: m.bos_token.clone(),
            eos_token: m.eos_token.clone(),
            system_role: self.preset.as_ref().map(|p| p.template.system_role),
            enable_thinking: self.preset.as_ref().and_then(|p| p.template.enable_thinking),
            think: self.preset.as_ref().map(|p| p.think_convention()),
        }
    }
}

impl From<crate::engine::scheduler::FinishReason> for FinishReason {
    fn from(f: crate::engine::scheduler::FinishReason) -> FinishReason {
        use crate::engine::scheduler::FinishReason as Engine;
        match f {
            Engine::Stop => FinishReason::Stop,
            Engine::StopString => FinishReason::StopString,
            Engine::Length => FinishReason::Length,
        }
    }
}
