//! A benchmark item: the query, its scenario and its annotated risks, as every stage
//! after loading sees it (the loading and validation are in [`crate::data`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The three SSA scenarios of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scenario {
    #[serde(rename = "Risk Omission")]
    RiskOmission,
    #[serde(rename = "Cognitive Shortcut")]
    CognitiveShortcut,
    #[serde(rename = "Over Sensitivity")]
    OverSensitivity,
}

impl Scenario {
    pub const ALL: [Scenario; 3] =
        [Scenario::RiskOmission, Scenario::CognitiveShortcut, Scenario::OverSensitivity];

    /// The name as the dataset and the authors' scorer spell it.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::RiskOmission => "Risk Omission",
            Scenario::CognitiveShortcut => "Cognitive Shortcut",
            Scenario::OverSensitivity => "Over Sensitivity",
        }
    }

    /// The two-letter prefix used in metric names (ro_at_1, cs_at_k, ...).
    pub fn short(self) -> &'static str {
        match self {
            Scenario::RiskOmission => "ro",
            Scenario::CognitiveShortcut => "cs",
            Scenario::OverSensitivity => "os",
        }
    }

    /// How many risks an item of this scenario carries.
    pub fn risk_count(self) -> usize {
        match self {
            Scenario::CognitiveShortcut => 2,
            _ => 1,
        }
    }

    /// Accepts the dataset spelling in any case and spacing, and the short names.
    pub fn parse(s: &str) -> Option<Scenario> {
        let norm: String = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        match norm.as_str() {
            "risk omission" | "ro" => Some(Scenario::RiskOmission),
            "cognitive shortcut" | "cs" => Some(Scenario::CognitiveShortcut),
            "over sensitivity" | "os" => Some(Scenario::OverSensitivity),
            _ => None,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The nine primary risk categories of the benchmark, in the authors' order.
pub const PRIMARY_CATEGORIES: [&str; 9] = [
    "Offense and Prejudice",
    "Specially Regulated Items",
    "Property Infringement",
    "Invasion of Privacy and Confidentiality",
    "Physical and Mental Health",
    "Violence and Terrorism",
    "Ethics and Morality",
    "Rumors",
    "Pornography",
];

/// One annotated risk of an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Risk {
    pub category: String,
    pub subcategory: String,
    pub summary: String,
}

/// One benchmark query with its annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub query: String,
    /// The risk summary as written in the dataset (both parts for two-risk rows).
    pub risk_summary: String,
    pub scenario: Scenario,
    pub risks: Vec<Risk>,
    /// The line of the source file where the item starts (for error messages).
    #[serde(skip)]
    pub line: u64,
}

impl Item {
    /// The distinct primary categories of the item (a two-risk row may have two).
    pub fn categories(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.risks {
            if !out.contains(&r.category) {
                out.push(r.category.clone());
            }
        }
        out
    }
}
