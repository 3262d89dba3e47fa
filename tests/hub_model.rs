//! A Hugging Face model directory (config.json, tokenizer.json, tokenizer_config.json,
//! model.safetensors) laid out in a hub cache the way huggingface_hub lays it out, resolved
//! by hub id with the network off, loaded in f32 and f16, and generated from end to end.
//! The weights are random (small real-shaped Llama); the tokenizer and chat template are
//! SmolLM2's, taken from the real GGUF.

mod common;
use common::smollm2;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use bsa::backends::local::LocalModel;
use bsa::engine::tokenizer;
use candle_core::{DType, Device, Tensor};

/// Writes a tiny random Llama with SmolLM2's tokenizer into `dir`.
fn write_model_dir(dir: &Path, gguf: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer::from_gguf_file(gguf).unwrap();
    tok.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let vocab = tok.tokenizer.get_vocab_size(true);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "chat_template": tok.chat_template.unwrap(),
            "bos_token": tok.bos_token,
            "eos_token": {"content": tok.eos_token, "special": true},
            "add_bos_token": false,
        })
        .to_string(),
    )
    .unwrap();
    let (h, inter, layers, heads, kv) = (64usize, 128usize, 2usize, 4usize, 2usize);
    let d = h / heads;
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 2048, "tie_word_embeddings": true, "hidden_act": "silu",
            "eos_token_id": tok.eos_ids[0],
        })
        .to_string(),
    )
    .unwrap();
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, &dev).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), r(&[vocab, h]));
    t.insert("model.norm.weight".into(), Tensor::ones(h, DType::F32, &dev).unwrap());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.self_attn.q_proj.weight"), r(&[heads * d, h]));
        t.insert(format!("{p}.self_attn.k_proj.weight"), r(&[kv * d, h]));
        t.insert(format!("{p}.self_attn.v_proj.weight"), r(&[kv * d, h]));
        t.insert(format!("{p}.self_attn.o_proj.weight"), r(&[h, heads * d]));
        t.insert(format!("{p}.mlp.gate_proj.weight"), r(&[inter, h]));
        t.insert(format!("{p}.mlp.up_proj.weight"), r(&[inter, h]));
        t.insert(format!("{p}.mlp.down_proj.weight"), r(&[h, inter]));
        t.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(h, DType::F32, &dev).unwrap());
        t.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(h, DType::F32, &dev).unwrap());
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// Lays `src` out as snapshot `commit` of model repo `id` in a hub cache at `cache`.
fn lay_out_hub_cache(cache: &Path, id: &str, src: &Path) {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let commit = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        // As in a real cache: the blob is named by its sha256 and the snapshot links to it.
        let bytes = std::fs::read(e.path()).unwrap();
        let sha = bsa::records::hex_sha256(&bytes);
        std::fs::write(blobs.join(&sha), &bytes).unwrap();
        std::os::unix::fs::symlink(blobs.join(&sha), snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_hub_model_loads_offline_and_generates() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny");
    write_model_dir(&model_dir, &gguf);

    // The directory itself loads, in f32 and f16, with the same tokenizer and eos ids.
    let m32 = LocalModel::load(model_dir.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap().loaded;
    let m16 = LocalModel::load(model_dir.to_str().unwrap(), &Device::Cpu, DType::F16).unwrap().loaded;
    assert_eq!(m32.eos_ids, m16.eos_ids);
    assert!(m32.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(m32.description.files.len(), 2, "config.json and model.safetensors are hashed");

    let cache = dir.path().join("hub");
    lay_out_hub_cache(&cache, "Owner/Tiny", &model_dir);
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_bsa"))
        .args(["generate", "--model", "Owner/Tiny", "--limit", "2", "--samples", "2", "--max-new-tokens", "5", "--quiet", "--out"])
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 4);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["job"]["model"]["id"], "Owner/Tiny");
    // Hub blobs are named by their hash: the manifest records it without rereading the file.
    let weights = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let files = manifest["job"]["model"]["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["sha256"] == bsa::records::hex_sha256(&weights)), "{files:?}");

    // A repo missing from the cache, offline: a clear error, nothing written.
    let o = Command::new(env!("CARGO_BIN_EXE_bsa"))
        .args(["generate", "--model", "Owner/Missing", "--out"])
        .arg(dir.path().join("r2"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("Owner/Missing") && e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(!dir.path().join("r2").exists());

    // A directory without its tokenizer: the error names the missing file.
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let e = LocalModel::load(model_dir.to_str().unwrap(), &Device::Cpu, DType::F32).err().unwrap();
    assert!(format!("{e:#}").contains("missing tokenizer.json"), "{e:#}");
}
