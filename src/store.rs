//! The run directory: `manifest.json`, append-only `samples.jsonl` / `verdicts.jsonl`,
//! and derived files (`scores.json`, reports).
//!
//! Records are appended one JSON line at a time and flushed, so a killed run loses at most
//! the line being written. On restart a torn last line is detected, set aside in
//! `<file>.torn` (nothing is ever thrown away) and redone; keys already present are skipped.
//! A manifest that disagrees with the new command is refused, naming the field.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{Selection, Shard};

pub const MANIFEST: &str = "manifest.json";
pub const SAMPLES: &str = "samples.jsonl";
pub const VERDICTS: &str = "verdicts.jsonl";
pub const SCORES: &str = "scores.json";

/// What a run evaluates. Two invocations may share a run directory only if every field
/// they both set is equal; a field one of them leaves unset (e.g. the judge, before
/// judging) is filled in by the later one.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    #[serialize_always]
    pub dataset: Option<DatasetRef>,
    #[serde(default)]
    pub selection: Selection,
    pub shard: Option<Shard>,
    pub model: Option<Value>,
    pub decoding: Option<Value>,
    pub samples: Option<u32>,
    pub seed: Option<u64>,
    pub prompt: Option<Value>,
    pub judge: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    pub source: String,
    pub sha256: String,
    pub items: usize,
}

/// `manifest.json`: the job plus everything needed to reproduce it.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub bsa_version: String,
    pub git_commit: Option<String>,
    pub created: String,
    pub job: JobSpec,
    /// Every command that wrote to this run, oldest first.
    #[serde(default)]
    pub commands: Vec<CommandEntry>,
    pub device: Option<String>,
    /// How the local engine ran the last pass (its KV cache and longest sequence; see
    /// [`crate::backends::local::CachePlan::manifest_entry`]). Not part of the job: a resume
    /// may size the cache anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<serde_json::Value>,
    /// For merged runs: the shard runs it was made from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// Free-form notes (e.g. "labels written by hand").
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandEntry {
    pub at: String,
    pub argv: Vec<String>,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

impl Manifest {
    pub fn new(job: JobSpec) -> Manifest {
        Manifest {
            bsa_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: option_env!("BSA_GIT_COMMIT").filter(|s| !s.is_empty()).map(str::to_string),
            created: now_rfc3339(),
            job,
            commands: vec![CommandEntry { at: now_rfc3339(), argv: std::env::args().collect() }],
            device: None,
            engine: None,
            merged_from: Vec::new(),
            note: None,
        }
    }
}

/// Merges `new` into `old`: equal where both are set, `new` fills what `old` lacks.
/// The error names the first differing field with both values.
pub fn reconcile(old: &JobSpec, new: &JobSpec) -> std::result::Result<JobSpec, String> {
    let a = serde_json::to_value(old).expect("job serialises");
    let b = serde_json::to_value(new).expect("job serialises");
    let merged = merge_value("job", &a, &b)?;
    Ok(serde_json::from_value(merged).expect("merged job deserialises"))
}

fn merge_value(path: &str, a: &Value, b: &Value) -> std::result::Result<Value, String> {
    match (a, b) {
        (Value::Null, x) | (x, Value::Null) => Ok(x.clone()),
        (Value::Object(ma), Value::Object(mb)) => {
            let mut out = ma.clone();
            for (k, vb) in mb {
                let p = format!("{path}.{k}");
                let merged = match ma.get(k) {
                    Some(va) => merge_value(&p, va, vb)?,
                    None => vb.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Ok(Value::Object(out))
        }
        _ if a == b => Ok(a.clone()),
        _ => Err(format!("{path}: the run has {a}, this command has {b}")),
    }
}

/// How to treat an existing run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Continue it if the job matches (the default).
    Resume,
    /// Leave it alone and start the next free `NAME-2`, `NAME-3`, ...
    NewRun,
}

/// An open run directory, locked against a second writer for as long as it lives.
#[derive(Debug)]
pub struct RunDir {
    pub path: PathBuf,
    pub manifest: Manifest,
    _lock: Option<File>,
}

impl RunDir {
    /// Opens `path` for writing `job`, creating it, resuming it, or (with `NewRun`)
    /// picking a fresh sibling directory.
    pub fn open(path: &Path, job: JobSpec, on_existing: OnExisting) -> Result<RunDir> {
        let mut path = path.to_path_buf();
        if on_existing == OnExisting::NewRun && path.join(MANIFEST).exists() {
            path = fresh_sibling(&path);
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create the run directory {}", path.display()))?;
        let lock = lock_run(&path)?;
        let manifest_path = path.join(MANIFEST);
        let manifest = if manifest_path.exists() {
            let mut m = read_manifest(&path)?;
            m.job = reconcile(&m.job, &job).map_err(|diff| {
                anyhow::anyhow!(
                    "{} belongs to a different job ({diff}); resume it with the same settings, pick another --out, or pass --new-run to start {} beside it",
                    path.display(),
                    fresh_sibling(&path).display()
                )
            })?;
            m.commands.push(CommandEntry { at: now_rfc3339(), argv: std::env::args().collect() });
            m
        } else {
            Manifest::new(job)
        };
        write_json_atomic(&manifest_path, &manifest)?;
        Ok(RunDir { path, manifest, _lock: Some(lock) })
    }

    /// Opens an existing run for reading only (no lock, no manifest change).
    pub fn read(path: &Path) -> Result<RunDir> {
        if !path.is_dir() {
            bail!("{} is not a run directory (it does not exist); give the --out of a bsa run", path.display());
        }
        let manifest = read_manifest(path)?;
        Ok(RunDir { path: path.to_path_buf(), manifest, _lock: None })
    }

    pub fn samples(&self) -> RecordLog {
        RecordLog::new(self.path.join(SAMPLES))
    }

    pub fn verdicts(&self) -> RecordLog {
        RecordLog::new(self.path.join(VERDICTS))
    }

    pub fn save_manifest(&self) -> Result<()> {
        write_json_atomic(&self.path.join(MANIFEST), &self.manifest)
    }
}

/// Where `job` differs from the run's `existing` job (the first field, as
/// [`RunDir::open`]'s error names it), or None when it would resume.
pub fn job_mismatch(existing: &JobSpec, job: &JobSpec) -> Option<String> {
    reconcile(existing, job).err()
}

/// Removes `job.judge` from the manifest of the run at `path`, under the run's lock: for a
/// run whose judge wrote no verdict, so that another judge may take it.
pub fn forget_judge(path: &Path) -> Result<()> {
    let _lock = lock_run(path)?;
    let mut m = read_manifest(path)?;
    m.job.judge = None;
    write_json_atomic(&path.join(MANIFEST), &m)
}

fn lock_run(dir: &Path) -> Result<File> {
    let p = dir.join(".lock");
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(&p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(_) => bail!(
            "{} is in use by another bsa process; wait for it to finish or use another --out",
            dir.display()
        ),
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!("cannot read {}: is {} a bsa run directory?", p.display(), dir.display())
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a valid bsa manifest", p.display()))
}

/// `NAME-2`, `NAME-3`, ...: the first that does not exist yet.
pub fn fresh_sibling(path: &Path) -> PathBuf {
    let base = path.to_string_lossy().trim_end_matches('/').to_string();
    (2..).map(|i| PathBuf::from(format!("{base}-{i}"))).find(|p| !p.exists()).expect("unbounded")
}

/// Writes via a temporary file and rename, so a crash never leaves half a file.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, value)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The identity of a sample or verdict record: (item, sample index, decoding config).
pub fn key_of(v: &Value) -> Option<String> {
    let id = v.get("item_id")?.as_str()?;
    let idx = v.get("sample_index")?.as_u64()?;
    let cfg = v.get("config").and_then(Value::as_str).unwrap_or("default");
    Some(crate::records::record_key(id, idx as u32, cfg))
}

/// What reading a log found.
#[derive(Debug, Default)]
pub struct LogContents<T> {
    /// Records in file order, with their 1-based line numbers.
    pub records: Vec<(u64, T)>,
    /// A last line that was cut off (no newline, or not valid JSON at the end).
    pub torn_tail: Option<TornTail>,
}

#[derive(Debug, Clone)]
pub struct TornTail {
    pub line: u64,
    /// Byte offset where the torn line starts (the file is valid up to here).
    pub offset: u64,
    pub bytes: usize,
}

/// An append-only JSON-lines file.
#[derive(Debug, Clone)]
pub struct RecordLog {
    pub path: PathBuf,
}

impl RecordLog {
    pub fn new(path: PathBuf) -> RecordLog {
        RecordLog { path }
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Reads every complete record. A bad line in the middle is an error naming it; a
    /// bad or unterminated last line is reported as torn (a crash mid-write).
    pub fn read<T: DeserializeOwned>(&self) -> Result<LogContents<T>> {
        let mut out = LogContents { records: Vec::new(), torn_tail: None };
        if !self.path.exists() {
            return Ok(out);
        }
        let mut bytes = Vec::new();
        File::open(&self.path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let name = self.path.display();
        let mut offset = 0usize;
        let mut lineno = 0u64;
        while offset < bytes.len() {
            lineno += 1;
            let end = bytes[offset..].iter().position(|&b| b == b'\n').map(|p| offset + p);
            let line = &bytes[offset..end.unwrap_or(bytes.len())];
            let is_last = end.is_none_or(|e| e + 1 >= bytes.len());
            let parsed: std::result::Result<T, String> = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str(s).map_err(|e| e.to_string()));
            match (parsed, end) {
                (Ok(rec), Some(_)) => out.records.push((lineno, rec)),
                _ if line.iter().all(u8::is_ascii_whitespace) && end.is_some() => {}
                (_, None) | (Err(_), Some(_)) if is_last => {
                    out.torn_tail = Some(TornTail { line: lineno, offset: offset as u64, bytes: bytes.len() - offset });
                    break;
                }
                (Err(e), _) => bail!(
                    "{name}:{lineno}: not a valid record ({e}); the file was edited or corrupted: fix or remove that line (a copy is safest), then rerun"
                ),
                (Ok(_), None) => unreachable!("handled as torn"),
            }
            offset = end.map_or(bytes.len(), |e| e + 1);
        }
        Ok(out)
    }

    /// Reads records and indexes them by key, refusing duplicate keys.
    pub fn read_keyed<T: DeserializeOwned>(&self, key: impl Fn(&T) -> String) -> Result<(Vec<T>, HashSet<String>)> {
        let contents = self.read::<T>()?;
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut recs = Vec::with_capacity(contents.records.len());
        for (line, r) in contents.records {
            let k = key(&r);
            if let Some(first) = seen.insert(k.clone(), line) {
                bail!(
                    "{}:{line}: duplicate record {k} (first on line {first}); were two processes writing this run? keep one of the two lines",
                    self.path.display()
                );
            }
            recs.push(r);
        }
        Ok((recs, seen.into_keys().collect()))
    }

    /// Opens for appending. A torn last line is moved to `<file>.torn` first, so the
    /// record is redone cleanly and the fragment is still there to inspect.
    pub fn appender(&self) -> Result<Appender> {
        let contents = self.read::<Value>()?;
        if let Some(torn) = &contents.torn_tail {
            self.set_aside_torn(torn)?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {} for appending", self.path.display()))?;
        Ok(Appender { w: BufWriter::new(f) })
    }

    fn set_aside_torn(&self, torn: &TornTail) -> Result<()> {
        let mut f = OpenOptions::new().read(true).write(true).open(&self.path)?;
        f.seek(SeekFrom::Start(torn.offset))?;
        let mut frag = Vec::new();
        f.read_to_end(&mut frag)?;
        let torn_path = self.path.with_extension("jsonl.torn");
        let mut t = OpenOptions::new().create(true).append(true).open(&torn_path)?;
        t.write_all(&frag)?;
        t.write_all(b"\n")?;
        t.sync_all()?;
        f.set_len(torn.offset)?;
        f.sync_all()?;
        eprintln!(
            "note: {}:{}: the last line was cut off ({} bytes, a run killed mid-write); set it aside in {} and will redo it",
            self.path.display(),
            torn.line,
            torn.bytes,
            torn_path.display()
        );
        Ok(())
    }
}

/// Appends records, one flushed line each.
pub struct Appender {
    w: BufWriter<File>,
}

impl Appender {
    pub fn append<T: Serialize>(&mut self, rec: &T) -> Result<()> {
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        self.w.write_all(&line)?;
        self.w.flush()?;
        Ok(())
    }
}

/// `bsa merge`: combines the runs of the shards of one job into `out`.
pub fn merge(out: &Path, runs: &[PathBuf]) -> Result<MergeSummary> {
    if runs.len() < 2 {
        bail!("bsa merge needs at least two runs to combine (got {})", runs.len());
    }
    if out.join(MANIFEST).exists() || out.is_dir() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} already exists and is not empty; merge into a new directory", out.display());
    }
    let opened: Vec<RunDir> = runs.iter().map(|r| RunDir::read(r)).collect::<Result<_>>()?;
    let first = &opened[0];
    let base = JobSpec { shard: None, ..first.manifest.job.clone() };
    let mut shards = Vec::new();
    for r in &opened {
        let job = JobSpec { shard: None, ..r.manifest.job.clone() };
        if job != base {
            let diff = first_difference(&base, &job);
            bail!(
                "{} and {} are not shards of one job ({diff}); only runs that differ in --shard can be merged",
                first.path.display(),
                r.path.display()
            );
        }
        shards.push(r.manifest.job.shard);
    }
    let mut seen_shards = HashSet::new();
    for (r, s) in opened.iter().zip(&shards) {
        if !seen_shards.insert(*s) {
            bail!("{}: shard {} appears twice in the merge; each shard once", r.path.display(), s.map_or("none".into(), |s| s.to_string()));
        }
    }
    // Every record key must come from exactly one run.
    let mut owners: HashMap<String, usize> = HashMap::new();
    let mut lines: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for (ri, r) in opened.iter().enumerate() {
        for (fi, log) in [r.samples(), r.verdicts()].iter().enumerate() {
            let c = log.read::<Value>()?;
            if let Some(t) = c.torn_tail {
                bail!("{}:{}: the last line is cut off; resume that run first so it is redone", log.path.display(), t.line);
            }
            for (line, v) in c.records {
                let k = key_of(&v).ok_or_else(|| anyhow::anyhow!("{}:{line}: record has no item_id/sample_index", log.path.display()))?;
                let tagged = format!("{fi}:{k}");
                if let Some(o) = owners.insert(tagged, ri) {
                    if o != ri {
                        bail!(
                            "{} and {} both hold {k}: the runs overlap, so they are not disjoint shards",
                            opened[o].path.display(),
                            r.path.display()
                        );
                    }
                }
                lines[fi].push(v);
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut m = Manifest::new(base);
    m.merged_from = opened.iter().map(|r| r.path.display().to_string()).collect();
    let counts: HashSet<u32> = shards.iter().flatten().map(|s| s.count).collect();
    let missing: Vec<String> = if counts.len() == 1 && shards.iter().all(Option::is_some) {
        let n = *counts.iter().next().unwrap();
        let have: HashSet<u32> = shards.iter().flatten().map(|s| s.index).collect();
        (0..n).filter(|i| !have.contains(i)).map(|i| format!("{i}/{n}")).collect()
    } else {
        Vec::new()
    };
    write_json_atomic(&out.join(MANIFEST), &m)?;
    for (fi, name) in [SAMPLES, VERDICTS].iter().enumerate() {
        if lines[fi].is_empty() {
            continue;
        }
        let mut a = RecordLog::new(out.join(name)).appender()?;
        for v in &lines[fi] {
            a.append(v)?;
        }
    }
    Ok(MergeSummary { samples: lines[0].len(), verdicts: lines[1].len(), missing_shards: missing })
}

#[derive(Debug)]
pub struct MergeSummary {
    pub samples: usize,
    pub verdicts: usize,
    pub missing_shards: Vec<String>,
}

fn first_difference(a: &JobSpec, b: &JobSpec) -> String {
    // Reconcile treats unset as compatible; for merging, unset vs set is a difference too.
    let va = serde_json::to_value(a).unwrap();
    let vb = serde_json::to_value(b).unwrap();
    diff_value("job", &va, &vb).unwrap_or_else(|| "no difference".into())
}

fn diff_value(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            keys.into_iter().find_map(|k| {
                diff_value(&format!("{path}.{k}"), ma.get(k).unwrap_or(&Value::Null), mb.get(k).unwrap_or(&Value::Null))
            })
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} vs {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(model: &str) -> JobSpec {
        JobSpec {
            dataset: Some(DatasetRef { source: "d.csv".into(), sha256: "ab".into(), items: 3 }),
            model: Some(json!({"id": model})),
            samples: Some(5),
            ..Default::default()
        }
    }

    #[test]
    fn resume_skips_done_keys_and_redoes_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(&dir.path().join("r"), job("m"), OnExisting::Resume).unwrap();
        let log = run.samples();
        {
            let mut a = log.appender().unwrap();
            a.append(&json!({"item_id": "x", "sample_index": 0, "text": "one"})).unwrap();
            a.append(&json!({"item_id": "x", "sample_index": 1, "text": "two"})).unwrap();
        }
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&log.path).unwrap();
        f.write_all(br#"{"item_id": "x", "sample_index": 2, "te"#).unwrap();
        drop(f);
        let c = log.read::<Value>().unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.torn_tail.as_ref().unwrap().line, 3);
        drop(run);
        // Restart: same job resumes; keys present are known; the torn line is set aside.
        let run = RunDir::open(&dir.path().join("r"), job("m"), OnExisting::Resume).unwrap();
        let log = run.samples();
        let mut a = log.appender().unwrap();
        a.append(&json!({"item_id": "x", "sample_index": 2, "text": "three"})).unwrap();
        let (recs, keys) = log.read_keyed::<Value>(|v| key_of(v).unwrap()).unwrap();
        assert_eq!(recs.len(), 3);
        assert!(keys.contains("x#2@default"));
        let torn = std::fs::read_to_string(log.path.with_extension("jsonl.torn")).unwrap();
        assert!(torn.contains("\"te"), "fragment kept: {torn}");
        assert_eq!(run.manifest.commands.len(), 2);
    }

    #[test]
    fn a_bad_middle_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.jsonl");
        std::fs::write(&p, "{\"a\":1}\nnot json\n{\"a\":2}\n").unwrap();
        let e = RecordLog::new(p).read::<Value>().unwrap_err().to_string();
        assert!(e.contains("v.jsonl:2"), "{e}");
    }

    #[test]
    fn a_bad_complete_last_line_is_torn_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":\n").unwrap();
        let c = RecordLog::new(p).read::<Value>().unwrap();
        assert_eq!(c.records.len(), 1);
        assert_eq!(c.torn_tail.unwrap().line, 2);
    }

    #[test]
    fn manifest_mismatch_names_the_field_and_new_run_goes_beside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        drop(RunDir::open(&p, job("m1"), OnExisting::Resume).unwrap());
        let e = RunDir::open(&p, job("m2"), OnExisting::Resume).unwrap_err().to_string();
        assert!(e.contains("job.model.id") && e.contains("m1") && e.contains("m2") && e.contains("--new-run"), "{e}");
        let r = RunDir::open(&p, job("m2"), OnExisting::NewRun).unwrap();
        assert_eq!(r.path, dir.path().join("r-2"));
        // The first run is untouched.
        assert_eq!(read_manifest(&p).unwrap().job.model, Some(json!({"id": "m1"})));
    }

    #[test]
    fn later_stage_fills_unset_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        drop(RunDir::open(&p, job("m"), OnExisting::Resume).unwrap());
        let judged = JobSpec { judge: Some(json!("j")), ..job("m") };
        let r = RunDir::open(&p, judged, OnExisting::Resume).unwrap();
        assert_eq!(r.manifest.job.judge, Some(json!("j")));
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let _held = RunDir::open(&p, job("m"), OnExisting::Resume).unwrap();
        let e = RunDir::open(&p, job("m"), OnExisting::Resume).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
    }

    #[test]
    fn merge_refuses_overlap_and_foreign_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, shard: u32, model: &str, ids: &[&str]| {
            let j = JobSpec { shard: Some(Shard { index: shard, count: 2 }), ..job(model) };
            let r = RunDir::open(&dir.path().join(name), j, OnExisting::Resume).unwrap();
            let mut a = r.samples().appender().unwrap();
            for id in ids {
                a.append(&json!({"item_id": id, "sample_index": 0})).unwrap();
            }
            dir.path().join(name)
        };
        let a = mk("a", 0, "m", &["x"]);
        let b = mk("b", 1, "m", &["y"]);
        let c = mk("c", 1, "other", &["z"]);
        let d = mk("d", 1, "m", &["x"]);
        let s = merge(&dir.path().join("out"), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(s.samples, 2);
        assert!(s.missing_shards.is_empty());
        let e = merge(&dir.path().join("o2"), &[a.clone(), c]).unwrap_err().to_string();
        assert!(e.contains("job.model.id"), "{e}");
        let e = merge(&dir.path().join("o3"), &[a.clone(), d]).unwrap_err().to_string();
        assert!(e.contains("overlap") && e.contains("x#0@default"), "{e}");
        let e = merge(&dir.path().join("out"), &[a, b]).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }
}
