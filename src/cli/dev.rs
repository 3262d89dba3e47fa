//! `bsa dev`: hidden developer checks run by scripts/gpu/check.sh.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::gpu_check;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Our logits for token ids on a checkpoint directory (config.json + safetensors):
    /// prefill then decode steps; raw little-endian f32 rows for comparison with transformers.
    Logits(DevLogitsArgs),
}

#[derive(Debug, Args)]
pub struct DevLogitsArgs {
    /// Checkpoint directory (config.json, model.safetensors or its index).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: a list of token-id lists (one per sequence).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Tokens of each sequence fed as one prefill; the rest are fed one decode step each.
    #[arg(long)]
    pub prefill: usize,
    /// Output file: rows of positions prefill-1 .. len-1 per sequence, f32 little-endian.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

fn dev_logits(a: DevLogitsArgs) -> Result<()> {
    use bsa::engine::load;
    let text = std::fs::read_to_string(&a.tokens).with_context(|| format!("cannot read {}", a.tokens.display()))?;
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of token-id lists", a.tokens.display()))?;
    let device = load::device(&a.device)?;
    let dtype = load::dtype(&a.dtype, &device)?;
    let (rows, vocab) = gpu_check::dump_logits(&a.model, &device, dtype, &seqs, a.prefill, &a.out)?;
    outln!("{}", serde_json::json!({"rows": rows, "vocab": vocab, "device": format!("{device:?}"), "dtype": format!("{dtype:?}"), "out": a.out}));
    Ok(())
}

pub(super) fn run(c: DevCommand) -> Result<()> {
    match c {
        DevCommand::Logits(a) => dev_logits(a),
    }
}
