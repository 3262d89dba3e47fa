//! `bsa models`: the model presets.

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(a: ModelsArgs) -> Result<()> {
    let ps = bsa::backends::preset::all();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ps)?);
        return Ok(());
    }
    println!("{:<22} {:<42} {:<6} {:>5} {:>5} {:>5} {:>6}  think", "preset", "hub id", "arch", "T", "top-p", "top-k", "max");
    for p in ps {
        let s = &p.sampling;
        let think = if !p.reasoning { "none".to_string() } else if p.think.prefilled { format!("{} pre-filled", p.think.open) } else { p.think.open.clone() };
        println!("{:<22} {:<42} {:<6} {:>5} {:>5} {:>5} {:>6}  {think}", p.name, p.hub_id, p.architecture, s.temperature, s.top_p, s.top_k, s.max_new_tokens);
    }
    Ok(())
}
