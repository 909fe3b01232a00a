//! PNG plots of a run: curves (loss, validation loss, gradient norm, learning rate) and the
//! reconstruction beside the ground truth. Text is drawn with the embedded DejaVu Sans.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::eval::Canvas;

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid font compiled into the binary; a failure would only lose labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws into a temporary file beside `path` and renames it into place, so that no reader (or a
/// kill) ever leaves a half-written PNG.
fn atomically(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = crate::io::temp_path(path)?;
    let r = draw(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(crate::io::io_err(path)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |why| Error::BadFile { path: path.display().to_string(), why: format!("cannot draw the plot: {why}") }
}

/// One named series of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// A line plot with a logarithmic y axis when `log_y` (non-positive and non-finite points dropped).
pub fn lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> Result<()> {
    lines_marked(path, title, x_label, y_label, series, &[], log_y)
}

/// [`lines`] plus `marks`: a labelled red cross at each point (e.g. where a failed run stopped).
pub fn lines_marked(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], marks: &[(f64, f64)], log_y: bool) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let keep = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0);
        let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().filter(keep).copied()).chain(marks.iter().filter(keep).copied()).collect();
        let root = BitMapBackend::new(target, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        if pts.is_empty() {
            root.titled(&format!("{title} (no finite data)"), ("sans-serif", 22)).map_err(|x| e(x.to_string()))?;
            return root.present().map_err(|x| e(x.to_string()));
        }
        let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        let (y0, y1) = if y1 > y0 { (y0, y1) } else { (y0 - 0.5 * y0.abs().max(1e-12), y1 + 0.5 * y1.abs().max(1e-12)) };
        let mut b = ChartBuilder::on(&root);
        b.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(80);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .y_label_formatter(&|v| format!("{v:.3e}"))
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                for s in series {
                    let data: Vec<(f64, f64)> = s.points.iter().filter(keep).copied().collect();
                    let color = s.color;
                    if data.len() < 40 {
                        chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|x| e(x.to_string()))?;
                    }
                    chart
                        .draw_series(LineSeries::new(data, color.stroke_width(2)))
                        .map_err(|x| e(x.to_string()))?
                        .label(s.name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                }
                let marked: Vec<(f64, f64)> = marks.iter().filter(keep).copied().collect();
                if !marked.is_empty() {
                    let red = RGBColor(214, 39, 40);
                    chart
                        .draw_series(marked.iter().map(|&p| Cross::new(p, 8, red.stroke_width(3))))
                        .map_err(|x| e(x.to_string()))?
                        .label("failed run (where it stopped)")
                        .legend(move |(x, y)| Cross::new((x + 10, y), 6, red.stroke_width(3)));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
            }};
        }
        if log_y {
            draw!(b.build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale()).map_err(|x| e(x.to_string()))?);
        } else {
            let pad = 0.05 * (y1 - y0);
            draw!(b.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad)).map_err(|x| e(x.to_string()))?);
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}

/// A bar chart of named values in [0, 1] (e.g. a crash probability), each bar labelled with
/// its name and `label` above it.
pub fn bars(path: &Path, title: &str, y_label: &str, bars: &[(String, f64, String)]) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let root = BitMapBackend::new(target, (160 + 110 * bars.len().max(1) as u32, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let n = bars.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n, 0.0..1.1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|_| String::new())
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let blue = RGBColor(31, 119, 180);
        let red = RGBColor(214, 39, 40);
        for (i, (name, v, label)) in bars.iter().enumerate() {
            let x = i as f64;
            let color = if *v > 0.0 { red } else { blue };
            chart.draw_series(std::iter::once(Rectangle::new([(x + 0.2, 0.0), (x + 0.8, v.clamp(0.0, 1.0))], color.filled()))).map_err(|x| e(x.to_string()))?;
            chart
                .draw_series([
                    Text::new(name.clone(), (x + 0.15, v.clamp(0.0, 1.0) + 0.09), ("sans-serif", 14)),
                    Text::new(label.clone(), (x + 0.15, v.clamp(0.0, 1.0) + 0.045), ("sans-serif", 14)),
                ])
                .map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}

/// Images side by side in grey levels, each scaled to its own [min, max], with titles.
pub fn images(path: &Path, title: &str, panels: &[(&str, &Canvas)]) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let scale = 2u32;
        let w: u32 = panels.iter().map(|(_, c)| c.cols as u32 * scale + 20).sum::<u32>() + 20;
        let h: u32 = panels.iter().map(|(_, c)| c.rows as u32 * scale).max().unwrap_or(0) + 90;
        let root = BitMapBackend::new(target, (w.max(200), h.max(120))).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        root.draw(&Text::new(title.to_string(), (20, 10), ("sans-serif", 20))).map_err(|x| e(x.to_string()))?;
        let mut x0 = 20i32;
        for (name, c) in panels {
            let (lo, hi) = c.data.iter().filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let span = if hi > lo { hi - lo } else { 1.0 };
            root.draw(&Text::new(format!("{name} [{lo:.3}, {hi:.3}]"), (x0, 40), ("sans-serif", 14))).map_err(|x| e(x.to_string()))?;
            for r in 0..c.rows {
                for col in 0..c.cols {
                    let v = c.data[r * c.cols + col];
                    let g = if v.is_finite() { (((v - lo) / span) * 255.0).round().clamp(0.0, 255.0) as u8 } else { 0 };
                    let px = RGBColor(g, g, g);
                    for dy in 0..scale {
                        for dx in 0..scale {
                            root.draw_pixel((x0 + (col as u32 * scale + dx) as i32, 65 + (r as u32 * scale + dy) as i32), &px).map_err(|x| e(x.to_string()))?;
                        }
                    }
                }
            }
            x0 += c.cols as i32 * scale as i32 + 20;
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}
