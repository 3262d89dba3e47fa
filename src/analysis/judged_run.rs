//! A judged run as the analysis commands (`bsa agree`, `bsa compare`, `bsa report`) read
//! it: a run directory (manifest, verdicts, and samples when present) or a bare
//! verdicts.jsonl file. Nothing here writes to the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::metrics::{self, ScoreOptions, Scorecard};
use crate::data::Dataset;
use crate::records::{record_key, response_missing, Decoding, FinishReason, Item, SampleRecord, Verdict};
use crate::store::{self, Manifest, RecordLog, RunDir};

/// One run's verdicts and what is known about how its samples were made.
#[derive(Debug, Clone)]
pub struct JudgedRun {
    /// The run directory, or the verdicts file itself when given one.
    pub path: PathBuf,
    /// The model id from the manifest, else the folder (or file) name.
    pub label: String,
    pub manifest: Option<Manifest>,
    /// Every verdict, in file order.
    pub verdicts: Vec<Verdict>,
    /// The decoding parameters of each configuration, read off samples.jsonl; empty for
    /// runs that have only verdicts.
    pub decodings: BTreeMap<String, Decoding>,
    samples_path: Option<PathBuf>,
}

/// The fields of a sample record that analysis reads (its configuration's decoding, and
/// whether its response came), so that reading them does not depend on the rest of the
/// record's layout.
#[derive(Deserialize)]
struct SampleHead {
    item_id: String,
    sample_index: u32,
    #[serde(default = "crate::records::default_config")]
    config: String,
    decoding: Decoding,
    finish_reason: FinishReason,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    response: String,
}

/// The record keys of the samples whose response never came.
fn missing_keys(heads: &[(u64, SampleHead)]) -> HashSet<String> {
    heads
        .iter()
        .filter(|(_, s)| response_missing(s.finish_reason, s.truncated, &s.response))
        .map(|(_, s)| record_key(&s.item_id, s.sample_index, &s.config))
        .collect()
}

fn mark(verdicts: &mut [Verdict], missing: &HashSet<String>) {
    for v in verdicts.iter_mut() {
        v.response_missing |= missing.contains(&v.key());
    }
}

/// Marks the verdicts whose sample's response never came, from the run's samples.jsonl
/// when it has one (verdicts written before the judge recorded it themselves).
pub fn mark_missing_responses(verdicts: &mut [Verdict], samples: &RecordLog) -> Result<()> {
    if samples.exists() {
        mark(verdicts, &missing_keys(&samples.read::<SampleHead>()?.records));
    }
    Ok(())
}

impl JudgedRun {
    /// A run known only by its verdicts (no manifest, no samples), named `label`: for
    /// analyses of verdicts made elsewhere, and for tests.
    pub fn from_verdicts(label: &str, verdicts: Vec<Verdict>) -> JudgedRun {
        JudgedRun { path: PathBuf::from(label), label: label.to_string(), manifest: None, verdicts, decodings: BTreeMap::new(), samples_path: None }
    }

    /// Loads a run directory or a verdicts `.jsonl` file.
    pub fn load(path: &Path) -> Result<JudgedRun> {
        if path.is_file() {
            let mut verdicts = read_verdicts(&RecordLog::new(path.to_path_buf()))?;
            let label = path.file_stem().map_or("verdicts".into(), |n| n.to_string_lossy().into_owned());
            // A verdicts file inside a run directory still gets the run's name and samples.
            let parent = path.parent().filter(|p| p.join(store::MANIFEST).is_file());
            if let Some(dir) = parent {
                let (mut run, missing) = JudgedRun::load_dir(dir)?;
                mark(&mut verdicts, &missing);
                run.path = path.to_path_buf();
                run.verdicts = verdicts;
                return Ok(run);
            }
            return Ok(JudgedRun { path: path.to_path_buf(), label, manifest: None, verdicts, decodings: BTreeMap::new(), samples_path: None });
        }
        Ok(JudgedRun::load_dir(path)?.0)
    }

    /// A run directory, and the keys of its samples whose response never came (its
    /// samples.jsonl read once for those and for the decodings).
    fn load_dir(path: &Path) -> Result<(JudgedRun, HashSet<String>)> {
        let dir = RunDir::read(path)?;
        let log = dir.verdicts();
        if !log.exists() {
            bail!("{} has no verdicts.jsonl yet: judge the samples first (bsa judge {})", path.display(), path.display());
        }
        let mut verdicts = read_verdicts(&log)?;
        let samples = dir.samples();
        let (decodings, missing, samples_path) = if samples.exists() {
            let heads = samples.read::<SampleHead>()?.records;
            (decodings(&samples, &heads)?, missing_keys(&heads), Some(samples.path.clone()))
        } else {
            (BTreeMap::new(), HashSet::new(), None)
        };
        mark(&mut verdicts, &missing);
        let run = JudgedRun { path: path.to_path_buf(), label: run_label(&dir), manifest: Some(dir.manifest), verdicts, decodings, samples_path };
        Ok((run, missing))
    }

    /// Verdicts grouped by decoding configuration.
    pub fn by_config(&self) -> BTreeMap<String, Vec<Verdict>> {
        let mut out: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
        for v in &self.verdicts {
            out.entry(v.config.clone()).or_default().push(v.clone());
        }
        out
    }

    /// How a configuration of this run is named in tables: `label`, or `label@config`
    /// when the run holds several configurations or a named one.
    pub fn config_name(&self, config: &str, configs: usize) -> String {
        if configs == 1 && config == crate::records::default_config() {
            self.label.clone()
        } else {
            format!("{}@{config}", self.label)
        }
    }

    /// The verdicts of one decoding configuration: `wanted`, or the only one the run holds.
    /// Errors (naming `flag`, the option that picks one): the run holds several and none
    /// is wanted, or it holds no `wanted`; both list the configurations it holds.
    pub fn pick_config(&self, wanted: Option<&str>, flag: &str) -> Result<(String, Vec<Verdict>)> {
        let mut by = self.by_config();
        let names: Vec<String> = by.keys().cloned().collect();
        let name = match wanted {
            Some(w) => w.to_string(),
            None if names.len() == 1 => names[0].clone(),
            None => bail!("{} holds {} decoding configurations ({}); pick one with {flag} NAME", self.path.display(), names.len(), names.join(", ")),
        };
        match by.remove(&name) {
            Some(vs) => Ok((name, vs)),
            None => bail!("{}: no configuration {name:?} ({flag}); it holds {}", self.path.display(), names.join(", ")),
        }
    }

    /// Whether the run has a samples.jsonl (the thinking and response texts).
    pub fn has_samples(&self) -> bool {
        self.samples_path.is_some()
    }

    /// The run's samples by record key (empty when the run has no samples.jsonl).
    pub fn samples(&self) -> Result<HashMap<String, SampleRecord>> {
        let Some(p) = &self.samples_path else { return Ok(HashMap::new()) };
        let c = RecordLog::new(p.clone()).read::<SampleRecord>()?;
        Ok(c.records.into_iter().map(|(_, s)| (s.key(), s)).collect())
    }

    /// The run's benchmark items (for query and risk summary), from `data` or the data
    /// file the manifest names. Err says why they are not available; callers go on without.
    pub fn items(&self, data: Option<&str>) -> Result<HashMap<String, Item>> {
        let recorded = self.manifest.as_ref().and_then(|m| m.job.dataset.clone());
        let source = match (data, &recorded) {
            (Some(d), _) => d.to_string(),
            (None, Some(r)) => r.source.clone(),
            (None, None) => bail!("{} names no data file; pass --data", self.path.display()),
        };
        let ds = Dataset::load(&source).with_context(|| format!("reading the data of {} ({source})", self.path.display()))?;
        if let Some(r) = &recorded {
            if r.sha256 != ds.sha256 {
                bail!("{source} (sha256 {}) is not the data {} was made from (sha256 {}); pass the original with --data", ds.sha256, self.path.display(), r.sha256);
            }
        }
        Ok(ds.items.into_iter().map(|i| (i.id.clone(), i)).collect())
    }
}

/// The label of a run in score output: the model id from the manifest, else the folder name.
pub fn run_label(run: &RunDir) -> String {
    run.manifest
        .job
        .model
        .as_ref()
        .and_then(|m| m.get("id").and_then(|v| v.as_str()).map(str::to_string).or_else(|| m.as_str().map(str::to_string)))
        .unwrap_or_else(|| run.path.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned()))
}

/// A run's verdicts grouped by decoding configuration, each group named as `bsa score` and
/// `bsa export` name it: `label`, or `label@config` when the run holds a sweep (or a single
/// configuration that is not "default").
pub fn run_verdicts(run: &RunDir, label: &str) -> Result<Vec<(String, Vec<Verdict>)>> {
    let log = run.verdicts();
    if !log.exists() {
        bail!("{} has no verdicts.jsonl yet: judge the samples first (bsa judge)", run.path.display());
    }
    let mut verdicts = read_verdicts(&log)?;
    mark_missing_responses(&mut verdicts, &run.samples())?;
    let mut by_config: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
    for v in verdicts {
        by_config.entry(v.config.clone()).or_default().push(v);
    }
    let single = by_config.len() == 1;
    Ok(by_config
        .into_iter()
        .map(|(cfg, vs)| (if single && cfg == "default" { label.to_string() } else { format!("{label}@{cfg}") }, vs))
        .collect())
}

/// Scores a run, one scorecard per decoding configuration, keyed as [`run_verdicts`] names
/// the groups (with the run's [`run_label`]).
pub fn score_run(run: &RunDir, opts: &ScoreOptions) -> Result<BTreeMap<String, Scorecard>> {
    run_verdicts(run, &run_label(run))?
        .into_iter()
        .map(|(key, vs)| {
            let sc = metrics::score(&vs, opts).with_context(|| format!("scoring {key}"))?;
            Ok((key, sc))
        })
        .collect()
}

/// Reads a verdicts file, refusing duplicate keys; a torn last line (a judge killed
/// mid-write) is left out with a warning, since the judge redoes it on resume.
pub fn read_verdicts(log: &RecordLog) -> Result<Vec<Verdict>> {
    let contents = log.read::<Verdict>()?;
    if let Some(t) = contents.torn_tail {
        eprintln!(
            "warning: {}:{}: the last line is cut off (a judge run was killed); it is left out here and redone when the judge resumes",
            log.path.display(),
            t.line
        );
    }
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(contents.records.len());
    for (line, v) in contents.records {
        if let Some(first) = seen.insert(v.key(), line) {
            bail!("{}:{line}: duplicate verdict {} (first on line {first}); keep one of the two lines", log.path.display(), v.key());
        }
        out.push(v);
    }
    Ok(out)
}

/// The decoding of each configuration; two samples of one configuration that disagree
/// about it mean the file mixes runs, which is refused.
fn decodings(log: &RecordLog, heads: &[(u64, SampleHead)]) -> Result<BTreeMap<String, Decoding>> {
    let mut out: BTreeMap<String, (u64, Decoding)> = BTreeMap::new();
    for (line, r) in heads {
        match out.get(&r.config) {
            Some((first, d)) if *d != r.decoding => bail!(
                "{}:{line}: configuration {:?} has decoding {:?} here but {:?} on line {first}; one configuration name must mean one decoding",
                log.path.display(),
                r.config,
                r.decoding,
                d
            ),
            Some(_) => {}
            None => {
                out.insert(r.config.clone(), (*line, r.decoding.clone()));
            }
        }
    }
    Ok(out.into_iter().map(|(k, (_, d))| (k, d)).collect())
}
