//! `bsa models`: the model presets.

use anyhow::Result;
use clap::Args;

use bsa::analysis::report::text::TextTable;

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(a: ModelsArgs) -> Result<()> {
    let ps = bsa::backends::preset::all();
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&ps)?);
        return Ok(());
    }
    let mut t = TextTable::new(["preset", "hub id", "arch", "T", "top-p", "top-k", "max", "think"], 3).left(7);
    for p in ps {
        let s = &p.sampling;
        let think = if !p.reasoning { "none".to_string() } else if p.think.prefilled { format!("{} pre-filled", p.think.open) } else { p.think.open.clone() };
        t.row([p.name, p.hub_id, p.architecture, s.temperature.to_string(), s.top_p.to_string(), s.top_k.to_string(), s.max_new_tokens.to_string(), think]);
    }
    out!("{}", t.render(0));
    Ok(())
}
