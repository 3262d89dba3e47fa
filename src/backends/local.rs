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
                // The same checks as a judge's up-front check: a cut-off download is named as
                // one, with the fix, before the weights are read.
                super::check_gguf(p)?;
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

/// How big the KV cache is and how long one sequence may grow: the engine flags
/// (`--kv-cache-mb`, `--gpu-memory-utilization`, `--block-size`, `--max-model-len`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSizing {
    /// The cache's memory in MiB; None: sized from the device (see [`crate::engine::memory`]).
    pub kv_cache_mb: Option<usize>,
    /// On a GPU, the share of the device's memory the engine may use (vLLM's
    /// `gpu_memory_utilization`), in (0, 1].
    pub gpu_memory_utilization: f64,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Most tokens of one sequence, prompt and generated; None: the smaller of the model's
    /// context and what the cache holds.
    pub max_model_len: Option<usize>,
}

impl Default for CacheSizing {
    fn default() -> Self {
        CacheSizing { kv_cache_mb: None, gpu_memory_utilization: 0.9, block_size: 16, max_model_len: None }
    }
}

/// The KV cache the engine builds and the longest sequence it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePlan {
    pub blocks: usize,
    pub block_size: usize,
    /// The pool's bytes (blocks x block bytes).
    pub bytes: u64,
    /// "f32" on the CPU (attention reads the pool in place), the weights' dtype on a GPU.
    pub dtype: DType,
    /// How the size was chosen ("--kv-cache-mb 512", "25% of the 15.2 GiB of RAM available").
    pub sized_by: String,
    /// Most tokens of one sequence (prompt and generated).
    pub max_model_len: usize,
    /// Why that limit: "set by --max-model-len", "the model's context", "what the KV cache
    /// holds".
    pub limited_by: &'static str,
}

impl CachePlan {
    /// Tokens the cache holds.
    pub fn tokens(&self) -> usize {
        self.blocks * self.block_size
    }

    /// Sequences of the full length that fit in the cache at once (each takes whole blocks).
    pub fn full_length_sequences(&self) -> usize {
        self.blocks / self.max_model_len.max(1).div_ceil(self.block_size)
    }

    /// "KV cache: 1.0 GiB, 21845 tokens (F32, blocks of 16; 25% of ...); sequences up to 8192
    /// tokens (the model's context); full-length sequences that fit at once: 2".
    pub fn describe(&self) -> String {
        format!(
            "KV cache: {}, {} tokens ({:?}, blocks of {}; {}); sequences up to {} tokens ({}); full-length sequences that fit at once: {}",
            crate::engine::memory::gib(self.bytes),
            self.tokens(),
            self.dtype,
            self.block_size,
            self.sized_by,
            self.max_model_len,
            self.limited_by,
            self.full_length_sequences()
        )
    }

    /// The manifest's record of the cache (not part of the job: a resume may size it anew).
    pub fn manifest_entry(&self) -> Value {
        json!({
            "kv_cache_bytes": self.bytes,
            "kv_cache_tokens": self.tokens(),
            "kv_cache_dtype": format!("{:?}", self.dtype),
            "block_size": self.block_size,
            "sized_by": self.sized_by,
            "max_model_len": self.max_model_len,
            "max_model_len_from": self.limited_by,
            "full_length_sequences": self.full_length_sequences(),
        })
    }
}

impl LocalModel {
    /// Sizes the KV cache for this model (loaded on `device` with `dtype`) and a scheduler
    /// running `batch` sequences and prefilling `prefill_chunk` tokens a step. Refuses, with
    /// the numbers and the fix, a size that holds no block, a `--max-model-len` the cache or
    /// the model's context cannot hold.
    pub fn plan_cache(&self, sizing: &CacheSizing, device: &Device, dtype: DType, batch: usize, prefill_chunk: usize) -> Result<CachePlan> {
        use crate::engine::memory;
        let config = &self.loaded.config;
        let bs = sizing.block_size;
        if bs == 0 {
            bail!("--block-size 0: a KV-cache block holds at least 1 token (16 is usual)");
        }
        let kv_dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let block_bytes = KvCache::block_bytes(config, bs, kv_dtype) as u64;
        let (bytes, sized_by) = match sizing.kv_cache_mb {
            Some(mb) => ((mb as u64) << 20, format!("--kv-cache-mb {mb}")),
            None if device.is_cuda() => {
                let mem = memory::device_memory(device)?.ok_or_else(|| anyhow::anyhow!("the GPU's memory cannot be read; give the cache a size with --kv-cache-mb"))?;
                // One step's activations: hidden states and MLP intermediates for every token
                // of the step, logits rows for the sequences sampling, and room for the
                // CUDA context and cuBLAS workspace.
                let step_tokens = (batch + prefill_chunk) as u64;
                let act = step_tokens * (12 * config.hidden_size + 3 * config.intermediate_size) as u64 * 4;
                let logits = 2 * batch as u64 * config.vocab_size as u64 * 4;
                let reserve = act + logits + (512 << 20);
                let u = sizing.gpu_memory_utilization;
                let bytes = memory::gpu_cache_bytes(mem, u, reserve)?;
                (bytes, format!("{:.0}% of the GPU's {}, less the {} in use and {} kept for activations", u * 100.0, memory::gib(mem.total), memory::gib(mem.total - mem.free), memory::gib(reserve)))
            }
            None => {
                let mem = memory::device_memory(device)?;
                let bytes = memory::cpu_cache_bytes(mem);
                let how = match mem {
                    Some(m) => format!("{:.0}% of the {} of RAM available, at most {}", memory::CPU_SHARE * 100.0, memory::gib(m.free), memory::gib(memory::CPU_CAP_BYTES)),
                    None => "the RAM available cannot be read here; --kv-cache-mb sets it".into(),
                };
                (bytes, how)
            }
        };
        let blocks = (bytes / block_bytes) as usize;
        if blocks == 0 {
            bail!(
                "{sized_by} holds no KV-cache block: one block of {bs} tokens takes {} KiB for this model; give at least {} MiB (--kv-cache-mb)",
                block_bytes.div_ceil(1024),
                block_bytes.div_ceil(1 << 20).max(1)
            );
        }
        let tokens = blocks * bs;
        let context = config.max_position_embeddings;
        let (max_model_len, limited_by) = match sizing.max_model_len {
            Some(0) => bail!("--max-model-len 0: a sequence holds at least its prompt and one token"),
            Some(n) if n > context => bail!("--max-model-len {n} is longer than the model's context of {context} tokens (max_position_embeddings), past which its positions were never trained; give at most {context}"),
            Some(n) if n > tokens => bail!(
                "--max-model-len {n} needs {} KV-cache blocks of {bs} tokens, but {sized_by} holds {blocks} ({tokens} tokens); give the cache at least {} MiB (--kv-cache-mb) or lower --max-model-len to {tokens}",
                n.div_ceil(bs),
                (n.div_ceil(bs) as u64 * block_bytes).div_ceil(1 << 20)
            ),
            Some(n) => (n, "set by --max-model-len"),
            None if context <= tokens => (context, "the model's context"),
            None => (tokens, "what the KV cache holds"),
        };
        Ok(CachePlan { blocks, block_size: bs, bytes: blocks as u64 * block_bytes, dtype: kv_dtype, sized_by, max_model_len, limited_by })
    }

    /// The paged KV cache of `plan` on `device`.
    pub fn kv_cache(&self, plan: &CachePlan, device: &Device) -> Result<KvCache> {
        Ok(KvCache::new(&self.loaded.config, plan.block_size, plan.blocks, plan.dtype, device)?)
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
            Engine::Error => FinishReason::Error,
        }
    }
}

type DecodeStream<'a> = tokenizers::DecodeStream<'a, tokenizers::ModelWrapper, tokenizers::NormalizerWrapper, tokenizers::PreTokenizerWrapper, tokenizers::PostProcessorWrapper, tokenizers::DecoderWrapper>;

/// One sample's stop strings (`--stop`, a request's `stop`), matched as it decodes. The
/// scheduler asks after every token; the matcher decodes only the new token (the tokenizer's
/// incremental [`tokenizers::DecodeStream`], which holds back an incomplete UTF-8 character
/// until its last byte comes) and searches only the text that a new match could touch, so a
/// 32k-token trace costs time linear in its length, and a stop string split across tokens
/// is found when its last piece arrives.
pub struct StopMatcher<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    stops: Vec<String>,
    /// None when there is nothing to match, or after the stream failed (then every call
    /// decodes the whole text, as a fallback).
    stream: Option<DecodeStream<'a>>,
    /// Tokens already fed.
    seen: usize,
    /// The text decoded so far (complete characters only).
    text: String,
    /// Bytes of the longest stop string.
    longest: usize,
}

impl<'a> StopMatcher<'a> {
    pub fn new(tokenizer: &'a tokenizers::Tokenizer, stops: &[String]) -> StopMatcher<'a> {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let stream = (!stops.is_empty()).then(|| tokenizer.decode_stream(false));
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher { tokenizer, stops, stream, seen: 0, text: String::new(), longest }
    }

    /// Whether the text of `tokens` (the sample's tokens so far: the ones not seen before are
    /// read) contains a stop string.
    pub fn hit(&mut self, tokens: &[u32]) -> bool {
        if self.stops.is_empty() || tokens.len() <= self.seen {
            return false;
        }
        let new = &tokens[self.seen..];
        self.seen = tokens.len();
        let Some(stream) = self.stream.as_mut() else { return self.hit_whole(tokens) };
        // A new match ends in the new text, so it starts at most longest - 1 bytes before it.
        let mut from = self.text.len().saturating_sub(self.longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        for &t in new {
            match stream.step(t) {
                Ok(Some(chunk)) => self.text.push_str(&chunk),
                Ok(None) => {}
                Err(_) => {
                    // The stream could not line its chunks up (a decoder it does not model):
                    // decode the whole text from here on.
                    self.stream = None;
                    return self.hit_whole(tokens);
                }
            }
        }
        let tail = &self.text[from..];
        self.stops.iter().any(|s| tail.contains(s.as_str()))
    }

    /// The fallback: whether the whole decoded text of `tokens` contains a stop string.
    fn hit_whole(&self, tokens: &[u32]) -> bool {
        let text = self.tokenizer.decode(tokens, false).unwrap_or_default();
        self.stops.iter().any(|s| text.contains(s.as_str()))
    }
}

/// The text of a finished sample's `tokens`: decoded whole, without an incomplete UTF-8
/// character at its end (a multi-byte character the token limit split would decode as
/// U+FFFD; it is dropped, as a stream holds it back), and cut before the earliest of the
/// `stops` when `stopped` (the sample ended on one).
pub fn completion_text(tokenizer: &tokenizers::Tokenizer, tokens: &[u32], stops: &[String], stopped: bool) -> Result<String> {
    let decode = |t: &[u32]| tokenizer.decode(t, false).map_err(|e| anyhow::anyhow!("decoding a completion: {e}"));
    let mut text = decode(tokens)?;
    if text.ends_with('\u{FFFD}') {
        // A UTF-8 character has at most 4 bytes, and every token at least one: the split
        // character's bytes are in the last 3 tokens. A text that still ends in U+FFFD
        // without them had a replacement character before; it is kept as decoded.
        for cut in 1..=tokens.len().min(3) {
            let shorter = decode(&tokens[..tokens.len() - cut])?;
            if !shorter.ends_with('\u{FFFD}') {
                text = shorter;
                break;
            }
        }
    }
    if stopped {
        if let Some(cut) = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
    }
    Ok(text)
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
    /// The KV cache's size and the longest sequence.
    pub cache: CacheSizing,
    /// Automatic prefix caching: prompt blocks computed once are reused by every later prompt
    /// that starts with the same tokens (`--no-prefix-cache` turns it off).
    pub prefix_cache: bool,
    /// A PEFT LoRA adapter merged into the weights at load (`--adapter DIR`).
    pub adapter: Option<PathBuf>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions { device: "auto".into(), dtype: "auto".into(), batch_size: 16, prefill_chunk: 512, cache: CacheSizing::default(), prefix_cache: true, adapter: None }
    }
}

/// Completions from a model loaded into the local engine: every request is one prompt group
/// (its samples share one prefill), all of them in one continuous batch.
pub struct LocalBackend {
    model: LocalModel,
    prompter: Prompter,
    cache: KvCache,
    plan: CachePlan,
    sched: SchedulerConfig,
    /// See [`crate::engine::tokenizer::max_text_bytes_per_token`].
    max_text_bytes_per_token: usize,
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
        let plan = model.plan_cache(&opts.cache, &device, dtype, opts.batch_size, opts.prefill_chunk)?;
        let mut cache = model.kv_cache(&plan, &device)?;
        cache.set_prefix_caching(opts.prefix_cache);
        let sched = SchedulerConfig { max_batch: opts.batch_size, prefill_chunk: opts.prefill_chunk, eos: model.loaded.eos_ids.clone(), max_model_len: Some(plan.max_model_len) };
        let max_text_bytes_per_token = crate::engine::tokenizer::max_text_bytes_per_token(&model.loaded.tokenizer);
        Ok(LocalBackend { model, prompter, cache, plan, sched, max_text_bytes_per_token, compiler: None, grammars: HashMap::new() })
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

    fn cache_plan(&self) -> Option<&CachePlan> {
        Some(&self.plan)
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
        let max_len = self.plan.max_model_len;
        // Per tag: its stop strings and the reply start its text begins with.
        let mut samples: HashMap<usize, (Vec<String>, Option<String>)> = HashMap::new();
        let mut groups = Vec::with_capacity(requests.len());
        let mut capped = 0;
        let n_requests = requests.len();
        let mut failed: Vec<Completion> = Vec::new();
        let mut failed_requests = 0;
        for (mut r, grammar) in requests.into_iter().zip(grammars) {
            if let Some(f) = &r.label_format {
                r.reply_start = f.reply_start();
            }
            let mut text = self.prompter.render_messages(&r.messages)?;
            if let Some(start) = &r.reply_start {
                text.push_str(start);
            }
            // A prompt that cannot fit is that request's failure, not the run's; one far
            // too long is known from its bytes, without tokenizing megabytes.
            let prompt = if text.len() > max_len.saturating_mul(self.max_text_bytes_per_token) { None } else { Some(m.tokenize_prompt(&text)?) };
            if prompt.as_ref().is_none_or(|p| p.len() >= max_len) {
                let error = match &prompt {
                    Some(p) => format!("{}: the prompt has {} tokens, and a sequence may have at most {max_len} ({}), so no token could be generated", r.label, p.len(), self.plan.limited_by),
                    None => format!("{}: the prompt ({} bytes) has more than {max_len} tokens, the most a sequence may have ({})", r.label, text.len(), self.plan.limited_by),
                };
                failed_requests += 1;
                for s in &r.samples {
                    let prompt_tokens = prompt.as_ref().map_or(0, Vec::len);
                    let c = if r.accept_refusal {
                        Completion { prompt_tokens, ..Completion::refused(s.tag, error.clone()) }
                    } else {
                        Completion { tag: s.tag, text: String::new(), reasoning: None, finish: FinishReason::Error, prompt_tokens, completion_tokens: 0, refused: None, label_probs: None, error: Some(error.clone()) }
                    };
                    failed.push(c);
                }
                continue;
            }
            let prompt = prompt.expect("checked above");
            if r.samples.iter().any(|s| prompt.len() + s.decoding.max_new_tokens > max_len) {
                capped += 1;
            }
            let specs = r
                .samples
                .into_iter()
                .map(|s| {
                    let spec = SampleSpec { tag: s.tag, params: sampling_params(&s.decoding), stream: s.stream, max_new_tokens: s.decoding.max_new_tokens, ignore_eos: s.decoding.ignore_eos, grammar: grammar.clone(), logprobs: None };
                    samples.insert(s.tag, (s.decoding.stop, r.reply_start.clone()));
                    spec
                })
                .collect();
            groups.push(PromptGroup { prompt, samples: specs });
        }
        // Not one prompt fits: the limit is wrong for this job, which is refused before anything
        // is recorded (a run of nothing but failed samples would have to be redone anyway).
        if n_requests > 0 && failed_requests == n_requests {
            let first = failed.iter().find_map(|c| c.error.clone().or_else(|| c.refused.clone())).unwrap_or_default();
            bail!(
                "every prompt is longer than the longest sequence allowed, {max_len} tokens ({}); first: {first}; give the KV cache more memory (--kv-cache-mb) or raise --max-model-len",
                self.plan.limited_by
            );
        }
        for c in failed {
            on_completion(c)?;
        }
        if capped > 0 {
            eprintln!(
                "warning: {capped} prompt(s) plus their max new tokens are longer than the longest sequence, {max_len} tokens ({}); their samples end there with finish reason length",
                self.plan.limited_by
            );
        }
        let tokenizer = &m.tokenizer;
        let mut matchers: HashMap<usize, StopMatcher> = samples.iter().map(|(&tag, (stops, _))| (tag, StopMatcher::new(tokenizer, stops))).collect();
        let mut stop = |tag: usize, tokens: &[u32], _: &[scheduler::TokenLogprob]| matchers.get_mut(&tag).is_some_and(|m| m.hit(tokens));
        let mut on_done = |f: scheduler::Finished| -> Result<()> {
            let (stops, start) = samples.get(&f.tag).expect("every tag was submitted");
            let mut text = completion_text(tokenizer, &f.tokens, stops, f.finish == scheduler::FinishReason::StopString)?;
            if let Some(start) = start {
                text.insert_str(0, start);
            }
            on_completion(Completion {
                tag: f.tag,
                text,
                reasoning: None,
                finish: f.finish.into(),
                prompt_tokens: f.prompt_len,
                completion_tokens: f.tokens.len(),
                refused: None,
                label_probs: f.choice_probs,
                error: f.error,
            })
        };
        let mut on_step = |s: scheduler::StepStats| {
            on_progress(Progress { decoded_tokens: s.decode_tokens, running: s.running, prefill: PrefillStats { computed: s.prefill_tokens, cached: s.cached_prefill_tokens }, preempted: s.preempted })
        };
        scheduler::run(m.model.as_ref(), &mut self.cache, &self.sched, groups, &mut stop, &mut on_done, &mut on_step)
    }
}
