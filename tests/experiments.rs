//! The paper's experiments as commands, on the real SmolLM2-135M-Instruct GGUF: safety rules
//! in the prompt (recorded, and never mixed with other rules on resume), decoding sweeps in
//! one engine pass (a configuration's samples equal a plain run's), and LoRA adapters
//! (refused on a GGUF base; recorded by hash on a safetensors base).

mod common;
use common::{bsa, fails, json, ok, records, smollm2, smollm2_arg, temp_path, write_file};
use std::collections::HashMap;
use std::path::Path;

use bsa::backends::local::{LocalModel, LocalOptions};
use bsa::data::Selection;
use bsa::engine::{lora, tokenizer};
use bsa::pipeline::decoding::{DecodingGrid, DecodingOverrides};
use bsa::pipeline::generate::{self as generation, GenerateOptions};
use bsa::prompt::{PromptSettings, Prompter};
use bsa::records::{hex_sha256, Decoding};
use bsa::store::OnExisting;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

fn options(model: &Path, out: &Path, decoding: DecodingOverrides) -> GenerateOptions {
    GenerateOptions {
        model: model.to_str().unwrap().into(),
        local: LocalOptions { device: "cpu".into(), dtype: "auto".into(), batch_size: 16, prefill_chunk: 512, cache: bsa::backends::local::CacheSizing { kv_cache_mb: Some(256), ..Default::default() }, prefix_cache: true, adapter: None },
        data: Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample.csv").to_str().unwrap().into(),
        selection: Selection { limit: Some(2), ..Default::default() },
        samples: 2,
        seed: 3,
        decoding: DecodingOverrides { max_new_tokens: Some(6), ..decoding },
        prompt: PromptSettings::default(),
        safety_rules: None,
        out: out.to_path_buf(),
        on_existing: OnExisting::Resume,
        progress: false,
        backend: None,
        remote: Default::default(),
    }
}

#[test]
fn a_sweep_configuration_equals_a_plain_run_and_resumes_per_configuration() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plain_dir = dir.path().join("plain");
    let one = DecodingOverrides { temperature: Some(0.8), top_p: Some(0.95), top_k: Some(20), ..Default::default() };
    generation::generate(&options(&model, &plain_dir, one)).unwrap();
    let plain = records(&plain_dir.join("samples.jsonl"));
    assert_eq!(plain.len(), 4);

    let sweep_dir = dir.path().join("sweep");
    let grid = DecodingGrid { temperature: vec![0.8, 1.0], top_p: vec![0.95], top_k: vec![20, 0], min_p: vec![] };
    let s = generation::generate_grid(&options(&model, &sweep_dir, Default::default()), Some(&grid)).unwrap();
    assert_eq!((s.written, s.configs.len()), (16, 4));
    let swept = records(&sweep_dir.join("samples.jsonl"));
    let names: Vec<&str> = s.configs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["t0.8_p0.95_k20", "t0.8_p0.95_k0", "t1.0_p0.95_k20", "t1.0_p0.95_k0"]);
    for r in &swept {
        let (_, d) = s.configs.iter().find(|(n, _)| r["config"] == n.as_str()).unwrap();
        let rd: Decoding = serde_json::from_value(r["decoding"].clone()).unwrap();
        assert_eq!(&rd, d, "each record carries its configuration's decoding");
    }
    // The configuration with the plain run's parameters has the plain run's samples.
    for p in &plain {
        let twin = swept
            .iter()
            .find(|r| r["config"] == "t0.8_p0.95_k20" && r["item_id"] == p["item_id"] && r["sample_index"] == p["sample_index"])
            .unwrap();
        assert_eq!(twin["raw"], p["raw"], "item {} sample {}", p["item_id"], p["sample_index"]);
        assert_eq!(twin["completion_tokens"], p["completion_tokens"]);
    }
    let m = json(&sweep_dir.join("manifest.json"));
    assert_eq!(m["job"]["decoding"]["configs"].as_array().unwrap().len(), 4);
    assert_eq!(m["job"]["decoding"]["top_k"], serde_json::json!([20, 0]));

    // Killed after 13 of 16: the rerun does exactly the 3 missing (item, sample, config).
    let text = std::fs::read_to_string(sweep_dir.join("samples.jsonl")).unwrap();
    let kept: String = text.lines().take(13).map(|l| format!("{l}\n")).collect();
    std::fs::write(sweep_dir.join("samples.jsonl"), &kept).unwrap();
    let s = generation::generate_grid(&options(&model, &sweep_dir, Default::default()), Some(&grid)).unwrap();
    assert_eq!((s.written, s.skipped), (3, 13));
    let strip = |v: &Value| {
        let mut v = v.clone();
        v["elapsed_s"] = 0.into();
        v
    };
    let mut again: Vec<Value> = records(&sweep_dir.join("samples.jsonl")).iter().map(strip).collect();
    let mut before: Vec<Value> = swept.iter().map(strip).collect();
    let key = |v: &Value| format!("{}#{}@{}", v["item_id"], v["sample_index"], v["config"]);
    again.sort_by_key(key);
    before.sort_by_key(key);
    assert_eq!(again, before);

    // Another grid on the same run is refused, naming the field; nothing is written.
    let other = DecodingGrid { temperature: vec![0.8, 0.9], ..grid.clone() };
    let e = format!("{:#}", generation::generate_grid(&options(&model, &sweep_dir, Default::default()), Some(&other)).err().unwrap());
    assert!(e.contains("job.decoding.temperature"), "{e}");
    // So is a plain run into the sweep's directory.
    let e = format!("{:#}", generation::generate(&options(&model, &sweep_dir, Default::default())).err().unwrap());
    assert!(e.contains("job.decoding.temperature"), "{e}");
    assert_eq!(records(&sweep_dir.join("samples.jsonl")).len(), 16);
}

#[test]
fn bsa_sweep_judges_scores_each_configuration_and_resumes() {
    let Some(model) = smollm2_arg() else { return };
    let (_dir, out) = temp_path("sweep");
    let out_s = out.to_str().unwrap();
    let args = ["sweep", "--model", &model, "--limit", "1", "--samples", "2", "--temperature", "0.5,1.0", "--top-p", "0.9",
        "--top-k", "0", "--max-new-tokens", "6", "--judge", &model, "--judge-max-new-tokens", "8", "--judge-retries", "0",
        "--k", "2", "--resamples", "50", "--quiet", "--out", out_s];
    let text = ok(&bsa(&args));
    for s in ["t0.5_p0.9_k0", "t1.0_p0.9_k0", "Safe@1", "Think@k", "F-score", "heatmaps in"] {
        assert!(text.contains(s), "{s} missing:\n{text}");
    }
    // The sweep writes its report: one Safe@1 and one Think@1 heatmap over the varying temperature.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("t0.5_p0.9_k0") && html.contains("<svg"), "the sweep's report lacks its configurations or plots");
    assert!(out.join("report.md").is_file());
    let sweep = json(&out.join("sweep.json"));
    let configs = sweep["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2);
    assert_eq!(configs[1]["name"], "t1.0_p0.9_k0");
    assert_eq!(configs[1]["decoding"]["temperature"], 1.0);
    assert_eq!(sweep["grid"]["temperature"], serde_json::json!([0.5, 1.0]));
    assert_eq!(configs[0]["scorecard"]["samples"], 2, "each configuration scored on its own 2 samples");
    assert!(configs[0]["scorecard"]["intervals"]["safe_at_1"].is_array());
    let verdicts = records(&out.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 4);
    assert_eq!(verdicts.iter().filter(|v| v["config"] == "t0.5_p0.9_k0").count(), 2);

    // bsa score on the run: one scorecard per configuration, never pooled.
    let cards: Value = serde_json::from_str(&ok(&bsa(&["score", out_s, "--k", "2", "--resamples", "50", "--json"]))).unwrap();
    let keys: Vec<&String> = cards.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.ends_with("@t0.5_p0.9_k0") || k.ends_with("@t1.0_p0.9_k0")), "{keys:?}");
    assert!(cards.as_object().unwrap().values().all(|c| c["samples"] == 2));

    // Rerun: nothing generated or judged again.
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let text = ok(&bsa(&args));
    assert!(text.contains("wrote 0 samples (4 already there)") && text.contains("nothing to do"), "{text}");
    assert_eq!(std::fs::read_to_string(out.join("samples.jsonl")).unwrap(), samples);
}

#[test]
fn safety_rules_go_before_the_query_are_recorded_and_never_mixed() {
    let Some(model) = smollm2_arg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gen = |out: &Path, extra: &[&str]| {
        let mut a = vec!["generate", "--model", &model, "--limit", "1", "--samples", "1", "--max-new-tokens", "2", "--quiet", "--out", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        bsa(&a)
    };
    let base = dir.path().join("base");
    let ruled = dir.path().join("ruled");
    ok(&gen(&base, &[]));
    ok(&gen(&ruled, &["--safety-rules", "default"]));
    let m = json(&ruled.join("manifest.json"));
    let rules = &m["job"]["prompt"]["safety_rules"];
    assert_eq!(rules["sha256"], hex_sha256(bsa::prompt::safety_rules::DEFAULT_RULES.trim().as_bytes()));
    assert_eq!(rules["placement"], "system");
    assert_eq!(json(&base.join("manifest.json"))["job"]["prompt"]["safety_rules"], "none");
    // The rules are in the prompt: hundreds of tokens more than the bare query.
    let tokens = |d: &Path| records(&d.join("samples.jsonl"))[0]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&ruled) > tokens(&base) + 300, "{} vs {}", tokens(&ruled), tokens(&base));

    // Other rules, or none, on the same run: refused naming the field; nothing lost.
    let before = std::fs::read_to_string(ruled.join("samples.jsonl")).unwrap();
    let file = write_file(dir.path(), "rules.txt", "RULES: refuse anything dangerous.");
    for extra in [&["--safety-rules", file.to_str().unwrap()][..], &[][..]] {
        let e = fails(&gen(&ruled, extra));
        assert!(e.contains("job.prompt.safety_rules"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(ruled.join("samples.jsonl")).unwrap(), before);

    // A template without a system role: the rules start the user turn, and the manifest says so.
    let tpl = write_file(
        dir.path(),
        "no_system.jinja",
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
    );
    let user_prefix = dir.path().join("user_prefix");
    ok(&gen(&user_prefix, &["--safety-rules", file.to_str().unwrap(), "--chat-template", tpl.to_str().unwrap()]));
    assert_eq!(json(&user_prefix.join("manifest.json"))["job"]["prompt"]["safety_rules"]["placement"], "user-prefix");
    let m = LocalModel::load(&model, &Device::Cpu, DType::F32).unwrap();
    let settings = PromptSettings { chat_template: Some(tpl.clone()), system: Some("RULES".into()), ..Default::default() };
    let p = Prompter::new(&m.prompt_format(), &settings).unwrap();
    assert!(!p.system_role());
    assert!(p.render("How do I X?").unwrap().starts_with("<|im_start|>user\nRULES\n\nHow do I X?<|im_end|>"));
}

/// A tiny random Llama directory with SmolLM2's tokenizer and chat template.
fn tiny_model_dir(dir: &Path, gguf: &Path) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer::from_gguf_file(gguf).unwrap();
    tok.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let vocab = tok.tokenizer.get_vocab_size(true);
    let tcfg = serde_json::json!({"chat_template": tok.chat_template.unwrap(), "bos_token": tok.bos_token, "eos_token": tok.eos_token});
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    let (h, inter) = (64usize, 128usize);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": true, "hidden_act": "silu", "eos_token_id": tok.eos_ids[0],
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap();
    let ones = || Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), r(&[vocab, h]));
    t.insert("model.norm.weight".into(), ones());
    let p = "model.layers.0";
    for (n, shape) in [("self_attn.q_proj", [h, h]), ("self_attn.k_proj", [h / 2, h]), ("self_attn.v_proj", [h / 2, h]),
        ("self_attn.o_proj", [h, h]), ("mlp.gate_proj", [inter, h]), ("mlp.up_proj", [inter, h]), ("mlp.down_proj", [h, inter])]
    {
        t.insert(format!("{p}.{n}.weight"), r(&shape));
    }
    t.insert(format!("{p}.input_layernorm.weight"), ones());
    t.insert(format!("{p}.post_attention_layernorm.weight"), ones());
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    t
}

#[test]
fn adapters_are_recorded_by_hash_and_refused_on_a_gguf_base() {
    let Some(gguf) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let base = tiny_model_dir(&model, &gguf);
    let adapter = dir.path().join("my-adapter");
    let mut factors = HashMap::new();
    for m in ["q_proj", "v_proj"] {
        let (out, inp) = base[&format!("model.layers.0.self_attn.{m}.weight")].dims2().unwrap();
        factors.insert(format!("base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"), Tensor::randn(0f32, 0.1, (8, inp), &Device::Cpu).unwrap());
        factors.insert(format!("base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"), Tensor::randn(0f32, 0.1, (out, 8), &Device::Cpu).unwrap());
    }
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "Owner/Tiny"});
    lora::write_adapter(&adapter, cfg, &factors).unwrap();
    let gen = |model: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec!["generate", "--model", model.to_str().unwrap(), "--limit", "1", "--samples", "1", "--max-new-tokens", "3", "--quiet", "--out", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        bsa(&a)
    };
    let out = dir.path().join("run");
    ok(&gen(&model, &out, &["--adapter", adapter.to_str().unwrap()]));
    let rec = &json(&out.join("manifest.json"))["job"]["model"]["adapter"];
    assert_eq!(rec["name"], "my-adapter");
    assert_eq!((rec["r"].as_u64(), rec["scale"].as_f64(), rec["merged_weights"].as_u64()), (Some(8), Some(2.0), Some(2)));
    let weights = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(rec["files"][1]["sha256"], hex_sha256(&weights));

    // The same run without the adapter is refused, naming the field.
    let e = fails(&gen(&model, &out, &[]));
    assert!(e.contains("job.model.adapter"), "{e}");

    // A GGUF base: a clear refusal that says what to pass instead, and no run directory.
    let gguf_out = dir.path().join("gguf-run");
    let e = fails(&gen(&gguf, &gguf_out, &["--adapter", adapter.to_str().unwrap()]));
    assert!(e.contains("GGUF") && e.contains("Owner/Tiny") && e.contains("--model"), "{e}");
    assert!(!gguf_out.exists());
    // A missing adapter directory names it.
    let e = fails(&gen(&model, &dir.path().join("r3"), &["--adapter", "/nonexistent/adapter"]));
    assert!(e.contains("/nonexistent/adapter") && e.contains("adapter_config.json"), "{e}");
}
