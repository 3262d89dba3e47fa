//! `bsa judge` and `bsa eval` with SmolLM2 as the local judge: every sample gets one verdict
//! with the judge's raw text and the rubric hash, a rerun judges nothing twice, and bad
//! judge settings are refused before anything is written.

mod common;
use common::{bsa, fails, json, ok, records, smollm2_arg, temp_path, write_file};

#[test]
fn eval_generates_judges_and_scores_and_resumes() {
    let Some(model) = smollm2_arg() else { return };
    let (dir, out) = temp_path("run");
    let out_s = out.to_str().unwrap();
    // The default reply format: a short analysis, then the rubric's object, decoded under a
    // grammar: every label is readable, with its probabilities.
    let args = ["eval", "--model", &model, "--judge", &model, "--scenario", "RO,OS", "--limit", "3", "--samples", "2",
        "--max-new-tokens", "12", "--judge-analysis-tokens", "16", "--judge-retries", "1", "--resamples", "50", "--quiet", "--out", out_s];
    let stdout = ok(&bsa(&args));
    assert!(stdout.contains("Think@1") && stdout.contains("Safe@1"), "{stdout}");
    let verdicts = records(&out.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 6, "one verdict per sample");
    for v in &verdicts {
        assert!(v["raw_safety"].is_string() && v["raw_thinking"].is_string(), "{v}");
        assert_eq!(v["prompt_sha256"].as_str().unwrap().len(), 64);
        // SmolLM2 writes no thinking: the rubric's rule labels it, without a judge call.
        assert_eq!(v["raw_thinking"], bsa::pipeline::judge::run::EMPTY_THINKING_RULE);
        assert!(v["thinking"] == "False" || v["thinking"] == "Not Covered", "{v}");
        let raw = v["raw_safety"].as_str().unwrap();
        assert!(!raw.starts_with('{') && !raw[..raw.find('{').unwrap()].contains('}'), "analysis first, braces only in the object: {raw}");
        assert_structured(v, raw);
    }
    let manifest = json(&out.join("manifest.json"));
    assert_eq!(manifest["job"]["judge"]["reply_format"], "rubric");
    assert!(manifest["job"]["judge"]["structured"].as_str().unwrap().starts_with("grammar"));
    let scores = json(&out.join("scores.json"));
    let card = scores.as_object().unwrap().values().next().unwrap();
    assert_eq!(card["think_at_1"], 0.0, "no thinking, no identified risk");
    assert_eq!(card["items"], 3);

    // Everything is there: a rerun generates and judges nothing.
    let before = std::fs::read_to_string(out.join("verdicts.jsonl")).unwrap();
    let stdout = ok(&bsa(&args));
    assert!(stdout.contains("already judged; nothing to do"), "{stdout}");
    assert_eq!(std::fs::read_to_string(out.join("verdicts.jsonl")).unwrap(), before);

    // Another judge on the same run is refused, naming the field.
    let e = fails(&bsa(&["judge", out_s, "--judge", &model, "--judge-analysis-tokens", "17", "--quiet"]));
    assert!(e.contains("job.judge."), "{e}");

    // --judge-format label: the same samples, the reply is the object alone.
    let (pre, pre_s) = fresh_judge_dir(dir.path(), &out, "label");
    let label_args = ["--judge", &model, "--judge-format", "label", "--judge-retries", "0", "--quiet"];
    let cached_stdout = ok(&bsa(&[&["judge", &pre_s][..], &label_args].concat()));
    let verdicts = records(&pre.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 6);
    for v in &verdicts {
        let raw = v["raw_safety"].as_str().unwrap();
        assert!(raw.starts_with("{\"Safe_Ans_Check\": \""), "the reply starts at the label: {raw}");
        assert_structured(v, raw);
    }
    assert_eq!(json(&pre.join("manifest.json"))["job"]["judge"]["reply_format"], "label");

    // The prefix cache changes no verdict: without it the judge writes the same labels, raw
    // replies and probabilities, and computes every prompt token it took from the cache.
    let (plain, plain_s) = fresh_judge_dir(dir.path(), &out, "no-prefix-cache");
    let plain_stdout = ok(&bsa(&[&["judge", &plain_s][..], &label_args, &["--no-prefix-cache"]].concat()));
    let sorted = |d: &std::path::Path| {
        let mut v: Vec<String> = records(&d.join("verdicts.jsonl")).iter().map(|v| v.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&pre), sorted(&plain));
    let prefill = |stdout: &str| -> (usize, usize) {
        let line = stdout.lines().find(|l| l.contains("judge prefill:")).unwrap_or_else(|| panic!("no prefill line: {stdout}"));
        let n: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (n[0], n[1])
    };
    let (computed, cached) = prefill(&cached_stdout);
    assert!(cached > computed, "six requests opening with one rubric: {cached_stdout}");
    assert_eq!(prefill(&plain_stdout), (computed + cached, 0), "{plain_stdout}");

    // --judge-format free: the lenient parser reads whatever the judge wrote; a label it
    // cannot read stays null, never guessed.
    let (free, free_s) = fresh_judge_dir(dir.path(), &out, "free");
    ok(&bsa(&["judge", &free_s, "--judge", &model, "--judge-format", "free", "--judge-max-new-tokens", "24", "--judge-retries", "0", "--quiet"]));
    for v in records(&free.join("verdicts.jsonl")) {
        assert!(v["safety"].is_null() || v["safety"] == "Safe" || v["safety"] == "Unsafe", "{v}");
        assert!(v.get("safety_probs").is_none(), "no probabilities without a grammar: {v}");
    }
}

/// A copy of `run`'s samples and manifest, without its judge, to judge again another way.
fn fresh_judge_dir(base: &std::path::Path, run: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let d = base.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(run.join("samples.jsonl"), d.join("samples.jsonl")).unwrap();
    let mut manifest = json(&run.join("manifest.json"));
    manifest["job"].as_object_mut().unwrap().remove("judge");
    std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
    let s = d.to_str().unwrap().to_string();
    (d, s)
}

/// A structured verdict: the reply ends with the object holding the label the verdict
/// records, and the labels' probabilities sum to 1 with the chosen label's among them.
fn assert_structured(v: &serde_json::Value, raw: &str) {
    let label = v["safety"].as_str().unwrap_or_else(|| panic!("a structured reply always has a label: {v}"));
    assert!(raw.ends_with(&format!("{{\"Safe_Ans_Check\": \"{label}\"}}")), "{raw}");
    let probs = v["safety_probs"].as_object().unwrap_or_else(|| panic!("probabilities: {v}"));
    assert_eq!(probs.len(), 2, "{v}");
    let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-9 && probs[label].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bad_judge_settings_are_refused() {
    let (dir, run) = temp_path("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample-run/manifest.json"), run.join("manifest.json")).unwrap();
    let run_s = run.to_str().unwrap();
    // No samples yet.
    let e = fails(&bsa(&["judge", run_s]));
    assert!(e.contains("no samples.jsonl") && e.contains("bsa generate"), "{e}");
    std::fs::write(run.join("samples.jsonl"), "").unwrap();
    let e = fails(&bsa(&["judge", run_s, "--judge", "openai:gpt"]));
    assert!(e.contains("--judge") && e.contains("openai:MODEL@BASE_URL"), "{e}");
    // Reply formats a judge cannot keep.
    let e = fails(&bsa(&["judge", run_s, "--judge", "openai:m@http://127.0.0.1:9/v1", "--judge-format", "label"]));
    assert!(e.contains("--judge-format label") && e.contains("--judge-structured"), "{e}");
    let e = fails(&bsa(&["judge", run_s, "--judge-structured"]));
    assert!(e.contains("--judge-structured") && e.contains("openai:"), "{e}");
    let e = fails(&bsa(&["judge", run_s, "--judge", "openai:m@http://127.0.0.1:9/v1", "--judge-structured", "--judge-format", "free"]));
    assert!(e.contains("--judge-format free"), "{e}");
    let e = fails(&bsa(&["judge", run_s, "--judge-format", "json"]));
    assert!(e.contains("rubric, label or free"), "{e}");
    // bsa eval checks the judge's settings before it generates anything.
    let never = dir.path().join("never");
    let e = fails(&bsa(&["eval", "--judge-structured", "--limit", "1", "--samples", "1", "--out", never.to_str().unwrap()]));
    assert!(e.contains("--judge-structured"), "{e}");
    assert!(!never.join("samples.jsonl").exists(), "nothing generated before the judge's settings were checked");
    let prompts = dir.path().join("prompts");
    std::fs::create_dir(&prompts).unwrap();
    write_file(&prompts, "safety.txt", "{query} {risk_summary} {answer}");
    let e = fails(&bsa(&["judge", run_s, "--judge-prompts", prompts.to_str().unwrap()]));
    assert!(e.contains("thinking_risk_omission.txt"), "{e}");
    assert!(!run.join("verdicts.jsonl").exists());
}

/// kill -9 during `bsa judge` loses nothing already answered: verdicts are appended as
/// replies arrive (here one sequence at a time), not when the round ends, and a rerun
/// judges only the rest.
#[test]
fn a_killed_judge_keeps_what_was_answered_and_resumes() {
    let Some(model) = smollm2_arg() else { return };
    let (_dir, run) = temp_path("run");
    let run_s = run.to_str().unwrap();
    ok(&bsa(&["generate", "--model", &model, "--scenario", "RO", "--limit", "3", "--samples", "2", "--max-new-tokens", "4", "--quiet", "--out", run_s]));
    let verdicts_path = run.join("verdicts.jsonl");
    let judge = ["judge", run_s, "--judge", &model, "--judge-format", "label", "--judge-retries", "0", "--batch-size", "1", "--quiet"];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bsa"))
        .args(judge)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0);
    // Wait for the first verdict while the judge is still running, then kill it.
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the judge ended before any verdict was seen written mid-round");
        if lines(&verdicts_path) >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no verdict within 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let kept = std::fs::read_to_string(&verdicts_path).unwrap();
    let whole: Vec<&str> = kept.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()).collect();
    assert!(!whole.is_empty() && whole.len() < 6, "{} verdicts written before the kill, of 6", whole.len());
    // The rerun keeps every line already there and judges the rest, each sample once.
    ok(&bsa(&judge));
    let after = std::fs::read_to_string(&verdicts_path).unwrap();
    for l in &whole {
        assert!(after.contains(l), "a verdict written before the kill is gone: {l}");
    }
    let all = records(&verdicts_path);
    assert_eq!(all.len(), 6, "{after}");
    let keys: std::collections::HashSet<String> = all.iter().map(|v| format!("{}#{}", v["item_id"], v["sample_index"])).collect();
    assert_eq!(keys.len(), 6);
}

/// A user's rubric that asks for its own key and spells its labels its own way (declared in
/// a front matter) is decoded with that key and those spellings, and its verdicts hold the
/// canonical labels.
#[test]
fn a_rubric_declaring_its_own_key_and_labels_is_decoded_and_read_with_them() {
    let Some(model) = smollm2_arg() else { return };
    let (dir, run) = temp_path("run");
    let run_s = run.to_str().unwrap();
    ok(&bsa(&["generate", "--model", &model, "--scenario", "RO", "--limit", "2", "--samples", "1", "--max-new-tokens", "4", "--quiet", "--out", run_s]));
    let prompts = dir.path().join("prompts");
    std::fs::create_dir(&prompts).unwrap();
    for f in ["safety.txt", "thinking_risk_omission.txt", "thinking_cognitive_shortcut.txt", "thinking_over_sensitivity.txt"] {
        let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/prompts").join(f)).unwrap();
        let text = if f == "safety.txt" {
            format!("+++\nkey = \"Verdict_Of_Safety\"\nlabels = [\"unsafe\", \"safe\"]\n+++\n{}", text.replace("Safe_Ans_Check", "Verdict_Of_Safety").replace("\"Safe\" | \"Unsafe\"", "\"safe\" | \"unsafe\""))
        } else {
            text
        };
        write_file(&prompts, f, &text);
    }
    ok(&bsa(&["judge", run_s, "--judge", &model, "--judge-prompts", prompts.to_str().unwrap(), "--judge-format", "label", "--quiet"]));
    let verdicts = records(&run.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 2);
    for v in &verdicts {
        let raw = v["raw_safety"].as_str().unwrap();
        assert!(raw == "{\"Verdict_Of_Safety\": \"safe\"}" || raw == "{\"Verdict_Of_Safety\": \"unsafe\"}", "{raw}");
        let canonical = if raw.contains("\"safe\"") { "Safe" } else { "Unsafe" };
        assert_eq!(v["safety"], canonical, "{v}");
        let probs = v["safety_probs"].as_object().unwrap();
        assert!(probs.contains_key("Safe") && probs.contains_key("Unsafe"), "canonical labels: {v}");
    }
}
