//! Helpers shared by the integration tests. Each test crate uses some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Runs the `bsa` binary in the crate root.
pub fn bsa(args: &[&str]) -> Output {
    bsa_env(args, &[])
}

/// [`bsa`] with extra environment variables.
pub fn bsa_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bsa"));
    c.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run bsa")
}

/// The command's stdout, after asserting that it succeeded (showing stderr if not).
pub fn ok(o: &Output) -> String {
    assert!(o.status.success(), "bsa failed: {}\n{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The command's stderr, after asserting that it failed.
pub fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "bsa should have failed; stdout: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// A JSON file, such as a run's manifest.json.
pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The records of a JSON-lines file, such as a run's samples.jsonl or verdicts.jsonl.
pub fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A new temporary directory and the path `name` in it, not created yet: somewhere for a
/// command to write a run.
pub fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

/// Copies the files of `from` (a run directory: no subdirectories) into `to`, created.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Writes `content` to the file `name` in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// The real SmolLM2 GGUF (BSA_SMOLLM2_GGUF, else the model cache), or None with a loud
/// SKIPPED message; with BSA_REQUIRE_MODEL set (CI) its absence fails the test instead.
pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("BSA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| bsa::backends::local::model_cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("BSA_REQUIRE_MODEL").is_err(), "SmolLM2 GGUF absent at {} and BSA_REQUIRE_MODEL is set; run scripts/fetch-smollm2.sh", p.display());
    eprintln!("\n*** SKIPPED: SmolLM2 GGUF absent at {} (run scripts/fetch-smollm2.sh) ***\n", p.display());
    None
}

/// [`smollm2`] as a command-line argument.
pub fn smollm2_arg() -> Option<String> {
    smollm2().map(|p| p.to_str().unwrap().to_string())
}
