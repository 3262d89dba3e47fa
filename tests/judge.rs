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
    let args = ["eval", "--model", &model, "--judge", &model, "--scenario", "RO,OS", "--limit", "3", "--samples", "2",
        "--max-new-tokens", "12", "--judge-max-new-tokens", "40", "--judge-retries", "1", "--resamples", "50", "--quiet", "--out", out_s];
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
        // A label is one of the two, or null when the reply stayed unreadable.
        assert!(v["safety"].is_null() || v["safety"] == "Safe" || v["safety"] == "Unsafe", "{v}");
    }
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
    let e = fails(&bsa(&["judge", out_s, "--judge", &model, "--judge-max-new-tokens", "41", "--quiet"]));
    assert!(e.contains("job.judge.max_new_tokens"), "{e}");

    // --judge-prefill: the same samples, judged with the reply started at the label's key.
    let pre = dir.path().join("prefilled");
    std::fs::create_dir(&pre).unwrap();
    std::fs::copy(out.join("samples.jsonl"), pre.join("samples.jsonl")).unwrap();
    let mut manifest = json(&out.join("manifest.json"));
    manifest["job"].as_object_mut().unwrap().remove("judge");
    std::fs::write(pre.join("manifest.json"), manifest.to_string()).unwrap();
    let pre_s = pre.to_str().unwrap();
    ok(&bsa(&["judge", pre_s, "--judge", &model, "--judge-prefill", "--judge-retries", "0", "--quiet"]));
    let verdicts = records(&pre.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 6);
    for v in &verdicts {
        let raw = v["raw_safety"].as_str().unwrap();
        assert!(raw.starts_with("{\"Safe_Ans_Check\": \""), "the reply starts at the label: {raw}");
        assert!(v["safety"].is_null() || v["safety"] == "Safe" || v["safety"] == "Unsafe", "{v}");
    }
    assert_eq!(json(&pre.join("manifest.json"))["job"]["judge"]["reply_start"], "the label's JSON key");
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
    let e = fails(&bsa(&["judge", run_s, "--judge", "openai:m@http://127.0.0.1:9/v1", "--judge-prefill"]));
    assert!(e.contains("--judge-prefill") && e.contains("local"), "{e}");
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
    let judge = ["judge", run_s, "--judge", &model, "--judge-prefill", "--judge-retries", "0", "--batch-size", "1", "--quiet"];
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
