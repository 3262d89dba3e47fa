//! `bsa judge`: samples.jsonl -> verdicts.jsonl with a local judge model.
//!
//! Every sample gets a safety request and a thinking request (rendered from the rubrics,
//! sent through the judge model's own chat template, decoded greedily, many at a time).
//! The reply's shape is the [`ReplyFormat`]: under `rubric` and `label` a local judge
//! decodes under a grammar that only lets it write the rubric's JSON object with one of its
//! labels (after a bounded analysis, or at once), so every finished reply is a label, and
//! the labels' probabilities where it chose are recorded; a server gets the same as
//! `response_format` with `--judge-structured`. A free reply is read by [`super::parse`].
//! A reply whose label cannot be read is asked again with a short repair message, up to
//! `retries` times; what still fails is written with no label, never guessed. A verdict is
//! appended as soon as both of its labels are final, so a killed judge resumes where it
//! stopped. An empty thinking trace is labelled by the rubric's own rule (not identified)
//! without calling the judge; the verdict says so in its raw text.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::parse::{parse_label_keyed, repair_request, Family};
use super::template::{Fields, Rubrics};
use crate::backends::local::LocalOptions;
use crate::backends::openai::ClientOptions;
use crate::backends::{self, Backend, LabelFormat, PromptSettings, SampleRequest, ANALYSIS_CHARS_PER_TOKEN};
use crate::data::Dataset;
use crate::engine::sampler::StreamKey;
use crate::progress::progress_bar_with_eta;
use crate::prompt::Message;
use crate::records::{Decoding, FinishReason, Item, SampleRecord, Scenario};
use crate::store::{self, JobSpec, OnExisting, RunDir};
use crate::records::{LabelProbs, SafetyLabel, ThinkingLabel, Verdict};

/// Most new tokens of a label-only reply: the longest label and the closing `"}`.
const LABEL_MAX_NEW_TOKENS: usize = 16;

/// Tokens a structured rubric reply may take past its analysis: the fixed `{"KEY": "`,
/// the label, `"}` and the end of sequence.
const LABEL_OBJECT_TOKENS: usize = 48;

/// The shape of a judge's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFormat {
    /// The rubric's own protocol: a short analysis (at most `analysis_tokens` tokens), then
    /// the JSON object with one label. Local judges decode it under a grammar; a server
    /// under `response_format` with `--judge-structured`, else as free text.
    Rubric,
    /// The JSON object with one label and nothing else: one to a few decode steps.
    /// Local judges, or a server with `--judge-structured`.
    Label,
    /// Whatever the judge writes, read by the lenient parser (retried when unreadable).
    Free,
}

impl ReplyFormat {
    /// `rubric`, `label` or `free` (the `--judge-format` values).
    pub fn parse(s: &str) -> Result<ReplyFormat, String> {
        match s {
            "rubric" => Ok(ReplyFormat::Rubric),
            "label" => Ok(ReplyFormat::Label),
            "free" => Ok(ReplyFormat::Free),
            _ => Err(format!("{s:?} is not a judge reply format: use rubric, label or free")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            ReplyFormat::Rubric => "rubric",
            ReplyFormat::Label => "label",
            ReplyFormat::Free => "free",
        }
    }
}

/// The raw text recorded when the empty-thinking rule decided the label.
pub const EMPTY_THINKING_RULE: &str = "(no judge call: the thinking is empty, which the rubric labels as not identified)";

#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// `local:MODEL` or a bare model spec (a .gguf, a directory, a preset, a hub id).
    pub judge: String,
    pub rubrics_dir: Option<PathBuf>,
    /// The data file, when the run's own source moved (its sha256 must still match).
    pub data: Option<String>,
    /// Most tokens of a free reply, and of a server's structured one.
    pub max_new_tokens: usize,
    pub retries: u32,
    pub format: ReplyFormat,
    /// Most tokens of the analysis before the label under [`ReplyFormat::Rubric`].
    pub analysis_tokens: usize,
    /// A server judge: send the format as `response_format` (a JSON schema).
    pub structured: bool,
    /// A local judge's device, batching and KV cache.
    pub local: LocalOptions,
    pub run: PathBuf,
    /// When the run holds verdicts already, leave them: copy its samples to `RUN-2`
    /// (`RUN-3`, ...) and judge the copy (to judge a run again with other settings).
    pub new_run: bool,
    pub progress: bool,
    /// The client settings of an `openai:` judge.
    pub remote: ClientOptions,
}

impl JudgeOptions {
    /// Whether the judge is a server (`openai:MODEL@URL`), not the local engine.
    pub fn remote(&self) -> bool {
        self.judge.starts_with("openai:")
    }
}

#[derive(Debug, Clone, Default)]
pub struct JudgeSummary {
    /// The run judged: the one given, or its copy under `new_run`.
    pub run: PathBuf,
    pub written: usize,
    pub skipped: usize,
    pub invalid_labels: usize,
    /// Of those, labels whose request the judge server refused (counted in `invalid_labels`).
    pub refused: usize,
    pub judge_calls: usize,
    /// Prompt tokens a local judge computed and took from its prefix cache.
    pub prefill: backends::PrefillStats,
    pub seconds: f64,
}

/// Checks the judge settings that need no model loaded and no run: the judge (the form of
/// the spec, and that its model file, directory, preset or server settings are there; see
/// [`backends::check`]), the reply format against the judge's kind, and the rubric folder.
/// `bsa eval` and `bsa sweep` call it before they generate, so a mistake shows in the first
/// second, not after hours of generation; returns the rubrics.
pub fn check_options(opts: &JudgeOptions) -> Result<Rubrics> {
    backends::check(&opts.judge, "--judge", &opts.remote)?;
    match (opts.remote(), opts.structured, opts.format) {
        (false, true, _) => bail!("--judge-structured is for openai: judges; a local judge decodes --judge-format rubric or label under a grammar already (drop the flag)"),
        (true, false, ReplyFormat::Label) => bail!("--judge-format label needs the server to constrain the reply: add --judge-structured (without it a server's reply is free text, read by the lenient parser)"),
        (_, true, ReplyFormat::Free) => bail!("--judge-structured constrains the reply to the rubric's JSON object; it does not go with --judge-format free"),
        _ => {}
    }
    if opts.format == ReplyFormat::Rubric && opts.analysis_tokens == 0 {
        bail!("--judge-analysis-tokens 0: under --judge-format rubric it must be at least 1 (or use --judge-format label for no analysis)");
    }
    match &opts.rubrics_dir {
        Some(d) => Rubrics::from_dir(d),
        None => Ok(Rubrics::builtin()),
    }
}

/// Opens `--judge`: `openai:MODEL@URL`, `local:MODEL` or a bare MODEL. A local judge renders
/// its template with thinking off (a server is left to its own default).
fn open_judge(opts: &JudgeOptions) -> Result<Box<dyn Backend>> {
    let settings = PromptSettings { enable_thinking: (!opts.remote()).then_some(false), ..Default::default() };
    backends::open(&opts.judge, "--judge", &settings, &opts.local, &opts.remote)
}

/// How one family's replies are shaped and read: the rubric's key and labels, and the
/// structured format the backend is given (None: free text).
#[derive(Debug, Clone)]
struct Shape {
    key: String,
    /// The rubric's spellings, in [`Family::labels`] order.
    labels: Vec<String>,
    format: Option<LabelFormat>,
    max_new_tokens: usize,
}

impl Shape {
    fn new(rubrics: &Rubrics, family: Family, opts: &JudgeOptions, remote: bool) -> Shape {
        let (key, labels) = rubrics.label_format(family);
        let constrained = if remote { opts.structured } else { opts.format != ReplyFormat::Free };
        let analysis_tokens = (opts.format == ReplyFormat::Rubric).then_some(opts.analysis_tokens);
        let format = constrained.then(|| LabelFormat { key: key.clone(), labels: labels.clone(), analysis_tokens });
        // Room for the whole object, so a structured reply is never cut before its label: a
        // server's analysis is bounded in characters, and a token holds at least one.
        let max_new_tokens = match (&format, remote) {
            (Some(f), false) => f.analysis_tokens.map_or(LABEL_MAX_NEW_TOKENS, |n| n + LABEL_OBJECT_TOKENS),
            (Some(f), true) => opts.max_new_tokens.max(f.analysis_tokens.map_or(0, |n| n * ANALYSIS_CHARS_PER_TOKEN) + LABEL_OBJECT_TOKENS),
            (None, _) => opts.max_new_tokens,
        };
        Shape { key, labels, format, max_new_tokens }
    }

    /// The canonical label of a reply: under a structured format the label the object
    /// holds, exactly (`{"KEY": "LABEL"}` at the end, or a server's JSON object); otherwise,
    /// or when a server ignored the format, the lenient parser's reading.
    fn read(&self, family: Family, raw: &str) -> Option<String> {
        if self.format.is_some() {
            if let Some(i) = self.exact(raw) {
                return Some(family.labels()[i].to_string());
            }
        }
        parse_label_keyed(family, &self.key, raw).ok()
    }

    /// The index of the label a structured reply ends with.
    fn exact(&self, raw: &str) -> Option<usize> {
        let value = match serde_json::from_str::<serde_json::Value>(raw.trim()) {
            Ok(v) => v.get(&self.key)?.as_str()?.to_string(),
            Err(_) => {
                let prefix = self.format.as_ref()?.label_prefix();
                let rest = &raw[raw.rfind(&prefix)? + prefix.len()..];
                rest.strip_suffix("\"}")?.to_string()
            }
        };
        self.labels.iter().position(|l| *l == value)
    }

    /// Label probabilities by canonical label.
    fn probs(&self, family: Family, p: Option<&[f64]>) -> Option<LabelProbs> {
        let p = p.filter(|p| p.len() == self.labels.len())?;
        Some(family.labels().iter().zip(p).map(|(l, &p)| (l.to_string(), p)).collect())
    }
}

/// The backend requests of one round: one greedy reply per judge request, tagged by its
/// index, shaped by its family's [`Shape`].
fn round_requests(requests: &[Request], shapes: &HashMap<Family, Shape>) -> Vec<backends::Request> {
    requests
        .iter()
        .enumerate()
        .map(|(tag, r)| {
            let shape = &shapes[&r.family];
            let decoding = Decoding { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, max_new_tokens: shape.max_new_tokens, ignore_eos: false, stop: Vec::new() };
            backends::Request {
                label: format!("judge request {tag}"),
                messages: r.messages.clone(),
                reply_start: None,
                // A refusal of one judge request (a content filter on one sample) leaves
                // that label unreadable with the server's message; the rest go on.
                accept_refusal: true,
                label_format: shape.format.clone(),
                samples: vec![SampleRequest { tag, decoding, stream: StreamKey::new(0, "judge", tag as u32), seed: Some(0) }],
            }
        })
        .collect()
}

/// One judge request: a conversation so far and what it is for.
struct Request {
    sample: usize,
    family: Family,
    messages: Vec<Message>,
    attempt: u32,
}

/// What one judge reply came to.
enum Read {
    /// The canonical label, and the labels' probabilities when the judge recorded them.
    Label(String, Option<LabelProbs>),
    Unreadable,
    /// The judge server (or the local engine: a prompt over its length limit) refused the
    /// request; its message.
    Refused(String),
    /// The judge's generation failed (finish reason `error`); the engine's message.
    Failed(String),
}

/// Labels of one sample as they become final.
#[derive(Default)]
struct Pending {
    safety: Option<(Option<SafetyLabel>, String, Option<LabelProbs>)>,
    thinking: Option<(Option<ThinkingLabel>, String, Option<LabelProbs>)>,
}

pub fn judge(opts: &JudgeOptions) -> Result<JudgeSummary> {
    let run_ro = RunDir::read(&opts.run)?;
    let samples_log = run_ro.samples();
    if !samples_log.exists() {
        bail!("{} has no samples.jsonl: generate first (bsa generate --out {})", opts.run.display(), opts.run.display());
    }
    let (samples, _) = samples_log.read_keyed::<SampleRecord>(SampleRecord::key)?;
    let rubrics = check_options(opts)?;
    let items = run_items(&run_ro, opts.data.as_deref())?;
    let mut backend = open_judge(opts)?;
    let remote = opts.remote();
    let shapes: HashMap<Family, Shape> = Family::ALL.iter().map(|&f| (f, Shape::new(&rubrics, f, opts, remote))).collect();
    let (judge_id, mut judge_desc) = (backend.model_id().to_string(), backend.manifest_judge());
    let desc = judge_desc.as_object_mut().expect("an object");
    desc.insert("rubrics_sha256".into(), rubrics.sha256_hex().into());
    desc.insert("max_new_tokens".into(), shapes[&Family::Safety].max_new_tokens.into());
    desc.insert("retries".into(), opts.retries.into());
    desc.insert("decoding".into(), "greedy".into());
    desc.insert("reply_format".into(), opts.format.name().into());
    let structured = shapes[&Family::Safety].format.is_some();
    if opts.format == ReplyFormat::Rubric && structured {
        desc.insert("analysis_tokens".into(), opts.analysis_tokens.into());
    }
    desc.insert(
        "structured".into(),
        match (structured, remote) {
            (false, _) => "no: free text, read by the lenient parser",
            (true, false) => "grammar (llguidance): every reply is the rubric's JSON object with one of its labels",
            (true, true) => "response_format: a JSON schema with the labels as an enum",
        }
        .into(),
    );
    let job = JobSpec { judge: Some(judge_desc), ..Default::default() };
    let has_verdicts = !run_ro.verdicts().read_keyed::<Verdict>(Verdict::key)?.0.is_empty();
    drop(run_ro);
    // Everything is checked: only now is anything written.
    let run = if opts.new_run && has_verdicts {
        RunDir::open(&store::copy_for_judging(&opts.run)?, job, OnExisting::Resume)?
    } else {
        match store::job_mismatch(&store::read_manifest(&opts.run)?.job, &job) {
            // A judge that wrote no verdict (it failed at once: a server down, a bad flag)
            // does not hold the run; one that did is resumed only with its own settings.
            Some(diff) if has_verdicts => bail!(
                "{}: its verdicts come from a judge with other settings ({diff}); rerun with those settings to resume, or judge a copy of its samples with the new settings: bsa judge {} --new-run [judge flags] (the copy goes to {})",
                opts.run.display(),
                opts.run.display(),
                store::fresh_sibling(&opts.run).display()
            ),
            Some(_) => RunDir::open_replacing_judge(&opts.run, job)?,
            None => RunDir::open(&opts.run, job, OnExisting::Resume)?,
        }
    };
    let verdict_log = run.verdicts();
    let (_, done) = verdict_log.read_keyed::<Verdict>(Verdict::key)?;
    let todo: Vec<&SampleRecord> = samples.iter().filter(|s| !done.contains(&s.key())).collect();
    let mut summary = JudgeSummary { run: run.path.clone(), skipped: samples.len() - todo.len(), ..Default::default() };
    if todo.is_empty() {
        return Ok(summary);
    }

    // First round: two requests per sample (one when the thinking is empty).
    let mut pending: Vec<Pending> = (0..todo.len()).map(|_| Pending::default()).collect();
    let mut requests: Vec<Request> = Vec::new();
    for (i, s) in todo.iter().enumerate() {
        let item = items.get(&s.item_id).ok_or_else(|| {
            anyhow::anyhow!("{}: sample of item {} whose id is not in the run's data", opts.run.display(), s.item_id)
        })?;
        let fields = Fields { query: &item.query, risk_summary: &item.risk_summary, answer: &s.response, reasoning_thinking: &s.thinking };
        requests.push(Request { sample: i, family: Family::Safety, messages: vec![Message::user(rubrics.get(Family::Safety).render(&fields))], attempt: 0 });
        let tf = Family::thinking(item.scenario);
        if s.thinking.trim().is_empty() {
            let label = match item.scenario {
                Scenario::RiskOmission => ThinkingLabel::False,
                _ => ThinkingLabel::NotCovered,
            };
            pending[i].thinking = Some((Some(label), EMPTY_THINKING_RULE.to_string(), None));
        } else {
            requests.push(Request { sample: i, family: tf, messages: vec![Message::user(rubrics.get(tf).render(&fields))], attempt: 0 });
        }
    }

    // One item's samples go together: their prompts share the rubric's opening, the query and
    // the risk summary, which a local judge's prefix cache then computes once. A sample's two
    // requests stay next to each other, so its verdict is written as early as before (a
    // killed judge loses little); the rubric openings stay cached either way. Replies are
    // greedy, so the order changes no label.
    let mut rank: HashMap<&str, usize> = HashMap::new();
    for s in &todo {
        let next = rank.len();
        rank.entry(s.item_id.as_str()).or_insert(next);
    }
    requests.sort_by_key(|r| (rank[todo[r.sample].item_id.as_str()], r.sample));

    // Samples judged, the time left, and judge calls answered per second.
    let bar = progress_bar_with_eta(opts.progress, todo.len() as u64, "judged");
    let mut answered = 0usize;
    let mut appender = run.appender(&verdict_log)?;
    let rubrics_sha = rubrics.sha256_hex();
    let start = Instant::now();

    // Each reply is handled as it arrives (local: as its sequence finishes in the
    // continuous batch; remote: as its response comes), and a verdict is appended as soon as
    // both of its labels are final, so a killed judge loses only what was in flight.
    while !requests.is_empty() {
        summary.judge_calls += requests.len();
        let batch = round_requests(&requests, &shapes);
        let mut slots: Vec<Option<Request>> = requests.into_iter().map(Some).collect();
        let mut next = Vec::new();
        let mut on_reply = |c: backends::Completion| -> Result<()> {
            // A judge that thinks (a reasoning model behind a server) is read from its
            // answer, not its reasoning.
            let r = slots[c.tag].take().with_context(|| format!("judge request {} answered twice", c.tag))?;
            answered += 1;
            bar.set_message(format!("{:.1} calls/s", answered as f64 / start.elapsed().as_secs_f64().max(1e-3)));
            let item = &items[&todo[r.sample].item_id];
            let shape = &shapes[&r.family];
            let raw = c.text;
            let read = match c.refused {
                Some(message) if structured && remote && mentions_response_format(&message) => {
                    bail!("{}: the judge server refused the structured format (response_format): {message}; drop --judge-structured", opts.judge)
                }
                Some(message) => Read::Refused(message),
                None if c.finish == FinishReason::Error => Read::Failed(c.error.unwrap_or_default()),
                None => shape.read(r.family, &raw).map_or(Read::Unreadable, |l| Read::Label(l, shape.probs(r.family, c.label_probs.as_deref()))),
            };
            match read {
                Read::Label(label, probs) => settle(&mut pending[r.sample], r.family, item.scenario, Some(&label), raw, probs),
                // Asking again would be refused again.
                Read::Refused(message) => {
                    summary.invalid_labels += 1;
                    summary.refused += 1;
                    settle(&mut pending[r.sample], r.family, item.scenario, None, format!("(refused by the judge server: {message})"), None);
                }
                // A fault of the engine, not a reply to repair.
                Read::Failed(message) => {
                    summary.invalid_labels += 1;
                    settle(&mut pending[r.sample], r.family, item.scenario, None, format!("(the judge's generation failed: {message})"), None);
                }
                Read::Unreadable if r.attempt < opts.retries => {
                    let mut messages = r.messages;
                    messages.push(Message::assistant(raw));
                    messages.push(Message::user(repair_request(r.family)));
                    next.push(Request { messages, attempt: r.attempt + 1, ..r });
                }
                Read::Unreadable => {
                    summary.invalid_labels += 1;
                    settle(&mut pending[r.sample], r.family, item.scenario, None, raw, None);
                }
            }
            // Write every sample whose two labels are now final.
            let p = &mut pending[r.sample];
            if let (Some(_), Some(_)) = (&p.safety, &p.thinking) {
                let (safety, raw_safety, safety_probs) = p.safety.take().unwrap();
                let (thinking, raw_thinking, thinking_probs) = p.thinking.take().unwrap();
                let s = todo[r.sample];
                appender.append(&Verdict {
                    item_id: s.item_id.clone(),
                    sample_index: s.sample_index,
                    config: s.config.clone(),
                    scenario: s.scenario,
                    categories: s.categories.clone(),
                    safety,
                    thinking,
                    judge: judge_id.clone(),
                    raw_safety: Some(raw_safety),
                    raw_thinking: Some(raw_thinking),
                    prompt_sha256: Some(rubrics_sha.clone()),
                    response_missing: s.response_missing(),
                    safety_probs,
                    thinking_probs,
                })?;
                summary.written += 1;
                bar.inc(1);
            }
            Ok(())
        };
        let mut prefill = backends::PrefillStats::default();
        backend.complete(batch, &mut on_reply, &mut |p| prefill.add(p.prefill))?;
        summary.prefill.add(prefill);
        if let Some(tag) = slots.iter().position(Option::is_some) {
            bail!("the judge backend returned no reply for judge request {tag}");
        }
        requests = next;
    }
    appender.close()?;
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn settle(p: &mut Pending, family: Family, scenario: Scenario, label: Option<&str>, raw: String, probs: Option<LabelProbs>) {
    match family {
        Family::Safety => p.safety = Some((label.and_then(SafetyLabel::parse), raw, probs)),
        _ => p.thinking = Some((label.and_then(|l| ThinkingLabel::parse(scenario, l)), raw, probs)),
    }
}

/// Whether a server's refusal is about the structured format rather than the sample.
fn mentions_response_format(message: &str) -> bool {
    let m = message.to_lowercase();
    ["response_format", "json_schema", "json schema", "structured output", "guided"].iter().any(|k| m.contains(k))
}

/// The run's items by id, from the data its manifest names (or `--data`), checked by hash.
fn run_items(run: &RunDir, data: Option<&str>) -> Result<HashMap<String, Item>> {
    let recorded = run.manifest.job.dataset.clone().ok_or_else(|| {
        anyhow::anyhow!("{}: the manifest names no data set; was it made by bsa generate?", run.path.display())
    })?;
    let source = data.unwrap_or(&recorded.source);
    let ds = Dataset::load(source).with_context(|| {
        format!("reading the run's data {source}; if it moved, pass its new path with --data")
    })?;
    if ds.sha256 != recorded.sha256 {
        bail!(
            "{source} (sha256 {}) is not the data the run was generated from (sha256 {}); pass the original file with --data",
            ds.sha256,
            recorded.sha256
        );
    }
    Ok(ds.items.into_iter().map(|i| (i.id.clone(), i)).collect())
}
