//! Progress bars on stderr for the long stages (generation, judging, bootstraps): indicatif,
//! hidden when the caller asks (`--quiet`, `--json`), and drawing nothing when stderr is not a
//! terminal, so logs stay clean.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` steps of `what` ("samples", "paired bootstrap", ...), with the elapsed
/// time; `eta` adds the estimated time left. Hidden unless `enabled`.
pub fn progress_bar(enabled: bool, len: u64, what: &str) -> ProgressBar {
    styled(enabled, len, &format!("{{spinner}} {what} {{pos}}/{{len}} [{{elapsed_precise}}]"))
}

/// [`progress_bar`] with the estimated time left and a message slot (throughput, running
/// sequences) after it.
pub fn progress_bar_with_eta(enabled: bool, len: u64, what: &str) -> ProgressBar {
    styled(enabled, len, &format!("{{spinner}} {what} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"))
}

fn styled(enabled: bool, len: u64, template: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
