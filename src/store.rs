//! The run directory: `manifest.json`, append-only `samples.jsonl` / `verdicts.jsonl`,
//! and derived files (`scores.json`, reports).
//!
//! Records are appended one JSON line at a time and flushed, so a killed run loses at most
//! the line being written; the lines are fsync'd every [`SYNC_INTERVAL`] and when the log is
//! closed, so a power loss loses at most the last seconds. On restart a torn last line is
//! detected, set aside in `<file>.torn` (nothing is ever thrown away) and redone; keys
//! already present are skipped. A manifest that disagrees with the new command is refused,
//! naming the field.
//!
//! Nothing is written before a command's input is checked: [`RunDir::open`] checks the job
//! and locks the run without writing, and the manifest (with the command) is written with a
//! log's first new record, so a command that is refused, or finds nothing left to do, leaves
//! the run directory as it was.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
    /// For a copy made to judge a run again (`bsa judge RUN --new-run`): the run it copies.
    pub copied_from: Option<String>,
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
            copied_from: None,
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
    _lock: Option<RunLock>,
}

impl RunDir {
    /// Opens `path` for writing `job`, creating it, resuming it, or (with `NewRun`)
    /// picking a fresh sibling directory. It writes nothing into an existing run: the
    /// manifest, with this command added, is written by [`RunDir::save_manifest`] or with the
    /// first record of [`RunDir::appender`].
    pub fn open(path: &Path, job: JobSpec, on_existing: OnExisting) -> Result<RunDir> {
        RunDir::open_inner(path, job, on_existing, false)
    }

    /// [`RunDir::open`] for a judge whose predecessor in the manifest wrote no verdict (it
    /// failed at once): the recorded judge is replaced by `job`'s.
    pub fn open_replacing_judge(path: &Path, job: JobSpec) -> Result<RunDir> {
        RunDir::open_inner(path, job, OnExisting::Resume, true)
    }

    fn open_inner(path: &Path, job: JobSpec, on_existing: OnExisting, replace_judge: bool) -> Result<RunDir> {
        let mut path = path.to_path_buf();
        if on_existing == OnExisting::NewRun && path.join(MANIFEST).exists() {
            path = fresh_sibling(&path);
        }
        if path.exists() && !path.is_dir() {
            bail!("{} is a file, not a run directory; give --out a directory (new or a run's)", path.display());
        }
        let created = !path.exists();
        if created {
            std::fs::create_dir_all(&path).map_err(|e| io_error("creating the run directory", &path, e))?;
        }
        let lock = RunLock::acquire(&path, created).inspect_err(|_| {
            if created {
                let _ = std::fs::remove_dir(&path);
            }
        })?;
        let mut run = RunDir { path, manifest: Manifest::new(job.clone()), _lock: Some(lock) };
        if run.path.join(MANIFEST).exists() {
            let mut m = read_manifest(&run.path)?;
            if replace_judge {
                m.job.judge = None;
            }
            m.job = reconcile(&m.job, &job).map_err(|diff| different_job(&run.path, &diff))?;
            m.commands.push(CommandEntry { at: now_rfc3339(), argv: std::env::args().collect() });
            run.manifest = m;
        }
        Ok(run)
    }

    /// Checks, without writing or locking anything, that `job` (the parts of it known so far)
    /// could be written to `path`: that it is a directory or does not exist, and that a run
    /// there holds a job that agrees. Commands call it before they load a model, so a resume
    /// with other data or settings is refused in its first second; [`RunDir::open`] checks
    /// again under the lock.
    pub fn check(path: &Path, job: &JobSpec, on_existing: OnExisting) -> Result<()> {
        if path.exists() && !path.is_dir() {
            bail!("{} is a file, not a run directory; give --out a directory (new or a run's)", path.display());
        }
        if on_existing == OnExisting::NewRun || !path.join(MANIFEST).exists() {
            return Ok(());
        }
        let m = read_manifest(path)?;
        reconcile(&m.job, job).map(|_| ()).map_err(|diff| different_job(path, &diff))
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

    /// An appender to `log` that writes this run's manifest (as it is now) just before the
    /// log's first new line: a command that ends before it has a record to write leaves the
    /// run as it was.
    pub fn appender(&self, log: &RecordLog) -> Result<Appender> {
        let mut a = log.appender()?;
        a.before_first = Some((self.path.join(MANIFEST), self.manifest.clone()));
        Ok(a)
    }
}

/// The refusal of a command whose job differs from the run's at `path` by `diff`.
fn different_job(path: &Path, diff: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{} belongs to a different job ({diff}); resume it with the same settings, pick another --out, or pass --new-run to start {} beside it",
        path.display(),
        fresh_sibling(path).display()
    )
}

/// Where `job` differs from the run's `existing` job (the first field, as
/// [`RunDir::open`]'s error names it), or None when it would resume.
pub fn job_mismatch(existing: &JobSpec, job: &JobSpec) -> Option<String> {
    reconcile(existing, job).err()
}

/// Copies the run at `path` to the next free `NAME-2`, `NAME-3`, ... for judging it again:
/// its manifest without `job.judge` (and naming where it came from) and its samples.jsonl;
/// the original is only read. A copy cut short by an error is removed. Returns the copy.
pub fn copy_for_judging(path: &Path) -> Result<PathBuf> {
    let mut m = read_manifest(path)?;
    m.job.judge = None;
    m.copied_from = Some(path.display().to_string());
    let to = fresh_sibling(path);
    std::fs::create_dir_all(&to).map_err(|e| io_error("creating", &to, e))?;
    let copied = (|| -> Result<()> {
        let (from, dest) = (path.join(SAMPLES), to.join(SAMPLES));
        std::fs::copy(&from, &dest).map_err(|e| io_error(&format!("copying {} to", from.display()), &dest, e))?;
        File::open(&dest).and_then(|f| f.sync_all()).map_err(|e| io_error("writing", &dest, e))?;
        write_json_atomic(&to.join(MANIFEST), &m)
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&to);
        return Err(e);
    }
    Ok(to)
}

/// The lock file of a run on file systems where a directory cannot be locked (some NFS).
const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, held for as long as it lives. The directory itself
/// is locked, so taking the lock writes nothing into the run; where the file system cannot
/// lock a directory, a `.lock` file in it is.
#[derive(Debug)]
struct RunLock {
    _file: File,
    dir: PathBuf,
    /// This command created the directory: released before anything was written into it,
    /// the directory goes again, so a command that ends early leaves nothing behind.
    created: bool,
}

impl RunLock {
    fn acquire(dir: &Path, created: bool) -> Result<RunLock> {
        let busy = || anyhow::anyhow!("{} is in use by another bsa process; wait for it to finish or use another --out", dir.display());
        let lock = |f: File| RunLock { _file: f, dir: dir.to_path_buf(), created };
        #[cfg(unix)]
        if let Ok(d) = File::open(dir) {
            match d.try_lock() {
                Ok(()) => return Ok(lock(d)),
                Err(std::fs::TryLockError::WouldBlock) => return Err(busy()),
                Err(std::fs::TryLockError::Error(_)) => {}
            }
        }
        let p = dir.join(LOCK_FILE);
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(|e| io_error("creating", &p, e))?;
        match f.try_lock() {
            Ok(()) => Ok(lock(f)),
            Err(_) => Err(busy()),
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self.created && !self.dir.join(MANIFEST).exists() {
            // Only an empty directory goes (remove_dir refuses any other).
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.dir);
        }
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

/// What to do about a failed read or write of a file, by its cause.
pub fn io_fix(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded => "free space on that disk (or write elsewhere), then run the same command again: what was written is kept and it resumes",
        K::FileTooLarge => "raise the file size limit (ulimit -f) or free space on that disk, then run the same command again: what was written is kept and it resumes",
        K::PermissionDenied | K::ReadOnlyFilesystem => "make that directory writable (or write elsewhere), then run the same command again",
        K::NotFound => "check the path",
        _ => "check that disk, then run the same command again",
    }
}

/// An I/O error on `path` that names the file, the cause and the fix:
/// "writing runs/x/samples.jsonl: No space left on device (os error 28); free space ...".
pub fn io_error(doing: &str, path: &Path, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("{doing} {}: {e}; {}", path.display(), io_fix(&e))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then fsyncs the
/// directory, so a crash or a power loss leaves the old file or the new one, never half of
/// one. The temporary file is removed when the write fails (a full disk).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("writing", path, e));
    }
    sync_parent(path);
    Ok(())
}

/// Makes a new or renamed directory entry durable. Best effort: some file systems cannot
/// fsync a directory, and the file's own data is synced already.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

/// [`write_atomic`] of a value as pretty JSON.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).with_context(|| format!("serialising {}", path.display()))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
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

    /// Opens for appending. Nothing is written until the first record: then a torn last
    /// line is moved to `<file>.torn`, so the record is redone cleanly and the fragment is
    /// still there to inspect, and the file is created if it is new.
    pub fn appender(&self) -> Result<Appender> {
        let contents = self.read::<Value>()?;
        Ok(Appender { path: self.path.clone(), torn: contents.torn_tail, before_first: None, file: None, syncer: None, sync_interval: SYNC_INTERVAL })
    }

    fn set_aside_torn(&self, torn: &TornTail) -> Result<()> {
        let torn_path = self.path.with_extension("jsonl.torn");
        let set_aside = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().read(true).write(true).open(&self.path)?;
            f.seek(SeekFrom::Start(torn.offset))?;
            let mut frag = Vec::new();
            f.read_to_end(&mut frag)?;
            let mut t = OpenOptions::new().create(true).append(true).open(&torn_path)?;
            frag.push(b'\n');
            t.write_all(&frag)?;
            t.sync_all()?;
            f.set_len(torn.offset)?;
            f.sync_all()
        };
        set_aside().map_err(|e| io_error(&format!("setting the cut-off last line of {} aside in", self.path.display()), &torn_path, e))?;
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

/// How often an [`Appender`]'s lines are made durable (fsync'd). Every line goes to the
/// operating system at once, so a killed process loses nothing; a power loss loses at most
/// the lines of the last interval. An fsync per line would cost milliseconds each.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Appends records, one line each, written to the operating system at once and fsync'd by a
/// background thread at most [`SYNC_INTERVAL`] after it was written, and when the appender
/// is closed or dropped (on error paths too).
pub struct Appender {
    path: PathBuf,
    /// A cut-off last line found when opening, set aside before the first record.
    torn: Option<TornTail>,
    /// A run's manifest, written just before the first record (see [`RunDir::appender`]).
    before_first: Option<(PathBuf, Manifest)>,
    /// Opened with the first record.
    file: Option<File>,
    syncer: Option<Syncer>,
    sync_interval: Duration,
}

impl Appender {
    /// Another interval between fsyncs than [`SYNC_INTERVAL`] (tests).
    pub fn with_sync_interval(mut self, interval: Duration) -> Appender {
        self.sync_interval = interval;
        self
    }

    pub fn append<T: Serialize>(&mut self, rec: &T) -> Result<()> {
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        if self.file.is_none() {
            self.open()?;
        }
        let syncer = self.syncer.as_ref().expect("opened with the file");
        syncer.check().map_err(|e| io_error("syncing", &self.path, e))?;
        // One write of the whole line: with O_APPEND it lands after every earlier line.
        self.file.as_mut().expect("opened above").write_all(&line).map_err(|e| io_error("writing", &self.path, e))?;
        syncer.written();
        Ok(())
    }

    /// The first record: the run's manifest, the torn line set aside, the file opened.
    fn open(&mut self) -> Result<()> {
        if let Some((path, manifest)) = self.before_first.take() {
            write_json_atomic(&path, &manifest)?;
        }
        if let Some(torn) = self.torn.take() {
            RecordLog::new(self.path.clone()).set_aside_torn(&torn)?;
        }
        let is_new = !self.path.exists();
        let f = OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| io_error("opening", &self.path, e))?;
        if is_new {
            sync_parent(&self.path);
        }
        let synced = f.try_clone().map_err(|e| io_error("opening", &self.path, e))?;
        self.syncer = Some(Syncer::start(synced, self.sync_interval));
        self.file = Some(f);
        Ok(())
    }

    /// How many times the lines were fsync'd so far (the background thread's and the last).
    pub fn syncs(&self) -> usize {
        self.syncer.as_ref().map_or(0, |s| s.state.0.lock().expect("not poisoned").syncs)
    }

    /// Stops the background thread and fsyncs what it has not: the error, if any, names the
    /// file. Dropping the appender does the same and drops the error.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let Some(syncer) = self.syncer.take() else { return Ok(()) };
        syncer.stop().map_err(|e| io_error("syncing", &self.path, e))
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Whether a background sync is due: lines were written since the last one. The thread
/// asks every interval, so a line is fsync'd at most one interval after it was written.
fn sync_due(state: &SyncState) -> bool {
    state.dirty && state.error.is_none()
}

#[derive(Default)]
struct SyncState {
    /// Lines were written since the last fsync.
    dirty: bool,
    stop: bool,
    syncs: usize,
    /// The first failed fsync, reported by the next append or the close.
    error: Option<std::io::Error>,
}

/// The background thread that fsyncs an appender's file every interval while lines come.
struct Syncer {
    state: Arc<(Mutex<SyncState>, Condvar)>,
    file: Arc<File>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(file: File, interval: Duration) -> Syncer {
        let state: Arc<(Mutex<SyncState>, Condvar)> = Default::default();
        let file = Arc::new(file);
        let (s, f) = (state.clone(), file.clone());
        let thread = std::thread::spawn(move || loop {
            let (lock, wake) = &*s;
            let guard = lock.lock().expect("not poisoned");
            let (mut st, _) = wake.wait_timeout_while(guard, interval, |st| !st.stop).expect("not poisoned");
            if st.stop {
                return;
            }
            if sync_due(&st) {
                st.dirty = false;
                drop(st);
                // Lines written during the fsync set `dirty` again: they are synced next time.
                let r = f.sync_data();
                let mut st = lock.lock().expect("not poisoned");
                match r {
                    Ok(()) => st.syncs += 1,
                    Err(e) => st.error = Some(e),
                }
            }
        });
        Syncer { state, file, thread: Some(thread) }
    }

    fn written(&self) {
        self.state.0.lock().expect("not poisoned").dirty = true;
    }

    /// A failed background fsync, once.
    fn check(&self) -> std::io::Result<()> {
        self.state.0.lock().expect("not poisoned").error.take().map_or(Ok(()), Err)
    }

    /// Ends the thread and fsyncs the rest.
    fn stop(mut self) -> std::io::Result<()> {
        self.state.0.lock().expect("not poisoned").stop = true;
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.check()?;
        let mut st = self.state.0.lock().expect("not poisoned");
        if st.dirty {
            self.file.sync_data()?;
            st.dirty = false;
            st.syncs += 1;
        }
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
    let created = !out.exists();
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| io_error("creating", out, e))?;
        write_json_atomic(&out.join(MANIFEST), &m)?;
        for (fi, name) in [SAMPLES, VERDICTS].iter().enumerate() {
            if lines[fi].is_empty() {
                continue;
            }
            let mut a = RecordLog::new(out.join(name)).appender()?;
            for v in &lines[fi] {
                a.append(v)?;
            }
            a.close()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        // Half a merged run would pass for a whole one: what was written goes.
        if created {
            let _ = std::fs::remove_dir_all(out);
        } else {
            for name in [MANIFEST, SAMPLES, VERDICTS] {
                let _ = std::fs::remove_file(out.join(name));
            }
        }
        return Err(e);
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
            let mut a = run.appender(&log).unwrap();
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
        let mut a = run.appender(&log).unwrap();
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
        RunDir::open(&p, job("m1"), OnExisting::Resume).unwrap().save_manifest().unwrap();
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
        RunDir::open(&p, job("m"), OnExisting::Resume).unwrap().save_manifest().unwrap();
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
            let mut a = r.appender(&r.samples()).unwrap();
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

    /// Every file of a directory with its bytes: what "left as it was" compares.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| { let b = std::fs::read(&p).unwrap(); (p, b) }).collect();
        files.sort();
        files
    }

    #[test]
    fn a_refused_or_idle_command_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let run = RunDir::open(&p, job("m"), OnExisting::Resume).unwrap();
        let mut a = run.appender(&run.samples()).unwrap();
        a.append(&json!({"item_id": "x", "sample_index": 0})).unwrap();
        a.close().unwrap();
        drop(run);
        let before = snapshot(&p);
        assert_eq!(before.len(), 2, "the manifest and samples.jsonl, no lock file: {before:?}");
        // Another job: refused by check and by open, with nothing written.
        let e = RunDir::check(&p, &job("other"), OnExisting::Resume).unwrap_err().to_string();
        assert!(e.contains("job.model.id") && e.contains("--new-run"), "{e}");
        assert!(RunDir::open(&p, job("other"), OnExisting::Resume).is_err());
        assert_eq!(snapshot(&p), before);
        // The same job with nothing to append: the manifest does not even get the command.
        let run = RunDir::open(&p, job("m"), OnExisting::Resume).unwrap();
        assert_eq!(run.manifest.commands.len(), 2);
        drop(run.appender(&run.verdicts()).unwrap());
        drop(run);
        assert_eq!(snapshot(&p), before);
        // A new directory a command wrote nothing into goes again.
        let fresh = dir.path().join("fresh");
        drop(RunDir::open(&fresh, job("m"), OnExisting::Resume).unwrap());
        assert!(!fresh.exists());
    }

    #[test]
    fn copy_for_judging_takes_samples_and_manifest_without_the_judge() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let run = RunDir::open(&p, JobSpec { judge: Some(json!("j")), ..job("m") }, OnExisting::Resume).unwrap();
        let mut a = run.appender(&run.samples()).unwrap();
        a.append(&json!({"item_id": "x", "sample_index": 0})).unwrap();
        a.close().unwrap();
        std::fs::write(p.join(VERDICTS), "{}\n").unwrap();
        let before = snapshot(&p);
        let copy = copy_for_judging(&p).unwrap();
        assert_eq!(copy, dir.path().join("r-2"));
        assert_eq!(snapshot(&p), before, "the original is only read");
        assert_eq!(std::fs::read(copy.join(SAMPLES)).unwrap(), std::fs::read(p.join(SAMPLES)).unwrap());
        assert!(!copy.join(VERDICTS).exists());
        let m = read_manifest(&copy).unwrap();
        assert_eq!((m.job.judge, m.job.model, m.copied_from), (None, Some(json!({"id": "m"})), Some(p.display().to_string())));
    }

    /// A write that fails (here into /dev/full through the temporary file's name) names the
    /// file and the fix and leaves no temporary file.
    #[cfg(unix)]
    #[test]
    fn a_failed_write_names_the_file_and_the_fix_and_leaves_no_tmp() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scores.json");
        std::os::unix::fs::symlink("/dev/full", dir.path().join("scores.json.tmp")).unwrap();
        let e = write_json_atomic(&p, &json!({"a": 1})).unwrap_err().to_string();
        assert!(e.starts_with(&format!("writing {}: ", p.display())) && e.contains("No space left on device") && e.contains("free space on that disk"), "{e}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no scores.json, no scores.json.tmp");
        // An append to a full disk: the log's name, the cause, the fix.
        let mut a = Appender { path: PathBuf::from("/dev/full"), torn: None, before_first: None, file: None, syncer: None, sync_interval: SYNC_INTERVAL };
        let e = a.append(&json!({"item_id": "x"})).unwrap_err().to_string();
        assert!(e.starts_with("writing /dev/full: No space left on device") && e.contains("run the same command again"), "{e}");
    }

    /// Appended lines are fsync'd by the background thread within an interval of being
    /// written, without another append, and the rest when the appender closes; an idle
    /// appender does not sync.
    #[test]
    fn appended_lines_are_synced_every_interval_and_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::new(dir.path().join("v.jsonl"));
        let mut a = log.appender().unwrap().with_sync_interval(Duration::from_millis(20));
        assert!(!log.path.exists(), "no file before the first record");
        a.append(&json!({"a": 1})).unwrap();
        let t = std::time::Instant::now();
        while a.syncs() == 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(a.syncs(), 1, "one sync for the line, with no further append");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(a.syncs(), 1, "nothing new written, nothing synced");
        a.close().unwrap();
        // A long interval: nothing synced while appending, everything at close.
        let mut a = log.appender().unwrap().with_sync_interval(Duration::from_secs(3600));
        for i in 0..3 {
            a.append(&json!({"a": i})).unwrap();
        }
        assert_eq!(a.syncs(), 0);
        let syncer = a.syncer.take().unwrap();
        assert!(syncer.state.0.lock().unwrap().dirty);
        syncer.stop().unwrap();
        assert_eq!(log.read::<Value>().unwrap().records.len(), 4);
    }
}
