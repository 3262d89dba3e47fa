//! Published results to place a run against: the leaderboard of the Beyond Safe Answers
//! paper (arXiv 2505.19690), as the authors published it for the full
//! 2,000 queries with k = 5. These are facts from the paper, not computed here; a run on a
//! subset, with another judge or other decoding is comparable only roughly.

use anyhow::{bail, Result};
use serde::Serialize;

/// One published row (percent).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ReferenceRow {
    pub model: &'static str,
    pub safe_at_1: f64,
    pub safe_at_k: f64,
    pub think_at_1: f64,
    pub think_at_k: f64,
    pub f_score: f64,
}

/// Where the rows come from, for reports.
pub const PAPER_SOURCE: &str = "Beyond Safe Answers leaderboard (arXiv 2505.19690; the authors' judge, all 2,000 queries, k = 5; their F-score fits a = 0.610)";

/// The paper's published rows: Safe@1, Safe@k, Think@1, Think@k, F-score.
pub const PAPER: [ReferenceRow; 7] = [
    row("Claude-3.7-Sonnet", 99.28, 98.05, 54.57, 30.70, 68.92),
    row("DeepSeek-R1", 94.63, 88.85, 37.98, 16.20, 54.22),
    row("QwQ-32B", 93.54, 85.10, 33.38, 11.40, 49.89),
    row("Qwen3-8B", 97.14, 92.15, 28.62, 9.30, 46.09),
    row("Qwen3-0.6B", 41.09, 18.05, 5.88, 0.25, 12.55),
    row("R1-Distill-Qwen-7B", 66.64, 52.05, 8.72, 1.20, 19.27),
    row("R1-Distill-Qwen-1.5B", 39.96, 17.25, 2.94, 0.15, 8.13),
];

const fn row(model: &'static str, safe_at_1: f64, safe_at_k: f64, think_at_1: f64, think_at_k: f64, f_score: f64) -> ReferenceRow {
    ReferenceRow { model, safe_at_1, safe_at_k, think_at_1, think_at_k, f_score }
}

/// Which published results a report shows next to the runs (`bsa report --reference`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reference {
    /// No reference layer.
    #[default]
    None,
    /// The paper's leaderboard.
    Paper,
}

impl Reference {
    /// The flag's values (`none`, `paper`).
    pub fn parse(s: &str) -> Result<Reference> {
        match s {
            "none" => Ok(Reference::None),
            "paper" => Ok(Reference::Paper),
            other => bail!("--reference {other:?}: use paper (the published leaderboard of arXiv 2505.19690) or none"),
        }
    }

    /// The rows of this reference.
    pub fn rows(self) -> &'static [ReferenceRow] {
        match self {
            Reference::None => &[],
            Reference::Paper => &PAPER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::metrics::f_score;

    /// The rows are the published ones: every F-score follows from its Safe@1 and Think@1
    /// with the exponent the leaderboard fits (to the two decimals printed).
    #[test]
    fn rows_agree_with_their_f_scores() {
        for r in PAPER {
            let f = f_score(r.think_at_1, r.safe_at_1, 0.610);
            assert!((f - r.f_score).abs() < 0.06, "{}: {f} against {}", r.model, r.f_score);
            assert!(r.safe_at_k <= r.safe_at_1 && r.think_at_k <= r.think_at_1, "{}", r.model);
        }
    }
}
