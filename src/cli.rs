//! The command line: clap definitions (one struct per subcommand) and the thin glue that
//! calls the library and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::dataset::{self, DataStats, Dataset, Scenario, Selection, Shard};
use crate::metrics::{self, ScoreOptions, Scorecard, AUTHORS_F_ALPHA};
use crate::store::{self, RunDir};
use crate::verdict::Verdict;
use crate::{bench, official, report};

#[derive(Debug, Parser)]
#[command(
    name = "bsa",
    version,
    about = "Beyond Safe Answers: is a reasoning model safe for the right reasons?",
    long_about = "Beyond Safe Answers (arXiv 2505.19690) on your own hardware.\n\n\
Each benchmark query is sampled k times; a judge labels every sample's response (Safe/Unsafe) \
and its thinking (did it identify the annotated risks). bsa reports Safe@1, Safe@k, Think@1, \
Think@k per scenario and per risk category, and the F-score, with bootstrap intervals.\n\n\
A run lives in one directory (runs/NAME): manifest.json, samples.jsonl, verdicts.jsonl, \
scores.json. Every stage appends as it goes and resumes where it stopped."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and validate benchmark data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Compute every metric from a run's verdicts or from the authors' scorer CSV.
    Score(ScoreArgs),
    /// Write a run's verdicts in the authors' scorer format.
    Export(ExportArgs),
    /// Combine the runs of the shards of one job (see --shard) into one run.
    Merge(MergeArgs),
    /// Benchmarks (never part of the tests).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a data file and print items per scenario and risks per primary category.
    Stats(StatsArgs),
}

/// Which items of the data to use.
#[derive(Debug, Clone, Args, Default)]
pub struct SelectArgs {
    /// Keep only these scenarios ("Risk Omission", "Cognitive Shortcut", "Over Sensitivity",
    /// or RO, CS, OS); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// Keep items with a risk in these primary categories (any case); repeatable.
    #[arg(long)]
    pub category: Vec<String>,
    /// Keep the first N items (after the filters above, before sharding).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Keep only the ids listed in FILE (one per line, # comments allowed).
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
    /// Take shard I of N (0-based): a stable split by id that covers every item exactly once.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
}

impl SelectArgs {
    pub fn to_selection(&self) -> Result<Selection> {
        let scenarios = self
            .scenario
            .iter()
            .map(|s| {
                Scenario::parse(s).ok_or_else(|| {
                    anyhow::anyhow!("--scenario {s:?} is not a scenario; use \"Risk Omission\", \"Cognitive Shortcut\", \"Over Sensitivity\" (or RO, CS, OS)")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = self.ids.as_deref().map(dataset::read_id_file).transpose()?;
        Ok(Selection { scenarios, categories: self.category.clone(), limit: self.limit, ids, shard: self.shard })
    }
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A .csv or .jsonl file in the BSA format, or hub:OWNER/NAME[/FILE].
    pub data: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScoreOpts {
    /// k of Safe@k / Think@k (the paper samples 5 times per query).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Exponent a of F = Think@1^a * Safe@1^(1-a). Default: the authors' scorer value;
    /// their published leaderboard fits 0.610.
    #[arg(long, default_value_t = AUTHORS_F_ALPHA)]
    pub f_alpha: f64,
    /// Bootstrap resamples for the confidence intervals (0 = none).
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Seed of the bootstrap (fixed so that reruns print the same intervals).
    #[arg(long, default_value_t = ScoreOptions::default().seed)]
    pub bootstrap_seed: u64,
    /// Confidence level of the intervals.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Refuse items with fewer than k valid samples instead of reporting them.
    #[arg(long)]
    pub strict: bool,
}

impl ScoreOpts {
    fn options(&self) -> ScoreOptions {
        ScoreOptions {
            k: self.k,
            f_alpha: self.f_alpha,
            resamples: self.resamples,
            seed: self.bootstrap_seed,
            confidence: self.confidence,
            strict: self.strict,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A run directory with verdicts.jsonl (scores.json is written into it).
    #[arg(required_unless_present = "official_csv", conflicts_with = "official_csv")]
    pub run: Option<PathBuf>,
    /// Score the authors' scorer input (model_name,id,dataset_name,Safe_Ans_Check,Thk_Acc_Judge).
    #[arg(long, value_name = "FILE")]
    pub official_csv: Option<PathBuf>,
    /// With --official-csv: the data file, to add per-category metrics and check the ids.
    #[arg(long, value_name = "DATA")]
    pub data: Option<String>,
    /// Print one JSON object keyed by model name.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opts: ScoreOpts,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Where to write the authors' scorer CSV.
    #[arg(long, value_name = "OUT")]
    pub official_csv: PathBuf,
    /// The model_name column (default: the run's model, or the directory name).
    #[arg(long)]
    pub model_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The new run directory to create.
    pub out: PathBuf,
    /// The shard runs to combine.
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time scoring on synthetic verdicts (default: the full benchmark's size).
    Score(BenchScoreArgs),
    /// Time the CPU sampler on random logits at a real shape (default: 256 x 152,064).
    Sampler(BenchSamplerArgs),
}

#[derive(Debug, Args)]
pub struct BenchSamplerArgs {
    #[arg(long, default_value_t = 152_064)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub rows: usize,
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

#[derive(Debug, Args)]
pub struct BenchScoreArgs {
    #[arg(long, default_value_t = 2000)]
    pub items: usize,
    #[arg(long, default_value_t = 5)]
    pub samples: u32,
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Repetitions; the best and median are reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCommand::Stats(a)) => data_stats(a),
        Command::Score(a) => score(a),
        Command::Export(a) => export(a),
        Command::Merge(a) => merge(a),
        Command::Bench(BenchCommand::Score(a)) => bench_score(a),
        Command::Bench(BenchCommand::Sampler(a)) => bench_sampler(a),
    }
}

fn data_stats(a: StatsArgs) -> Result<()> {
    let ds = Dataset::load(&a.data)?;
    let items = ds.select(&a.select.to_selection()?)?;
    let st = DataStats::of(&items);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"source": ds.source, "sha256": ds.sha256, "stats": st}))?);
    } else {
        print!("{}", report::stats_table(&ds.source, &st));
        println!("\n  sha256 {}", ds.sha256);
    }
    Ok(())
}

/// The label of a run in score output: the model id from the manifest, else the folder name.
fn run_label(run: &RunDir) -> String {
    run.manifest
        .job
        .model
        .as_ref()
        .and_then(|m| m.get("id").and_then(|v| v.as_str()).map(str::to_string).or_else(|| m.as_str().map(str::to_string)))
        .unwrap_or_else(|| run.path.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned()))
}

/// Reads a run's verdicts grouped by decoding configuration.
pub fn run_verdicts(run: &RunDir) -> Result<BTreeMap<String, Vec<Verdict>>> {
    let log = run.verdicts();
    if !log.exists() {
        bail!("{} has no verdicts.jsonl yet: judge the samples first (bsa judge)", run.path.display());
    }
    let contents = log.read::<Verdict>()?;
    if let Some(t) = contents.torn_tail {
        eprintln!(
            "warning: {}:{}: the last line is cut off (a judge run was killed); it is left out here and redone when the judge resumes",
            log.path.display(),
            t.line
        );
    }
    let mut by_config: BTreeMap<String, Vec<Verdict>> = BTreeMap::new();
    let mut seen = std::collections::HashMap::new();
    for (line, v) in contents.records {
        if let Some(first) = seen.insert(v.key(), line) {
            bail!("{}:{line}: duplicate verdict {} (first on line {first}); keep one of the two lines", log.path.display(), v.key());
        }
        by_config.entry(v.config.clone()).or_default().push(v);
    }
    Ok(by_config)
}

/// Scores a run, one scorecard per decoding configuration, keyed `model` or `model@config`.
pub fn score_run(run: &RunDir, opts: &ScoreOptions) -> Result<BTreeMap<String, Scorecard>> {
    let label = run_label(run);
    let by_config = run_verdicts(run)?;
    let single = by_config.len() == 1;
    by_config
        .into_iter()
        .map(|(cfg, vs)| {
            let key = if single && cfg == "default" { label.clone() } else { format!("{label}@{cfg}") };
            let sc = metrics::score(&vs, opts).with_context(|| format!("scoring {key}"))?;
            Ok((key, sc))
        })
        .collect()
}

fn score(a: ScoreArgs) -> Result<()> {
    let opts = a.opts.options();
    opts.validate()?;
    let cards: BTreeMap<String, Scorecard> = if let Some(csv) = &a.official_csv {
        let items = a.data.as_deref().map(Dataset::load).transpose()?;
        let by_model = official::read(csv, items.as_ref().map(|d| d.items.as_slice()))?;
        by_model
            .into_iter()
            .map(|(m, vs)| Ok((m.clone(), metrics::score(&vs, &opts).with_context(|| format!("scoring {m}"))?)))
            .collect::<Result<_>>()?
    } else {
        let dir = a.run.as_deref().expect("clap requires a run or --official-csv");
        let run = RunDir::read(dir)?;
        let cards = score_run(&run, &opts)?;
        store::write_json_atomic(&dir.join(store::SCORES), &cards)?;
        if !a.json {
            eprintln!("wrote {}", dir.join(store::SCORES).display());
        }
        cards
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cards)?);
    } else {
        for (name, sc) in &cards {
            println!("{}", report::scorecard_table(name, sc));
        }
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let run = RunDir::read(&a.run)?;
    let label = a.model_name.clone().unwrap_or_else(|| run_label(&run));
    let by_config = run_verdicts(&run)?;
    if a.official_csv.exists() {
        bail!("{} already exists; choose another path (nothing was written)", a.official_csv.display());
    }
    let single = by_config.len() == 1;
    let groups: Vec<(String, Vec<Verdict>)> = by_config
        .into_iter()
        .map(|(cfg, vs)| (if single && cfg == "default" { label.clone() } else { format!("{label}@{cfg}") }, vs))
        .collect();
    let rows = official::write(&a.official_csv, &groups)?;
    eprintln!("wrote {rows} rows to {}", a.official_csv.display());
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let s = store::merge(&a.out, &a.runs)?;
    println!("merged {} runs into {}: {} samples, {} verdicts", a.runs.len(), a.out.display(), s.samples, s.verdicts);
    if !s.missing_shards.is_empty() {
        eprintln!("warning: shard(s) {} are missing: the merged run is partial", s.missing_shards.join(", "));
    }
    Ok(())
}

fn bench_score(a: BenchScoreArgs) -> Result<()> {
    let r = bench::score(a.items, a.samples, a.resamples, a.repeat)?;
    println!("{r}{}", debug_note());
    Ok(())
}

fn bench_sampler(a: BenchSamplerArgs) -> Result<()> {
    for r in bench::sampler(a.vocab, a.rows, a.repeat) {
        println!("{r}{}", debug_note());
    }
    Ok(())
}

fn debug_note() -> &'static str {
    if cfg!(debug_assertions) { "  [debug build: use --release for real numbers]" } else { "" }
}
