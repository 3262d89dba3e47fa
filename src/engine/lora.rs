//! PEFT LoRA adapters (`--adapter DIR`), merged into the base weights as they load.
//!
//! An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, and
//! optionally use_rslora / fan_in_fan_out) and `adapter_model.safetensors` with, per adapted
//! linear layer, `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight`
//! `[out, r]`. Each adapted base weight becomes `W + scale * B @ A` with
//! `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with use_rslora), computed in f32 and then
//! cast to the model's dtype, so the merged model runs exactly like a full checkpoint: no
//! per-token adapter cost and every engine path (batching, paging, sampling) unchanged.
//!
//! Only Hugging Face safetensors bases are supported: a GGUF's weights are quantized, and
//! merging into them would mean dequantize-add-requantize, which changes every weight by a
//! fresh quantization error and no longer equals the fine-tuned model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;
use serde_json::Value;

use super::load::file_hash;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The linear layers of Llama / Qwen2 / Qwen3 an adapter may target.
pub const MERGEABLE_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What the manifest records about an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterDescription {
    /// The directory's name (not its full path, so a moved adapter still resumes).
    pub name: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub scale: f64,
    pub target_modules: Vec<String>,
    /// How many weight matrices the adapter changes.
    pub merged_weights: usize,
    /// File names and sha256 (names only: the run resumes from wherever the adapter lives).
    pub files: Vec<AdapterFile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterFile {
    pub name: &'static str,
    pub sha256: String,
}

/// A validated adapter: its factors per base weight name.
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub description: AdapterDescription,
    /// Base tensor name (`model.layers.0.self_attn.q_proj.weight`) -> (A `[r, in]`, B `[out, r]`), f32.
    factors: BTreeMap<String, (Tensor, Tensor)>,
}

fn field<'a>(cfg: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

impl LoraAdapter {
    /// Reads and checks an adapter directory (the base model is checked in [`merged_var_builder`]).
    pub fn open(dir: &Path) -> Result<LoraAdapter> {
        let hint = "a PEFT LoRA adapter directory holds adapter_config.json and adapter_model.safetensors";
        if !dir.is_dir() {
            bail!("--adapter {}: no such directory; {hint}", dir.display());
        }
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let w_path = dir.join(ADAPTER_WEIGHTS);
        if !cfg_path.exists() {
            bail!("--adapter {}: missing {ADAPTER_CONFIG}; {hint}", dir.display());
        }
        if !w_path.exists() {
            let bin = if dir.join("adapter_model.bin").exists() {
                " (there is an adapter_model.bin: save the adapter with safe_serialization=True, or convert it to safetensors)"
            } else {
                ""
            };
            bail!("--adapter {}: missing {ADAPTER_WEIGHTS}{bin}; {hint}", dir.display());
        }
        let cfg_name = cfg_path.display();
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {cfg_name}"))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{cfg_name}: not valid JSON"))?;
        let cfg = json.as_object().ok_or_else(|| anyhow::anyhow!("{cfg_name}: expected a JSON object"))?;

        if let Some(t) = field(cfg, "peft_type").and_then(Value::as_str) {
            if !t.eq_ignore_ascii_case("lora") {
                bail!("{cfg_name}: field `peft_type` is {t:?}; only LORA adapters can be merged");
            }
        }
        let r = field(cfg, "r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| anyhow::anyhow!("{cfg_name}: field `r` (the LoRA rank) is missing or not a positive integer"))? as usize;
        let lora_alpha = field(cfg, "lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow::anyhow!("{cfg_name}: field `lora_alpha` is missing or not a number"))?;
        let flag = |key: &str| -> Result<bool> {
            match field(cfg, key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => bail!("{cfg_name}: field `{key}` is {v}; expected true or false"),
            }
        };
        let use_rslora = flag("use_rslora")?;
        if flag("fan_in_fan_out")? {
            bail!("{cfg_name}: field `fan_in_fan_out` is true, which is for GPT-2 style Conv1D layers stored [in, out]; Llama/Qwen2/Qwen3 linear layers are [out, in], so this adapter was made for another architecture");
        }
        if flag("use_dora")? {
            bail!("{cfg_name}: field `use_dora` is true; DoRA adapters are not supported (only plain LoRA merges into the weights)");
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(cfg, key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                bail!("{cfg_name}: field `{key}` sets per-module ranks or alphas, which is not supported; only one r and lora_alpha for all modules");
            }
        }
        if let Some(b) = field(cfg, "bias").and_then(Value::as_str).filter(|b| *b != "none") {
            bail!("{cfg_name}: field `bias` is {b:?}; only adapters trained with bias=\"none\" are supported");
        }
        if field(cfg, "modules_to_save").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            bail!("{cfg_name}: field `modules_to_save` lists modules the adapter replaces whole; that is not supported (only LoRA factors are merged)");
        }
        let target_modules: Vec<String> = match field(cfg, "target_modules") {
            Some(Value::String(s)) if s == "all-linear" => MERGEABLE_MODULES.iter().map(|m| m.to_string()).collect(),
            Some(Value::String(s)) => bail!(
                "{cfg_name}: field `target_modules` is the pattern {s:?}; list the modules instead, from {}",
                MERGEABLE_MODULES.join(", ")
            ),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{cfg_name}: field `target_modules` holds {v}, not a module name")))
                .collect::<Result<_>>()?,
            _ => bail!("{cfg_name}: field `target_modules` is missing; it lists the adapted modules, e.g. [\"q_proj\", \"v_proj\"]"),
        };
        if let Some(bad) = target_modules.iter().find(|m| !MERGEABLE_MODULES.contains(&m.as_str())) {
            bail!(
                "{cfg_name}: field `target_modules` lists {bad:?}, which cannot be merged; the modules of Llama/Qwen2/Qwen3 that can are {}",
                MERGEABLE_MODULES.join(", ")
            );
        }
        let scale = if use_rslora { lora_alpha / (r as f64).sqrt() } else { lora_alpha / r as f64 };

        // The factors, paired by module and checked against the rank.
        let w_name = w_path.display();
        let tensors = candle_core::safetensors::load(&w_path, &Device::Cpu).with_context(|| format!("{w_name}: not a readable safetensors file"))?;
        let mut halves: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
        for (name, t) in tensors {
            let parsed = name
                .strip_prefix("base_model.model.")
                .and_then(|rest| rest.strip_suffix(".weight"))
                .and_then(|rest| rest.strip_suffix(".lora_A").map(|m| (m, 0)).or_else(|| rest.strip_suffix(".lora_B").map(|m| (m, 1))));
            let Some((module_path, half)) = parsed else {
                bail!("{w_name}: tensor `{name}` is not a LoRA factor (base_model.model.<module>.lora_A.weight / lora_B.weight); this adapter has parts that cannot be merged");
            };
            let module = module_path.rsplit('.').next().unwrap_or(module_path);
            if !target_modules.iter().any(|m| m == module) {
                bail!("{w_name}: tensor `{name}` adapts `{module}`, which {ADAPTER_CONFIG} field `target_modules` does not list");
            }
            let t = t.to_dtype(DType::F32)?;
            let dims = t.dims().to_vec();
            let rank = if half == 0 { dims.first() } else { dims.get(1) };
            if dims.len() != 2 || rank != Some(&r) {
                bail!(
                    "{w_name}: tensor `{name}` has shape {dims:?}, but {cfg_name} field `r` is {r} (lora_A must be [r, in], lora_B [out, r]): the rank does not match"
                );
            }
            halves.entry(format!("{module_path}.weight")).or_default()[half] = Some(t);
        }
        let mut factors = BTreeMap::new();
        for (base, [a, b]) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    factors.insert(base, (a, b));
                }
                (a, _) => bail!(
                    "{w_name}: `{base}` has a {} but no {}; the adapter file is incomplete",
                    if a.is_some() { "lora_A" } else { "lora_B" },
                    if a.is_some() { "lora_B" } else { "lora_A" }
                ),
            }
        }
        if factors.is_empty() {
            bail!("{w_name}: no LoRA factors (lora_A / lora_B tensors) in the file");
        }
        let description = AdapterDescription {
            name: dir.canonicalize().unwrap_or(dir.to_path_buf()).file_name().map_or("adapter".into(), |n| n.to_string_lossy().into_owned()),
            base_model_name_or_path: field(cfg, "base_model_name_or_path").and_then(Value::as_str).map(str::to_string),
            r,
            lora_alpha,
            use_rslora,
            scale,
            target_modules,
            merged_weights: factors.len(),
            files: vec![
                AdapterFile { name: ADAPTER_CONFIG, sha256: file_hash(&cfg_path)?.sha256 },
                AdapterFile { name: ADAPTER_WEIGHTS, sha256: file_hash(&w_path)?.sha256 },
            ],
        };
        Ok(LoraAdapter { dir: dir.to_path_buf(), description, factors })
    }

    /// Checks every factor pair against the base weight it changes.
    fn check_against(&self, base: &MmapedSafetensors) -> Result<()> {
        let w_name = self.dir.join(ADAPTER_WEIGHTS);
        let trained_for = self.description.base_model_name_or_path.as_deref().map_or(String::new(), |b| format!(" (it was trained for {b})"));
        for (name, (a, b)) in &self.factors {
            let Ok(view) = base.get(name) else {
                bail!("{}: the adapter changes `{name}`, which the base model does not have{trained_for}", w_name.display());
            };
            let want = [b.dims()[0], a.dims()[1]];
            if view.shape() != want {
                bail!(
                    "{}: the factors of `{name}` make a [{}, {}] update, but the base weight is {:?}: the adapter does not fit this base model{trained_for}",
                    w_name.display(),
                    want[0],
                    want[1],
                    view.shape()
                );
            }
        }
        Ok(())
    }

    /// `scale * B @ A` for `name` on `dev`, if the adapter changes that weight.
    fn delta(&self, name: &str, dev: &Device) -> candle_core::Result<Option<Tensor>> {
        let Some((a, b)) = self.factors.get(name) else { return Ok(None) };
        let d = b.to_device(dev)?.matmul(&a.to_device(dev)?)?;
        Ok(Some((d * self.description.scale)?))
    }
}

/// The base weights with the adapter merged in as each is read.
struct MergedWeights {
    base: MmapedSafetensors,
    adapter: LoraAdapter,
}

impl MergedWeights {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.load(name, dev)?;
        match self.adapter.delta(name, dev)? {
            // Merged in f32 whatever the storage and model dtypes, then cast once.
            Some(d) => (w.to_dtype(DType::F32)? + d)?.to_dtype(dtype),
            None => w.to_dtype(dtype),
        }
    }
}

impl SimpleBackend for MergedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.read(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape { msg: format!("shape mismatch for {name}"), expected: s, got: t.shape().clone() }.bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.get(name).is_ok()
    }
}

/// A VarBuilder over safetensors `weight_files` with `adapter` merged in.
pub fn merged_var_builder(weight_files: &[PathBuf], adapter: LoraAdapter, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are memory-mapped read-only and not modified while the model lives.
    let base = unsafe { MmapedSafetensors::multi(weight_files)? };
    adapter.check_against(&base)?;
    Ok(VarBuilder::from_backend(Box::new(MergedWeights { base, adapter }), dtype, device.clone()))
}

/// Writes an adapter directory (tests and examples): config fields merged over defaults.
pub fn write_adapter(dir: &Path, config: Value, factors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(ADAPTER_CONFIG), serde_json::to_string_pretty(&config)?)?;
    candle_core::safetensors::save(factors, dir.join(ADAPTER_WEIGHTS))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_cache::{BlockTable, KvCache};
    use crate::engine::batch::{BatchInput, SeqInput};
    use crate::engine::config::{Architecture, ModelConfig};
    use crate::engine::models::{load_safetensors, CausalLM};
    use serde_json::json;

    const H: usize = 64;
    const I: usize = 128;
    const V: usize = 300;

    fn config_json(arch: &str) -> String {
        let extra = match arch {
            "Qwen3ForCausalLM" => r#""head_dim": 32, "attention_bias": false,"#,
            _ => "",
        };
        format!(
            r#"{{"architectures": ["{arch}"], "vocab_size": {V}, "hidden_size": {H}, "intermediate_size": {I},
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, {extra}
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
                "tie_word_embeddings": false, "hidden_act": "silu"}}"#
        )
    }

    /// Deterministic pseudo-random values (candle's CPU RNG cannot be seeded).
    fn rand(shape: &[usize], seed: u64, std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 2.0 * std * 1.7
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn base_weights(cfg: &ModelConfig) -> HashMap<String, Tensor> {
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let mut t = HashMap::new();
        let mut seed = 1;
        let mut put = |name: String, shape: &[usize], std: f32, ones: bool| {
            seed += 1;
            let v = if ones { (rand(shape, seed, 0.1) + 1.0).unwrap() } else { rand(shape, seed, std) };
            t.insert(name, v);
        };
        put("model.embed_tokens.weight".into(), &[V, H], 1.0, false);
        put("lm_head.weight".into(), &[V, H], 0.15, false);
        put("model.norm.weight".into(), &[H], 0.0, true);
        for l in 0..cfg.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            put(p("input_layernorm.weight"), &[H], 0.0, true);
            put(p("post_attention_layernorm.weight"), &[H], 0.0, true);
            put(p("self_attn.q_proj.weight"), &[q, H], 0.2, false);
            put(p("self_attn.k_proj.weight"), &[kv, H], 0.2, false);
            put(p("self_attn.v_proj.weight"), &[kv, H], 0.15, false);
            put(p("self_attn.o_proj.weight"), &[H, q], 0.15, false);
            put(p("mlp.gate_proj.weight"), &[I, H], 0.15, false);
            put(p("mlp.up_proj.weight"), &[I, H], 0.15, false);
            put(p("mlp.down_proj.weight"), &[H, I], 0.1, false);
            if cfg.arch == Architecture::Qwen2 {
                for (n, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                    put(p(&format!("self_attn.{n}.bias")), &[o], 0.2, false);
                }
            }
            if cfg.arch == Architecture::Qwen3 {
                put(p("self_attn.q_norm.weight"), &[cfg.head_dim], 0.0, true);
                put(p("self_attn.k_norm.weight"), &[cfg.head_dim], 0.0, true);
            }
        }
        t
    }

    /// Random factors for `modules` of every layer, with the adapter's file names.
    fn adapter_factors(base: &HashMap<String, Tensor>, layers: usize, modules: &[&str], r: usize) -> HashMap<String, Tensor> {
        let mut f = HashMap::new();
        let mut seed = 100;
        for l in 0..layers {
            for m in modules {
                let group = if m.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(m) { "mlp" } else { "self_attn" };
                let path = format!("model.layers.{l}.{group}.{m}");
                let (out, inp) = base[&format!("{path}.weight")].dims2().unwrap();
                seed += 2;
                f.insert(format!("base_model.model.{path}.lora_A.weight"), rand(&[r, inp], seed, 0.3));
                f.insert(format!("base_model.model.{path}.lora_B.weight"), rand(&[out, r], seed + 1, 0.3));
            }
        }
        f
    }

    /// Logits of one 9-token prompt (every position's row is not needed: the last one
    /// depends on all weights of all layers).
    fn logits(model: &dyn CausalLM, cfg: &ModelConfig) -> Vec<f32> {
        let mut cache = KvCache::new(cfg, 4, 16, DType::F32, &Device::Cpu).unwrap();
        let toks: Vec<u32> = vec![3, 17, 250, 9, 41, 41, 120, 7, 299];
        let mut table = BlockTable::new();
        table.reserve(&mut cache, toks.len()).unwrap();
        let batch = BatchInput {
            tokens: toks.clone(),
            seqs: vec![SeqInput { start_pos: 0, len: toks.len(), block_table: table.blocks().to_vec(), want_logits: true }],
        };
        let out = model.forward(&batch, &mut cache).unwrap();
        table.release(&mut cache);
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        diff / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
    }

    fn merge_parity(arch: &str, modules: &[&str], r: usize, alpha: f64, rslora: bool) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::from_hf_config(&config_json(arch)).unwrap();
        let base = base_weights(&cfg);
        let weights = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&base, &weights).unwrap();
        let factors = adapter_factors(&base, cfg.num_layers, modules, r);
        let adir = dir.path().join("adapter");
        write_adapter(
            &adir,
            json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": modules,
                   "fan_in_fan_out": false, "bias": "none", "base_model_name_or_path": "test/tiny"}),
            &factors,
        )
        .unwrap();

        let adapter = LoraAdapter::open(&adir).unwrap();
        let scale = if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        assert_eq!(adapter.description.scale, scale);
        assert_eq!(adapter.description.merged_weights, cfg.num_layers * modules.len());
        let merged = load_safetensors(&cfg, merged_var_builder(std::slice::from_ref(&weights), adapter, DType::F32, &Device::Cpu).unwrap()).unwrap();

        // The merge done by hand: W + scale * B @ A for every factor pair.
        let mut by_hand = base.clone();
        for (name, a) in factors.iter().filter(|(n, _)| n.ends_with(".lora_A.weight")) {
            let b = &factors[&name.replace("lora_A", "lora_B")];
            let target = name.strip_prefix("base_model.model.").unwrap().replace(".lora_A", "");
            let w = &by_hand[&target];
            let merged_w = (w + (b.matmul(a).unwrap() * scale).unwrap()).unwrap();
            by_hand.insert(target, merged_w);
        }
        let hand = load_safetensors(&cfg, VarBuilder::from_tensors(by_hand, DType::F32, &Device::Cpu)).unwrap();
        let plain = load_safetensors(&cfg, VarBuilder::from_tensors(base, DType::F32, &Device::Cpu)).unwrap();

        let (lm, lh, lb) = (logits(merged.as_ref(), &cfg), logits(hand.as_ref(), &cfg), logits(plain.as_ref(), &cfg));
        let err = rel_err(&lm, &lh);
        assert!(err < 1e-5, "{arch}: merged load vs merged by hand: rel err {err}");
        let moved = rel_err(&lm, &lb);
        eprintln!("{arch}: merged load vs by hand rel err {err:.2e}; vs base {moved:.2e}");
        assert!(moved > 1e-2, "{arch}: the adapter must change the logits (rel diff {moved})");
    }

    #[test]
    fn llama_merge_equals_the_merge_by_hand() {
        merge_parity("LlamaForCausalLM", &MERGEABLE_MODULES, 4, 8.0, false);
    }

    #[test]
    fn qwen2_merge_equals_the_merge_by_hand_with_rslora() {
        merge_parity("Qwen2ForCausalLM", &["q_proj", "v_proj", "down_proj"], 8, 16.0, true);
    }

    #[test]
    fn qwen3_merge_equals_the_merge_by_hand() {
        merge_parity("Qwen3ForCausalLM", &["q_proj", "k_proj", "o_proj", "up_proj"], 2, 4.0, false);
    }

    /// An adapter for q_proj of a tiny Llama, with `edit` applied to its config and factors.
    fn bad_adapter(edit: impl FnOnce(&mut Value, &mut HashMap<String, Tensor>)) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::from_hf_config(&config_json("LlamaForCausalLM")).unwrap();
        let base = base_weights(&cfg);
        let weights = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&base, &weights).unwrap();
        let mut factors = adapter_factors(&base, cfg.num_layers, &["q_proj"], 4);
        let mut config = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        edit(&mut config, &mut factors);
        let adir = dir.path().join("adapter");
        write_adapter(&adir, config, &factors).unwrap();
        let e = match LoraAdapter::open(&adir) {
            Err(e) => format!("{e:#}"),
            Ok(a) => match merged_var_builder(&[weights], a, DType::F32, &Device::Cpu) {
                Err(e) => format!("{e:#}"),
                Ok(_) => "ok".into(),
            },
        };
        (dir, e)
    }

    #[test]
    fn bad_adapters_are_refused_naming_the_file_and_field() {
        let (_d, e) = bad_adapter(|_, _| {});
        assert_eq!(e, "ok");
        let (_d, e) = bad_adapter(|c, _| c["target_modules"] = json!(["q_proj", "lm_head"]));
        assert!(e.contains("adapter_config.json") && e.contains("target_modules") && e.contains("lm_head"), "{e}");
        let (_d, e) = bad_adapter(|c, _| c["r"] = json!(8));
        assert!(e.contains("adapter_model.safetensors") && e.contains("field `r` is 8") && e.contains("rank"), "{e}");
        let (_d, e) = bad_adapter(|c, _| {
            c.as_object_mut().unwrap().remove("lora_alpha");
        });
        assert!(e.contains("adapter_config.json") && e.contains("lora_alpha"), "{e}");
        let (_d, e) = bad_adapter(|c, _| c["fan_in_fan_out"] = json!(true));
        assert!(e.contains("fan_in_fan_out"), "{e}");
        // A factor whose input size does not fit the base weight.
        let (_d, e) = bad_adapter(|_, f| {
            f.insert("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(), rand(&[4, 32], 1, 0.1));
        });
        assert!(e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("[64, 32]") && e.contains("[64, 64]"), "{e}");
        // A module the base does not have.
        let (_d, e) = bad_adapter(|_, f| {
            f.insert("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(), rand(&[4, 64], 1, 0.1));
            f.insert("base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight".into(), rand(&[64, 4], 1, 0.1));
        });
        assert!(e.contains("layers.9") && e.contains("does not have"), "{e}");
        // Half a pair, and a tensor that is no LoRA factor.
        let (_d, e) = bad_adapter(|_, f| {
            f.remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
        });
        assert!(e.contains("layers.1.self_attn.q_proj") && e.contains("no lora_B"), "{e}");
        let (_d, e) = bad_adapter(|_, f| {
            f.insert("base_model.model.lm_head.weight".into(), rand(&[4, 4], 1, 0.1));
        });
        assert!(e.contains("lm_head.weight") && e.contains("not a LoRA factor"), "{e}");
        // Missing files.
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", LoraAdapter::open(dir.path()).err().unwrap());
        assert!(e.contains("missing adapter_config.json"), "{e}");
        std::fs::write(dir.path().join(ADAPTER_CONFIG), "{}").unwrap();
        let e = format!("{:#}", LoraAdapter::open(dir.path()).err().unwrap());
        assert!(e.contains("missing adapter_model.safetensors"), "{e}");
    }
}
