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
    let r = draw(&tmp).and_then(|()| {
        if crate::io::abort_due(path) {
            std::process::abort();
        }
        std::fs::rename(&tmp, path).map_err(crate::io::io_err(path))
    });
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

/// Marks at points of a plot, e.g. where a failed run stopped or a step the guards acted on.
pub struct Marks<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// A number's text without trailing zeros after its point (nor a bare point).
fn trim_zeros(t: &str) -> &str {
    if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.')
    } else {
        t
    }
}

/// `v` with `decimals` digits after the point, trailing zeros dropped.
fn fixed(v: f64, decimals: usize) -> String {
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

/// `v` in scientific notation with `digits` mantissa decimals, trailing zeros dropped ("2.5e-4").
fn scientific(v: f64, digits: usize) -> String {
    let t = format!("{v:.digits$e}");
    let (m, e) = t.split_once('e').unwrap_or((&t, "0"));
    format!("{}e{e}", trim_zeros(m))
}

/// A value with four significant digits, trailing zeros dropped.
pub fn sig4(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || !v.is_finite() {
        format!("{v}")
    } else if (1e-3..1e5).contains(&a) {
        fixed(v, (3 - a.log10().floor() as i32).clamp(0, 6) as usize)
    } else {
        scientific(v, 3)
    }
}

/// A tick label on an axis spanning [lo, hi]: as many digits as tell the ticks apart (at most
/// four significant), trailing zeros dropped, scientific notation on an axis of very small or
/// very large values, and "0" for what is zero at the axis's scale (not the -1.355e-20 that
/// rounding leaves).
pub fn tick(v: f64, lo: f64, hi: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let span = (hi - lo).abs();
    let mag = lo.abs().max(hi.abs()).max(v.abs());
    if v == 0.0 || v.abs() < span * 1e-9 {
        return "0".into();
    }
    if (1e-2..1e5).contains(&mag) {
        fixed(v, if span > 0.0 { ((-span.log10()).ceil() + 1.0).clamp(0.0, 6.0) as usize } else { 4 })
    } else {
        // Mantissa digits that the span needs: ticks a tenth of it apart.
        scientific(v, if span > 0.0 { ((mag / span).log10().ceil() + 1.0).clamp(0.0, 3.0) as usize } else { 3 })
    }
}

/// A line plot with a logarithmic y axis when `log_y` and the values span at least a decade
/// (non-positive and non-finite points dropped either way).
pub fn lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> Result<()> {
    lines_marked(path, title, x_label, y_label, series, &[], log_y)
}

/// [`lines`] plus `marks`: a labelled cross at each of their points.
pub fn lines_marked(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], marks: &[Marks], log_y: bool) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let keep = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0);
        let pts: Vec<(f64, f64)> =
            series.iter().flat_map(|s| s.points.iter().filter(keep).copied()).chain(marks.iter().flat_map(|m| m.points.iter().filter(keep).copied())).collect();
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
        // A log axis only where the values span a decade or more: within less, it has no ticks.
        let log_axis = log_y && y1 >= 10.0 * y0;
        let mut b = ChartBuilder::on(&root);
        b.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(40).y_label_area_size(80);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_labels(8)
                    .y_labels(8)
                    .x_label_formatter(&|v| tick(*v, x0, x1))
                    // A log axis's ticks are decades apart: each shows its own digits.
                    .y_label_formatter(&|v| if log_axis { sig4(*v) } else { tick(*v, y0, y1) })
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                for s in series {
                    let data: Vec<(f64, f64)> = s.points.iter().filter(keep).copied().collect();
                    let color = s.color;
                    if data.len() < 40 {
                        chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|x| e(x.to_string()))?;
                    }
                    // A dense noisy series drawn wider than a pixel gets miter spikes that leave
                    // the frame (plotters issue #549): one pixel there.
                    let width = if data.len() > 200 { 1 } else { 2 };
                    chart
                        .draw_series(LineSeries::new(data, color.stroke_width(width)))
                        .map_err(|x| e(x.to_string()))?
                        .label(s.name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                }
                for m in marks {
                    let marked: Vec<(f64, f64)> = m.points.iter().filter(keep).copied().collect();
                    if marked.is_empty() {
                        continue;
                    }
                    let color = m.color;
                    chart
                        .draw_series(marked.iter().map(|&p| Cross::new(p, 8, color.stroke_width(3))))
                        .map_err(|x| e(x.to_string()))?
                        .label(format!("{} ({})", m.name, marked.len()))
                        .legend(move |(x, y)| Cross::new((x + 10, y), 6, color.stroke_width(3)));
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
            }};
        }
        if log_axis {
            // A margin of a tenth of the range's decades on each side, so that no line touches
            // the frame.
            let pad = 10f64.powf(0.1 * (y1.log10() - y0.log10()).max(0.1));
            draw!(b.build_cartesian_2d(x0..x1, (y0 / pad..y1 * pad).log_scale()).map_err(|x| e(x.to_string()))?);
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

/// One cell of a [`heat_map`]: its value in [0, 1] (None: no data) and two lines of text.
pub struct HeatCell {
    pub value: Option<f64>,
    pub text: [String; 2],
}

/// A grid of cells coloured from white (0) to red (1), rows labelled on the left (top row
/// first), columns below; a grey cell has no data.
pub fn heat_map(path: &Path, title: &str, row_label: &str, col_label: &str, rows: &[String], cols: &[String], cells: &[Vec<HeatCell>]) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let (nr, nc) = (rows.len().max(1), cols.len().max(1));
        let root = BitMapBackend::new(target, ((140 + 120 * nc as u32).max(560), 120 + 70 * nr as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..nc as f64, 0.0..nr as f64)
            .map_err(|x| e(x.to_string()))?;
        let col_name = |v: &f64| cols.get(v.floor() as usize).filter(|_| v.fract() > 0.4 && v.fract() < 0.6).cloned().unwrap_or_default();
        // Rows from the top: chart row y = nr - 1 - i.
        let row_name = |v: &f64| {
            let i = nr as isize - 1 - v.floor() as isize;
            rows.get(i as usize).filter(|_| i >= 0 && v.fract() > 0.4 && v.fract() < 0.6).cloned().unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(4 * nc + 1)
            .y_labels(4 * nr + 1)
            .x_label_formatter(&col_name)
            .y_label_formatter(&row_name)
            .x_desc(col_label)
            .y_desc(row_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, row) in cells.iter().enumerate() {
            let y = (nr - 1 - i) as f64;
            for (j, cell) in row.iter().enumerate() {
                let x = j as f64;
                let color = match cell.value {
                    Some(v) => {
                        let v = v.clamp(0.0, 1.0);
                        let mix = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
                        RGBColor(mix(255.0, 214.0), mix(255.0, 39.0), mix(255.0, 40.0))
                    }
                    None => RGBColor(200, 200, 200),
                };
                chart.draw_series(std::iter::once(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled()))).map_err(|x| e(x.to_string()))?;
                chart.draw_series(std::iter::once(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], BLACK.stroke_width(1)))).map_err(|x| e(x.to_string()))?;
                chart
                    .draw_series([
                        Text::new(cell.text[0].clone(), (x + 0.1, y + 0.75), ("sans-serif", 15)),
                        Text::new(cell.text[1].clone(), (x + 0.1, y + 0.4), ("sans-serif", 13)),
                    ])
                    .map_err(|x| e(x.to_string()))?;
            }
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}

/// One image of [`image_grid`].
pub struct Panel<'a> {
    pub name: String,
    pub image: &'a Canvas,
    /// The values mapped to black and white; None: the image's own [min, max].
    pub range: Option<(f64, f64)>,
    /// A blue-white-red scale (for signed errors) instead of grey levels.
    pub diverging: bool,
}

impl<'a> Panel<'a> {
    pub fn new(name: impl Into<String>, image: &'a Canvas, range: Option<(f64, f64)>) -> Panel<'a> {
        Panel { name: name.into(), image, range, diverging: false }
    }
}

/// The [min, max] of the finite values of several images (a shared colour range).
pub fn range_of(images: &[&Canvas]) -> Option<(f64, f64)> {
    let (lo, hi) = images.iter().flat_map(|c| c.data.iter()).filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    (lo <= hi).then_some((lo, hi))
}

/// A panel's label: its name and the values its colours span.
fn panel_label(p: &Panel) -> (String, (f64, f64)) {
    let (lo, hi) = p.range.or_else(|| range_of(&[p.image])).unwrap_or((0.0, 1.0));
    (format!("{} [{}, {}]", p.name, sig4(lo), sig4(hi)), (lo, hi))
}

/// Rows of images, each labelled with the range its colours span, under a title (lines
/// separated by '\n').
pub fn image_grid(path: &Path, title: &str, rows: &[Vec<Panel>]) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let largest = rows.iter().flatten().map(|p| p.image.rows.max(p.image.cols)).max().unwrap_or(1).max(1);
        // Small patches are drawn larger; a panel is as wide as its label (about 7.5 pixels a
        // character at 14 points).
        let scale = (320 / largest).clamp(1, 8) as u32;
        let text_w = |t: &str, pt: f64| (t.chars().count() as f64 * pt * 0.55) as u32;
        let cell_w = |p: &Panel| (p.image.cols as u32 * scale).max(text_w(&panel_label(p).0, 14.0)) + 20;
        let lines: Vec<&str> = title.lines().collect();
        let title_w = lines.iter().map(|l| text_w(l, 18.0)).max().unwrap_or(0);
        // Columns line up: each as wide as its widest panel.
        let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
        let col_w: Vec<u32> = (0..columns).map(|j| rows.iter().filter_map(|r| r.get(j)).map(cell_w).max().unwrap_or(0)).collect();
        let w: u32 = col_w.iter().sum::<u32>().max(title_w) + 40;
        let row_h = |r: &Vec<Panel>| r.iter().map(|p| p.image.rows as u32 * scale).max().unwrap_or(0) + 40;
        let top = 16 + 24 * lines.len() as u32;
        let h: u32 = rows.iter().map(row_h).sum::<u32>() + top;
        let root = BitMapBackend::new(target, (w.max(300), h.max(120))).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        for (i, l) in lines.iter().enumerate() {
            root.draw(&Text::new(l.to_string(), (20, 10 + 24 * i as i32), ("sans-serif", 18))).map_err(|x| e(x.to_string()))?;
        }
        let mut y0 = top as i32;
        for row in rows {
            let mut x0 = 20i32;
            for (j, p) in row.iter().enumerate() {
                let c = p.image;
                let (label, (lo, hi)) = panel_label(p);
                let span = if hi > lo { hi - lo } else { 1.0 };
                root.draw(&Text::new(label, (x0, y0), ("sans-serif", 14))).map_err(|x| e(x.to_string()))?;
                for r in 0..c.rows {
                    for col in 0..c.cols {
                        let v = c.data[r * c.cols + col];
                        let t = if v.is_finite() { ((v - lo) / span).clamp(0.0, 1.0) } else { 0.0 };
                        let px = if p.diverging {
                            // Blue at 0, white at 0.5, red at 1.
                            let fade = |u: f64| (255.0 * u).round() as u8;
                            if t < 0.5 {
                                RGBColor(fade(2.0 * t), fade(2.0 * t), 255)
                            } else {
                                RGBColor(255, fade(2.0 - 2.0 * t), fade(2.0 - 2.0 * t))
                            }
                        } else {
                            let g = (t * 255.0).round() as u8;
                            RGBColor(g, g, g)
                        };
                        let (px0, py0) = (x0 + (col as u32 * scale) as i32, y0 + 22 + (r as u32 * scale) as i32);
                        root.draw(&Rectangle::new([(px0, py0), (px0 + scale as i32, py0 + scale as i32)], px.filled())).map_err(|x| e(x.to_string()))?;
                    }
                }
                x0 += col_w[j] as i32;
            }
            y0 += row_h(row) as i32;
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}

/// Rows (named, top first) of values over steps, each a log10 ratio to the row's own baseline:
/// white at 0, red above, blue below, saturated at two decades (dark red: non-finite), grey where
/// there is none; a black line before the `mark` step's column.
pub fn step_heat_map(path: &Path, title: &str, rows: &[(String, Vec<Option<f64>>)], steps: &[u64], mark: Option<u64>) -> Result<()> {
    atomically(path, |target| {
        fonts();
        let e = plot_err(path);
        let (nr, nc) = (rows.len().max(1), steps.len().max(1));
        let root = BitMapBackend::new(target, (260 + (10 * nc as u32).max(640), 110 + 26 * nr as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let (s0, s1) = (steps.first().copied().unwrap_or(0) as f64, steps.last().copied().unwrap_or(0) as f64 + 1.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(220)
            .build_cartesian_2d(s0..s1, 0.0..nr as f64)
            .map_err(|x| e(x.to_string()))?;
        let row_name = |v: &f64| {
            let i = nr as isize - 1 - v.floor() as isize;
            rows.get(i as usize).filter(|_| i >= 0 && v.fract() > 0.4 && v.fract() < 0.6).map(|r| r.0.clone()).unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(10)
            .x_label_formatter(&|v| format!("{}", v.floor()))
            .y_labels(4 * nr + 1)
            .y_label_formatter(&row_name)
            .x_desc("step")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        for (i, (_, values)) in rows.iter().enumerate() {
            let y = (nr - 1 - i) as f64;
            for (&s, v) in steps.iter().zip(values) {
                let color = match v {
                    None => RGBColor(200, 200, 200),
                    Some(v) if !v.is_finite() => RGBColor(103, 0, 13),
                    Some(v) => {
                        let t = (v / 2.0).clamp(-1.0, 1.0);
                        let mix = |a: f64, b: f64| (a + (b - a) * t.abs()).round() as u8;
                        if t >= 0.0 {
                            RGBColor(mix(255.0, 214.0), mix(255.0, 39.0), mix(255.0, 40.0))
                        } else {
                            RGBColor(mix(255.0, 31.0), mix(255.0, 119.0), mix(255.0, 180.0))
                        }
                    }
                };
                let x = s as f64;
                chart.draw_series(std::iter::once(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled()))).map_err(|x| e(x.to_string()))?;
            }
        }
        if let Some(m) = mark {
            let x = m as f64;
            chart.draw_series(std::iter::once(PathElement::new(vec![(x, 0.0), (x, nr as f64)], BLACK.stroke_width(2)))).map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::{sig4, tick};

    #[test]
    fn ticks_are_short_and_zero_is_zero() {
        assert_eq!(tick(-1.355e-20, 0.0, 1e-3), "0");
        assert_eq!(tick(1e-3, 5e-4, 1e-3), "1e-3");
        assert_eq!(tick(7.5e-4, 5e-4, 1e-3), "7.5e-4");
        assert_eq!(tick(0.885, 0.88, 0.93), "0.885");
        assert_eq!(tick(10.0, 0.0, 24.0), "10");
        assert_eq!(tick(150000.0, 0.0, 200000.0), "1.5e5");
        assert_eq!(sig4(3.15432), "3.154");
        assert_eq!(sig4(-0.2697), "-0.2697");
        assert_eq!(sig4(1.25e-5), "1.25e-5");
    }
}
