//! Files from the Hugging Face hub through hf-hub, cache first.
//!
//! The cache is the one the Python tools share (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), so anything `huggingface-cli download` fetched is found
//! without a network. With `HF_HUB_OFFLINE=1` the network is never touched.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

/// The cache directory in use, honouring the same variables as huggingface_hub.
pub fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

pub fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").map(|v| v.to_ascii_lowercase()).as_deref(),
        Ok("1") | Ok("true") | Ok("yes") | Ok("on")
    )
}

/// Splits `OWNER/NAME[/FILE...]` into the repo id and an optional file path inside it.
pub fn split_spec(spec: &str) -> Result<(String, Option<String>)> {
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.len() < 2 || parts[0].is_empty() || parts[1].is_empty() {
        bail!("bad hub reference {spec:?}: write hub:OWNER/NAME or hub:OWNER/NAME/FILE, e.g. hub:OpenStellarTeam/BeyongSafeAnswer_Benchmark");
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let file = if parts.len() > 2 { Some(parts[2..].join("/")) } else { None };
    Ok((repo, file))
}

/// The snapshot folder the cache's `refs/main` points at, if any.
fn cached_snapshot(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let base = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(base.join("refs").join(repo.revision())).ok()?;
    let dir = base.join("snapshots").join(commit.trim());
    dir.is_dir().then_some(dir)
}

fn data_files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_data_file(&p.to_string_lossy()) {
                if let Ok(rel) = p.strip_prefix(dir) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
    }
    out.sort();
    out
}

fn is_data_file(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with(".csv") || n.ends_with(".jsonl")
}

/// The hub client on `cache`. With HF_HUB_OFFLINE set there is none: the error says that
/// `what` is not in the cache, how to get it once online (`fetch`) and what to pass instead.
fn client(cache: &Cache, progress: bool, what: &str, fetch: &str, instead: &str) -> Result<Api> {
    if offline() {
        bail!(
            "{what} is not in the hub cache at {} and HF_HUB_OFFLINE is set; download it once online ({fetch}), or pass {instead}",
            cache.path().display()
        );
    }
    ApiBuilder::from_cache(cache.clone())
        .with_progress(progress)
        .build()
        .context("cannot start the hub client")
}

/// Resolves one file of a model repo, cache first; None when the repo lacks that file
/// (so callers can try alternatives such as a sharded index).
pub fn resolve_model_file(repo_id: &str, file: &str) -> Result<Option<PathBuf>> {
    let repo = Repo::new(repo_id.to_string(), RepoType::Model);
    let cache = cache();
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Ok(Some(p));
    }
    // Offline, a file missing from a snapshot that exists is simply not in the repo.
    if offline() && cached_snapshot(&cache, &repo).is_some() {
        return Ok(None);
    }
    let api = client(
        &cache,
        true,
        &format!("the model {repo_id}"),
        &format!("huggingface-cli download {repo_id}"),
        "a local model directory or .gguf file instead",
    )?;
    match api.repo(repo).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
        Err(e) => Err(anyhow::anyhow!(e)).with_context(|| {
            format!("cannot fetch {file} of the model {repo_id} from the hub (offline? set HF_HUB_OFFLINE=1 to use the cache only)")
        }),
    }
}

/// Resolves `OWNER/NAME[/FILE]` of a dataset repo to a local file. Without FILE the repo
/// must hold exactly one `.csv`/`.jsonl` file.
pub fn resolve_dataset_file(spec: &str) -> Result<PathBuf> {
    let (repo_id, file) = split_spec(spec)?;
    let repo = Repo::new(repo_id.clone(), RepoType::Dataset);
    let cache = cache();
    let pick = |files: Vec<String>, where_: &str| -> Result<String> {
        match files.len() {
            1 => Ok(files.into_iter().next().unwrap()),
            0 => bail!("the dataset {repo_id} has no .csv or .jsonl file {where_}"),
            _ => bail!(
                "the dataset {repo_id} has several data files {where_}: {}; name one, e.g. hub:{repo_id}/{}",
                files.join(", "),
                files[0]
            ),
        }
    };
    // Cache first: this is what makes offline use work.
    let snapshot = cached_snapshot(&cache, &repo);
    if let Some(dir) = &snapshot {
        let name = match &file {
            Some(f) => Some(f.clone()),
            None => {
                let files = data_files_in(dir);
                if files.is_empty() { None } else { Some(pick(files, "in the cache")?) }
            }
        };
        if let Some(name) = name {
            if let Some(p) = cache.repo(repo.clone()).get(&name) {
                return Ok(p);
            }
        }
    }
    let api = client(&cache, false, &format!("hub:{spec}"), "or unset HF_HUB_OFFLINE", "the file path to --data")?;
    let api_repo = api.repo(repo);
    let name = match file {
        Some(f) => f,
        None => {
            let info = api_repo
                .info()
                .with_context(|| format!("cannot list the files of the dataset {repo_id} on the hub (offline? set HF_HUB_OFFLINE=1 to use the cache only)"))?;
            pick(info.siblings.into_iter().map(|s| s.rfilename).filter(|f| is_data_file(f)).collect(), "on the hub")?
        }
    };
    api_repo
        .get(&name)
        .with_context(|| format!("cannot download {name} of the dataset {repo_id} from the hub; check the name, or pass a local file to --data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(split_spec("a/b").unwrap(), ("a/b".into(), None));
        assert_eq!(split_spec("a/b/c/d.csv").unwrap(), ("a/b".into(), Some("c/d.csv".into())));
        assert!(split_spec("a").is_err());
        assert!(split_spec("/b").is_err());
    }
}
