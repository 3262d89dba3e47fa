//! Bad input is refused before anything is written: a table of bad inputs across the
//! commands, each checked for a failing exit status, a message that names the flag, field
//! or file and the bad value, and a fixture tree (the runs, and where new runs would go)
//! left byte for byte as it was. Most rows are refused before any model loads, which is
//! the point. Then the refusals that need a set-up of their own: a full disk, a
//! RUST_BACKTRACE environment, and judging a run again with other settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{bsa, bsa_env, copy_dir, fails, json, ok, records, smollm2_arg, write_file};

/// Every file and directory under `root` with the bytes of the files: what "left as it
/// was" compares.
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let kind = std::fs::symlink_metadata(&p).unwrap().file_type();
            if kind.is_symlink() {
                // Its target, not its contents (a link to /dev/full never ends).
                out.insert(p.clone(), Some(std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()));
            } else if kind.is_dir() {
                stack.push(p.clone());
                out.insert(p, None);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(p, Some(bytes));
            }
        }
    }
    out
}

/// What changed between two [`tree`]s, for the failure message.
fn changes(before: &BTreeMap<PathBuf, Option<Vec<u8>>>, after: &BTreeMap<PathBuf, Option<Vec<u8>>>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => out.push(format!("removed {}", p.display())),
            Some(a) if a != b => out.push(format!("changed {}", p.display())),
            _ => {}
        }
    }
    out.extend(after.keys().filter(|p| !before.contains_key(*p)).map(|p| format!("created {}", p.display())));
    out
}

/// data/sample-run (a judged run) with a samples.jsonl made from its verdicts, so the
/// judge has something to judge.
fn judged_run(to: &Path) {
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample-run"), to);
    let samples: String = records(&to.join("verdicts.jsonl"))
        .iter()
        .map(|v| {
            let s = serde_json::json!({
                "item_id": v["item_id"], "sample_index": v["sample_index"], "config": v["config"], "scenario": v["scenario"],
                "categories": v["categories"], "seed": 0,
                "decoding": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "max_new_tokens": 8, "stop": []},
                "prompt_tokens": 10, "completion_tokens": 8, "thinking": "", "response": "A reply.", "raw": "A reply.",
                "finish_reason": "stop", "truncated": false, "elapsed_s": 0.1,
            });
            format!("{s}\n")
        })
        .collect();
    std::fs::write(to.join("samples.jsonl"), samples).unwrap();
}

/// The fixtures every row may name, all under one temporary root.
struct Fixtures {
    _dir: tempfile::TempDir,
    root: PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl Fixtures {
    fn new(model: &str) -> Fixtures {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let p = |name: &str| root.join(name).to_str().unwrap().to_string();
        // A generated run (one item, one sample, two tokens) of the real model.
        ok(&bsa(&["generate", "--model", model, "--scenario", "RO", "--limit", "1", "--samples", "1", "--max-new-tokens", "2", "--quiet", "--out", &p("gen")]));
        judged_run(&root.join("judged"));
        // A run whose verdicts.jsonl is corrupt in its middle line.
        copy_dir(&root.join("judged"), &root.join("corrupt"));
        let v = std::fs::read_to_string(root.join("corrupt/verdicts.jsonl")).unwrap();
        let mut lines: Vec<&str> = v.lines().collect();
        lines[1] = "{not json";
        std::fs::write(root.join("corrupt/verdicts.jsonl"), lines.join("\n") + "\n").unwrap();
        // Rubrics: the safety one lacks {answer}.
        let rubrics = root.join("rubrics");
        std::fs::create_dir(&rubrics).unwrap();
        for f in ["safety.txt", "thinking_risk_omission.txt", "thinking_cognitive_shortcut.txt", "thinking_over_sensitivity.txt"] {
            let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/prompts").join(f)).unwrap();
            std::fs::write(rubrics.join(f), if f == "safety.txt" { text.replace("{answer}", "the answer") } else { text }).unwrap();
        }
        // Model files that are not models: a cut-off GGUF, a directory with a bad config.json.
        let gguf = std::fs::read(model).unwrap();
        std::fs::write(root.join("cut.gguf"), &gguf[..100_000]).unwrap();
        std::fs::write(root.join("text.gguf"), "not a model").unwrap();
        std::fs::create_dir(root.join("badmodel")).unwrap();
        write_file(&root.join("badmodel"), "config.json", r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "wide"}"#);
        write_file(&root, "other.csv", "id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omission,Rumors-R\n");
        write_file(&root, "bad.csv", "id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omission,Rumors-R\ny,q,s,Risky,Rumors-R\n");
        write_file(&root, "existing.csv", "keep me\n");
        write_file(&root, "afile", "not a directory\n");
        let vars = vec![
            ("{GEN}", p("gen")),
            ("{JUDGED}", p("judged")),
            ("{CORRUPT}", p("corrupt")),
            ("{NEW}", p("new")),
            ("{RUBRICS}", p("rubrics")),
            ("{CUT}", p("cut.gguf")),
            ("{TEXT}", p("text.gguf")),
            ("{BADMODEL}", p("badmodel")),
            ("{OTHERCSV}", p("other.csv")),
            ("{BADCSV}", p("bad.csv")),
            ("{EXISTING}", p("existing.csv")),
            ("{AFILE}", p("afile")),
            ("{MODEL}", model.to_string()),
        ];
        Fixtures { _dir: dir, root, vars }
    }

    fn expand(&self, s: &str) -> String {
        self.vars.iter().fold(s.to_string(), |s, (k, v)| s.replace(k, v))
    }
}

/// (command line, what the message must contain). `{NAME}`s are [`Fixtures`]; `{NEW}` is
/// where a new run would go, and must not appear.
const BAD_INPUTS: &[(&str, &[&str])] = &[
    // bsa generate: flags out of range, refused as the command line is read.
    ("generate --out {NEW} --batch-size 0", &["--batch-size", "'0'", "from 1 up"]),
    ("generate --out {NEW} --prefill-chunk 0", &["--prefill-chunk", "'0'", "from 1 up"]),
    ("generate --out {NEW} --block-size 0", &["--block-size", "'0'", "from 1 up"]),
    ("generate --out {NEW} --kv-cache-mb 0", &["--kv-cache-mb", "'0'", "from 1 up"]),
    ("generate --out {NEW} --samples 0", &["--samples", "'0'", "from 1"]),
    ("generate --out {NEW} --max-new-tokens 0", &["--max-new-tokens", "'0'", "from 1 up"]),
    ("generate --out {NEW} --temperature=-1", &["--temperature", "'-1'", "from 0"]),
    ("generate --out {NEW} --temperature nan", &["--temperature", "'nan'", "from 0"]),
    ("generate --out {NEW} --top-p 0", &["--top-p", "'0'", "(0, 1]"]),
    ("generate --out {NEW} --top-p 1.5", &["--top-p", "'1.5'", "(0, 1]"]),
    ("generate --out {NEW} --top-k=-3", &["--top-k", "'-3'", "from 0 up"]),
    ("generate --out {NEW} --min-p 1", &["--min-p", "'1'", "[0, 1)"]),
    ("generate --out {NEW} --limit 0", &["--limit", "'0'", "from 1 up"]),
    ("generate --out {NEW} --seed x", &["--seed", "'x'", "from 0 to"]),
    ("generate --out {NEW} --stop=", &["--stop", "must not be empty"]),
    ("generate --out {NEW} --device gpu", &["--device", "'gpu'", "cuda:N"]),
    ("generate --out {NEW} --dtype f64", &["--dtype", "'f64'", "bf16"]),
    ("generate --out {NEW} --enable-thinking maybe", &["--enable-thinking", "'maybe'"]),
    ("generate --out {NEW} --concurrency 0", &["--concurrency", "'0'", "from 1 up"]),
    ("generate --out {NEW} --request-timeout 0", &["--request-timeout", "'0'", "from 1 up"]),
    ("generate --out {NEW} --http-retries=-1", &["--http-retries", "'-1'", "from 0"]),
    ("generate --out {NEW} --max-tokens-field max", &["--max-tokens-field", "'max'", "max_tokens, max_completion_tokens or auto"]),
    ("judge {GEN} --judge openai:m@http://127.0.0.1:9/v1 --max-tokens-field=", &["--max-tokens-field", "max_completion_tokens or auto"]),
    ("generate --out {NEW} --stream=yes", &["--stream", "'yes'"]),
    ("generate --out {NEW} --shard 4/4", &["--shard", "4/4", "I/N"]),
    ("generate --out {NEW} --per-scenario 0", &["--per-scenario", "'0'", "from 1 up"]),
    ("generate --out {NEW} --selection-seed 3", &["--per-scenario"]),
    // bsa generate: bad files and values, refused before a model loads.
    ("generate --out {NEW} --scenario XX", &["--scenario", "\"XX\"", "Risk Omission"]),
    ("generate --out {NEW} --data /nonexistent/data.csv", &["/nonexistent/data.csv", "check the path"]),
    ("generate --out {NEW} --data {BADCSV}", &["bad.csv:3", "dataset_name", "\"Risky\""]),
    ("generate --out {NEW} --ids /nonexistent/ids.txt", &["/nonexistent/ids.txt"]),
    ("generate --out {NEW} --safety-rules /nonexistent/rules.txt", &["/nonexistent/rules.txt"]),
    ("generate --out {NEW} --model /nonexistent/m.gguf", &["/nonexistent/m.gguf", "no such file"]),
    ("generate --out {NEW} --model {TEXT}", &["text.gguf", "not a GGUF"]),
    ("generate --out {NEW} --backend openai:m", &["--backend", "openai:MODEL@BASE_URL"]),
    ("generate --out {AFILE} --model {MODEL}", &["afile", "is a file", "--out"]),
    // A refused resume writes nothing, not even its command into the manifest.
    ("generate --out {GEN} --model {MODEL} --scenario RO --limit 1 --samples 3", &["job.samples", "1", "3", "--new-run"]),
    ("generate --out {GEN} --model {MODEL} --scenario RO --limit 1 --samples 1 --max-new-tokens 2 --temperature 0.9", &["job.decoding.temperature", "--new-run"]),
    // bsa judge.
    ("judge {GEN} --batch-size 0", &["--batch-size", "'0'", "from 1 up"]),
    ("judge {GEN} --judge-max-new-tokens 0", &["--judge-max-new-tokens", "'0'", "from 1 up"]),
    ("judge {GEN} --judge-retries=-1", &["--judge-retries", "'-1'", "from 0"]),
    ("judge {GEN} --kv-cache-mb 0", &["--kv-cache-mb", "'0'"]),
    ("judge {GEN} --judge {MODEL} --judge-analysis-tokens 0", &["--judge-analysis-tokens 0", "at least 1", "--judge-format label"]),
    ("judge {GEN} --judge-format json", &["--judge-format", "\"json\"", "rubric, label or free"]),
    ("judge {GEN} --judge /nonexistent/j.gguf", &["--judge /nonexistent/j.gguf", "no such file"]),
    ("judge {GEN} --judge {CUT}", &["--judge", "cut.gguf", "download it again"]),
    ("judge {GEN} --judge openai:m", &["--judge", "\"openai:m\"", "openai:MODEL@BASE_URL"]),
    ("judge {GEN} --judge openai:m@ftp://host/v1", &["--judge", "ftp://host/v1", "http://"]),
    ("judge {GEN} --judge openai:m@http://127.0.0.1:9/v1 --api-key-env BSA_TEST_UNSET_KEY", &["--api-key-env BSA_TEST_UNSET_KEY", "not set"]),
    ("judge {GEN} --judge {MODEL} --judge-structured", &["--judge-structured", "openai:"]),
    ("judge {GEN} --judge {MODEL} --judge-prompts {RUBRICS}", &["safety.txt", "{answer}"]),
    ("judge {GEN} --judge {MODEL} --judge-prompts /nonexistent/rubrics", &["/nonexistent/rubrics"]),
    ("judge {GEN} --judge {MODEL} --data {OTHERCSV}", &["other.csv", "sha256", "--data"]),
    ("judge /nonexistent/run", &["/nonexistent/run", "not a run directory"]),
    ("judge {JUDGED} --judge {MODEL} --judge-format label", &["job.judge", "bsa judge", "--new-run"]),
    // bsa eval refuses a bad judge, rubric or score flag before it generates anything.
    ("eval --out {NEW} --judge /nonexistent/j.gguf", &["--judge /nonexistent/j.gguf", "no such file"]),
    ("eval --out {NEW} --judge not-a-model", &["--judge", "\"not-a-model\"", "bsa models"]),
    ("eval --out {NEW} --judge {CUT}", &["--judge", "cut.gguf", "download it again"]),
    ("eval --out {NEW} --judge {TEXT}", &["--judge", "text.gguf", "not a GGUF file"]),
    ("eval --out {NEW} --judge {BADMODEL}", &["--judge", "config.json", "hidden_size"]),
    ("eval --out {NEW} --judge openai:x", &["--judge", "openai:MODEL@BASE_URL"]),
    ("eval --out {NEW} --judge {MODEL} --judge-prompts {RUBRICS}", &["safety.txt", "{answer}"]),
    ("eval --out {NEW} --judge-max-new-tokens 0", &["--judge-max-new-tokens", "'0'"]),
    ("eval --out {NEW} --k 0", &["--k", "'0'", "from 1 up"]),
    ("eval --out {NEW} --f-alpha 2", &["--f-alpha", "'2'", "[0, 1]"]),
    ("eval --out {NEW} --confidence 1", &["--confidence", "'1'", "between 0 and 1"]),
    ("eval --out {NEW} --resamples=-5", &["--resamples", "'-5'", "from 0 up"]),
    // bsa sweep.
    ("sweep --out {NEW} --temperature=0.2,-1", &["--temperature", "'-1'", "from 0"]),
    ("sweep --out {NEW} --top-p 0.9,2", &["--top-p", "'2'", "(0, 1]"]),
    ("sweep --out {NEW} --min-p 0,1", &["--min-p", "'1'", "[0, 1)"]),
    ("sweep --out {NEW} --top-k 20,20", &["--top-k lists 20 twice"]),
    ("sweep --out {NEW} --judge /nonexistent/j.gguf", &["--judge /nonexistent/j.gguf"]),
    // bsa score, report, compare, agree, export.
    ("score {JUDGED} --k 0", &["--k", "'0'"]),
    ("score {JUDGED} --f-alpha 1.5", &["--f-alpha", "'1.5'", "[0, 1]"]),
    ("score {JUDGED} --confidence 0", &["--confidence", "'0'", "between 0 and 1"]),
    ("score {JUDGED} --bootstrap-seed=-1", &["--bootstrap-seed", "'-1'"]),
    ("score {JUDGED} --invalid maybe", &["--invalid", "maybe", "exclude"]),
    ("score {JUDGED} --truncated never", &["--truncated", "never", "judge"]),
    ("score /nonexistent/run", &["/nonexistent/run", "not a run directory"]),
    ("score --official-csv /nonexistent/o.csv", &["/nonexistent/o.csv"]),
    ("score {CORRUPT}", &["verdicts.jsonl:2", "not a valid record"]),
    ("report {JUDGED} --k 0", &["--k", "'0'"]),
    ("report {JUDGED} {CORRUPT}", &["--out DIR"]),
    ("report /nonexistent/run", &["/nonexistent/run"]),
    ("report {JUDGED} --reference leaderboard", &["--reference", "\"leaderboard\"", "paper"]),
    ("report {JUDGED} --baseline nope", &["--baseline \"nope\"", "illustrative-model"]),
    ("compare {JUDGED} /nonexistent/run", &["/nonexistent/run"]),
    ("compare {JUDGED} {JUDGED} --confidence 2", &["--confidence", "'2'"]),
    ("agree {JUDGED} {JUDGED} --sheet {EXISTING}", &["existing.csv", "already exists", "--sheet"]),
    ("agree {JUDGED} {JUDGED} --resamples x", &["--resamples", "'x'"]),
    ("export {JUDGED} --official-csv {EXISTING}", &["existing.csv", "already exists"]),
    ("export /nonexistent/run --official-csv {NEW}", &["/nonexistent/run"]),
    // bsa review writes nothing for a bad filter, configuration or run.
    ("review {JUDGED} --category Nope", &["--category", "'Nope'", "Rumors"]),
    ("review {JUDGED} --scenario XX", &["--scenario", "'XX'", "Over Sensitivity"]),
    ("review {JUDGED} --failing both", &["--failing", "'both'", "either"]),
    ("review {JUDGED} --config hot", &["no configuration \"hot\"", "--config"]),
    ("review {CORRUPT}", &["verdicts.jsonl:2"]),
    ("review /nonexistent/run", &["/nonexistent/run", "not a run directory"]),
    // bsa data, merge.
    ("data stats /nonexistent/data.csv", &["/nonexistent/data.csv", "check the path"]),
    ("data stats data/sample.csv --limit 0", &["--limit", "'0'"]),
    ("data stats {BADCSV}", &["bad.csv:3", "dataset_name", "\"Risky\""]),
    ("merge {NEW} {JUDGED}", &["<RUNS> <RUNS>"]),
    ("merge {NEW} {JUDGED} {JUDGED}", &["appears twice"]),
    ("merge {GEN} {JUDGED} {CORRUPT}", &["{GEN}", "already exists"]),
    // bsa serve refuses before it loads a model or binds a port.
    ("serve --port 70000", &["--port", "70000", "65535"]),
    ("serve --batch-size 0", &["--batch-size", "'0'"]),
    ("serve --prefill-chunk 0", &["--prefill-chunk", "'0'"]),
    ("serve --kv-cache-mb 0", &["--kv-cache-mb", "'0'"]),
    ("serve --max-queue 0", &["--max-queue", "'0'"]),
    ("serve --max-n 0", &["--max-n", "'0'"]),
    ("serve --max-tokens 0", &["--max-tokens", "'0'"]),
    // bsa bench.
    ("bench score --items 0", &["--items", "'0'"]),
    ("bench serve --clients 8,0", &["--clients", "'0'"]),
];

#[test]
fn bad_inputs_are_refused_with_the_flag_and_value_and_nothing_written() {
    let Some(model) = smollm2_arg() else { return };
    assert!(BAD_INPUTS.len() >= 50, "{} rows", BAD_INPUTS.len());
    let fx = Fixtures::new(&model);
    let mut failures = Vec::new();
    for (line, expect) in BAD_INPUTS {
        let args: Vec<String> = line.split_whitespace().map(|a| fx.expand(a)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = tree(&fx.root);
        let o = bsa(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let mut why = Vec::new();
        if o.status.success() {
            why.push("it succeeded".to_string());
        }
        if stderr.contains("panicked") {
            why.push("it panicked".to_string());
        }
        for e in expect.iter().map(|e| fx.expand(e)) {
            if !stderr.contains(&e) {
                why.push(format!("the message lacks {e:?}"));
            }
        }
        why.extend(changes(&before, &tree(&fx.root)));
        if !why.is_empty() {
            failures.push(format!("bsa {line}: {}\n  stderr: {}", why.join("; "), stderr.trim()));
        }
    }
    assert!(failures.is_empty(), "{} of {} bad inputs:\n{}", failures.len(), BAD_INPUTS.len(), failures.join("\n"));
}

/// `bsa eval` with a judge that is not there refuses in its first second, before the
/// generation model loads: it never gets as far as the run directory.
#[test]
fn eval_refuses_a_missing_judge_before_generating() {
    let Some(model) = smollm2_arg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let start = std::time::Instant::now();
    let e = fails(&bsa(&["eval", "--model", &model, "--judge", "local:/nonexistent/judge.gguf", "--limit", "1", "--samples", "1", "--out", out.to_str().unwrap()]));
    assert!(e.contains("--judge local:/nonexistent/judge.gguf") && e.contains("no such file"), "{e}");
    assert!(!out.exists());
    assert!(start.elapsed().as_secs_f64() < 30.0, "{:?}", start.elapsed());
}

/// Runs `bsa` under `sh` with a file size limit of `blocks` blocks and SIGXFSZ ignored, so
/// a write past the limit fails with EFBIG ("File too large") as a full disk fails with
/// ENOSPC.
fn bsa_with_file_limit(blocks: u32, args: &[&str]) -> Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let script = format!("trap '' XFSZ; ulimit -f {blocks} && exec '{}' {}", env!("CARGO_BIN_EXE_bsa"), quoted.join(" "));
    Command::new("sh").arg("-c").arg(script).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    tree(dir).into_keys().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect()
}

/// A full disk: the message names the file and the fix, no temporary file is left, and the
/// run is as it was (a failed score writes no scores.json; a failed merge leaves no half
/// run; a generation whose manifest cannot be written leaves no directory).
#[cfg(unix)]
#[test]
fn a_full_disk_names_the_file_and_the_fix_and_leaves_no_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    judged_run(&run);
    // scores.json goes through scores.json.tmp, here a link to /dev/full (ENOSPC).
    if Path::new("/dev/full").exists() {
        let before: Vec<_> = tree(&run).into_iter().collect();
        std::os::unix::fs::symlink("/dev/full", run.join("scores.json.tmp")).unwrap();
        let e = fails(&bsa(&["score", run.to_str().unwrap(), "--resamples", "10"]));
        let scores = run.join("scores.json");
        assert!(e.contains(&format!("writing {}: No space left on device", scores.display())) && e.contains("free space on that disk"), "{e}");
        assert_eq!(tree(&run).into_iter().collect::<Vec<_>>(), before, "no scores.json, no scores.json.tmp");
    }
    // A merge whose verdicts.jsonl outgrows the file size limit: EFBIG, and no half run.
    let shard = |i: u64| {
        let d = dir.path().join(format!("s{i}"));
        judged_run(&d);
        let mut m = json(&d.join("manifest.json"));
        m["job"]["shard"] = serde_json::json!({"index": i, "count": 2});
        std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
        let keep = |v: &Value| bsa::data::fnv1a64(v["item_id"].as_str().unwrap().as_bytes()) % 2 == i;
        for f in ["samples.jsonl", "verdicts.jsonl"] {
            let lines: String = records(&d.join(f)).iter().filter(|v| keep(v)).map(|v| format!("{v}\n")).collect();
            std::fs::write(d.join(f), lines).unwrap();
        }
        d
    };
    let (a, b) = (shard(0), shard(1));
    let out = dir.path().join("merged");
    let o = bsa_with_file_limit(8, &["merge", out.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("samples.jsonl: File too large") && e.contains("ulimit -f") && !e.contains("panicked"), "{e}");
    assert!(!out.exists(), "the half-merged run is gone");
    assert!(tmp_files(dir.path()).is_empty(), "{:?}", tmp_files(dir.path()));
    // A generation whose manifest cannot be written: no directory is left behind.
    let Some(model) = smollm2_arg() else { return };
    let new = dir.path().join("gen");
    let o = bsa_with_file_limit(1, &["generate", "--model", &model, "--limit", "1", "--samples", "1", "--max-new-tokens", "2", "--quiet", "--out", new.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && e.contains(&format!("writing {}: File too large", new.join("manifest.json").display())), "{e}");
    assert!(!new.exists(), "{:?}", tree(dir.path()).keys().collect::<Vec<_>>());
}

/// RUST_BACKTRACE=1 (set in many environments) changes no message: model-load refusals
/// print as one line of causes, without the backtrace candle writes into its errors.
#[test]
fn errors_print_without_backtraces_whatever_rust_backtrace_says() {
    let Some(model) = smollm2_arg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &std::fs::read(&model).unwrap()[..100_000]).unwrap();
    // Cut inside the weights, past the header: named as cut short, with the fix.
    let deep = dir.path().join("deep.gguf");
    std::fs::write(&deep, &std::fs::read(&model).unwrap()[..10_000_000]).unwrap();
    let bad = dir.path().join("badmodel");
    std::fs::create_dir(&bad).unwrap();
    write_file(&bad, "config.json", r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "wide"}"#);
    let out = dir.path().join("run");
    for (m, expect) in [(cut.to_str().unwrap(), "cut.gguf: not a readable GGUF file"), (deep.to_str().unwrap(), "deep.gguf is cut short: tensor"), (bad.to_str().unwrap(), "hidden_size")] {
        for bt in ["1", "full", "0"] {
            let o = bsa_env(&["generate", "--model", m, "--limit", "1", "--samples", "1", "--out", out.to_str().unwrap()], &[("RUST_BACKTRACE", bt), ("RUST_LIB_BACKTRACE", bt)]);
            let e = fails(&o);
            assert!(e.starts_with("error: ") && e.contains(expect), "RUST_BACKTRACE={bt}: {e}");
            assert_eq!(e.trim_end().lines().count(), 1, "RUST_BACKTRACE={bt}: one line: {e}");
            assert!(!e.contains("candle_core::") && !e.contains(".rs:") && !e.contains("backtrace"), "RUST_BACKTRACE={bt}: {e}");
            assert!(!out.exists());
        }
    }
}

/// A judged run is judged again with other settings without copying it by hand: the
/// refusal names `bsa judge RUN --new-run`, which copies the samples to RUN-2 and judges
/// the copy, leaving the first labelling as it was.
#[test]
fn a_judged_run_is_judged_again_with_other_settings_with_new_run() {
    let Some(model) = smollm2_arg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    ok(&bsa(&["generate", "--model", &model, "--scenario", "RO", "--limit", "1", "--samples", "2", "--max-new-tokens", "4", "--quiet", "--out", run_s]));
    let judge = ["--judge", &model, "--judge-format", "label", "--quiet"];
    ok(&bsa(&[&["judge", run_s][..], &judge].concat()));
    let first = tree(&run);
    let other = ["--judge", &model, "--judge-format", "free", "--judge-max-new-tokens", "6", "--judge-retries", "0", "--quiet"];
    let e = fails(&bsa(&[&["judge", run_s][..], &other].concat()));
    assert!(e.contains("job.judge.") && e.contains(&format!("bsa judge {run_s} --new-run")), "{e}");
    assert_eq!(tree(&run), first, "the refused rerun wrote nothing, not even its command");
    let stdout = ok(&bsa(&[&["judge", run_s, "--new-run"][..], &other].concat()));
    let copy = dir.path().join("run-2");
    assert!(stdout.contains(copy.to_str().unwrap()), "{stdout}");
    assert_eq!(tree(&run), first, "the first labelling is as it was");
    assert_eq!(std::fs::read(copy.join("samples.jsonl")).unwrap(), std::fs::read(run.join("samples.jsonl")).unwrap());
    assert_eq!(records(&copy.join("verdicts.jsonl")).len(), 2);
    let m = json(&copy.join("manifest.json"));
    assert_eq!((m["job"]["judge"]["reply_format"].as_str(), m["copied_from"].as_str()), (Some("free"), Some(run_s)));
    assert_eq!(json(&run.join("manifest.json"))["job"]["judge"]["reply_format"], "label");
    // The two labellings side by side.
    ok(&bsa(&["agree", run_s, copy.to_str().unwrap(), "--resamples", "10", "--quiet"]));
}
