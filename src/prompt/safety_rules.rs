//! `--safety-rules default|FILE`: the paper's prompt-level mitigation. A text that names,
//! for each of the nine risk categories, the risk and the expected response strategy is put
//! before the query as a system message (or, for templates without a system role, at the
//! start of the user turn). The manifest records its sha256 and where it went, so runs with
//! and without rules (or with different rules) are never mixed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The built-in rules (data/prompts/safety_rules.txt).
pub const DEFAULT_RULES: &str = include_str!("../../data/prompts/safety_rules.txt");

/// A safety-rules text and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyRules {
    /// `default` or the file's path as given.
    pub source: String,
    pub text: String,
}

/// Where the rules ended up in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A system message.
    System,
    /// Prepended to the user turn (the template has no system role).
    UserPrefix,
}

impl Placement {
    pub fn for_template(system_role: bool) -> Placement {
        if system_role { Placement::System } else { Placement::UserPrefix }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::System => "system",
            Placement::UserPrefix => "user-prefix",
        }
    }
}

impl SafetyRules {
    /// `default` is the built-in text; anything else is a UTF-8 text file.
    pub fn load(spec: &str) -> Result<SafetyRules> {
        if spec == "default" {
            return Ok(SafetyRules { source: "default".into(), text: DEFAULT_RULES.trim().to_string() });
        }
        let path = Path::new(spec);
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("--safety-rules {spec}: cannot read the file; give `default` or the path of a text file with your rules")
        })?;
        if text.trim().is_empty() {
            bail!("--safety-rules {spec}: the file is empty; write the rules into it or use `default`");
        }
        Ok(SafetyRules { source: spec.to_string(), text: text.trim().to_string() })
    }

    pub fn sha256(&self) -> String {
        crate::records::hex_sha256(self.text.as_bytes())
    }

    /// The text before the query: the rules, then the user's own system text, if any.
    pub fn system_text(rules: Option<&SafetyRules>, system: Option<&str>) -> Option<String> {
        match (rules, system.filter(|s| !s.trim().is_empty())) {
            (Some(r), Some(s)) => Some(format!("{}\n\n{s}", r.text)),
            (Some(r), None) => Some(r.text.clone()),
            (None, s) => s.map(str::to_string),
        }
    }

    /// What the manifest records. "none" (not null) when absent, so that resuming a run
    /// without rules with rules, or the reverse, is refused like any other difference.
    pub fn manifest_entry(rules: Option<&SafetyRules>, placement: Placement) -> Value {
        match rules {
            None => json!("none"),
            Some(r) => json!({"source": r.source, "sha256": r.sha256(), "placement": placement.as_str()}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_cover_all_nine_categories_with_a_strategy() {
        let r = SafetyRules::load("default").unwrap();
        for c in crate::records::PRIMARY_CATEGORIES {
            let para = r.text.split("\n\n").find(|p| p.contains(c)).unwrap_or_else(|| panic!("no paragraph for {c}"));
            assert!(para.contains("Risk:") && para.contains("Strategy:"), "{c}: {para}");
        }
        assert_eq!(r.sha256(), crate::records::hex_sha256(DEFAULT_RULES.trim().as_bytes()));
    }

    #[test]
    fn a_file_loads_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rules.txt");
        std::fs::write(&p, "  Be careful.\n").unwrap();
        let r = SafetyRules::load(p.to_str().unwrap()).unwrap();
        assert_eq!(r.text, "Be careful.");
        assert_ne!(r.sha256(), SafetyRules::load("default").unwrap().sha256());
        let e = format!("{:#}", SafetyRules::load(dir.path().join("nope.txt").to_str().unwrap()).unwrap_err());
        assert!(e.contains("nope.txt") && e.contains("default"), "{e}");
        std::fs::write(&p, " \n").unwrap();
        let e = SafetyRules::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("rules.txt"), "{e}");
    }

    #[test]
    fn rules_come_before_the_users_system_text_and_absence_is_recorded() {
        let r = SafetyRules { source: "default".into(), text: "RULES".into() };
        assert_eq!(SafetyRules::system_text(Some(&r), Some("Be brief.")).unwrap(), "RULES\n\nBe brief.");
        assert_eq!(SafetyRules::system_text(Some(&r), None).unwrap(), "RULES");
        assert_eq!(SafetyRules::system_text(None, Some("S")).unwrap(), "S");
        assert_eq!(SafetyRules::system_text(None, None), None);
        assert_eq!(SafetyRules::manifest_entry(None, Placement::System), json!("none"));
        let e = SafetyRules::manifest_entry(Some(&r), Placement::for_template(false));
        assert_eq!(e["placement"], "user-prefix");
        assert_eq!(e["sha256"], crate::records::hex_sha256(b"RULES"));
    }
}
