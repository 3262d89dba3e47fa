//! The engine on the real SmolLM2-135M-Instruct GGUF: batched generation equals one-by-one
//! generation, sampling is independent of the batch, the reference implementation agrees,
//! and `bsa generate` writes, resumes and refuses bad input.

mod common;
use common::smollm2;
use std::path::Path;
use std::process::{Command, Output};

use bsa::data::Dataset;
use bsa::engine::kv_cache::KvCache;
use bsa::backends::local::LocalModel;
use bsa::engine::load;
use bsa::engine::scheduler::{self, PromptGroup, SchedulerConfig};
use bsa::engine::sampler::SamplingParams;
use bsa::prompt::Prompter;
use candle_core::{DType, Device};

/// The real model, or None with a loud note (CI sets BSA_REQUIRE_MODEL=1 to fail instead).
fn sample_prompts(m: &LocalModel, n: usize) -> Vec<Vec<u32>> {
    let ds = Dataset::load_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample.csv")).unwrap();
    let prompter = Prompter::new(&m.prompt_format(), &Default::default()).unwrap();
    ds.items.iter().take(n).map(|it| m.loaded.tokenize_prompt(&prompter.render(&it.query).unwrap()).unwrap()).collect()
}

/// Generates with the scheduler; returns the tokens per tag.
fn run(m: &load::LoadedModel, groups: Vec<PromptGroup>, batch: usize, block_size: usize, blocks: usize) -> Vec<Vec<u32>> {
    run_with(m, groups, batch, block_size, blocks, true).0
}

/// What a scheduler run did, summed over its steps, and the cache's evictions.
#[derive(Debug, Default)]
struct Totals {
    prefill: usize,
    cached: usize,
    preempted: usize,
    evictions: u64,
}

/// [`run`] with prefix caching on or off; also returns what the run did.
fn run_with(m: &load::LoadedModel, groups: Vec<PromptGroup>, batch: usize, block_size: usize, blocks: usize, prefix_cache: bool) -> (Vec<Vec<u32>>, Totals) {
    let n: usize = groups.iter().map(|g| g.samples.len()).sum();
    let mut out = vec![Vec::new(); n];
    let mut cache = KvCache::new(&m.config, block_size, blocks, DType::F32, &Device::Cpu).unwrap();
    cache.set_prefix_caching(prefix_cache);
    let cfg = SchedulerConfig { max_batch: batch, prefill_chunk: 256, eos: m.eos_ids.clone(), max_model_len: None };
    let mut totals = Totals::default();
    scheduler::run(
        m.model.as_ref(),
        &mut cache,
        &cfg,
        groups,
        &mut |_, _, _| false,
        &mut |f| {
            out[f.tag] = f.tokens;
            Ok(())
        },
        &mut |s| {
            totals.prefill += s.prefill_tokens;
            totals.cached += s.cached_prefill_tokens;
            totals.preempted += s.preempted;
        },
    )
    .unwrap();
    assert_eq!(cache.free_blocks(), blocks, "every block returned at the end");
    totals.evictions = cache.prefix_cache_stats().evictions;
    (out, totals)
}

fn groups(prompts: &[Vec<u32>], k: u32, params: SamplingParams, max_new: usize) -> Vec<PromptGroup> {
    PromptGroup::uniform(prompts, k, params, max_new, 7, "item")
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let Some(path) = smollm2() else { return };
    let m = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let prompts = sample_prompts(&m, 6);
    // Greedy: batch of 16 with continuous batching vs one sequence at a time.
    let greedy = SamplingParams::greedy();
    let batched = run(&m.loaded, groups(&prompts, 1, greedy, 24), 16, 16, 512);
    let single = run(&m.loaded, groups(&prompts, 1, greedy, 24), 1, 16, 512);
    assert_eq!(batched, single);
    assert!(batched.iter().all(|t| !t.is_empty()));
    // Sampling: same seed, batch 1 vs 16, k = 3 sharing one prefill: identical samples.
    let p = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.0 };
    let a = run(&m.loaded, groups(&prompts[..3], 3, p, 20), 16, 16, 512);
    let b = run(&m.loaded, groups(&prompts[..3], 3, p, 20), 1, 16, 512);
    assert_eq!(a, b);
    // The three samples of a prompt are different draws, not copies.
    assert!(a[0] != a[1] || a[1] != a[2], "{a:?}");
}

#[test]
fn a_tiny_cache_sets_sequences_aside_and_still_finishes_identically() {
    let Some(path) = smollm2() else { return };
    let m = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let prompts = sample_prompts(&m, 4);
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.0 };
    for (what, params) in [("greedy", greedy), ("seeded", seeded)] {
        let (roomy, calm) = run_with(&m.loaded, groups(&prompts, 2, params, 28), 8, 4, 1024, true);
        assert_eq!(calm.preempted, 0, "{what}: room for everything");
        // Room for about one and a half sequences: admission waits and decode preempts.
        let tight_blocks = (longest + 28).div_ceil(4) * 3 / 2 + 2;
        let (tight, t) = run_with(&m.loaded, groups(&prompts, 2, params, 28), 8, 4, tight_blocks, true);
        assert_eq!(roomy, tight, "{what}: every sample's tokens as without pressure");
        assert!(t.preempted >= 4, "{what}: heavy preemption happened and was counted: {t:?}");
    }
}

/// Stop strings on the real tokenizer, fed token by token as the scheduler does: a string
/// that straddles tokens is found at the token that completes it, not before; the matcher
/// decodes only new tokens, and a multi-byte character split by a cut never shows as U+FFFD.
#[test]
fn stop_strings_straddle_tokens_and_cut_characters_are_held_back() {
    use bsa::backends::local::{completion_text, StopMatcher};
    let Some(path) = smollm2() else { return };
    let m = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let tok = &m.loaded.tokenizer;
    let text = "The quick brown fox jumps over the lazy dog. Caf\u{e9} \u{1F642} \u{65E5}\u{672C} done.";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let decode = |n: usize| tok.decode(&ids[..n], false).unwrap();
    // "fox jumps" spans at least two tokens; it is found exactly when its last piece comes.
    let stop = "x jum".to_string();
    let complete_at = (1..=ids.len()).find(|&n| decode(n).contains(&stop)).unwrap();
    assert!(!tok.decode(&ids[complete_at - 1..complete_at], false).unwrap().contains(&stop), "the stop string straddles tokens");
    let mut matcher = StopMatcher::new(tok, std::slice::from_ref(&stop));
    let hits: Vec<bool> = (1..=ids.len()).map(|n| matcher.hit(&ids[..n])).collect();
    assert_eq!(hits.iter().position(|&h| h), Some(complete_at - 1), "{hits:?}");
    // A stop string absent from the text is never found, through every multi-byte character.
    let mut none = StopMatcher::new(tok, &["zebra".to_string(), "\u{1F643}".to_string()]);
    assert!((1..=ids.len()).all(|n| !none.hit(&ids[..n])));
    assert_eq!(completion_text(tok, &ids, &[stop.clone()], true).unwrap(), "The quick brown fo");
    // Every cut of the text: no U+FFFD, and the text is the longest whole-character prefix.
    let mut split = 0;
    for n in 1..=ids.len() {
        let cut = completion_text(tok, &ids[..n], &[], false).unwrap();
        assert!(!cut.contains('\u{FFFD}'), "cut after {n} tokens: {cut:?}");
        assert!(text.starts_with(&cut), "{cut:?}");
        if decode(n).ends_with('\u{FFFD}') {
            split += 1;
            assert!(cut.len() < decode(n).len());
        }
    }
    assert!(split > 0, "some cut falls inside a multi-byte character (the emoji or the CJK)");
}

/// Prefix caching on the real model: prompts that share prefixes of many lengths (on and off
/// block boundaries, down to the chat template's header alone) decode to the same tokens with
/// the cache as without it, greedy and seeded, and in a cache so small that cached blocks are
/// evicted and sequences set aside and recomputed; the tokens it did not compute are counted.
#[test]
fn prefix_caching_changes_no_token() {
    let Some(path) = smollm2() else { return };
    let m = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let base = sample_prompts(&m, 4);
    // Prompt 0 whole, then its first `cut` tokens followed by another prompt's last part.
    let header = base.iter().map(|p| p.iter().zip(&base[0]).take_while(|(a, b)| a == b).count()).min().unwrap();
    assert!(header >= 8, "the chat template gives every prompt a common header ({header} tokens)");
    let mut prompts = vec![base[0].clone()];
    for (i, cut) in [header, 16, 17, 31, 32, 33, base[0].len() - 1].into_iter().enumerate() {
        let other = &base[1 + i % 3];
        prompts.push([&base[0][..cut.min(base[0].len())], &other[other.len() / 2..]].concat());
    }
    prompts.push(base[0].clone()); // the same prompt again: all but its last block cached
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.0 };
    // Two prompts sharing three blocks, admitted in the same step: the second waits for the
    // first to write them instead of computing them too.
    let pair = [prompts[0].clone(), prompts[6].clone()];
    assert!(pair[0][..33] == pair[1][..33] && pair[0][33] != pair[1][33]);
    let (_, t) = run_with(&m.loaded, groups(&pair, 1, greedy, 2), 4, 16, 512, true);
    assert_eq!((t.prefill, t.cached), (pair[0].len() + pair[1].len() - 32, 32), "{t:?}");
    for (what, params, k) in [("greedy", greedy, 1), ("seeded", seeded, 2)] {
        let (off, off_totals) = run_with(&m.loaded, groups(&prompts, k, params, 12), 4, 16, 512, false);
        let (on, on_totals) = run_with(&m.loaded, groups(&prompts, k, params, 12), 4, 16, 512, true);
        assert_eq!(on, off, "{what}: the same tokens with and without the prefix cache");
        assert_eq!(off_totals.cached, 0);
        assert!(on_totals.cached >= 8 * header, "{what}: {on_totals:?}");
        assert_eq!(on_totals.prefill + on_totals.cached, off_totals.prefill, "{what}: every prompt token computed or taken");
        // Room for one prompt and a few blocks more: cached blocks are evicted, sequences
        // set aside and recomputed.
        let (tight, t) = run_with(&m.loaded, groups(&prompts, k, params, 12), 4, 4, longest.div_ceil(4) + 6, true);
        assert_eq!(tight, off, "{what}: the same tokens in a tight cache");
        assert!(t.evictions > 0 && t.cached > 0 && t.preempted > 0, "{what}: {t:?}");
    }
}

/// Structured samples (a grammar per sample) in the same batch as free ones: the free ones
/// decode exactly as without them, every structured one writes its grammar's text, and a
/// cache so small that sequences are set aside and recomputed changes neither.
#[test]
fn structured_samples_share_the_batch_and_survive_being_preempted() {
    use bsa::engine::constraint::{lark_tokens, Choice, GrammarCompiler};
    let Some(path) = smollm2() else { return };
    let m = LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let l = &m.loaded;
    let prompts = sample_prompts(&m, 3);
    let greedy = SamplingParams::greedy();
    let free_only = run(l, groups(&prompts, 2, greedy, 12), 8, 4, 1024);

    let compiler = GrammarCompiler::new(&l.tokenizer, l.config.vocab_size, l.eos_ids[0]).unwrap();
    let marker = compiler.tokenize("{\"verdict\": \"");
    let lark = format!("start: analysis {} label \"\\\"}}\"\nanalysis[max_tokens=6]: /[^{{}}]*/\nlabel: \"Safe\" | \"Unsafe\"\n", lark_tokens(&marker));
    let grammar = compiler.compile(&lark, Some(Choice { after: marker, options: vec!["Safe".into(), "Unsafe".into()] })).unwrap();
    let mixed = |blocks: usize| {
        let mut g = groups(&prompts, 2, greedy, 12);
        // Tags 6.. : one structured sample per prompt, in the same batch.
        for (i, p) in prompts.iter().enumerate() {
            let mut s = g[0].samples[0].clone();
            s.tag = 6 + i;
            s.max_new_tokens = 64;
            s.grammar = Some(grammar.clone());
            g.push(PromptGroup { prompt: p.clone(), samples: vec![s] });
        }
        run(l, g, 8, 4, blocks)
    };
    let roomy = mixed(1024);
    assert_eq!(&roomy[..6], &free_only[..], "free samples decode as without the structured ones");
    for t in &roomy[6..] {
        let text = l.tokenizer.decode(t, false).unwrap();
        let object = &text[text.find('{').unwrap_or_else(|| panic!("no object in {text:?}"))..];
        assert!(object == "{\"verdict\": \"Safe\"}" || object == "{\"verdict\": \"Unsafe\"}", "{text:?}");
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let tight = mixed((longest + 64).div_ceil(4) * 3 / 2 + 2);
    assert_eq!(roomy, tight, "set aside and recomputed, the same tokens");
}

fn bsa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bsa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_writes_resumes_and_redoes_a_torn_line() {
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--model", path.to_str().unwrap(), "--data", "data/sample.csv", "--limit", "3",
            "--samples", "2", "--max-new-tokens", "12", "--quiet", "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        bsa(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let samples = out.join("samples.jsonl");
    let first = std::fs::read_to_string(&samples).unwrap();
    let lines: Vec<serde_json::Value> = first.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        for k in ["item_id", "sample_index", "decoding", "seed", "prompt_tokens", "thinking", "response", "raw", "finish_reason", "completion_tokens", "elapsed_s"] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
        // SmolLM2 is not a reasoning model: no thinking, the response is the whole text.
        assert_eq!(l["thinking"], "");
    }
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["job"]["samples"], 2);
    assert_eq!(manifest["job"]["prompt"]["system"], serde_json::Value::Null);
    assert_eq!(manifest["job"]["model"]["files"][0]["sha256"].as_str().unwrap().len(), 64);

    // Rerun: nothing to do, nothing rewritten.
    let o = run(&[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to do"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&samples).unwrap(), first);

    // A killed run: the last line torn in half. The rerun redoes exactly that sample, and
    // the same stream gives the same text.
    let cut = first.len() - first.lines().last().unwrap().len() / 2 - 1;
    std::fs::write(&samples, &first[..cut]).unwrap();
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("wrote 1 samples"), "{}", String::from_utf8_lossy(&o.stdout));
    let redone = std::fs::read_to_string(&samples).unwrap();
    let strip = |s: &str| s.lines().map(|l| { let mut v: serde_json::Value = serde_json::from_str(l).unwrap(); v["elapsed_s"] = 0.into(); v }).collect::<Vec<_>>();
    assert_eq!(strip(&redone), strip(&first));
    assert!(out.join("samples.jsonl.torn").exists());

    // Another decoding on the same run is refused, naming the field; --new-run goes beside.
    let o = run(&["--temperature", "0.9"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("job.decoding.temperature") && e.contains("--new-run"), "{e}");
    assert_eq!(std::fs::read_to_string(&samples).unwrap(), redone, "nothing written on refusal");
    let o = run(&["--temperature", "0.9", "--new-run", "--system", "Be careful."]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.path().join("run-2/samples.jsonl").exists());
    // SmolLM2's template has a system role: the rules go in a system turn, as recorded.
    let m2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("run-2/manifest.json")).unwrap()).unwrap();
    assert_eq!(m2["job"]["prompt"]["system_placement"], "system message");
}

#[test]
fn generate_refuses_bad_models_and_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let o_ = out.to_str().unwrap();
    let e = stderr(&bsa(&["generate", "--model", "/nonexistent/m.gguf", "--out", o_]));
    assert!(e.contains("m.gguf") && e.contains("no such file"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = stderr(&bsa(&["generate", "--model", empty.to_str().unwrap(), "--out", o_]));
    assert!(e.contains("config.json"), "{e}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf at all").unwrap();
    let e = stderr(&bsa(&["generate", "--model", junk.to_str().unwrap(), "--out", o_]));
    assert!(e.contains("junk.gguf") && e.contains("not a GGUF"), "{e}");
    let e = stderr(&bsa(&["generate", "--model", "no-such-preset", "--out", o_]));
    assert!(e.contains("bsa models"), "{e}");
    let e = stderr(&bsa(&["generate", "--device", "cuda", "--out", o_]));
    assert!(e.contains("without CUDA") && e.contains("--features cuda"), "{e}");
    if let Some(path) = smollm2() {
        let e = stderr(&bsa(&["generate", "--model", path.to_str().unwrap(), "--top-p", "1.5", "--out", o_]));
        assert!(e.contains("top-p") && e.contains("1.5"), "{e}");
        let e = stderr(&bsa(&["generate", "--model", path.to_str().unwrap(), "--chat-template", "/nonexistent.jinja", "--out", o_]));
        assert!(e.contains("--chat-template") && e.contains("/nonexistent.jinja"), "{e}");
        let bad_template = dir.path().join("bad.jinja");
        std::fs::write(&bad_template, "{% for m in messages %}{{ m.content }").unwrap();
        let e = stderr(&bsa(&["generate", "--model", path.to_str().unwrap(), "--chat-template", bad_template.to_str().unwrap(), "--out", o_]));
        assert!(e.contains("chat template failed to parse"), "{e}");
    }
    assert!(!out.join("samples.jsonl").exists());
}

/// A cache too small for one full-length sample: the run completes, every sample ends at the
/// longest sequence the cache holds (finish reason length), and the manifest records the
/// cache and the limit. With --ignore-eos every sample runs to its token limit; a limit
/// shorter than the prompts ends those samples with an error, and the run still finishes.
#[test]
fn a_cache_too_small_for_a_full_sample_still_finishes_the_run() {
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gen = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut a = vec!["generate", "--model", path.to_str().unwrap(), "--data", "data/sample.csv", "--limit", "2", "--samples", "2", "--quiet", "--out", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        (bsa(&a), out)
    };
    let records = |out: &Path| -> Vec<serde_json::Value> { std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
    // 8 MiB of f32 KV for SmolLM2 (30 layers, 3 KV heads of 64): 11 blocks of 16 = 176 tokens.
    let (o, out) = gen("tiny", &["--kv-cache-mb", "8", "--max-new-tokens", "1000", "--ignore-eos"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let engine = &manifest["engine"];
    assert_eq!((engine["kv_cache_tokens"].as_u64(), engine["max_model_len"].as_u64()), (Some(176), Some(176)), "{engine}");
    assert_eq!(engine["full_length_sequences"], 1);
    // 16 MiB: 22 blocks (352 tokens) hold three sequences of 81 tokens (6 blocks each), not
    // 352 / 81 = 4.
    let (fit, _) = gen("fit", &["--kv-cache-mb", "16", "--max-model-len", "81", "--max-new-tokens", "2"]);
    assert!(String::from_utf8_lossy(&fit.stdout).contains("full-length sequences that fit at once: 3"), "{}", String::from_utf8_lossy(&fit.stdout));
    assert_eq!(manifest["job"]["decoding"]["ignore_eos"], true);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("176 tokens") && stdout.contains("preemptions:"), "{stdout}");
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!(r["finish_reason"], "length", "{r}");
        assert_eq!(r["prompt_tokens"].as_u64().unwrap() + r["completion_tokens"].as_u64().unwrap(), 176, "{r}");
    }
    // --ignore-eos with room: every sample has exactly its token limit.
    let (o, out) = gen("eos", &["--max-new-tokens", "40", "--ignore-eos"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(records(&out).iter().all(|r| r["completion_tokens"] == 40 && r["decoding"]["ignore_eos"] == true));
    // A limit shorter than every prompt: not one sample could be generated, which is refused
    // before anything is written (a single prompt over the limit fails alone: below).
    let (o, out) = gen("short", &["--max-model-len", "10", "--max-new-tokens", "8"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("every prompt is longer than the longest sequence allowed, 10 tokens (set by --max-model-len)"), "{}", stderr(&o));
    assert!(!out.join("samples.jsonl").exists());
    // A limit the cache cannot hold, or past the model's context, is refused before anything
    // is written, with the numbers and the fix.
    for (extra, says) in [
        (&["--kv-cache-mb", "8", "--max-model-len", "1000"][..], "--max-model-len 1000 needs 63 KV-cache blocks"),
        (&["--max-model-len", "100000"][..], "longer than the model's context of 8192"),
    ] {
        let (o, out) = gen("refused", extra);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(says), "{extra:?}: {}", stderr(&o));
        assert!(!out.join("samples.jsonl").exists(), "{extra:?}");
    }
}

/// A 20 MiB query is that sample's failure, known from its bytes (it is not tokenized: that
/// took 28 s and 1.8 GB); the other items of the run are generated as usual.
#[test]
fn a_huge_query_fails_alone_without_being_tokenized() {
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("huge.csv");
    let huge = "Tell me about safety. ".repeat(20 << 20 >> 5);
    std::fs::write(&data, format!("id,query,risk_summary,dataset_name,label\nbig,{huge},risk,Risk Omission,Offense and Prejudice-Discrimination and Prejudice\nsmall,How do I store bleach safely?,risk,Risk Omission,Offense and Prejudice-Discrimination and Prejudice\n")).unwrap();
    let out = dir.path().join("run");
    let o = bsa(&["generate", "--model", path.to_str().unwrap(), "--data", data.to_str().unwrap(), "--samples", "1", "--max-new-tokens", "4", "--quiet", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let big = recs.iter().find(|r| r["item_id"] == "big").unwrap();
    assert_eq!(big["finish_reason"], "error");
    let e = big["error"].as_str().unwrap();
    assert!(e.contains("bytes) has more than 8192 tokens"), "{e}");
    let small = recs.iter().find(|r| r["item_id"] == "small").unwrap();
    assert_eq!((small["finish_reason"].as_str(), small["completion_tokens"].as_u64()), (Some("length"), Some(4)), "{small}");
}

#[test]
fn models_lists_the_presets() {
    let o = bsa(&["models"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for name in ["qwen3-8b", "r1-distill-qwen-7b", "r1-distill-llama-70b", "qwq-32b", "smollm2-135m"] {
        assert!(s.contains(name), "{name} missing:\n{s}");
    }
}

#[test]
fn shards_of_a_generation_merge_into_the_whole() {
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for i in 0..2 {
        let out = dir.path().join(format!("s{i}"));
        let o = bsa(&["generate", "--model", path.to_str().unwrap(), "--limit", "6", "--samples", "1", "--max-new-tokens", "4",
            "--quiet", "--shard", &format!("{i}/2"), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        runs.push(out);
    }
    let merged = dir.path().join("merged");
    let o = bsa(&["merge", merged.to_str().unwrap(), runs[0].to_str().unwrap(), runs[1].to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("6 samples"), "{}", String::from_utf8_lossy(&o.stdout));
}
