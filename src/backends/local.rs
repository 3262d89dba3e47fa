//! The local backend: `--model` resolved (a file, a model directory, a preset, a hub id),
//! loaded into the [`crate::engine`], and prompted through its own chat template.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::preset::{self, Preset};
use super::{sampling_params, Backend, Completion, LabelFormat, PrefillStats, Progress, PromptSettings, Request};
use crate::engine::constraint::{lark_literal, lark_tokens, Choice, Grammar, GrammarCompiler};
use crate::engine::kv_cache::KvCache;
use crate::engine::load::{self, load_dir, load_gguf, LoadedModel};
use crate::engine::lora::LoraAdapter;
use crate::engine::scheduler::{self, PromptGroup, SampleSpec, SchedulerConfig};
use crate::hub;
use crate::prompt::{Placement, PresetPrompting, PromptFormat, Prompter, SafetyRules, ThinkConvention};
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
    /// A paged KV cache of about `mb` MiB in blocks of `block_size` tokens, on `device`: f32
    /// on the CPU (where attention reads the pool in place), `dtype` (the weights') on a GPU.
    pub fn kv_cache(&self, block_size: usize, mb: usize, device: &Device, dtype: DType) -> Result<KvCache> {
        let config = &self.loaded.config;
        let kv_dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let blocks = KvCache::blocks_for_bytes(config, block_size, mb << 20, kv_dtype);
        Ok(KvCache::new(config, block_size, blocks, kv_dtype, device)?)
    }

    /// How to prompt this model: its template and special tokens, and its preset's defaults.
    pub fn prompt_format(&self) -> PromptFormat {
        let m = &self.loaded;
        PromptFormat {
            model_id: m.description.id.clone(),
            chat_template: m.chat_template.clone(),
            bos_token: m.bos_token.clone(),
            eos_token: m.eos_token.clone(),
            preset: self.preset.as_ref().map(|p| PresetPrompting { system_role: p.template.system_role, enable_thinking: p.template.enable_thinking, think: p.think_convention() }),
        }
    }
}

impl From<crate::engine::scheduler::FinishReason> for FinishReason {
    fn from(f: crate::engine::scheduler::FinishReason) -> FinishReason {
        use crate::engine::scheduler::FinishReason as Engine;
        match f {
            Engine::Stop | Engine::GrammarComplete => FinishReason::Stop,
            Engine::StopString => FinishReason::StopString,
            Engine::Length => FinishReason::Length,
        }
    }
}

/// Stop strings (`--stop`, a request's `stop`) on decoded text. The scheduler asks after every
/// token whether a sequence should stop; the finished text is then cut before the earliest
/// match.
pub struct StopStrings<'a>(pub &'a [String]);

impl StopStrings<'_> {
    /// Whether the text of `tokens` contains any of the strings.
    pub fn hit(&self, tokenizer: &tokenizers::Tokenizer, tokens: &[u32]) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let text = tokenizer.decode(tokens, false).unwrap_or_default();
        self.0.iter().any(|s| text.contains(s.as_str()))
    }

    /// Cuts `text` before the earliest match, if any.
    pub fn cut(&self, text: &mut String) {
        if let Some(cut) = self.0.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
    }
}

/// How the local engine runs: device, dtype, batching and KV-cache memory.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// `auto`, `cpu`, `cuda`, `cuda:N`, `metal` (see [`load::device`]).
    pub device: String,
    /// `auto`, `f32`, `bf16`, `f16` (see [`load::dtype`]).
    pub dtype: String,
    /// Most sequences decoding at once.
    pub batch_size: usize,
    /// Most prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// KV-cache memory in MiB.
    pub kv_cache_mb: usize,
    /// Automatic prefix caching: prompt blocks computed once are reused by every later prompt
    /// that starts with the same tokens (`--no-prefix-cache` turns it off).
    pub prefix_cache: bool,
    /// A PEFT LoRA adapter merged into the weights at load (`--adapter DIR`).
    pub adapter: Option<PathBuf>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions { device: "auto".into(), dtype: "auto".into(), batch_size: 16, prefill_chunk: 512, block_size: 16, kv_cache_mb: 1024, prefix_cache: true, adapter: None }
    }
}

/// Completions from a model loaded into the local engine: every request is one prompt group
/// (its samples share one prefill), all of them in one continuous batch.
pub struct LocalBackend {
    model: LocalModel,
    prompter: Prompter,
    cache: KvCache,
    sched: SchedulerConfig,
    /// Built on the first structured request: the vocabulary as llguidance sees it.
    compiler: Option<GrammarCompiler>,
    /// Each label format's grammar, compiled once.
    grammars: HashMap<LabelFormat, std::sync::Arc<Grammar>>,
}

impl LocalBackend {
    /// Loads `model` (see [`resolve`]) and builds its prompter and KV cache.
    pub fn open(model: &str, prompt: &PromptSettings, opts: &LocalOptions) -> Result<LocalBackend> {
        let device = load::device(&opts.device)?;
        let dtype = load::dtype(&opts.dtype, &device)?;
        let model = LocalModel::load_with_adapter(model, opts.adapter.as_deref(), &device, dtype)?;
        let prompter = Prompter::new(&model.prompt_format(), prompt)?;
        let mut cache = model.kv_cache(opts.block_size.max(1), opts.kv_cache_mb, &device, dtype)?;
        cache.set_prefix_caching(opts.prefix_cache);
        let sched = SchedulerConfig { max_batch: opts.batch_size, prefill_chunk: opts.prefill_chunk, eos: model.loaded.eos_ids.clone() };
        Ok(LocalBackend { model, prompter, cache, sched, compiler: None, grammars: HashMap::new() })
    }

    /// The grammar of `format` (compiled on first use).
    ///
    /// With analysis: free text without braces (at most `analysis_tokens` tokens), then
    /// `{"KEY": "` as fixed tokens, one label, `"}`. The fixed tokens put the label at a
    /// token boundary, which is where its probabilities are read. Label only: the label and
    /// `"}` (the prompt ends with `{"KEY": "`, so the first token decoded is the label's).
    pub fn grammar(&mut self, format: &LabelFormat) -> Result<std::sync::Arc<Grammar>> {
        if let Some(g) = self.grammars.get(format) {
            return Ok(g.clone());
        }
        if let Some(bad) = format.labels.iter().find(|l| !LabelFormat::is_plain(l)) {
            bail!("structured judge output: the label {bad:?} is blank or holds a quote, a backslash or a control character; rename it");
        }
        if self.compiler.is_none() {
            self.compiler = Some(GrammarCompiler::for_model(&self.model.loaded)?);
        }
        let compiler = self.compiler.as_ref().expect("built above");
        let labels = format.labels.iter().map(|l| lark_literal(l)).collect::<Vec<_>>().join(" | ");
        let close = lark_literal("\"}");
        let (lark, after) = match format.analysis_tokens {
            Some(n) => {
                let prefix = compiler.tokenize(&format.label_prefix());
                (format!("start: analysis {} label {close}\nanalysis[max_tokens={}]: /[^{{}}]*/\nlabel: {labels}\n", lark_tokens(&prefix), n.max(1)), prefix)
            }
            None => (format!("start: label {close}\nlabel: {labels}\n"), Vec::new()),
        };
        let g = compiler.compile(&lark, Some(Choice { after, options: format.labels.clone() }))?;
        self.grammars.insert(format.clone(), g.clone());
        Ok(g)
    }

    /// The loaded model (its config, tokenizer, description).
    pub fn model(&self) -> &LocalModel {
        &self.model
    }
}

impl Backend for LocalBackend {
    fn model_id(&self) -> &str {
        &self.model.loaded.description.id
    }

    fn device(&self) -> String {
        self.model.loaded.description.device.clone()
    }

    fn location(&self) -> String {
        format!("the local engine ({})", self.model.loaded.description.device)
    }

    fn preset(&self) -> Option<&Preset> {
        self.model.preset.as_ref()
    }

    fn think(&self) -> ThinkConvention {
        self.prompter.think().clone()
    }

    fn manifest_model(&self) -> Value {
        let d = &self.model.loaded.description;
        json!({
            "id": d.id,
            "architecture": d.architecture,
            "files": d.files.iter().map(|f| json!({"name": PathBuf::from(&f.path).file_name().map(|n| n.to_string_lossy().into_owned()), "sha256": f.sha256})).collect::<Vec<_>>(),
            // "none", not null: a run without an adapter must not resume with one.
            "adapter": d.adapter.as_ref().map_or(json!("none"), |a| serde_json::to_value(a).expect("adapter serialises")),
        })
    }

    fn manifest_prompt(&self, system_flag: Option<&str>, rules: Option<&SafetyRules>) -> Value {
        let p = &self.prompter;
        let placement = Placement::for_template(p.system_role());
        json!({
            "chat_template_sha256": p.template_sha256(),
            "system": system_flag,
            "system_placement": if p.system().is_some() { Some(if p.system_role() { "system message" } else { "prepended to the user turn" }) } else { None },
            "safety_rules": SafetyRules::manifest_entry(rules, placement),
            "enable_thinking": p.enable_thinking(),
            "think_tags": [p.think().open, p.think().close],
        })
    }

    fn manifest_judge(&self) -> Value {
        let d = &self.model.loaded.description;
        json!({"model": d.id, "files": d.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>()})
    }

    fn complete(&mut self, requests: Vec<Request>, on_completion: &mut dyn FnMut(Completion) -> Result<()>, on_progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let mut grammars = Vec::with_capacity(requests.len());
        for r in &requests {
            if r.label_format.is_some() && r.reply_start.is_some() {
                bail!("{}: a structured reply starts where its format says; it cannot also be given a reply start", r.label);
            }
            grammars.push(r.label_format.as_ref().map(|f| self.grammar(f)).transpose()?);
        }
        let m = &self.model.loaded;
        let context = m.config.max_position_embeddings;
        // Per tag: its stop strings and the reply start its text begins with.
        let mut samples: HashMap<usize, (Vec<String>, Option<String>)> = HashMap::new();
        let mut groups = Vec::with_capacity(requests.len());
        for (mut r, grammar) in requests.into_iter().zip(grammars) {
            if let Some(f) = &r.label_format {
                r.reply_start = f.reply_start();
            }
            let mut text = self.prompter.render_messages(&r.messages)?;
            if let Some(start) = &r.reply_start {
                text.push_str(start);
            }
            let prompt = m.tokenize_prompt(&text)?;
            let longest = r.samples.iter().map(|s| s.decoding.max_new_tokens).max().unwrap_or(0);
            if prompt.len() + longest > context {
                eprintln!("warning: {}: prompt ({} tokens) + --max-new-tokens {longest} exceeds the model's context of {context}", r.label, prompt.len());
            }
            let specs = r
                .samples
                .into_iter()
                .map(|s| {
                    let spec = SampleSpec { tag: s.tag, params: sampling_params(&s.decoding), stream: s.stream, max_new_tokens: s.decoding.max_new_tokens, grammar: grammar.clone() };
                    samples.insert(s.tag, (s.decoding.stop, r.reply_start.clone()));
                    spec
                })
                .collect();
            groups.push(PromptGroup { prompt, samples: specs });
        }
        let tokenizer = &m.tokenizer;
        let mut stop = |tag: usize, tokens: &[u32]| samples.get(&tag).is_some_and(|(stops, _)| StopStrings(stops).hit(tokenizer, tokens));
        let mut on_done = |f: scheduler::Finished| -> Result<()> {
            let (stops, start) = samples.get(&f.tag).expect("every tag was submitted");
            let mut text = tokenizer.decode(&f.tokens, false).map_err(|e| anyhow::anyhow!("decoding a completion: {e}"))?;
            if f.finish == scheduler::FinishReason::StopString {
                StopStrings(stops).cut(&mut text);
            }
            if let Some(start) = start {
                text.insert_str(0, start);
            }
            on_completion(Completion { tag: f.tag, text, reasoning: None, finish: f.finish.into(), prompt_tokens: f.prompt_len, completion_tokens: f.tokens.len(), refused: None, label_probs: f.choice_probs })
        };
        let mut on_step = |s: scheduler::StepStats| {
            on_progress(Progress { decoded_tokens: s.decode_tokens, running: s.running, prefill: PrefillStats { computed: s.prefill_tokens, cached: s.cached_prefill_tokens } })
        };
        scheduler::run(m.model.as_ref(), &mut self.cache, &self.sched, groups, &mut stop, &mut on_done, &mut on_step)
    }
}
