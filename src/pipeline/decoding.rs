//! The decoding of a run: flags over a model preset's defaults, and the grid of
//! configurations a sweep runs (`t0.6_p0.95_k20`, ...).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backends::preset::Preset;
use crate::backends::sampling_params;
use crate::records::Decoding;

/// Flags that override the preset's (or the built-in) decoding defaults.
#[derive(Debug, Clone, Default)]
pub struct DecodingOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// `--ignore-eos`: every sample runs to `max_new_tokens`.
    pub ignore_eos: bool,
}

/// The decoding of a run: the flags, else the preset's defaults, else the built-in ones
/// (T 0.6, top-p 0.95, 4096 new tokens). Errors name the flag whose value is out of range.
pub fn resolve(preset: Option<&Preset>, o: &DecodingOverrides) -> Result<Decoding> {
    let base = preset.map(|p| p.sampling.clone());
    let d = Decoding {
        temperature: o.temperature.or(base.as_ref().map(|b| b.temperature)).unwrap_or(0.6),
        top_p: o.top_p.or(base.as_ref().map(|b| b.top_p)).unwrap_or(0.95),
        top_k: o.top_k.or(base.as_ref().map(|b| b.top_k)).unwrap_or(0),
        min_p: o.min_p.or(base.as_ref().map(|b| b.min_p)).unwrap_or(0.0),
        max_new_tokens: o.max_new_tokens.or(base.as_ref().map(|b| b.max_new_tokens)).unwrap_or(4096),
        stop: o.stop.clone(),
        ignore_eos: o.ignore_eos,
    };
    sampling_params(&d).validate().map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    if d.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    Ok(d)
}

/// The swept parameters, as named in the manifest and sweep.json.
pub const GRID_AXES: [&str; 4] = ["temperature", "top_p", "top_k", "min_p"];

/// The values swept per parameter; an empty list keeps the model's (or built-in) default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodingGrid {
    pub temperature: Vec<f32>,
    pub top_p: Vec<f32>,
    pub top_k: Vec<usize>,
    pub min_p: Vec<f32>,
}

/// `0.6` stays `0.6`, `1` becomes `1.0`: names read as the flags were written.
fn num(x: f32) -> String {
    if x.fract() == 0.0 { format!("{x:.1}") } else { format!("{x}") }
}

/// The stable, readable name of one configuration.
pub fn config_name(d: &Decoding, with_min_p: bool) -> String {
    let mut s = format!("t{}_p{}_k{}", num(d.temperature), num(d.top_p), d.top_k);
    if with_min_p {
        s.push_str(&format!("_m{}", num(d.min_p)));
    }
    s
}

impl DecodingGrid {
    /// The checks that need no model: each value of each axis once. `bsa sweep` runs them
    /// before it loads the model; [`DecodingGrid::configs`] again.
    pub fn check(&self) -> Result<()> {
        fn no_repeats<T: PartialEq + std::fmt::Display>(flag: &str, v: &[T]) -> Result<()> {
            for (i, x) in v.iter().enumerate() {
                if v[..i].contains(x) {
                    bail!("--{flag} lists {x} twice; give each value once");
                }
            }
            Ok(())
        }
        no_repeats("temperature", &self.temperature)?;
        no_repeats("top-p", &self.top_p)?;
        no_repeats("top-k", &self.top_k)?;
        no_repeats("min-p", &self.min_p)
    }

    /// Every configuration, temperature outermost, in a stable order; `base` supplies the
    /// parameters not swept and max_new_tokens / stop.
    pub fn configs(&self, base: &Decoding) -> Result<Vec<(String, Decoding)>> {
        fn or_base<T: Copy>(v: &[T], b: T) -> Vec<T> {
            if v.is_empty() { vec![b] } else { v.to_vec() }
        }
        self.check()?;
        let with_min_p = !self.min_p.is_empty();
        let mut out = Vec::new();
        for &temperature in &or_base(&self.temperature, base.temperature) {
            for &top_p in &or_base(&self.top_p, base.top_p) {
                for &top_k in &or_base(&self.top_k, base.top_k) {
                    for &min_p in &or_base(&self.min_p, base.min_p) {
                        let d = Decoding { temperature, top_p, top_k, min_p, ..base.clone() };
                        sampling_params(&d).validate().map_err(|e| anyhow::anyhow!("the sweep grid: --{}", e.replace('_', "-")))?;
                        out.push((config_name(&d, with_min_p), d));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The manifest's `decoding` of a sweep: the grid as run (lists where a plain run has
    /// numbers, so a plain `bsa generate` into a sweep's directory is refused, naming the
    /// field) and the configuration names.
    pub fn manifest_entry(&self, base: &Decoding, configs: &[(String, Decoding)]) -> Value {
        let axis = |v: Vec<Value>| Value::Array(v);
        let uniq = |f: &dyn Fn(&Decoding) -> Value| {
            let mut seen = Vec::new();
            for (_, d) in configs {
                let v = f(d);
                if !seen.contains(&v) {
                    seen.push(v);
                }
            }
            axis(seen)
        };
        // f32 as written (0.8, not 0.800000011920929): the manifest is read by people.
        let f = |x: f32| json!(x.to_string().parse::<f64>().unwrap_or(x as f64));
        json!({
            "temperature": uniq(&|d| f(d.temperature)),
            "top_p": uniq(&|d| f(d.top_p)),
            "top_k": uniq(&|d| json!(d.top_k)),
            "min_p": uniq(&|d| f(d.min_p)),
            "configs": configs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            "max_new_tokens": base.max_new_tokens,
            "stop": base.stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Decoding {
        Decoding { temperature: 0.6, top_p: 0.95, top_k: 0, min_p: 0.0, max_new_tokens: 64, stop: vec!["###".into()], ignore_eos: false }
    }

    #[test]
    fn the_grid_expands_in_a_stable_order_with_readable_names() {
        let g = DecodingGrid { temperature: vec![0.2, 1.0], top_p: vec![0.8, 1.0], top_k: vec![0, 20], min_p: vec![] };
        let cs = g.configs(&base()).unwrap();
        let names: Vec<&str> = cs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["t0.2_p0.8_k0", "t0.2_p0.8_k20", "t0.2_p1.0_k0", "t0.2_p1.0_k20", "t1.0_p0.8_k0", "t1.0_p0.8_k20", "t1.0_p1.0_k0", "t1.0_p1.0_k20"]
        );
        let (_, d) = &cs[3];
        assert_eq!((d.temperature, d.top_p, d.top_k, d.min_p, d.max_new_tokens), (0.2, 1.0, 20, 0.0, 64));
        assert_eq!(d.stop, ["###"]);
        // Unswept parameters keep the base value; a min-p axis adds _m to the names.
        let g = DecodingGrid { temperature: vec![0.6], min_p: vec![0.0, 0.05], ..Default::default() };
        let names: Vec<String> = g.configs(&base()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["t0.6_p0.95_k0_m0.0", "t0.6_p0.95_k0_m0.05"]);
        let m = g.manifest_entry(&base(), &g.configs(&base()).unwrap());
        assert_eq!(m["min_p"], json!([0.0, 0.05]));
        assert_eq!(m["top_p"], json!([0.95]));
        assert_eq!(m["configs"][1], "t0.6_p0.95_k0_m0.05");
    }

    #[test]
    fn bad_grids_are_refused_naming_the_flag() {
        let g = DecodingGrid { top_p: vec![0.9, 1.5], ..Default::default() };
        let e = g.configs(&base()).unwrap_err().to_string();
        assert!(e.contains("--top-p") && e.contains("1.5"), "{e}");
        let g = DecodingGrid { top_k: vec![20, 20], ..Default::default() };
        let e = g.configs(&base()).unwrap_err().to_string();
        assert!(e.contains("--top-k lists 20 twice"), "{e}");
    }
}
