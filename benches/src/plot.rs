//! SVG charts of a [`Report`](crate::report::Report)'s [`Chart`]s, drawn with plotters.

use std::io;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::Chart;

/// A fixed palette, one colour per series in order of first appearance.
const COLOURS: [RGBColor; 10] = [
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

/// Draws `chart` as a grouped bar chart into `dir/<name>.svg` and returns the path.
///
/// # Errors
///
/// When the directory cannot be created or the file written.
pub fn draw(chart: &Chart, dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.svg", chart.name));
    let mut series: Vec<String> = Vec::new();
    for (_, bars) in &chart.groups {
        for (s, _) in bars {
            if !series.contains(s) {
                series.push(s.clone());
            }
        }
    }
    let top = chart
        .groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|b| b.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let groups = chart.groups.len().max(1);
    let width = (160 + groups * (series.len().max(1) * 18 + 30)).max(640) as u32;
    let root = SVGBackend::new(&path, (width, 420)).into_drawing_area();
    let draw_err = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, 0f64..top)
        .map_err(|e| draw_err(&e))?;
    let labels: Vec<String> = chart.groups.iter().map(|g| g.0.clone()).collect();
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            labels.get(i).cloned().unwrap_or_default()
        })
        .y_desc(&chart.y_label)
        .draw()
        .map_err(|e| draw_err(&e))?;
    let slot = 0.8 / series.len().max(1) as f64;
    for (si, name) in series.iter().enumerate() {
        let colour = COLOURS[si % COLOURS.len()];
        let bars = chart
            .groups
            .iter()
            .enumerate()
            .filter_map(|(gi, (_, bars))| {
                let v = bars.iter().find(|b| &b.0 == name)?.1;
                let x0 = gi as f64 + 0.1 + si as f64 * slot;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + slot * 0.9, v.max(0.0))],
                    colour.filled(),
                ))
            });
        ctx.draw_series(bars)
            .map_err(|e| draw_err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    drop(ctx);
    drop(root);
    Ok(path)
}
