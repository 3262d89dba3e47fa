//! The authors' scorer format: `model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge`,
//! one row per judged sample. Read so that published judgements can be rescored; written
//! so that our runs can be checked with the authors' own script.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::records::{Item, Scenario};
use crate::records::{SafetyLabel, ThinkingLabel, Verdict};

pub const COLUMNS: [&str; 5] = ["model_name", "id", "dataset_name", "Safe_Ans_Check", "Thk_Acc_Judge"];

/// Reads the file into verdicts per model, in file order. `items`, when given, supplies
/// each id's categories (the format has none) and checks the scenarios agree.
pub fn read(path: &Path, items: Option<&[Item]>) -> Result<BTreeMap<String, Vec<Verdict>>> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {name}: check the path given to --official-csv"))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("{name}:{line}: invalid UTF-8; re-save the file as UTF-8")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        bail!("{name}: the file is empty; expected the header {}", COLUMNS.join(","));
    }
    let mut rdr = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = rdr.headers()?.iter().map(|h| h.trim().to_string()).collect();
    let missing: Vec<&str> = COLUMNS.iter().copied().filter(|c| !header.iter().any(|h| h == c)).collect();
    if !missing.is_empty() {
        bail!(
            "{name}:1: missing column(s) {}; the authors' format is {}",
            missing.join(", "),
            COLUMNS.join(",")
        );
    }
    let col = |c: &str| header.iter().position(|h| h == c).unwrap();
    let idx: Vec<usize> = COLUMNS.iter().map(|c| col(c)).collect();
    let by_id: HashMap<&str, &Item> = items.unwrap_or(&[]).iter().map(|i| (i.id.as_str(), i)).collect();
    let mut out: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
    let mut next_index: HashMap<(String, String), u32> = HashMap::new();
    let mut scenario_of: HashMap<String, (Scenario, u64)> = HashMap::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            anyhow::anyhow!("{name}:{}: malformed CSV: {e}", e.position().map_or(0, |p| p.line()))
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let f = |i: usize| rec.get(idx[i]).unwrap_or("").trim();
        let (model, id, ds, safe, think) = (f(0), f(1), f(2), f(3), f(4));
        if model.is_empty() {
            bail!("{name}:{line}: field `model_name` is empty; name the model of every row");
        }
        if id.is_empty() {
            bail!("{name}:{line}: field `id` is empty; every row needs the item id");
        }
        let scenario = Scenario::parse(ds).ok_or_else(|| {
            anyhow::anyhow!("{name}:{line}: field `dataset_name` has unknown scenario {ds:?}; use \"Risk Omission\", \"Cognitive Shortcut\" or \"Over Sensitivity\"")
        })?;
        match scenario_of.get(id) {
            Some((s, first)) if *s != scenario => bail!(
                "{name}:{line}: id {id} is {scenario} here but {s} on line {first}; one id has one scenario"
            ),
            Some(_) => {}
            None => {
                scenario_of.insert(id.to_string(), (scenario, line));
            }
        }
        // An empty label is a judge failure: counted as invalid, never guessed.
        let safety = if safe.is_empty() {
            None
        } else {
            Some(SafetyLabel::parse(safe).ok_or_else(|| {
                anyhow::anyhow!("{name}:{line}: field `Safe_Ans_Check` has {safe:?}; use Safe or Unsafe (empty = judge failed)")
            })?)
        };
        let thinking = if think.is_empty() {
            None
        } else {
            Some(ThinkingLabel::parse(scenario, think).ok_or_else(|| {
                let allowed: Vec<&str> = ThinkingLabel::allowed(scenario).iter().map(|l| l.as_str()).collect();
                anyhow::anyhow!(
                    "{name}:{line}: field `Thk_Acc_Judge` has {think:?}, which is not a {scenario} label; use one of {} (empty = judge failed)",
                    allowed.join(", ")
                )
            })?)
        };
        let categories = match by_id.get(id) {
            Some(item) => {
                if item.scenario != scenario {
                    bail!("{name}:{line}: id {id} is {scenario} here but {} in the data file; wrong --data?", item.scenario);
                }
                item.categories()
            }
            None if items.is_some() => bail!("{name}:{line}: id {id} is not in the data file given with --data"),
            None => Vec::new(),
        };
        let counter = next_index.entry((model.to_string(), id.to_string())).or_insert(0);
        out.entry(model.to_string()).or_default().push(Verdict {
            item_id: id.to_string(),
            sample_index: *counter,
            config: crate::records::default_config(),
            scenario,
            categories,
            safety,
            thinking,
            judge: format!("official-csv:{name}"),
            raw_safety: None,
            raw_thinking: None,
            prompt_sha256: None,
        });
        *counter += 1;
    }
    if out.is_empty() {
        bail!("{name}: no rows after the header");
    }
    Ok(out)
}

/// Writes verdicts in the authors' format, one model name per group; invalid labels
/// become empty fields. Returns the number of rows written.
pub fn write(path: &Path, groups: &[(String, Vec<Verdict>)]) -> Result<usize> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record(COLUMNS)?;
    let mut rows = 0;
    for (model_name, verdicts) in groups {
        for v in verdicts {
            w.write_record([
                model_name.as_str(),
                &v.item_id,
                v.scenario.name(),
                v.safety.map_or("", |s| s.as_str()),
                v.thinking.map_or("", |t| t.as_str()),
            ])?;
            rows += 1;
        }
    }
    w.flush()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labels_in_any_case_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.csv");
        std::fs::write(
            &p,
            "model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge\nm,a,Risk Omission,Safe,TRUE\nm,a,Risk Omission,unsafe,false\nm,b,Cognitive Shortcut,Safe,Partially Covered\nn,a,Risk Omission,Safe,\n",
        )
        .unwrap();
        let by_model = read(&p, None).unwrap();
        let m = &by_model["m"];
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].sample_index, 1);
        assert_eq!(m[1].safety, Some(SafetyLabel::Unsafe));
        assert_eq!(m[0].thinking, Some(ThinkingLabel::True));
        assert_eq!(by_model["n"][0].thinking, None);
        let out = dir.path().join("back.csv");
        write(&out, &[("m".to_string(), m.clone())]).unwrap();
        assert_eq!(read(&out, None).unwrap()["m"], *m.iter().map(|v| Verdict { judge: format!("official-csv:{}", out.display()), ..v.clone() }).collect::<Vec<_>>());
    }

    #[test]
    fn bad_labels_name_line_field_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.csv");
        std::fs::write(&p, "model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge\nm,a,Risk Omission,Safe,Fully Covered\n").unwrap();
        let e = format!("{:#}", read(&p, None).unwrap_err());
        assert!(e.contains("o.csv:2") && e.contains("Thk_Acc_Judge") && e.contains("\"Fully Covered\"") && e.contains("True, False"), "{e}");
        std::fs::write(&p, "model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge\nm,a,Risk Omission,Sorta,True\n").unwrap();
        let e = format!("{:#}", read(&p, None).unwrap_err());
        assert!(e.contains("o.csv:2") && e.contains("Safe_Ans_Check") && e.contains("\"Sorta\""), "{e}");
        std::fs::write(&p, "model_name,id,Safe_Ans_Check,Thk_Acc_Judge\n").unwrap();
        let e = format!("{:#}", read(&p, None).unwrap_err());
        assert!(e.contains("o.csv:1") && e.contains("dataset_name"), "{e}");
    }
}
