//! Helpers shared by the integration tests that run the `bsa` binary.

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
