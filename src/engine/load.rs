//! Loading a model: a Hugging Face layout (config.json, tokenizer.json,
//! tokenizer_config.json, *.safetensors; local, or files fetched by the caller) or a single
//! GGUF file (tokenizer and chat template from its metadata); and the device and dtype it
//! runs in. Which model a name means (a preset, a hub id) is the backends' business.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;

use super::config::{Architecture, ModelConfig};
use super::models::{self, CausalLM};
use super::tokenizer;

/// A file the model was loaded from, with its content hash.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What the manifest records about a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescription {
    pub id: String,
    pub architecture: String,
    pub dtype: String,
    pub device: String,
    pub files: Vec<ModelFile>,
    /// A LoRA adapter merged into the weights (`--adapter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<super::lora::AdapterDescription>,
}

/// A loaded model with everything needed to prompt it.
pub struct LoadedModel {
    pub model: Box<dyn CausalLM>,
    pub config: ModelConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    pub eos_token: Option<String>,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    pub description: ModelDescription,
}

impl LoadedModel {
    /// Tokenizes a rendered prompt (see [`super::tokenizer::encode_prompt`]): special tokens
    /// written as text are parsed as tokens, and a BOS is added only when the model wants
    /// one and the text lacks it.
    pub fn tokenize_prompt(&self, text: &str) -> Result<Vec<u32>> {
        tokenizer::encode_prompt(&self.tokenizer, self.prompt_bos(), text)
    }

    /// The BOS (id, text) a prompt must start with, when the model wants one.
    pub fn prompt_bos(&self) -> Option<(u32, &str)> {
        self.add_bos.then_some(self.bos_id).flatten().zip(self.bos_token.as_deref())
    }
}

/// Parses `--device`: `cpu`, `cuda`, `cuda:N`, `metal`, or `auto` (the best available).
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        // The best device this binary and machine have: a GPU build on a machine whose GPU
        // cannot be opened falls back to the CPU rather than failing.
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this bsa binary was built without CUDA; rebuild with `cargo build --release --features cuda` (or use --device cpu)");
            }
            let n: usize = s.strip_prefix("cuda:").map_or(Ok(0), |n| n.parse()).map_err(|_| anyhow::anyhow!("--device {s}: write cuda or cuda:N"))?;
            // candle's error carries a backtrace in its text: keep the first line only.
            Device::new_cuda(n).map_err(|e| {
                let cause = e.to_string();
                anyhow::anyhow!(
                    "--device {s}: cannot open CUDA device {n} ({}); check that `nvidia-smi` lists it and that the NVIDIA driver (CUDA 13.0 or newer) is installed, or use --device cpu",
                    cause.lines().next().unwrap_or_default()
                )
            })
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this bsa binary was built without Metal; rebuild with `cargo build --release --features metal`");
            }
            Ok(Device::new_metal(0)?)
        }
        s => bail!("--device {s:?}: use auto, cpu, cuda, cuda:N or metal"),
    }
}

/// Parses `--dtype`; `auto` is f32 on the CPU and bf16 on a GPU.
pub fn dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec {
        "auto" => if device.is_cpu() { DType::F32 } else { DType::BF16 },
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        s => bail!("--dtype {s:?}: use auto, f32, bf16 or f16"),
    })
}

fn gguf_str(content: &candle_core::quantized::gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// Loads a llama.cpp GGUF file: configuration, tokenizer and chat template from its
/// metadata; quantized weights stay quantized.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let name = path.display().to_string();
    let mut reader = BufReader::new(File::open(path).with_context(|| format!("cannot open {name}"))?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader)
        .map_err(|e| anyhow::anyhow!("{name}: not a GGUF model file ({e}); --model takes a .gguf file, a model directory or a hub id"))?;
    let arch = gguf_str(&content, "general.architecture")
        .ok_or_else(|| anyhow::anyhow!("{name}: the GGUF has no general.architecture: it is not a model"))?;
    if Architecture::from_gguf_name(&arch).is_none() {
        bail!("{name}: architecture {arch:?} is not supported yet; supported: llama, qwen2, qwen3");
    }
    let config = ModelConfig::from_gguf(&content).with_context(|| format!("{name}: reading the model configuration"))?;
    let tok = tokenizer::from_gguf(&content).with_context(|| format!("{name}: building the tokenizer"))?;
    let model = models::load_gguf(&config, &content, &mut reader, device).with_context(|| format!("{name}: loading the weights"))?;
    let id = gguf_str(&content, "general.name").unwrap_or_else(|| path.file_stem().map_or(name.clone(), |s| s.to_string_lossy().into_owned()));
    Ok(LoadedModel {
        model,
        config,
        tokenizer: tok.tokenizer,
        bos_token: Some(tok.bos_token).filter(|s| !s.is_empty()),
        bos_id: tok.bos_id,
        add_bos: tok.add_bos,
        eos_token: Some(tok.eos_token).filter(|s| !s.is_empty()),
        eos_ids: tok.eos_ids,
        chat_template: tok.chat_template,
        description: ModelDescription {
            id,
            architecture: arch,
            dtype: "gguf".into(),
            device: format!("{device:?}"),
            files: vec![file_hash(path)?],
            adapter: None,
        },
    })
}

/// A token in tokenizer_config.json is a string or an AddedToken object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// The shard files named by a `model.safetensors.index.json`, sorted, each once.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let idx = read_json(index)?;
    let mut shards: Vec<String> = idx
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow::anyhow!("{}: no weight_map", index.display()))?
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Loads a Hugging Face layout (config.json, tokenizer.json, tokenizer_config.json,
/// *.safetensors), local or from the hub: `fetch` maps a file name to a path (None when the
/// model has no such file); `label` names the model in errors and the description. A LoRA
/// `adapter` is merged into the weights at load.
pub fn load_dir(
    label: &str,
    fetch: impl Fn(&str) -> Result<Option<PathBuf>>,
    device: &Device,
    dtype: DType,
    adapter: Option<super::lora::LoraAdapter>,
) -> Result<LoadedModel> {
    let need = |name: &str| -> Result<PathBuf> {
        fetch(name)?.ok_or_else(|| anyhow::anyhow!("{label}: missing {name}; a model directory needs config.json, tokenizer.json, tokenizer_config.json and *.safetensors"))
    };
    let config_path = need("config.json")?;
    let config_text = std::fs::read_to_string(&config_path)?;
    let config = ModelConfig::from_hf_config(&config_text).with_context(|| format!("{}", config_path.display()))?;
    let tokenizer_path = need("tokenizer.json")?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", tokenizer_path.display()))?;
    let tcfg = match fetch("tokenizer_config.json")? {
        Some(p) => read_json(&p)?,
        None => Value::Null,
    };
    let chat_template = match tcfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // Newer files list named templates; the default one is what chat uses.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    }
    .or_else(|| fetch("chat_template.jinja").ok().flatten().and_then(|p| std::fs::read_to_string(p).ok()));
    let bos_token = token_text(tcfg.get("bos_token"));
    let eos_token = token_text(tcfg.get("eos_token"));
    let add_bos = tcfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    // End of generation: generation_config.json, else config.json, else the eos token.
    let config_json: Value = serde_json::from_str(&config_text)?;
    let gen_cfg = fetch("generation_config.json")?.map(|p| read_json(&p)).transpose()?.unwrap_or(Value::Null);
    let mut eos_ids: Vec<u32> = Vec::new();
    for v in [gen_cfg.get("eos_token_id"), config_json.get("eos_token_id")].into_iter().flatten() {
        match v {
            Value::Number(n) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
            Value::Array(a) => eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
            _ => {}
        }
        if !eos_ids.is_empty() {
            break;
        }
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    // Weights: one file or a sharded index.
    let mut weight_files = Vec::new();
    if let Some(p) = fetch("model.safetensors")? {
        weight_files.push(p);
    } else if let Some(index) = fetch("model.safetensors.index.json")? {
        for s in shard_names(&index)? {
            weight_files.push(need(&s)?);
        }
    } else {
        bail!("{label}: no model.safetensors or model.safetensors.index.json; the weights must be safetensors");
    }
    if dtype == DType::BF16 && device.is_cpu() {
        // candle's CPU matmul has no bf16 kernels worth using; say so instead of crawling.
        bail!("--dtype bf16 is not supported on the CPU; use --dtype f32 (the default there)");
    }
    let adapter_description = adapter.as_ref().map(|a| a.description.clone());
    let vb = match adapter {
        Some(a) => super::lora::merged_var_builder(&weight_files, a, dtype, device).with_context(|| format!("{label}: merging the adapter"))?,
        // SAFETY: the files are memory-mapped read-only and not modified while the model lives.
        None => unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weight_files, dtype, device)? },
    };
    let model = models::load_safetensors(&config, vb).with_context(|| format!("{label}: loading the weights"))?;
    let mut files = vec![file_hash(&config_path)?];
    for f in &weight_files {
        files.push(file_hash(f)?);
    }
    Ok(LoadedModel {
        model,
        config: config.clone(),
        tokenizer,
        bos_token,
        bos_id,
        add_bos,
        eos_token,
        eos_ids,
        chat_template,
        description: ModelDescription {
            id: label.to_string(),
            architecture: format!("{:?}", config.arch).to_lowercase(),
            dtype: format!("{dtype:?}").to_lowercase(),
            device: format!("{device:?}"),
            files,
            adapter: adapter_description,
        },
    })
}

/// Content hash of a model file. Files in the hub cache are named by their hash already
/// (the blob a snapshot links to), which saves reading tens of gigabytes.
pub fn file_hash(path: &Path) -> Result<ModelFile> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let bytes = meta.len();
    if let Ok(target) = std::fs::canonicalize(path) {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if target.parent().is_some_and(|p| p.ends_with("blobs")) && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(ModelFile { path: path.display().to_string(), bytes, sha256: name });
        }
    }
    let mut f = File::open(path)?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(0))?;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
    }
    let digest = sha2::Digest::finalize(hasher);
    Ok(ModelFile { path: path.display().to_string(), bytes, sha256: digest.iter().map(|b| format!("{b:02x}")).collect() })
}

#[cfg(all(test, not(feature = "cuda"), not(feature = "metal")))]
mod device_tests {
    use super::*;

    #[test]
    fn device_spec_errors_name_the_fix() {
        assert!(device("auto").unwrap().is_cpu());
        assert!(device("cpu").unwrap().is_cpu());
        let e = device("cuda:1").unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
        let e = device("metal").unwrap_err().to_string();
        assert!(e.contains("built without Metal"), "{e}");
        let e = device("tpu").unwrap_err().to_string();
        assert_eq!(e, "--device \"tpu\": use auto, cpu, cuda, cuda:N or metal");
        assert_eq!(dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert!(dtype("fp8", &Device::Cpu).is_err());
    }
}
