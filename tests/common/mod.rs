//! Helpers shared by the integration tests. Each test crate uses some of them.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;

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
