//! Rubric prompt templates: the text the judge model is sent for one label.
//!
//! A template is plain text with four placeholders, `{query}`, `{risk_summary}`,
//! `{answer}` (the model's response) and `{reasoning_thinking}` (its thinking), written
//! the way Python's `str.format` writes them, so that the authors' published prompts
//! work unchanged: a literal brace is doubled (`{{` and `}}`). Templates are checked
//! when they are loaded, not when the first sample is judged: an unknown placeholder
//! or a single brace is an error naming the file, the line and the column.
//!
//! [`Rubrics`] holds the four templates a run needs, either the built-in ones
//! (`data/prompts/`) or a user's own folder, and a hash of them for the run manifest.
//!
//! A template may open with a front matter in TOML between two `+++` lines that declares
//! the JSON key its reply puts the label under and how it spells the labels, so a rubric
//! that asks for its own key (the authors' published prompts) is read, and decoded under
//! structured output, with that key:
//!
//! ```text
//! +++
//! key = "Thk_Acc_Judge"
//! labels = ["true", "false"]
//! +++
//! ```
//!
//! `labels` must be the family's labels in another spelling (case, spaces, `_`, `-`), one
//! each; without a front matter the key is the family's own (`Safe_Ans_Check`,
//! `Thk_Acc_Judge`) and the labels are spelled as in [`Family::labels`].

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::backends::LabelFormat;

use super::parse::{normalize_key, Family};

/// The placeholders a template may use, in the order [`Fields`] lists them.
pub const PLACEHOLDERS: [&str; 4] = ["query", "risk_summary", "answer", "reasoning_thinking"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Query,
    RiskSummary,
    Answer,
    ReasoningThinking,
}

impl Field {
    fn from_name(name: &str) -> Option<Field> {
        match name {
            "query" => Some(Field::Query),
            "risk_summary" => Some(Field::RiskSummary),
            "answer" => Some(Field::Answer),
            "reasoning_thinking" => Some(Field::ReasoningThinking),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Query => "query",
            Field::RiskSummary => "risk_summary",
            Field::Answer => "answer",
            Field::ReasoningThinking => "reasoning_thinking",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Field(Field),
}

/// The values substituted into a template. Values are inserted verbatim: braces in a
/// response or a query are never read as placeholders.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    pub query: &'a str,
    pub risk_summary: &'a str,
    /// The model's final response.
    pub answer: &'a str,
    /// The model's thinking trace.
    pub reasoning_thinking: &'a str,
}

impl<'a> Fields<'a> {
    fn get(&self, field: Field) -> &'a str {
        match field {
            Field::Query => self.query,
            Field::RiskSummary => self.risk_summary,
            Field::Answer => self.answer,
            Field::ReasoningThinking => self.reasoning_thinking,
        }
    }
}

/// One checked rubric template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RubricTemplate {
    name: String,
    source: String,
    segments: Vec<Segment>,
    front: FrontMatter,
}

/// What a template's front matter declares (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontMatter {
    /// The JSON key the reply puts its label under.
    pub key: Option<String>,
    /// The labels as the template spells them.
    pub labels: Option<Vec<String>>,
}

/// Splits a `+++` TOML front matter off `text`: (front matter, body, lines before the body).
fn split_front_matter(name: &str, text: &str) -> Result<(FrontMatter, String, usize)> {
    let Some(rest) = text.strip_prefix("+++\n").or_else(|| text.strip_prefix("+++\r\n")) else {
        return Ok((FrontMatter::default(), text.to_string(), 0));
    };
    let Some(end) = rest.find("\n+++").filter(|&e| matches!(rest[e + 4..].chars().next(), None | Some('\n') | Some('\r'))) else {
        bail!("{name}:1: the front matter opened by `+++` is never closed; end it with a line `+++`");
    };
    let front: FrontMatter = toml::from_str(&rest[..end]).map_err(|e| {
        anyhow::anyhow!("{name}: its front matter (the TOML between the `+++` lines) does not parse: {}; it may set key = \"...\" and labels = [\"...\", ...]", e.message())
    })?;
    let body = rest[end + 4..].trim_start_matches('\r');
    let body = body.strip_prefix('\n').unwrap_or(body);
    let skipped = text[..text.len() - body.len()].matches('\n').count();
    Ok((front, body.to_string(), skipped))
}

const BRACE_HINT: &str = "a template may use only the placeholders {query}, {risk_summary}, {answer} and \
     {reasoning_thinking}; write a literal brace doubled, `{{` for `{` and `}}` for `}` (as in Python's str.format)";

impl RubricTemplate {
    /// Checks `text` and keeps it. `name` (usually the file's path) is used in errors.
    ///
    /// Errors: a `{name}` whose name is not one of [`PLACEHOLDERS`] (including format
    /// specs such as `{answer!r}`), a single `{` that opens no placeholder, and a single
    /// `}`. Each error names the template, the line and column (1-based, in characters)
    /// and the offending text, and says to double literal braces.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let source = text.to_string();
        let (front, body, skipped) = split_front_matter(name, text)?;
        let chars: Vec<char> = body.chars().collect();
        let mut segments = Vec::new();
        let mut literal = String::new();
        let (mut line, mut col) = (1 + skipped, 1usize);
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '{' if chars.get(i + 1) == Some(&'{') => {
                    literal.push('{');
                    i += 2;
                    col += 2;
                    continue;
                }
                '}' if chars.get(i + 1) == Some(&'}') => {
                    literal.push('}');
                    i += 2;
                    col += 2;
                    continue;
                }
                '{' => {
                    // The field name runs to the next `}`; it never spans lines or braces.
                    let close = chars[i + 1..]
                        .iter()
                        .position(|&c| c == '}' || c == '{' || c == '\n')
                        .map(|p| i + 1 + p)
                        .filter(|&p| chars[p] == '}');
                    if let Some(close) = close {
                        let inner: String = chars[i + 1..close].iter().collect();
                        if let Some(field) = Field::from_name(&inner) {
                            if !literal.is_empty() {
                                segments.push(Segment::Text(std::mem::take(&mut literal)));
                            }
                            segments.push(Segment::Field(field));
                            col += close + 1 - i;
                            i = close + 1;
                            continue;
                        }
                        if looks_like_field(&inner) {
                            bail!(
                                "{name}:{line}:{col}: unknown placeholder `{{{inner}}}`; {BRACE_HINT}"
                            );
                        }
                    }
                    bail!(
                        "{name}:{line}:{col}: a single `{{` that opens no placeholder, at `{}`; {BRACE_HINT}",
                        snippet(&chars[i..])
                    );
                }
                '}' => {
                    bail!(
                        "{name}:{line}:{col}: a single `}}` that closes no placeholder, at `{}`; {BRACE_HINT}",
                        snippet(&chars[i..])
                    );
                }
                '\n' => {
                    literal.push(c);
                    line += 1;
                    col = 1;
                }
                _ => {
                    literal.push(c);
                    col += 1;
                }
            }
            i += 1;
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(RubricTemplate { name: name.to_string(), source, segments, front })
    }

    /// The template's front matter (empty when it has none).
    pub fn front_matter(&self) -> &FrontMatter {
        &self.front
    }

    /// The name given to [`RubricTemplate::parse`] (a file path or `builtin:<file>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template exactly as written, front matter included (less a leading byte-order
    /// mark).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template uses the placeholder `name` (written without braces).
    pub fn uses(&self, name: &str) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Field(f) if f.name() == name))
    }

    /// The placeholders the template uses, each once, in [`PLACEHOLDERS`] order.
    pub fn placeholders(&self) -> Vec<&'static str> {
        PLACEHOLDERS.iter().copied().filter(|p| self.uses(p)).collect()
    }

    /// The prompt: literal text with doubled braces made single, and each placeholder
    /// replaced by its value, verbatim.
    pub fn render(&self, fields: &Fields) -> String {
        let mut out = String::with_capacity(self.source.len() + 256);
        for segment in &self.segments {
            match segment {
                Segment::Text(t) => out.push_str(t),
                Segment::Field(f) => out.push_str(fields.get(*f)),
            }
        }
        out
    }
}

/// A front matter's key and labels fit the rubric's family: a key that is a plain name, and
/// the family's labels, each once, in any spelling [`normalize_key`] equates.
fn check_front_matter(t: &RubricTemplate, family: Family) -> Result<()> {
    let front = t.front_matter();
    if let Some(key) = &front.key {
        if !LabelFormat::is_plain(key) {
            bail!("{}: front matter key = {key:?}: a key must be a non-empty name without quotes, backslashes or control characters", t.name());
        }
    }
    if let Some(labels) = &front.labels {
        let canonical = family.labels();
        let expected = canonical.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(", ");
        for l in labels {
            if !canonical.iter().any(|c| normalize_key(c) == normalize_key(l)) || !LabelFormat::is_plain(l) {
                bail!("{}: front matter label {l:?} is not one of the {} labels {expected} (any case, spaces, `_` or `-`)", t.name(), family.name());
            }
        }
        for c in canonical {
            let n = labels.iter().filter(|l| normalize_key(l) == normalize_key(c)).count();
            if n != 1 {
                bail!("{}: front matter labels {labels:?} must name each of {expected} exactly once; {c:?} appears {n} times", t.name());
            }
        }
    }
    Ok(())
}

/// A would-be placeholder name: what Python would read as a field, not prose or JSON.
fn looks_like_field(inner: &str) -> bool {
    !inner.is_empty()
        && inner.chars().count() <= 40
        && inner.chars().all(|c| c.is_alphanumeric() || "_.!:[]<>^=+-#".contains(c))
}

/// Up to 30 characters of the offending text, stopping at the end of the line.
fn snippet(rest: &[char]) -> String {
    let line: Vec<char> = rest.iter().copied().take_while(|&c| c != '\n').collect();
    let mut s: String = line.iter().take(30).collect();
    if line.len() > 30 {
        s.push('…');
    }
    s
}

/// The four rubric templates of a run: the response-safety rubric and one thinking rubric
/// per scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rubrics {
    pub safety: RubricTemplate,
    pub risk_omission: RubricTemplate,
    pub cognitive_shortcut: RubricTemplate,
    pub over_sensitivity: RubricTemplate,
}

impl Rubrics {
    /// The file names a rubric folder must hold, in the order of [`Rubrics::sources`].
    pub const FILE_NAMES: [&'static str; 4] = [
        "safety.txt",
        "thinking_risk_omission.txt",
        "thinking_cognitive_shortcut.txt",
        "thinking_over_sensitivity.txt",
    ];

    /// The project's own rubrics (`data/prompts/`), compiled into the binary.
    pub fn builtin() -> Rubrics {
        const SOURCES: [&str; 4] = [
            include_str!("../../../data/prompts/safety.txt"),
            include_str!("../../../data/prompts/thinking_risk_omission.txt"),
            include_str!("../../../data/prompts/thinking_cognitive_shortcut.txt"),
            include_str!("../../../data/prompts/thinking_over_sensitivity.txt"),
        ];
        let named = Self::FILE_NAMES.map(|f| format!("builtin:{f}"));
        Rubrics::from_sources([
            (named[0].as_str(), SOURCES[0]),
            (named[1].as_str(), SOURCES[1]),
            (named[2].as_str(), SOURCES[2]),
            (named[3].as_str(), SOURCES[3]),
        ])
        .expect("the built-in rubric templates are valid (tested)")
    }

    /// A user's own rubrics (for instance the authors' published prompts, one per file):
    /// the folder must hold the four files of [`Rubrics::FILE_NAMES`].
    pub fn from_dir(dir: &Path) -> Result<Rubrics> {
        let missing: Vec<&str> =
            Self::FILE_NAMES.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
        if !missing.is_empty() {
            bail!(
                "rubric folder {} lacks {}; it must hold the four templates {} (placeholders {{query}}, \
                 {{risk_summary}}, {{answer}}, {{reasoning_thinking}}; literal braces doubled)",
                dir.display(),
                missing.join(", "),
                Self::FILE_NAMES.join(", ")
            );
        }
        let mut loaded = Vec::with_capacity(4);
        for f in Self::FILE_NAMES {
            let path = dir.join(f);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading rubric template {}", path.display()))?;
            loaded.push((path.display().to_string(), text));
        }
        Rubrics::from_sources([
            (loaded[0].0.as_str(), loaded[0].1.as_str()),
            (loaded[1].0.as_str(), loaded[1].1.as_str()),
            (loaded[2].0.as_str(), loaded[2].1.as_str()),
            (loaded[3].0.as_str(), loaded[3].1.as_str()),
        ])
    }

    /// Four `(name, text)` pairs in [`Rubrics::FILE_NAMES`] order. Besides the checks of
    /// [`RubricTemplate::parse`], the safety rubric must use `{answer}` and every thinking
    /// rubric `{reasoning_thinking}`, and all four `{risk_summary}`: a template that does
    /// not show the judge what it is judging is a mistake (often two files swapped).
    pub fn from_sources(sources: [(&str, &str); 4]) -> Result<Rubrics> {
        let mut parsed = Vec::with_capacity(4);
        for (i, (name, text)) in sources.into_iter().enumerate() {
            let t = RubricTemplate::parse(name, text)?;
            let (role, needs): (&str, &[&str]) = if i == 0 {
                ("the response-safety rubric", &["answer", "risk_summary"])
            } else {
                ("a thinking rubric", &["reasoning_thinking", "risk_summary"])
            };
            for need in needs {
                if !t.uses(need) {
                    let uses = t.placeholders();
                    bail!(
                        "{name}: {role} must use the placeholder {{{need}}}; this one uses {}",
                        if uses.is_empty() {
                            "none".to_string()
                        } else {
                            uses.iter().map(|u| format!("{{{u}}}")).collect::<Vec<_>>().join(", ")
                        }
                    );
                }
            }
            check_front_matter(&t, Family::ALL[i])?;
            parsed.push(t);
        }
        let mut it = parsed.into_iter();
        Ok(Rubrics {
            safety: it.next().unwrap(),
            risk_omission: it.next().unwrap(),
            cognitive_shortcut: it.next().unwrap(),
            over_sensitivity: it.next().unwrap(),
        })
    }

    /// The JSON key the rubric of `family` asks for (its front matter's, else the
    /// family's own) and its labels as it spells them, in [`Family::labels`] order.
    pub fn label_format(&self, family: Family) -> (String, Vec<String>) {
        let front = self.get(family).front_matter();
        let key = front.key.clone().unwrap_or_else(|| family.key().to_string());
        let labels = family
            .labels()
            .iter()
            .map(|canonical| {
                front
                    .labels
                    .iter()
                    .flatten()
                    .find(|l| normalize_key(l) == normalize_key(canonical))
                    .cloned()
                    .unwrap_or_else(|| canonical.to_string())
            })
            .collect();
        (key, labels)
    }

    /// The template that produces labels of `family`.
    pub fn get(&self, family: Family) -> &RubricTemplate {
        match family {
            Family::Safety => &self.safety,
            Family::RiskOmission => &self.risk_omission,
            Family::CognitiveShortcut => &self.cognitive_shortcut,
            Family::OverSensitivity => &self.over_sensitivity,
        }
    }

    /// The four sources in [`Rubrics::FILE_NAMES`] order.
    pub fn sources(&self) -> [&str; 4] {
        [
            self.safety.source(),
            self.risk_omission.source(),
            self.cognitive_shortcut.source(),
            self.over_sensitivity.source(),
        ]
    }

    /// A stable fingerprint of the rubric texts for run manifests: SHA-256, in lower-case
    /// hex, over each of the four in [`Rubrics::FILE_NAMES`] order as the file name, a
    /// zero byte, the source's length in bytes (u64 little-endian) and the source. Where
    /// the files were read from does not enter it; any change to their text does.
    pub fn sha256_hex(&self) -> String {
        let mut h = Sha256::new();
        for (file, source) in Self::FILE_NAMES.iter().zip(self.sources()) {
            h.update(file.as_bytes());
            h.update([0u8]);
            h.update((source.len() as u64).to_le_bytes());
            h.update(source.as_bytes());
        }
        let mut out = String::with_capacity(64);
        for b in h.finalize() {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", RubricTemplate::parse("t.txt", text).unwrap_err())
    }

    #[test]
    fn renders_placeholders_and_doubled_braces() {
        let t = RubricTemplate::parse(
            "t.txt",
            "Q: {query}\nR: {risk_summary}\nA: {answer}\nT: {reasoning_thinking}\n{{\"k\": {{}}}} {{query}} {{{answer}}}",
        )
        .unwrap();
        let f = Fields { query: "q {x}", risk_summary: "r", answer: "a}}", reasoning_thinking: "{t}" };
        assert_eq!(t.render(&f), "Q: q {x}\nR: r\nA: a}}\nT: {t}\n{\"k\": {}} {query} {a}}}");
        assert_eq!(t.placeholders(), PLACEHOLDERS.to_vec());
        assert!(t.uses("answer") && !t.uses("foo"));
        assert_eq!(t.name(), "t.txt");
    }

    #[test]
    fn placeholder_may_repeat_or_be_absent() {
        let t = RubricTemplate::parse("t", "{answer} and again {answer}").unwrap();
        let f = Fields { answer: "X", ..Default::default() };
        assert_eq!(t.render(&f), "X and again X");
        assert_eq!(t.placeholders(), vec!["answer"]);
        let plain = RubricTemplate::parse("t", "no fields at all").unwrap();
        assert_eq!(plain.render(&f), "no fields at all");
    }

    /// Bad templates, each with what its error starts with (`""`: no requirement) and
    /// what else the error contains.
    fn check_errors(cases: &[(&str, &str, &[&str])]) {
        for &(text, start, parts) in cases {
            let e = err(text);
            assert!(e.starts_with(start), "{text:?}: {e}");
            for part in parts {
                assert!(e.contains(part), "{text:?}: {e}");
            }
        }
    }

    #[test]
    fn unknown_placeholder_is_located() {
        check_errors(&[
            (
                "line one\n  see {response} here",
                "t.txt:2:7: unknown placeholder `{response}`",
                &["{query}, {risk_summary}, {answer} and {reasoning_thinking}", "doubled"],
            ),
            ("{answer!r}", "", &["t.txt:1:1: unknown placeholder `{answer!r}`"]),
            ("x {0}", "", &["t.txt:1:3: unknown placeholder `{0}`"]),
        ]);
    }

    #[test]
    fn single_braces_are_located() {
        check_errors(&[
            // The classic mistake: a JSON example with single braces.
            (
                "Answer with\n{\"Safe_Ans_Check\": \"Safe\"}",
                "t.txt:2:1: a single `{` that opens no placeholder, at `{\"Safe_Ans_Check\": \"Safe\"}`",
                &["`{{` for `{`"],
            ),
            ("ok {{ fine }}\nthen } alone", "t.txt:2:6: a single `}` that closes no placeholder, at `} alone`", &[]),
            ("{query", "", &["t.txt:1:1: a single `{`"]),
            ("{ query }", "", &["t.txt:1:1: a single `{`"]),
            ("{}", "", &["t.txt:1:1: a single `{`"]),
            // Columns count characters, not bytes.
            ("é中 {nope}", "", &["t.txt:1:4: unknown placeholder `{nope}`"]),
            // A long offending line is cut.
            ("{ this is a long line of prose that goes on and on }", "", &["at `{ this is a long line of prose…`"]),
        ]);
    }

    #[test]
    fn builtin_rubrics_are_valid_and_use_the_right_fields() {
        let r = Rubrics::builtin();
        for f in ["query", "risk_summary", "answer"] {
            assert!(r.safety.uses(f), "safety lacks {f}");
        }
        assert!(!r.safety.uses("reasoning_thinking"));
        for t in [&r.risk_omission, &r.cognitive_shortcut, &r.over_sensitivity] {
            for f in ["query", "risk_summary", "reasoning_thinking"] {
                assert!(t.uses(f), "{} lacks {f}", t.name());
            }
            assert!(!t.uses("answer"), "{}", t.name());
            assert!(t.render(&Fields::default()).contains("{\"Thk_Acc_Judge\": "), "{}", t.name());
        }
        let s = r.safety.render(&Fields { answer: "ANSWER", ..Default::default() });
        assert!(s.contains("{\"Safe_Ans_Check\": \"Safe\" | \"Unsafe\"}") && s.contains("ANSWER"));
        assert!(!s.contains("{{"));
        assert!(r.get(Family::CognitiveShortcut).render(&Fields::default()).contains("\"Partially Covered\""));
        assert!(r.get(Family::OverSensitivity).render(&Fields::default()).contains("\"Over Sensitive\""));
        assert!(r.get(Family::RiskOmission).render(&Fields::default()).contains("true | false"));
        assert_eq!(r.get(Family::Safety), &r.safety);
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = Rubrics::builtin();
        let h = a.sha256_hex();
        assert_eq!(h.len(), 64);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(h, Rubrics::builtin().sha256_hex());
        let mut b = a.clone();
        b.over_sensitivity =
            RubricTemplate::parse("x", &format!("{} ", a.over_sensitivity.source())).unwrap();
        assert_ne!(h, b.sha256_hex());
        // Moving text from one template to the next changes the hash too.
        let s = |t: &str| RubricTemplate::parse("x", t).unwrap();
        let mk = |x: &str, y: &str| Rubrics {
            safety: s(x),
            risk_omission: s(y),
            cognitive_shortcut: s(""),
            over_sensitivity: s(""),
        };
        assert_ne!(mk("ab", "c").sha256_hex(), mk("a", "bc").sha256_hex());
        assert_eq!(a.sources()[0], a.safety.source());
    }

    #[test]
    fn from_dir_reads_a_users_rubrics() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", Rubrics::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("lacks safety.txt, thinking_risk_omission.txt") && e.contains("thinking_over_sensitivity.txt"), "{e}");
        // An authors'-style prompt: Python format placeholders and doubled JSON braces.
        std::fs::write(
            dir.path().join("safety.txt"),
            "**Your Task:**\n{{\n\"User Question\": {query},\n\"Identified Risk\": {risk_summary},\n\"Answer\": {answer}\n}}\n",
        )
        .unwrap();
        for f in &Rubrics::FILE_NAMES[1..] {
            std::fs::write(
                dir.path().join(f),
                "query: {query}\nrisk_summary: {risk_summary}\nreasoning_thinking: {reasoning_thinking}\n",
            )
            .unwrap();
        }
        let r = Rubrics::from_dir(dir.path()).unwrap();
        let out = r.safety.render(&Fields { query: "Q", risk_summary: "R", answer: "A", reasoning_thinking: "" });
        assert_eq!(out, "**Your Task:**\n{\n\"User Question\": Q,\n\"Identified Risk\": R,\n\"Answer\": A\n}\n");
        assert_ne!(r.sha256_hex(), Rubrics::builtin().sha256_hex());

        // Only one missing: only that one is named as missing.
        std::fs::remove_file(dir.path().join("thinking_cognitive_shortcut.txt")).unwrap();
        let e = format!("{:#}", Rubrics::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("lacks thinking_cognitive_shortcut.txt;"), "{e}");

        // A bad template names its file and position.
        std::fs::write(dir.path().join("thinking_cognitive_shortcut.txt"), "{reasoning_thinking} {risk_summary}\n{risk}").unwrap();
        let e = format!("{:#}", Rubrics::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("thinking_cognitive_shortcut.txt:2:1: unknown placeholder `{risk}`"), "{e}");

        // Swapped files: a thinking template in the safety slot.
        std::fs::write(dir.path().join("thinking_cognitive_shortcut.txt"), "{reasoning_thinking} {risk_summary}").unwrap();
        std::fs::write(dir.path().join("safety.txt"), "{query} {risk_summary} {reasoning_thinking}").unwrap();
        let e = format!("{:#}", Rubrics::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("safety.txt: the response-safety rubric must use the placeholder {answer}; this one uses {query}, {risk_summary}, {reasoning_thinking}"), "{e}");
    }

    #[test]
    fn byte_order_mark_is_dropped() {
        let t = RubricTemplate::parse("t", "\u{feff}{answer}").unwrap();
        assert_eq!(t.source(), "{answer}");
        assert_eq!(t.render(&Fields { answer: "a", ..Default::default() }), "a");
    }

    /// Builtin rubric sources with `front` put before the thinking rubric of Risk Omission.
    fn with_front(front: &str) -> Result<Rubrics> {
        let b = Rubrics::builtin();
        let ro = format!("{front}{}", b.risk_omission.source());
        let names = Rubrics::FILE_NAMES;
        Rubrics::from_sources([(names[0], b.safety.source()), (names[1], &ro), (names[2], b.cognitive_shortcut.source()), (names[3], b.over_sensitivity.source())])
    }

    #[test]
    fn a_front_matter_declares_the_key_and_the_labels_spellings() {
        let r = with_front("+++\nkey = \"Reasoning_Check\"\nlabels = [\"false\", \"true\"]\n+++\n").unwrap();
        // Labels in the family's order, in the rubric's spelling; the body renders without it.
        assert_eq!(r.label_format(Family::RiskOmission), ("Reasoning_Check".to_string(), vec!["true".to_string(), "false".to_string()]));
        assert_eq!(r.label_format(Family::Safety), ("Safe_Ans_Check".to_string(), vec!["Safe".to_string(), "Unsafe".to_string()]));
        let rendered = r.risk_omission.render(&Fields { query: "q", risk_summary: "r", answer: "a", reasoning_thinking: "t" });
        assert!(!rendered.contains("+++") && rendered.starts_with(Rubrics::builtin().risk_omission.render(&Fields { query: "q", risk_summary: "r", answer: "a", reasoning_thinking: "t" }).as_str()));
        // The front matter is part of the text the manifest's hash covers.
        assert_ne!(r.sha256_hex(), Rubrics::builtin().sha256_hex());
        // A key alone keeps the family's labels.
        let r = with_front("+++\nkey = \"k\"\n+++\n").unwrap();
        assert_eq!(r.label_format(Family::RiskOmission).1, vec!["True", "False"]);
    }

    #[test]
    fn a_bad_front_matter_is_an_error_naming_the_file_and_the_fix() {
        let e = |front: &str| format!("{:#}", with_front(front).unwrap_err());
        let m = e("+++\nkey = \"k\"\n");
        assert!(m.contains("thinking_risk_omission.txt") && m.contains("never closed"), "{m}");
        let m = e("+++\nkey = k\n+++\n");
        assert!(m.contains("thinking_risk_omission.txt") && m.contains("does not parse"), "{m}");
        let m = e("+++\nlabel = [\"True\"]\n+++\n");
        assert!(m.contains("does not parse") && m.contains("label"), "an unknown field: {m}");
        let m = e("+++\nlabels = [\"Yes\", \"No\"]\n+++\n");
        assert!(m.contains("\"Yes\"") && m.contains("\"True\", \"False\""), "{m}");
        let m = e("+++\nlabels = [\"True\", \"true\"]\n+++\n");
        assert!(m.contains("exactly once") && m.contains("\"False\""), "{m}");
        let m = e("+++\nkey = \"a\\\"b\"\n+++\n");
        assert!(m.contains("without quotes"), "{m}");
        // Placeholder errors count lines from the top of the file, front matter included.
        let m = e("+++\nkey = \"k\"\n+++\n{bogus}\n");
        assert!(m.contains("thinking_risk_omission.txt:4:1") && m.contains("{bogus}"), "{m}");
    }
}
