//! Free-running greedy generation on the real SmolLM2 GGUF with dense (dequantized) weights:
//! our batched engine and candle-transformers' quantized_llama must write the same tokens.
//! (With the quantized kernels both round activations to 8 bits, so near-ties may flip; the
//! teacher-forced test in models::parity_tests covers that case.) A file of its own because
//! CANDLE_DEQUANTIZE_ALL is read process-wide when weights load.

use std::path::{Path, PathBuf};

use bsa::data::Dataset;
use bsa::engine::kv_cache::KvCache;
use bsa::backends::local::{model_cache_dir, LocalModel};
use bsa::engine::scheduler::{self, PromptGroup, SampleSpec, SchedulerConfig};
use bsa::engine::sampler::{SamplingParams, StreamKey};
use bsa::prompt::Prompter;
use candle_core::{DType, Device, Tensor};

#[test]
fn dense_greedy_continuations_match_quantized_llama() {
    let path = std::env::var_os("BSA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| model_cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.exists() {
        assert!(std::env::var("BSA_REQUIRE_MODEL").is_err(), "SmolLM2 GGUF absent at {}", path.display());
        eprintln!("\n*** SKIPPED: SmolLM2 GGUF absent at {} (run scripts/fetch-smollm2.sh) ***\n", path.display());
        return;
    }
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let local = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let m = &local.loaded;
    let ds = Dataset::load_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample.csv")).unwrap();
    let prompter = Prompter::new(&local.prompt_format(), &Default::default()).unwrap();
    let prompts: Vec<Vec<u32>> =
        ds.items.iter().step_by(8).map(|it| m.tokenize_prompt(&prompter.render(&it.query).unwrap()).unwrap()).collect();
    let new_tokens = 24;

    // Ours: all prompts in one batch.
    let groups: Vec<PromptGroup> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| PromptGroup {
            prompt: p.clone(),
            samples: vec![SampleSpec { tag: i, params: SamplingParams::greedy(), stream: StreamKey::new(0, "x", 0), max_new_tokens: new_tokens, ignore_eos: false, grammar: None, logprobs: None }],
        })
        .collect();
    let mut ours = vec![Vec::new(); prompts.len()];
    let mut cache = KvCache::new(&m.config, 16, 256, DType::F32, &Device::Cpu).unwrap();
    let cfg = SchedulerConfig { max_batch: 8, prefill_chunk: 512, eos: m.eos_ids.clone(), max_model_len: None };
    scheduler::run(m.model.as_ref(), &mut cache, &cfg, groups, &mut |_, _, _| false, &mut |f| {
        ours[f.tag] = f.tokens;
        Ok(())
    }, &mut |_| {})
    .unwrap();

    // The reference: one sequence at a time with its own cache.
    for (prompt, ours) in prompts.iter().zip(&ours) {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut reference =
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let mut tokens = prompt.clone();
        let mut theirs = Vec::new();
        let mut pos = 0;
        while theirs.len() < new_tokens {
            let input = Tensor::new(&tokens[pos..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = reference.forward(&input, pos).unwrap().squeeze(0).unwrap();
            pos = tokens.len();
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            if m.eos_ids.contains(&next) {
                break;
            }
            theirs.push(next);
            tokens.push(next);
        }
        assert!(!theirs.is_empty());
        assert_eq!(ours, &theirs, "prompt of {} tokens", prompt.len());
    }
}
