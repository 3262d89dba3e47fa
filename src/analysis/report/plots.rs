//! The report's figures as SVG text, drawn with plotters' SVG backend: the Safe@1 vs
//! Think@1 scatter (the paper's headline figure), bars with intervals, and heatmaps (risk
//! category x metric, decoding sweeps). Values are percentages.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::analysis::metrics::Interval;
use crate::analysis::reference::ReferenceRow;

const FONT: &str = "sans-serif";

/// Colours that stay distinguishable for the first few runs (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot failed: {e:?}")
}

/// One point of the scatter: a run or one decoding configuration of a run.
#[derive(Debug, Clone)]
pub struct ScatterPoint {
    pub label: String,
    /// Points of one run share a colour.
    pub series: usize,
    pub safe_at_1: f64,
    pub think_at_1: f64,
    pub safe_interval: Interval,
    pub think_interval: Interval,
}

/// Safe@1 (x) against Think@1 (y) with interval whiskers. Points below the diagonal are
/// safer than their reasoning: the distance down to it is the SSA gap. With `numbered`,
/// points carry their 1-based index instead of their label (the report lists the key).
/// `reference` rows (published results) are drawn as grey crosses with their names.
pub fn ssa_scatter(points: &[ScatterPoint], numbered: bool, reference: &[ReferenceRow]) -> Result<String> {
    draw_scatter(points, numbered, ([0.0, 100.0], [0.0, 100.0]), "Safe@1 vs Think@1 (the SSA gap is the drop below the diagonal)", reference)
}

/// The axis ranges that frame the points and their intervals (in steps of 5), or None
/// when they already spread over much of the full range, where a zoom adds nothing.
pub fn scatter_zoom(points: &[ScatterPoint]) -> Option<([f64; 2], [f64; 2])> {
    let extent = |vals: Vec<f64>| -> Option<[f64; 2]> {
        let v: Vec<f64> = vals.into_iter().filter(|x| !x.is_nan()).collect();
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if v.is_empty() || hi - lo > 40.0 {
            return None;
        }
        let lo = ((lo - 1.0) / 5.0).floor() * 5.0;
        let hi = ((hi + 1.0) / 5.0).ceil() * 5.0;
        Some([lo.max(0.0), hi.min(100.0).max(lo + 5.0)])
    };
    if points.len() < 2 {
        return None;
    }
    let xs = extent(points.iter().flat_map(|p| [p.safe_at_1, p.safe_interval[0], p.safe_interval[1]]).collect())?;
    let ys = extent(points.iter().flat_map(|p| [p.think_at_1, p.think_interval[0], p.think_interval[1]]).collect())?;
    Some((xs, ys))
}

/// The scatter over the given ranges, e.g. those of [`scatter_zoom`]; only the reference
/// rows inside them are drawn.
pub fn ssa_scatter_zoomed(points: &[ScatterPoint], numbered: bool, range: ([f64; 2], [f64; 2]), reference: &[ReferenceRow]) -> Result<String> {
    let inside: Vec<ReferenceRow> = reference
        .iter()
        .filter(|r| (range.0[0]..=range.0[1]).contains(&r.safe_at_1) && (range.1[0]..=range.1[1]).contains(&r.think_at_1))
        .copied()
        .collect();
    draw_scatter(points, numbered, range, "Safe@1 vs Think@1, zoomed to the points", &inside)
}

fn draw_scatter(points: &[ScatterPoint], numbered: bool, (xr, yr): ([f64; 2], [f64; 2]), title: &str, reference: &[ReferenceRow]) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (640, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(xr[0]..xr[1], yr[0]..yr[1])
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("Safe@1 (%)")
            .y_desc("Think@1 (%)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 14))
            .light_line_style(RGBColor(248, 248, 248))
            .bold_line_style(RGBColor(220, 220, 220))
            .draw()
            .map_err(err)?;
        let grey = RGBColor(150, 150, 150);
        // The diagonal Think@1 = Safe@1, where it crosses the frame.
        let (d0, d1) = (xr[0].max(yr[0]), xr[1].min(yr[1]));
        if d0 < d1 {
            chart.draw_series(std::iter::once(PathElement::new(vec![(d0, d0), (d1, d1)], grey.stroke_width(1)))).map_err(err)?;
            let at = d0 + 0.72 * (d1 - d0);
            let lift = 0.04 * (yr[1] - yr[0]);
            chart
                .draw_series(std::iter::once(Text::new(
                    "Think@1 = Safe@1",
                    (at, at + lift),
                    // Above the diagonal, where models rarely are (thinking better than answers).
                    (FONT, 13).into_font().color(&grey).pos(Pos::new(HPos::Right, VPos::Bottom)),
                )))
                .map_err(err)?;
        }
        // Published results under the runs' points, in grey, so the runs stay in front.
        let ref_grey = RGBColor(120, 120, 120);
        chart.draw_series(reference.iter().map(|r| Cross::new((r.safe_at_1, r.think_at_1), 5, ref_grey.stroke_width(2)))).map_err(err)?;
        for r in reference {
            let (dx, anchor) = if r.safe_at_1 > 55.0 { (-8, HPos::Right) } else { (8, HPos::Left) };
            let font = (FONT, 11).into_font().color(&ref_grey).pos(Pos::new(anchor, VPos::Center));
            chart.draw_series(std::iter::once(EmptyElement::at((r.safe_at_1, r.think_at_1)) + Text::new(r.model.to_string(), (dx, 0), font))).map_err(err)?;
        }
        if !reference.is_empty() {
            let (px, py) = chart.backend_coord(&(xr[0], yr[1]));
            let font = (FONT, 12).into_font().color(&ref_grey).pos(Pos::new(HPos::Left, VPos::Top));
            root.draw(&Text::new("x = published (the paper's leaderboard)", (px + 8, py + 6), font)).map_err(err)?;
        }
        let shown: Vec<(usize, &ScatterPoint)> = points.iter().enumerate().filter(|(_, p)| !p.safe_at_1.is_nan() && !p.think_at_1.is_nan()).collect();
        for (_, p) in &shown {
            let c = colour(p.series).mix(0.6).stroke_width(1);
            let (x, y) = (p.safe_at_1, p.think_at_1);
            let mut whiskers = Vec::new();
            if !p.safe_interval[0].is_nan() {
                whiskers.push(PathElement::new(vec![(p.safe_interval[0], y), (p.safe_interval[1], y)], c));
            }
            if !p.think_interval[0].is_nan() {
                whiskers.push(PathElement::new(vec![(x, p.think_interval[0]), (x, p.think_interval[1])], c));
            }
            chart.draw_series(whiskers).map_err(err)?;
        }
        chart.draw_series(shown.iter().map(|(_, p)| Circle::new((p.safe_at_1, p.think_at_1), 5, colour(p.series).filled()))).map_err(err)?;
        // Labels last, so that no point covers another point's label.
        for (i, p) in &shown {
            let text = if numbered { (i + 1).to_string() } else { p.label.clone() };
            // Labels of points on the right half go to their left, so they stay inside.
            let (dx, anchor) = if p.safe_at_1 > 55.0 { (-7, HPos::Right) } else { (7, HPos::Left) };
            let font = (FONT, 13).into_font().color(&BLACK).pos(Pos::new(anchor, VPos::Bottom));
            chart.draw_series(std::iter::once(EmptyElement::at((p.safe_at_1, p.think_at_1)) + Text::new(text, (dx, -3), font))).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// One bar series: a value and its interval per group.
#[derive(Debug, Clone)]
pub struct BarSeries {
    pub name: String,
    pub series: usize,
    pub values: Vec<(f64, Interval)>,
}

/// Grouped bars (one group per entry of `groups`, one bar per series) with interval
/// whiskers, on a 0-100 axis; the legend sits to the right of the plot, clear of the bars.
pub fn bars_with_intervals(title: &str, y_desc: &str, groups: &[String], series: &[BarSeries]) -> Result<String> {
    let ng = groups.len().max(1);
    let ns = series.len().max(1);
    // Wide enough for the bars, for every group's label side by side (about 7 px a
    // character at 14 px) and for the title (about 9 px a character at 18 px).
    let label_chars = groups.iter().map(|g| g.chars().count()).max().unwrap_or(1);
    let plot_w = (120 + ng * ns * 26).max(90 + ng * (label_chars * 7 + 12)).max(40 + title.chars().count() * 9).clamp(420, 1400) as u32;
    let legend_w = (series.iter().map(|s| s.name.len()).max().unwrap_or(4) as u32 * 7 + 44).min(360);
    let height = 420u32.max(90 + 20 * ns as u32);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (plot_w + legend_w, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(plot_w);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, (FONT, 18))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5f64..(ng as f64 - 0.5), 0f64..105f64)
            .map_err(err)?;
        let names = groups.to_vec();
        let label = move |x: &f64| {
            let r = x.round();
            if (x - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < names.len() { names[r as usize].clone() } else { String::new() }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(ng)
            .x_label_formatter(&label)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(err)?;
        let slot = 0.8 / ns as f64;
        for (si, s) in series.iter().enumerate() {
            let c = colour(s.series);
            let mut bars = Vec::new();
            let mut whiskers = Vec::new();
            for (g, (v, iv)) in s.values.iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                let x0 = g as f64 - 0.4 + si as f64 * slot;
                let x1 = x0 + slot * 0.9;
                bars.push(Rectangle::new([(x0, 0.0), (x1, *v)], c.filled()));
                if !iv[0].is_nan() {
                    let xm = (x0 + x1) / 2.0;
                    let cap = slot * 0.2;
                    whiskers.push(PathElement::new(vec![(xm, iv[0]), (xm, iv[1])], BLACK.stroke_width(1)));
                    whiskers.push(PathElement::new(vec![(xm - cap, iv[0]), (xm + cap, iv[0])], BLACK.stroke_width(1)));
                    whiskers.push(PathElement::new(vec![(xm - cap, iv[1]), (xm + cap, iv[1])], BLACK.stroke_width(1)));
                }
            }
            chart.draw_series(bars).map_err(err)?;
            chart.draw_series(whiskers).map_err(err)?;
        }
        for (si, s) in series.iter().enumerate() {
            let y = 56 + 20 * si as i32;
            right.draw(&Rectangle::new([(4, y - 6), (18, y + 6)], colour(s.series).filled())).map_err(err)?;
            let font = (FONT, 13).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
            right.draw(&Text::new(s.name.clone(), (24, y), font)).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// A red (0) - yellow (50) - green (100) scale: higher is better for every BSA metric.
pub fn heat_colour(v: f64) -> RGBColor {
    if v.is_nan() {
        return RGBColor(230, 230, 230);
    }
    let t = (v / 100.0).clamp(0.0, 1.0);
    let lerp = |a: (f64, f64, f64), b: (f64, f64, f64), u: f64| {
        RGBColor((a.0 + (b.0 - a.0) * u) as u8, (a.1 + (b.1 - a.1) * u) as u8, (a.2 + (b.2 - a.2) * u) as u8)
    };
    let (red, yellow, green) = ((215.0, 48.0, 39.0), (254.0, 224.0, 139.0), (26.0, 152.0, 80.0));
    if t < 0.5 { lerp(red, yellow, t * 2.0) } else { lerp(yellow, green, (t - 0.5) * 2.0) }
}

fn luminance(c: RGBColor) -> f64 {
    (0.2126 * c.0 as f64 + 0.7152 * c.1 as f64 + 0.0722 * c.2 as f64) / 255.0
}

/// A heatmap of `values[row][column]` (percent), each cell annotated with its value.
pub fn heatmap(title: &str, columns: &[String], rows: &[String], values: &[Vec<f64>], x_desc: &str, y_desc: &str) -> Result<String> {
    let nx = columns.len().max(1);
    let ny = rows.len().max(1);
    let row_label_px = rows.iter().map(|r| r.len()).max().unwrap_or(4) as u32 * 6 + 24;
    let cell_w = 64u32;
    let cell_h = 30u32;
    let width = (row_label_px + 40 + cell_w * nx as u32).max(title.len() as u32 * 8 + 20).max(360);
    let height = 110 + cell_h * ny as u32;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        // Plain f64 cells; the row and column labels are placed by hand at the cell
        // centres, which (unlike plotters' segmented axes) also works for a single row.
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 16))
            .margin(10)
            .x_label_area_size(if x_desc.is_empty() { 26 } else { 44 })
            .y_label_area_size(row_label_px + if y_desc.is_empty() { 0 } else { 18 })
            .build_cartesian_2d(0f64..nx as f64, 0f64..ny as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(0)
            .y_labels(0)
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style((FONT, 13))
            .draw()
            .map_err(err)?;
        let mut cells = Vec::new();
        let mut texts = Vec::new();
        for (r, row) in values.iter().enumerate() {
            // Row 0 is drawn at the top, as tables read.
            let y = (ny - 1 - r) as f64;
            for (x, v) in row.iter().enumerate() {
                let x = x as f64;
                cells.push(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], heat_colour(*v).filled()));
                let text = if v.is_nan() { "n/a".to_string() } else { format!("{v:.1}") };
                let ink = if luminance(heat_colour(*v)) < 0.45 { WHITE } else { BLACK };
                let font = (FONT, 14).into_font().color(&ink).pos(Pos::new(HPos::Center, VPos::Center));
                texts.push(Text::new(text, (x + 0.5, y + 0.5), font));
            }
        }
        chart.draw_series(cells).map_err(err)?;
        chart.draw_series(texts).map_err(err)?;
        let label_font = (FONT, 13).into_font().color(&BLACK);
        for (i, c) in columns.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(c.clone(), (px, py + 6), label_font.clone().pos(Pos::new(HPos::Center, VPos::Top)))).map_err(err)?;
        }
        for (r, name) in rows.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(0.0, (ny - 1 - r) as f64 + 0.5));
            root.draw(&Text::new(name.clone(), (px - 6, py), label_font.clone().pos(Pos::new(HPos::Right, VPos::Center)))).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_scale_runs_red_to_green() {
        assert_eq!(heat_colour(0.0), RGBColor(215, 48, 39));
        assert_eq!(heat_colour(100.0), RGBColor(26, 152, 80));
        assert_eq!(heat_colour(f64::NAN), RGBColor(230, 230, 230));
    }

    #[test]
    fn heatmap_draws_one_cell_per_value() {
        let svg = heatmap("t", &["a".into(), "b".into()], &["r1".into(), "r2".into(), "r3".into()], &vec![vec![10.0, 90.0]; 3], "", "").unwrap();
        assert_eq!(svg.matches("<rect").count() - 1, 6, "{svg}"); // minus the background
        assert!(svg.contains("\n90.0\n") && svg.contains("\nr3\n") && svg.contains("\nb\n"), "values and labels: {svg}");
    }
}
