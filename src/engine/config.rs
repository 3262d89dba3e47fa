//! Model hyper-parameters: the [`Architecture`]s the engine implements and a
//! [`ModelConfig`] read from a Hugging Face `config.json` or from GGUF metadata.
//!
//! `config.json` goes through serde structs; a field of the wrong type or a missing required
//! field is reported with its path (`serde_path_to_error`), e.g.
//! ``config.json: field `vocab_size`: invalid type: string "many", expected usize``.
//! What serde cannot say (unsupported activation, sliding window, RoPE scaling type) is
//! checked after parsing. Defaults are transformers' (`LlamaConfig`, `Qwen2Config`,
//! `Qwen3Config`).

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;
use serde_json::Value;

use super::models::{llama, qwen2, qwen3, ArchSpec, AttentionBiases};

/// The model families this engine implements; each has an [`ArchSpec`] in its file under
/// `models/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// What the shared decoder does differently for this architecture.
    pub fn spec(self) -> &'static ArchSpec {
        match self {
            Architecture::Llama => &llama::SPEC,
            Architecture::Qwen2 => &qwen2::SPEC,
            Architecture::Qwen3 => &qwen3::SPEC,
        }
    }

    /// The `architectures` entry of a Hugging Face `config.json`.
    pub fn hf_name(self) -> &'static str {
        self.spec().hf_name
    }

    /// The `general.architecture` value of a GGUF file.
    pub fn gguf_name(self) -> &'static str {
        self.spec().gguf_name
    }

    /// The architecture named by a `config.json` `architectures` entry, if supported.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    /// The architecture named by a GGUF `general.architecture` value, if supported.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.gguf_name() == name)
    }

    /// "A, B, C": the supported names, for error messages.
    fn supported(name: fn(Architecture) -> &'static str) -> String {
        Self::ALL.map(name).join(", ")
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Architecture hyper-parameters, from a HF `config.json` or GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the attention projections, which ones per [`AttentionBiases`]: q/k/v for
    /// Qwen2 (always true in its HF configs, which do not say so), q/k/v/o for Llama and
    /// Qwen3 (when the checkpoint says `attention_bias: true`). For GGUF: whether the file
    /// has them.
    pub attention_bias: bool,
}

/// The `architectures` list alone: read first, so that an unsupported model is reported as
/// such rather than by its first missing field.
#[derive(Deserialize)]
struct HfArchitectures {
    architectures: Vec<String>,
}

/// The fields of a Hugging Face `config.json` the engine uses; the others are ignored.
#[derive(Deserialize)]
#[serde(expecting = "a JSON object")]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// Default: `num_attention_heads` (no grouped-query attention).
    num_key_value_heads: Option<usize>,
    /// Default: `hidden_size / num_attention_heads`.
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    rope_scaling: Option<HfRopeScaling>,
}

/// `config.json`'s `rope_scaling` object (transformers' `rope_config_validation`).
#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct HfRopeScaling {
    rope_type: Option<String>,
    /// The older spelling of `rope_type`; transformers accepts both.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// Deserializes `T` from `json`, naming the offending field on error.
fn from_config_json<'de, T: Deserialize<'de>>(json: &'de Value) -> Result<T> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let at_root = e.path().iter().next().is_none();
        let path = e.path().to_string();
        let inner = e.into_inner();
        if at_root {
            anyhow!("config.json: {inner}")
        } else {
            anyhow!("config.json: field `{path}`: {inner}")
        }
    })
}

impl HfRopeScaling {
    fn resolve(self) -> Result<Option<RopeScaling>> {
        let kind = self
            .rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let num = |v: Option<f64>, key: &str| -> Result<f64> {
                    v.ok_or_else(|| {
                        anyhow!(
                            "config.json: `rope_scaling.{key}` is missing for llama3 rope scaling"
                        )
                    })
                };
                Ok(Some(RopeScaling {
                    factor: num(self.factor, "factor")?,
                    low_freq_factor: num(self.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: num(self.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: self
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            anyhow!(
                                "config.json: `rope_scaling.original_max_position_embeddings` \
                                 is missing"
                            )
                        })?,
                }))
            }
            other => bail!(
                "config.json: `rope_scaling` type `{other}` is not supported (supported: llama3); \
                 running it with plain RoPE would give wrong results"
            ),
        }
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    ///
    /// Errors name the file and the field: invalid JSON, a missing or mistyped field, an
    /// unsupported architecture (listing the supported ones), activation other than `silu`,
    /// sliding-window attention, RoPE scaling other than llama3, inconsistent head counts.
    pub fn from_hf_config(json: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(json).context("config.json is not valid JSON")?;
        ensure!(root.is_object(), "config.json must hold a JSON object");

        let HfArchitectures { architectures } = from_config_json(&root)?;
        let arch_name = architectures
            .first()
            .ok_or_else(|| anyhow!("config.json: field `architectures` is empty"))?;
        let arch = Architecture::from_hf_name(arch_name).ok_or_else(|| {
            anyhow!(
                "config.json: unsupported architecture `{arch_name}`; supported: {}",
                Architecture::supported(Architecture::hf_name)
            )
        })?;

        let hf: HfConfig = from_config_json(&root)?;
        if let Some(act) = &hf.hidden_act {
            ensure!(
                act == "silu",
                "config.json: field `hidden_act` is `{act}`, only `silu` is supported"
            );
        }
        if hf.use_sliding_window.unwrap_or(false) {
            bail!(
                "config.json: `use_sliding_window` is true; sliding-window attention is not \
                 supported, use a checkpoint with full attention"
            );
        }

        let (hidden_size, num_heads) = (hf.hidden_size, hf.num_attention_heads);
        ensure!(
            num_heads > 0,
            "config.json: field `num_attention_heads` must be positive"
        );
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None => {
                ensure!(
                    hidden_size.is_multiple_of(num_heads),
                    "config.json: `hidden_size` ({hidden_size}) is not a multiple of \
                     `num_attention_heads` ({num_heads}) and no `head_dim` is given"
                );
                hidden_size / num_heads
            }
        };
        let attention_bias = match arch.spec().biases {
            // Qwen2 always has q/k/v biases; its config does not say so.
            AttentionBiases::QkvAlways => true,
            AttentionBiases::AllIfConfigured => hf.attention_bias.unwrap_or(false),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            rope_scaling: hf
                .rope_scaling
                .map(HfRopeScaling::resolve)
                .transpose()?
                .flatten(),
            attention_bias,
        };
        cfg.validate().context("config.json")?;
        Ok(cfg)
    }

    /// Reads the hyper-parameters of a GGUF file (llama.cpp's `{arch}.*` metadata keys; see
    /// llama.cpp's `gguf-py/gguf/constants.py`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(key).ok_or_else(|| {
                anyhow!("GGUF metadata key `{key}` is missing; the file is incomplete or not a llama.cpp model")
            })
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|_| anyhow!("GGUF metadata `general.architecture` is not a string"))?;
        let arch = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            anyhow!(
                "GGUF architecture `{arch_name}` is not supported; supported: {}",
                Architecture::supported(Architecture::gguf_name)
            )
        })?;
        let a = arch.gguf_name();
        let usize_key = |key: String| -> Result<usize> { gguf_usize(get(&key)?, &key) };
        let opt_usize_key = |key: String| -> Result<Option<usize>> {
            md.get(&key).map(|v| gguf_usize(v, &key)).transpose()
        };
        let opt_f64_key = |key: String| -> Result<Option<f64>> {
            md.get(&key).map(|v| gguf_f64(v, &key)).transpose()
        };

        let hidden_size = usize_key(format!("{a}.embedding_length"))?;
        let num_heads = usize_key(format!("{a}.attention.head_count"))?;
        ensure!(
            num_heads > 0,
            "GGUF metadata `{a}.attention.head_count` must be positive"
        );
        let num_kv_heads =
            opt_usize_key(format!("{a}.attention.head_count_kv"))?.unwrap_or(num_heads);
        let head_dim = match opt_usize_key(format!("{a}.attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        if let Some(rope_dim) = opt_usize_key(format!("{a}.rope.dimension_count"))? {
            ensure!(
                rope_dim == head_dim,
                "GGUF model rotates only {rope_dim} of {head_dim} head dimensions (partial \
                 rotary embedding), which is not supported"
            );
        }
        let vocab_size = match content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| {
                    anyhow!("GGUF file has neither a `token_embd.weight` tensor nor `tokenizer.ggml.tokens`; cannot tell the vocabulary size")
                })?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_key(format!("{a}.feed_forward_length"))?,
            num_layers: usize_key(format!("{a}.block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: opt_f64_key(format!("{a}.rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: gguf_f64(
                get(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
                &format!("{a}.attention.layer_norm_rms_epsilon"),
            )?,
            max_position_embeddings: opt_usize_key(format!("{a}.context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            // llama.cpp stores Llama 3 frequency scaling as the `rope_freqs.weight` tensor,
            // which the loader applies; there is nothing to read here.
            rope_scaling: None,
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        cfg.validate().context("GGUF metadata")?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.num_kv_heads > 0 && self.num_heads.is_multiple_of(self.num_kv_heads),
            "{} attention heads cannot be grouped over {} key/value heads",
            self.num_heads,
            self.num_kv_heads
        );
        ensure!(
            self.head_dim > 0 && self.head_dim.is_multiple_of(2),
            "head_dim must be a positive even number for rotary embeddings, got {}",
            self.head_dim
        );
        ensure!(
            self.vocab_size > 0 && self.hidden_size > 0 && self.num_layers > 0,
            "vocab_size, hidden_size and the number of layers must be positive"
        );
        Ok(())
    }
}

fn gguf_usize(v: &gguf_file::Value, key: &str) -> Result<usize> {
    let Some(x) = super::gguf::integer(v) else { bail!("GGUF metadata `{key}` must be an integer, found {v:?}") };
    usize::try_from(x).map_err(|_| anyhow!("GGUF metadata `{key}` is out of range: {x}"))
}

fn gguf_f64(v: &gguf_file::Value, key: &str) -> Result<f64> {
    use gguf_file::Value as V;
    Ok(match v {
        V::F32(x) => *x as f64,
        V::F64(x) => *x,
        other => gguf_usize(other, key)
            .map_err(|_| anyhow!("GGUF metadata `{key}` must be a number, found {other:?}"))?
            as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        format!("{:#}", ModelConfig::from_hf_config(json).unwrap_err())
    }

    const BASE: &str = r#"{"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10,
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 32"#;

    #[test]
    fn serde_errors_name_the_field_path() {
        let ok = ModelConfig::from_hf_config(&format!("{BASE}}}")).unwrap();
        assert_eq!(
            (ok.arch, ok.rms_norm_eps, ok.attention_bias),
            (Architecture::Qwen3, 1e-6, false)
        );

        let nested = err(&format!(
            r#"{BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": "x"}}}}"#
        ));
        assert!(
            nested.contains("config.json: field `rope_scaling.factor`"),
            "{nested}"
        );
        let not_object = err(&format!(r#"{BASE}, "rope_scaling": "llama3"}}"#));
        assert!(
            not_object.contains("`rope_scaling`") && not_object.contains("an object"),
            "{not_object}"
        );
        let llama3 = err(&format!(
            r#"{BASE}, "rope_scaling": {{"type": "llama3", "factor": 8.0}}}}"#
        ));
        assert!(llama3.contains("rope_scaling.low_freq_factor"), "{llama3}");
        let negative = err(&format!(r#"{BASE}, "num_key_value_heads": -1}}"#));
        assert!(negative.contains("`num_key_value_heads`"), "{negative}");
        let act = err(&format!(r#"{BASE}, "hidden_act": "gelu"}}"#));
        assert!(
            act.contains("`hidden_act`") && act.contains("silu"),
            "{act}"
        );
        let sliding = err(&format!(r#"{BASE}, "use_sliding_window": true}}"#));
        assert!(sliding.contains("use_sliding_window"), "{sliding}");
        assert!(err(r#"{"architectures": []}"#).contains("`architectures` is empty"));
        assert!(err(r#"{"vocab_size": 3}"#).contains("`architectures`"));
        assert!(err("{").contains("not valid JSON"));
        // Qwen2 configs do not mention their q/k/v biases.
        let q2 =
            ModelConfig::from_hf_config(&format!("{BASE}}}").replace("Qwen3", "Qwen2")).unwrap();
        assert!(q2.attention_bias);
        let biased =
            ModelConfig::from_hf_config(&format!(r#"{BASE}, "attention_bias": true}}"#)).unwrap();
        assert!(biased.attention_bias);
    }
}
