//! The autopsy's verdict and files: which part's quantity left its baseline first, and when
//! the loss moved; autopsy.json, verdict.txt and the plots.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use super::{Header, StepRecord};
use crate::error::{Error, Result};
use crate::train::plot::{self, sig4, Marks, Series};

/// One quantity of one part leaving its baseline.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Departure {
    pub part: String,
    pub quantity: String,
    pub step: u64,
    pub value: f64,
    /// Its median over the calm steps.
    pub baseline: f64,
    /// value / baseline (inf: non-finite).
    pub ratio: f64,
}

impl Departure {
    /// "the <quantity> of <part> at step S (value, ratio x its median m)".
    pub fn describe(&self) -> String {
        let how = if !self.value.is_finite() { "non-finite".to_string() } else { format!("{}x its median {}", sig4(self.ratio), sig4(self.baseline)) };
        format!("the {} of {} at step {} ({}, {how})", self.quantity, self.part, self.step, sig4(self.value))
    }

    /// How far it left, in decades either way.
    fn distance(&self) -> f64 {
        if self.ratio.is_finite() {
            self.ratio.log10().abs()
        } else {
            f64::INFINITY
        }
    }
}

/// What the autopsy concludes.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Verdict {
    /// The calm steps whose medians are the baselines (both included).
    pub baseline_steps: (u64, u64),
    /// The first step whose loss is over factor x the median before it: (step, loss, median).
    pub loss_moved: Option<(u64, f64, f64)>,
    /// Every quantity that left its baseline, earliest first (then the farthest).
    pub departures: Vec<Departure>,
    /// The verdict in one line.
    pub line: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// One judged quantity: (part index, its name) and its value at each record (None: not measured).
type Quantity = ((usize, String), Vec<Option<f64>>);

/// The quantity whose harmful direction is down (a smaller sqrt(v) makes Adam's steps larger);
/// every other one leaves its baseline upwards.
const FALLING: &str = "smallest sqrt(v)";

/// The quantities the verdict judges, per part: the gradient norm before clipping, the update
/// ratio, the smallest sqrt(v), and the RMS and largest magnitude of each noted activation.
fn quantities(parts: usize, records: &[StepRecord]) -> Vec<Quantity> {
    let mut out: Vec<Quantity> = Vec::new();
    let per_part =
        |f: &dyn Fn(&StepRecord, usize) -> Option<f64>| -> Vec<Vec<Option<f64>>> { (0..parts).map(|p| records.iter().map(|r| f(r, p)).collect()).collect() };
    let sum_sq = |r: &StepRecord, p: usize, v: &dyn Fn(&super::ParamStat) -> Option<f64>| -> Option<f64> {
        r.params.iter().filter(|s| s.part == p).map(|s| v(s).map(|x| x * x)).sum::<Option<f64>>()
    };
    let grad = per_part(&|r, p| sum_sq(r, p, &|s| s.grad_norm).map(f64::sqrt));
    let update = per_part(&|r, p| {
        let d = sum_sq(r, p, &|s| s.update_ratio.map(|u| u * s.weight_norm))?;
        let w = sum_sq(r, p, &|s| Some(s.weight_norm))?;
        (w > 0.0).then(|| (d / w).sqrt())
    });
    let sqrt_v = per_part(&|r, p| r.params.iter().filter(|s| s.part == p).filter_map(|s| s.sqrt_v_min).reduce(f64::min));
    for (name, series) in [("gradient norm", grad), ("update ratio", update), (FALLING, sqrt_v)] {
        for (p, v) in series.into_iter().enumerate() {
            if v.iter().any(Option::is_some) {
                out.push(((p, name.to_string()), v));
            }
        }
    }
    let mut kinds: Vec<(usize, String)> = records.iter().flat_map(|r| r.activations.iter().map(|a| (a.part, a.what.clone()))).collect();
    kinds.sort();
    kinds.dedup();
    for (p, what) in kinds {
        let find = |r: &StepRecord| r.activations.iter().find(|a| a.part == p && a.what == what).cloned();
        out.push(((p, format!("{what} RMS")), records.iter().map(|r| find(r).map(|a| a.rms)).collect()));
        out.push(((p, format!("{what} largest |x|")), records.iter().map(|r| find(r).map(|a| a.max_abs)).collect()));
    }
    out
}

/// The verdict on the recorded steps (`factor`: how far a quantity or the loss must go; at most
/// `baseline_steps` calm steps make the baselines).
pub fn judge(header: &Header, records: &[StepRecord], factor: f64, baseline_steps: usize) -> Result<Verdict> {
    if records.len() < 4 {
        return Err(Error::invalid("autopsy", "a window of at least 4 steps is needed (3 calm ones make the baselines)"));
    }
    // The loss moves at the first step over factor x the median of the calm steps before it.
    let loss: Vec<f64> = records.iter().map(|r| r.loss.unwrap_or(f64::NAN)).collect();
    let mut moved = None;
    for k in 3..records.len() {
        let Some(m) = median(loss[..k.min(baseline_steps)].to_vec()) else { continue };
        if !loss[k].is_finite() || loss[k] > factor * m {
            moved = Some((k, m));
            break;
        }
    }
    // The baselines come from the first half of the steps before the loss moved (at most
    // `baseline_steps`), so that a quantity that left before the loss did is judged, not averaged in.
    let calm = moved.map_or(baseline_steps, |(k, _)| (k / 2).max(3).min(baseline_steps)).min(records.len());
    let mut departures = Vec::new();
    for ((p, quantity), values) in quantities(header.parts.len(), records) {
        let base: Vec<f64> = values[..calm].iter().flatten().copied().filter(|v| *v > 0.0).collect();
        if base.len() < 2 {
            continue;
        }
        let Some(b) = median(base) else { continue };
        let falling = quantity == FALLING;
        let left = values.iter().enumerate().skip(calm).find_map(|(k, v)| {
            let v = (*v)?;
            (!v.is_finite() || if falling { v < b / factor } else { v > factor * b }).then_some((k, v))
        });
        if let Some((k, v)) = left {
            let part = header.parts.get(p).cloned().unwrap_or_else(|| format!("part {p}"));
            departures.push(Departure {
                part,
                quantity,
                step: records[k].step,
                value: v,
                baseline: b,
                ratio: if v.is_finite() { v / b } else { f64::INFINITY },
            });
        }
    }
    departures.sort_by(|x, y| x.step.cmp(&y.step).then(y.distance().total_cmp(&x.distance())));
    let loss_moved = moved.map(|(k, m)| (records[k].step, loss[k], m));
    let line = verdict_line(&departures, loss_moved, factor, (records[0].step, records[calm - 1].step));
    Ok(Verdict { baseline_steps: (records[0].step, records[calm - 1].step), loss_moved, departures, line })
}

fn verdict_line(departures: &[Departure], moved: Option<(u64, f64, f64)>, factor: f64, calm: (u64, u64)) -> String {
    let base = format!("baselines: medians over steps {}-{}, factor {factor}", calm.0, calm.1);
    let first = departures.first();
    match (moved, first) {
        (None, None) => format!("nothing left its baseline and the loss did not move ({base})"),
        (None, Some(d)) => format!("the loss did not move by {factor}x; first to leave its baseline: {} ({base})", d.describe()),
        (Some((s, l, m)), first) => {
            let loss = format!("the loss moved at step {s} ({}, {}x its median {})", sig4(l), sig4(l / m), sig4(m));
            match first.filter(|d| d.step <= s) {
                None => format!("nothing left its baseline before {loss} ({base})"),
                Some(d) if d.step == s => format!("first to leave its baseline: {}, at the step {loss} ({base})", d.describe()),
                Some(d) => format!("first to leave its baseline: {}, {} step(s) before {loss} ({base})", d.describe(), s - d.step),
            }
        }
    }
}

/// autopsy.json, verdict.txt and the plots in `out`.
pub fn write(out: &Path, header: &Header, records: &[StepRecord], v: &Verdict, factor: f64) -> Result<()> {
    let doc = json!({
        "run": header.run, "steps": header.steps, "from_step": header.from_step, "factor": factor,
        "parts": header.parts, "verdict": v,
    });
    crate::io::write_atomic(&out.join("autopsy.json"), serde_json::to_string_pretty(&doc).map_err(|e| Error::invalid("autopsy", e.to_string()))?.as_bytes())?;
    let mut text = format!("verdict: {}\n", v.line);
    if v.departures.len() > 1 {
        let _ = writeln!(text, "then (the first 12 of {}):", v.departures.len() - 1);
        for d in v.departures.iter().skip(1).take(12) {
            let _ = writeln!(text, "  {}", d.describe());
        }
    }
    crate::io::write_atomic(&out.join("verdict.txt"), text.as_bytes())?;
    let steps: Vec<u64> = records.iter().map(|r| r.step).collect();
    let calm = records.iter().position(|r| r.step > v.baseline_steps.1).unwrap_or(records.len());
    let mark = v.loss_moved.map(|m| m.0);
    let all = quantities(header.parts.len(), records);
    for (quantity, file) in [("gradient norm", "grad_norm.png"), ("update ratio", "update_ratio.png")] {
        let rows: Vec<(String, Vec<Option<f64>>)> = (0..header.parts.len())
            .filter_map(|p| all.iter().find(|((q, n), _)| *q == p && n == quantity).map(|(_, vals)| (header.parts[p].clone(), relative(vals, calm))))
            .collect();
        let title = format!(
            "{quantity} / its median over steps {}-{} (log10){}",
            v.baseline_steps.0,
            v.baseline_steps.1,
            mark.map_or(String::new(), |m| format!("; loss moved at step {m}"))
        );
        plot::step_heat_map(&out.join(file), &title, &rows, &steps, mark)?;
    }
    // The activations along the generator: the calm median, the first departure's step, the
    // loss's move.
    let rms_of = |k: usize| -> Vec<(f64, f64)> {
        (0..header.parts.len()).filter_map(|p| records[k].activations.iter().find(|a| a.part == p && a.what == "output").map(|a| (p as f64, a.rms))).collect()
    };
    let calm_rms: Vec<(f64, f64)> = (0..header.parts.len())
        .filter_map(|p| {
            let vals: Vec<f64> =
                records[..calm].iter().filter_map(|r| r.activations.iter().find(|a| a.part == p && a.what == "output").map(|a| a.rms)).collect();
            median(vals).map(|m| (p as f64, m))
        })
        .collect();
    let at = |step: u64| records.iter().position(|r| r.step == step);
    let mut series = vec![Series { name: "median of the calm steps", points: calm_rms, color: plotters::style::RGBColor(31, 119, 180) }];
    let first_name;
    if let Some(k) = v.departures.first().and_then(|d| at(d.step)) {
        first_name = format!("step {} (first departure)", records[k].step);
        series.push(Series { name: &first_name, points: rms_of(k), color: plotters::style::RGBColor(255, 127, 14) });
    }
    let moved_name;
    if let Some(k) = mark.and_then(at) {
        moved_name = format!("step {} (loss moved)", records[k].step);
        series.push(Series { name: &moved_name, points: rms_of(k), color: plotters::style::RGBColor(214, 39, 40) });
    }
    plot::lines(&out.join("activations.png"), "RMS of each part's output (parts as `fnokern model` lists them, from 0)", "part", "RMS", &series, true)?;
    let loss: Vec<(f64, f64)> = records.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let point = |step: u64| records.iter().find(|r| r.step == step).and_then(|r| r.loss).map(|l| vec![(step as f64, l)]).unwrap_or_default();
    let marks = [
        Marks { name: "first departure", points: v.departures.first().map_or(Vec::new(), |d| point(d.step)), color: plotters::style::RGBColor(255, 127, 14) },
        Marks { name: "loss moved", points: mark.map_or(Vec::new(), point), color: plotters::style::RGBColor(214, 39, 40) },
    ];
    plot::lines_marked(
        &out.join("loss.png"),
        "training loss of the replayed steps",
        "step",
        "loss",
        &[Series { name: "loss", points: loss, color: plotters::style::RGBColor(31, 119, 180) }],
        &marks,
        true,
    )
}

/// log10 of each value over the median of the first `calm` (None where not measured or not positive).
fn relative(values: &[Option<f64>], calm: usize) -> Vec<Option<f64>> {
    let b = median(values[..calm.min(values.len())].iter().flatten().copied().filter(|v| *v > 0.0).collect());
    values
        .iter()
        .map(|v| match (v, b) {
            (Some(v), Some(b)) if *v > 0.0 && v.is_finite() => Some((v / b).log10()),
            (Some(v), Some(_)) if !v.is_finite() => Some(f64::INFINITY),
            _ => None,
        })
        .collect()
}
