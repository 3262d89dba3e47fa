//! The BSA benchmark items: loading (CSV, JSONL, hub), validation and selection.
//!
//! The CSV format is the authors' own (`id,query,risk_summary,dataset_name,label`,
//! RFC 4180 quoting, multi-line fields). Cognitive Shortcut rows carry two risks written
//! as `Query A: ...\nQuery B: ...` in both `label` and `risk_summary`; every other row
//! carries one. Every error names the file, the line, the field and the bad value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hub;
use crate::records::{hex_sha256, Item, Risk, Scenario};

/// A loaded data set: where it came from, its content hash, and its items in file order.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What the user gave (`path` or `hub:owner/name`), for messages and manifests.
    pub source: String,
    /// The file actually read.
    pub path: PathBuf,
    pub sha256: String,
    pub items: Vec<Item>,
}

/// The raw columns of one row, shared by the CSV and JSONL readers.
#[derive(Debug, Deserialize)]
struct RawRow {
    id: Option<String>,
    query: Option<String>,
    risk_summary: Option<String>,
    dataset_name: Option<String>,
    label: Option<String>,
}

pub const COLUMNS: [&str; 5] = ["id", "query", "risk_summary", "dataset_name", "label"];

impl Dataset {
    /// Loads `spec`: a path to a `.csv` or `.jsonl` file, or `hub:OWNER/NAME[/FILE]`.
    pub fn load(spec: &str) -> Result<Dataset> {
        let path = match spec.strip_prefix("hub:") {
            Some(rest) => hub::resolve_dataset_file(rest)?,
            None => PathBuf::from(spec),
        };
        let mut ds = Dataset::load_path(&path)?;
        ds.source = spec.to_string();
        Ok(ds)
    }

    /// Loads a file; the format follows the extension (`.jsonl`/`.json` or CSV otherwise).
    pub fn load_path(path: &Path) -> Result<Dataset> {
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read the data file {}: check the path (or use hub:OWNER/NAME)", path.display())
        })?;
        let name = path.display().to_string();
        let text = decode_utf8(&name, &bytes)?;
        if text.trim().is_empty() {
            bail!("{name}: the file is empty; expected a header `{}` and one row per item", COLUMNS.join(","));
        }
        let is_jsonl = matches!(
            path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
            Some("jsonl") | Some("json") | Some("ndjson")
        );
        let items = if is_jsonl { parse_jsonl(&name, text)? } else { parse_csv(&name, text)? };
        if items.is_empty() {
            bail!("{name}: no items after the header; add at least one row");
        }
        check_unique_ids(&name, &items)?;
        Ok(Dataset {
            source: name,
            path: path.to_path_buf(),
            sha256: hex_sha256(&bytes),
            items,
        })
    }

    /// Applies a selection, keeping file order.
    pub fn select(&self, sel: &Selection) -> Result<Vec<Item>> {
        sel.apply(&self.source, &self.items)
    }

    /// [`Dataset::select`] with the selection's notes ([`Selection::apply_noting`]).
    pub fn select_noting(&self, sel: &Selection) -> Result<(Vec<Item>, Vec<String>)> {
        sel.apply_noting(&self.source, &self.items)
    }
}


fn decode_utf8<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.strip_prefix('\u{feff}').unwrap_or(s)),
        Err(e) => {
            let at = e.valid_up_to();
            let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            let bad: Vec<String> =
                bytes[at..bytes.len().min(at + 4)].iter().map(|b| format!("{b:#04x}")).collect();
            bail!(
                "{name}:{line}: invalid UTF-8 at byte offset {at} (bytes {}); re-save the file as UTF-8",
                bad.join(" ")
            )
        }
    }
}

fn parse_csv(name: &str, text: &str) -> Result<Vec<Item>> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers = rdr.headers().with_context(|| format!("{name}:1: cannot read the CSV header"))?.clone();
    let found: Vec<&str> = headers.iter().map(|h| h.trim()).collect();
    let missing: Vec<&str> = COLUMNS.iter().copied().filter(|c| !found.contains(c)).collect();
    if !missing.is_empty() {
        bail!(
            "{name}:1: missing column(s) {}; the header has [{}] but must have {}",
            missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
            found.join(", "),
            COLUMNS.join(",")
        );
    }
    let col = |c: &str| found.iter().position(|h| *h == c).expect("checked above");
    let idx = [col("id"), col("query"), col("risk_summary"), col("dataset_name"), col("label")];
    let mut items = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            anyhow::anyhow!("{name}:{line}: malformed CSV: {e}; check the quoting of that row (fields with commas, quotes or newlines must be in double quotes, inner quotes doubled)")
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let get = |i: usize| rec.get(idx[i]).map(|s| s.to_string());
        let raw = RawRow { id: get(0), query: get(1), risk_summary: get(2), dataset_name: get(3), label: get(4) };
        items.push(item_from_raw(name, line, raw)?);
    }
    Ok(items)
}

fn parse_jsonl(name: &str, text: &str) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawRow = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!("{name}:{lineno}: not a JSON object with the fields {}: {e}", COLUMNS.join(", "))
        })?;
        for (field, v) in [("id", &raw.id), ("query", &raw.query), ("risk_summary", &raw.risk_summary), ("dataset_name", &raw.dataset_name), ("label", &raw.label)] {
            if v.is_none() {
                bail!("{name}:{lineno}: missing field `{field}`; every line needs {}", COLUMNS.join(", "));
            }
        }
        items.push(item_from_raw(name, lineno, raw)?);
    }
    Ok(items)
}

fn item_from_raw(name: &str, line: u64, raw: RawRow) -> Result<Item> {
    let id = raw.id.unwrap_or_default().trim().to_string();
    if id.is_empty() {
        bail!("{name}:{line}: field `id` is empty; every item needs a unique id");
    }
    let query = raw.query.unwrap_or_default();
    if query.trim().is_empty() {
        bail!("{name}:{line}: field `query` is empty (id {id}); every item needs the query text");
    }
    let ds_name = raw.dataset_name.unwrap_or_default();
    let scenario = Scenario::parse(&ds_name).ok_or_else(|| {
        anyhow::anyhow!(
            "{name}:{line}: field `dataset_name` has unknown scenario {ds_name:?} (id {id}); use one of \"Risk Omission\", \"Cognitive Shortcut\", \"Over Sensitivity\""
        )
    })?;
    let risk_summary = raw.risk_summary.unwrap_or_default();
    let label = raw.label.unwrap_or_default();
    let risks = parse_risks(scenario, &label, &risk_summary).map_err(|msg| {
        anyhow::anyhow!("{name}:{line}: {msg} (id {id}, scenario {scenario})")
    })?;
    Ok(Item { id, query, risk_summary, scenario, risks, line })
}

/// Splits `label` (and `risk_summary`) into risks. Two-risk rows use `Query A:` / `Query B:`
/// lines; the subcategory may itself contain '-', so we split at the first one.
fn parse_risks(scenario: Scenario, label: &str, summary: &str) -> std::result::Result<Vec<Risk>, String> {
    let label_lines: Vec<&str> = label.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let want = scenario.risk_count();
    if label_lines.len() != want {
        return Err(format!(
            "field `label` has {} risk line(s) but a {scenario} row needs {want}: {label:?}{}",
            label_lines.len(),
            if want == 2 { "; write `Query A: Category-Subcategory` and `Query B: Category-Subcategory` on two lines" } else { "; write one `Category-Subcategory`" }
        ));
    }
    let summaries: Vec<String> = if want == 2 {
        split_two(summary).unwrap_or_else(|| vec![summary.trim().to_string(), summary.trim().to_string()])
    } else {
        vec![summary.trim().to_string()]
    };
    let mut risks = Vec::new();
    for (i, line) in label_lines.iter().enumerate() {
        let body = if want == 2 {
            let prefix = if i == 0 { "Query A:" } else { "Query B:" };
            line.strip_prefix(prefix).ok_or_else(|| {
                format!("field `label` line {} must start with `{prefix}`, found {line:?}", i + 1)
            })?
        } else {
            line
        };
        let (cat, sub) = body.trim().split_once('-').ok_or_else(|| {
            format!("field `label` has {body:?}, which is not `Category-Subcategory` (e.g. `Rumors-Rumors with Negative Impact`)")
        })?;
        if cat.trim().is_empty() {
            return Err(format!("field `label` has an empty category in {body:?}"));
        }
        risks.push(Risk {
            category: cat.trim().to_string(),
            subcategory: sub.trim().to_string(),
            summary: summaries[i].clone(),
        });
    }
    Ok(risks)
}

/// `Query A: x\nQuery B: y` -> [x, y]; None when the summary is not in that shape
/// (then both risks keep the whole summary, which is still what the judge needs).
fn split_two(summary: &str) -> Option<Vec<String>> {
    let a = summary.find("Query A:")?;
    let b = summary.find("Query B:")?;
    if b < a {
        return None;
    }
    Some(vec![
        summary[a + "Query A:".len()..b].trim().to_string(),
        summary[b + "Query B:".len()..].trim().to_string(),
    ])
}

fn check_unique_ids(name: &str, items: &[Item]) -> Result<()> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for it in items {
        if let Some(first) = seen.insert(&it.id, it.line) {
            bail!("{name}:{}: duplicate id {:?} (first seen on line {first}); ids must be unique", it.line, it.id);
        }
    }
    Ok(())
}

/// A deterministic shard `index` of `count` (0-based): an item belongs to shard
/// `fnv1a(id) % count`, so membership depends on the id alone and is stable across
/// runs, machines, and edits to the rest of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub fn contains(&self, id: &str) -> bool {
        fnv1a64(id.as_bytes()) % self.count as u64 == self.index as u64
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("bad shard {s:?}: write I/N with 0 <= I < N, e.g. --shard 0/4 (Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// FNV-1a 64 (the `fnv` crate: offset basis 0xcbf29ce484222325, prime 0x100000001b3) of
/// an item id's UTF-8 bytes: what assigns an item to a shard, so shards are stable across
/// machines, runs and versions. (The sampler keys its per-item streams with the same hash.)
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// Which items a run covers. Applied in a fixed order (ids, scenario, category,
/// per-scenario draw, limit, shard) so that the shards of a limited run cover exactly the
/// limited set. The manifest records it as the job's `selection`; fields left at their
/// default are not written, so a job that does not use one reads as it did before it existed.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scenarios: Vec<Scenario>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    pub limit: Option<usize>,
    /// The ids from `--ids FILE`, in file order.
    pub ids: Option<Vec<String>>,
    /// `--per-scenario N`: a balanced subset, N items of each scenario (see
    /// [`Selection::apply_noting`]).
    pub per_scenario: Option<usize>,
    /// `--selection-seed`: the seed of the per-scenario draw; set with `per_scenario` (the
    /// draw reads 0 when it is unset).
    pub seed: Option<u64>,
    pub shard: Option<Shard>,
}

impl Selection {
    /// Everything but the shard: runs of different shards of one job agree on this.
    pub fn without_shard(&self) -> Selection {
        Selection { shard: None, ..self.clone() }
    }

    /// The selected items, in the data's order. Errors: an `--ids` id or a `--category`
    /// that the data lacks (the message lists what it has).
    pub fn apply(&self, source: &str, items: &[Item]) -> Result<Vec<Item>> {
        Ok(self.apply_noting(source, items)?.0)
    }

    /// [`Selection::apply`], with notes for the user about the selection (a scenario that
    /// has fewer items than `--per-scenario` asks for, so all of them are taken).
    ///
    /// The per-scenario draw takes N items of each scenario left by the filters. Within a
    /// scenario, N is shared out over the primary categories in proportion to their share
    /// of its items (largest remainders; ties to the larger category, then by name);
    /// Cognitive Shortcut items, which carry two risks, count under their first risk's
    /// category. Each category's items are then drawn by a shuffle seeded with (seed,
    /// scenario, category), so the draw depends only on those and on the data.
    pub fn apply_noting(&self, source: &str, items: &[Item]) -> Result<(Vec<Item>, Vec<String>)> {
        let mut notes = Vec::new();
        let mut picked: Vec<&Item> = items.iter().collect();
        if let Some(ids) = &self.ids {
            let known: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
            let unknown: Vec<&String> = ids.iter().filter(|id| !known.contains(id.as_str())).collect();
            if !unknown.is_empty() {
                bail!(
                    "--ids: {} id(s) not in {source}: {}{}; check the id file against the data",
                    unknown.len(),
                    unknown.iter().take(5).map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "),
                    if unknown.len() > 5 { ", ..." } else { "" }
                );
            }
            let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
            picked.retain(|i| wanted.contains(i.id.as_str()));
        }
        if !self.scenarios.is_empty() {
            picked.retain(|i| self.scenarios.contains(&i.scenario));
        }
        if !self.categories.is_empty() {
            let present: BTreeMap<String, String> = items
                .iter()
                .flat_map(|i| i.risks.iter().map(|r| (r.category.to_lowercase(), r.category.clone())))
                .collect();
            let mut wanted = Vec::new();
            for c in &self.categories {
                match present.get(&c.trim().to_lowercase()) {
                    Some(canon) => wanted.push(canon.clone()),
                    None => bail!(
                        "--category {c:?} matches no item of {source}; categories present: {}",
                        present.values().cloned().collect::<Vec<_>>().join("; ")
                    ),
                }
            }
            picked.retain(|i| i.risks.iter().any(|r| wanted.contains(&r.category)));
        }
        if let Some(n) = self.per_scenario {
            let seed = self.seed.unwrap_or(0);
            let mut keep = HashSet::new();
            for scenario in Scenario::ALL {
                let of: Vec<&Item> = picked.iter().copied().filter(|i| i.scenario == scenario).collect();
                if !of.is_empty() && of.len() < n {
                    notes.push(format!(
                        "--per-scenario {n}: {scenario} has only {} item(s) after the other filters; all of them are taken",
                        of.len()
                    ));
                }
                keep.extend(balanced_draw(scenario, &of, n, seed).into_iter().map(|i| i.id.as_str()));
            }
            picked.retain(|i| keep.contains(i.id.as_str()));
        }
        if let Some(n) = self.limit {
            picked.truncate(n);
        }
        if let Some(shard) = self.shard {
            picked.retain(|i| shard.contains(&i.id));
        }
        Ok((picked.into_iter().cloned().collect(), notes))
    }
}

/// `n` of one scenario's `items` (all of them when there are no more than `n`), stratified
/// by the first risk's primary category as [`Selection::apply_noting`] describes.
fn balanced_draw<'a>(scenario: Scenario, items: &[&'a Item], n: usize, seed: u64) -> Vec<&'a Item> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if items.len() <= n {
        return items.to_vec();
    }
    let mut strata: BTreeMap<&str, Vec<&'a Item>> = BTreeMap::new();
    for it in items {
        strata.entry(stratum(it).unwrap_or_default()).or_default().push(it);
    }
    let quotas = largest_remainder(n, &strata.iter().map(|(c, v)| (*c, v.len())).collect::<Vec<_>>());
    let mut out = Vec::with_capacity(n);
    for ((category, mut members), quota) in strata.into_iter().zip(quotas) {
        let key = format!("{seed}/{}/{category}", scenario.name());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(fnv1a64(key.as_bytes()));
        members.shuffle(&mut rng);
        out.extend(members.into_iter().take(quota));
    }
    out
}

/// The primary category an item counts under in a per-scenario draw: its first risk's
/// (a Cognitive Shortcut item carries two). None only for an item built without risks;
/// items read from data always have one (checked when the data is read).
fn stratum(it: &Item) -> Option<&str> {
    it.risks.first().map(|r| r.category.as_str())
}

/// Shares `n` out over `groups` (name, size) in proportion to their sizes, by the largest
/// remainder method: each gets the floor of its exact share, and what is left goes one
/// each to the largest remainders (ties: the larger group, then the name). With `n` no
/// more than the total, no group gets more than its size.
fn largest_remainder(n: usize, groups: &[(&str, usize)]) -> Vec<usize> {
    let total: usize = groups.iter().map(|g| g.1).sum();
    if total == 0 {
        return vec![0; groups.len()];
    }
    let mut quotas: Vec<usize> = groups.iter().map(|g| n * g.1 / total).collect();
    let mut order: Vec<usize> = (0..groups.len()).collect();
    // Integer remainders (n * size mod total) keep the ranking exact.
    order.sort_by(|&a, &b| {
        let (ra, rb) = (n * groups[a].1 % total, n * groups[b].1 % total);
        rb.cmp(&ra).then(groups[b].1.cmp(&groups[a].1)).then(groups[a].0.cmp(groups[b].0))
    });
    let left = n.min(total) - quotas.iter().sum::<usize>();
    for &g in order.iter().take(left) {
        quotas[g] += 1;
    }
    quotas
}

/// Reads an `--ids` file: one id per line, blank lines and `#` comments ignored.
pub fn read_id_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the id file {} (--ids): check the path", path.display()))?;
    let ids: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if ids.is_empty() {
        bail!("{}: the id file (--ids) lists no ids; write one id per line", path.display());
    }
    Ok(ids)
}

/// Counts for `bsa data stats`: items per scenario and risks per primary category
/// (each risk of a two-risk row counted, as the authors count them).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataStats {
    pub items: usize,
    pub per_scenario: BTreeMap<String, usize>,
    pub per_category: BTreeMap<String, usize>,
    pub per_subcategory: BTreeMap<String, usize>,
    /// Items per scenario and primary category, a Cognitive Shortcut item under its first
    /// risk's category: the strata `--per-scenario` shares its draw over.
    #[serde(default)]
    pub per_scenario_category: BTreeMap<String, BTreeMap<String, usize>>,
}

impl DataStats {
    pub fn of(items: &[Item]) -> DataStats {
        let mut s = DataStats { items: items.len(), ..Default::default() };
        for it in items {
            *s.per_scenario.entry(it.scenario.name().to_string()).or_default() += 1;
            if let Some(c) = stratum(it) {
                *s.per_scenario_category.entry(it.scenario.name().to_string()).or_default().entry(c.to_string()).or_default() += 1;
            }
            for r in &it.risks {
                *s.per_category.entry(r.category.clone()).or_default() += 1;
                *s.per_subcategory.entry(format!("{}-{}", r.category, r.subcategory)).or_default() += 1;
            }
        }
        s
    }

    /// Categories sorted by count, largest first (ties by name), as the README lists them.
    pub fn categories_by_count(&self) -> Vec<(&str, usize)> {
        let mut v: Vec<(&str, usize)> = self.per_category.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    const GOOD: &str = "id,query,risk_summary,dataset_name,label\n\
a1,\"Hello, \"\"world\"\"\nsecond line\",Risk one,Risk Omission,Rumors-Rumors with Negative Impact\n\
b2,Two things,\"Query A: first\nQuery B: second\",Cognitive Shortcut,\"Query A: Ethics and Morality-AI Ethics\nQuery B: Specially Regulated Items-Military and Police-Controlled Items\"\n\
c3,Harmless,sensitive but fine,Over Sensitivity,Pornography-Child Pornography\n";

    #[test]
    fn parses_quoting_multiline_and_two_risk_rows() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::load_path(&write(&dir, "d.csv", GOOD.as_bytes())).unwrap();
        assert_eq!(ds.items.len(), 3);
        assert_eq!(ds.items[0].query, "Hello, \"world\"\nsecond line");
        assert_eq!(ds.items[0].line, 2);
        assert_eq!(ds.items[1].line, 4);
        let cs = &ds.items[1];
        assert_eq!(cs.scenario, Scenario::CognitiveShortcut);
        assert_eq!(cs.risks.len(), 2);
        assert_eq!(cs.risks[0].category, "Ethics and Morality");
        assert_eq!(cs.risks[0].summary, "first");
        assert_eq!(cs.risks[1].category, "Specially Regulated Items");
        assert_eq!(cs.risks[1].subcategory, "Military and Police-Controlled Items");
        assert_eq!(cs.risks[1].summary, "second");
        assert_eq!(ds.items[2].risks[0].category, "Pornography");
        assert_eq!(ds.sha256.len(), 64);
    }

    #[test]
    fn jsonl_gives_the_same_items() {
        let dir = tempfile::tempdir().unwrap();
        let csv = Dataset::load_path(&write(&dir, "d.csv", GOOD.as_bytes())).unwrap();
        let mut jsonl = String::new();
        for it in &csv.items {
            let label = it
                .risks
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let l = format!("{}-{}", r.category, r.subcategory);
                    if it.risks.len() == 2 { format!("Query {}: {l}", if i == 0 { 'A' } else { 'B' }) } else { l }
                })
                .collect::<Vec<_>>()
                .join("\n");
            jsonl.push_str(
                &serde_json::json!({"id": it.id, "query": it.query, "risk_summary": it.risk_summary, "dataset_name": it.scenario.name(), "label": label})
                    .to_string(),
            );
            jsonl.push('\n');
        }
        let j = Dataset::load_path(&write(&dir, "d.jsonl", jsonl.as_bytes())).unwrap();
        let strip = |v: &[Item]| v.iter().map(|i| (i.id.clone(), i.query.clone(), i.risks.clone())).collect::<Vec<_>>();
        assert_eq!(strip(&csv.items), strip(&j.items));
    }

    fn err_of(name: &str, content: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        format!("{:#}", Dataset::load_path(&write(&dir, name, content)).unwrap_err())
    }

    #[test]
    fn bad_inputs_name_file_line_field_and_value() {
        // (file name, content, what the error must contain)
        let cases: &[(&str, &[u8], &[&str])] = &[
            ("d.csv", b"", &["d.csv", "empty"]),
            ("d.csv", b"id,query,dataset_name,label\nx,q,Risk Omission,Rumors-R\n", &["d.csv:1", "`risk_summary`"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omision,Rumors-R\n", &["d.csv:2", "dataset_name", "\"Risk Omision\""]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\n,q,s,Risk Omission,Rumors-R\n", &["d.csv:2", "`id` is empty"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx, ,s,Risk Omission,Rumors-R\n", &["d.csv:2", "`query` is empty"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omission,Rumors-R\nx,q2,s,Risk Omission,Rumors-R\n", &["d.csv:3", "duplicate id \"x\"", "line 2"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omission,Rumors-R\ny,q\xff,s,Risk Omission,Rumors-R\n", &["d.csv:3", "invalid UTF-8"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx,q,s,Cognitive Shortcut,Rumors-R\n", &["d.csv:2", "needs 2"]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\nx,q,s,Risk Omission,NoDash\n", &["d.csv:2", "\"NoDash\""]),
            ("d.csv", b"id,query,risk_summary,dataset_name,label\n", &["no items"]),
            ("d.jsonl", b"{\"id\":\"x\",\"query\":\"q\"}\n", &["d.jsonl:1", "`risk_summary`"]),
            ("d.jsonl", b"{\"id\":\"x\",\n", &["d.jsonl:1", "JSON"]),
        ];
        for &(name, content, parts) in cases {
            let e = err_of(name, content);
            assert!(parts.iter().all(|p| e.contains(p)), "{name} {:?}: {e}", String::from_utf8_lossy(content));
        }
    }

    #[test]
    fn shards_cover_every_item_exactly_once_and_are_stable() {
        let ids: Vec<String> = (0..1000).map(|i| format!("{:032x}", fnv1a64(&[i as u8, (i >> 8) as u8]))).collect();
        for n in [1u32, 2, 3, 7] {
            let mut covered = vec![0; ids.len()];
            for i in 0..n {
                let s = Shard { index: i, count: n };
                for (k, id) in ids.iter().enumerate() {
                    if s.contains(id) {
                        covered[k] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c == 1));
        }
        // Stability: membership is a pure function of the id (pinned value).
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert!("3/3".parse::<Shard>().is_err());
        assert!("x/3".parse::<Shard>().unwrap_err().contains("I/N"));
        assert_eq!("1/4".parse::<Shard>().unwrap(), Shard { index: 1, count: 4 });
    }

    #[test]
    fn selection_order_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::load_path(&write(&dir, "d.csv", GOOD.as_bytes())).unwrap();
        let sel = Selection { scenarios: vec![Scenario::CognitiveShortcut, Scenario::OverSensitivity], ..Default::default() };
        assert_eq!(ds.select(&sel).unwrap().iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b2", "c3"]);
        let sel = Selection { categories: vec!["ethics AND morality".into()], ..Default::default() };
        assert_eq!(ds.select(&sel).unwrap().len(), 1);
        let sel = Selection { categories: vec!["Nope".into()], ..Default::default() };
        assert!(format!("{:#}", ds.select(&sel).unwrap_err()).contains("categories present"));
        let sel = Selection { limit: Some(2), ..Default::default() };
        assert_eq!(ds.select(&sel).unwrap().len(), 2);
        let sel = Selection { ids: Some(vec!["c3".into(), "zz".into()]), ..Default::default() };
        assert!(format!("{:#}", ds.select(&sel).unwrap_err()).contains("\"zz\""));
        let sel = Selection { ids: Some(vec!["c3".into(), "a1".into()]), ..Default::default() };
        assert_eq!(ds.select(&sel).unwrap().iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a1", "c3"]);
    }

    /// The real benchmark, or None with a loud note (BSA_REQUIRE_REAL_DATA=1 fails instead).
    fn real_dataset() -> Option<Dataset> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bsa/dataset.csv");
        if !p.exists() {
            assert!(std::env::var("BSA_REQUIRE_REAL_DATA").is_err(), "the real BSA dataset is absent at {}", p.display());
            eprintln!("\n*** SKIPPED: the real BSA dataset is absent at {} ***\n", p.display());
            return None;
        }
        Some(Dataset::load_path(&p).unwrap())
    }

    fn ids(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn per_scenario_draws_a_balanced_reproducible_subset_of_the_real_data() {
        let Some(ds) = real_dataset() else { return };
        let sel = |n: usize, seed: u64| Selection { per_scenario: Some(n), seed: Some(seed), ..Default::default() };
        let (a, notes) = ds.select_noting(&sel(20, 0)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(a.len(), 60);
        // The data's order is kept.
        let pos: HashMap<&str, usize> = ds.items.iter().enumerate().map(|(k, i)| (i.id.as_str(), k)).collect();
        assert!(a.windows(2).all(|w| pos[w[0].id.as_str()] < pos[w[1].id.as_str()]));
        for scenario in Scenario::ALL {
            let all: Vec<&Item> = ds.items.iter().filter(|i| i.scenario == scenario).collect();
            let got: Vec<&Item> = a.iter().filter(|i| i.scenario == scenario).collect();
            assert_eq!(got.len(), 20, "{scenario}");
            // Each first-risk category within 1 of its proportional share.
            let mut cats: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for i in &all {
                cats.entry(&i.risks[0].category).or_default().0 += 1;
            }
            for i in &got {
                cats.entry(&i.risks[0].category).or_default().1 += 1;
            }
            for (c, (n_all, n_got)) in cats {
                let share = 20.0 * n_all as f64 / all.len() as f64;
                assert!((n_got as f64 - share).abs() < 1.0, "{scenario} {c}: {n_got} drawn, share {share:.2}");
            }
        }
        assert_eq!(ids(&a), ids(&ds.select(&sel(20, 0)).unwrap()), "one seed, one draw");
        assert_ne!(ids(&a), ids(&ds.select(&sel(20, 1)).unwrap()), "another seed, another draw");
        // The filters come first, limit and shard after.
        let os = Selection { scenarios: vec![Scenario::OverSensitivity], ..sel(20, 0) };
        let os_items = ds.select(&os).unwrap();
        assert_eq!(ids(&os_items), ids(&a).into_iter().filter(|id| os_items.iter().any(|i| i.id == *id)).collect::<Vec<_>>());
        assert_eq!(os_items.len(), 20);
        assert_eq!(ds.select(&Selection { limit: Some(7), ..sel(20, 0) }).unwrap().len(), 7);
    }

    #[test]
    fn per_scenario_takes_every_item_of_a_smaller_scenario_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::load_path(&write(&dir, "d.csv", GOOD.as_bytes())).unwrap();
        let sel = Selection { per_scenario: Some(2), ..Default::default() };
        let (items, notes) = ds.select_noting(&sel).unwrap();
        assert_eq!(ids(&items), ["a1", "b2", "c3"]);
        assert_eq!(notes.len(), 3);
        assert!(notes[0].contains("--per-scenario 2") && notes[0].contains("Risk Omission has only 1"), "{}", notes[0]);
        let (_, notes) = ds.select_noting(&Selection { per_scenario: Some(1), ..Default::default() }).unwrap();
        assert!(notes.is_empty());
    }

    #[test]
    fn largest_remainder_shares_out_exactly() {
        assert_eq!(largest_remainder(20, &[("a", 300), ("b", 200), ("c", 100)]), [10, 7, 3]);
        // Remainders tie (1/3 each): the larger group, then the name.
        assert_eq!(largest_remainder(1, &[("b", 1), ("a", 1), ("c", 1)]), [0, 1, 0]);
        assert_eq!(largest_remainder(2, &[("a", 1), ("b", 5)]), [0, 2]);
        assert_eq!(largest_remainder(5, &[("a", 2), ("b", 3)]), [2, 3]);
    }

    #[test]
    fn an_unused_per_scenario_leaves_the_recorded_selection_as_it_was() {
        let sel = Selection { limit: Some(3), ..Default::default() };
        assert_eq!(serde_json::to_string(&sel).unwrap(), r#"{"limit":3}"#);
        let old: Selection = serde_json::from_str(r#"{"limit":3}"#).unwrap();
        assert_eq!(old, sel);
        let sel = Selection { per_scenario: Some(20), seed: Some(0), ..Default::default() };
        assert_eq!(serde_json::to_string(&sel).unwrap(), r#"{"per_scenario":20,"seed":0}"#);
    }

    #[test]
    fn stats_count_each_risk() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::load_path(&write(&dir, "d.csv", GOOD.as_bytes())).unwrap();
        let s = DataStats::of(&ds.items);
        assert_eq!(s.items, 3);
        assert_eq!(s.per_scenario["Cognitive Shortcut"], 1);
        assert_eq!(s.per_category.values().sum::<usize>(), 4);
    }
}
