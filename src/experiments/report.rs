//! A crash hunt's or shootout's report (a stability map's is [`super::map`]): report.md (tables), results.json (every number), p_crash.png and
//! val_curves.png (validation loss of every run, failures marked where they stopped).

use std::fmt::Write as _;

use plotters::style::RGBColor;
use serde::Serialize;

use super::{Failure, Plan, RunResult, SweepKind, SweepOptions, SweepOutcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::train::plot;

/// Mean, sample standard deviation and count of the values present.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stat {
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub n: usize,
}

impl Stat {
    pub fn of(values: impl Iterator<Item = Option<f64>>) -> Stat {
        let v: Vec<f64> = values.flatten().filter(|x| x.is_finite()).collect();
        let n = v.len();
        let mean = (n > 0).then(|| v.iter().sum::<f64>() / n as f64);
        let sd = mean.filter(|_| n > 1).map(|m| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Stat { mean, sd, n }
    }

    pub fn show(&self, digits: usize) -> String {
        match (self.mean, self.sd) {
            (Some(m), Some(s)) => format!("{m:.digits$} ± {s:.digits$}"),
            (Some(m), None) => format!("{m:.digits$}"),
            _ => "-".into(),
        }
    }
}

/// One (arm, depth) cell of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub arm: String,
    pub depth: usize,
    /// Runs of this cell that have ended.
    pub runs: usize,
    pub failed: usize,
    pub p_crash: Option<f64>,
    /// Runs with at least one loss spike, and spikes in all.
    pub runs_with_spikes: usize,
    pub spikes: u64,
    /// Non-finite steps (skipped) in all.
    pub nonfinite_steps: u64,
    /// (seed, failure, reason) of each failed run.
    pub failing: Vec<(u64, Failure, String)>,
    /// Over the runs that trained to the end (crashed runs have no final numbers).
    pub best_val_loss: Stat,
    pub final_val_loss: Stat,
    pub amp_ssim: Stat,
    pub phase_ssim: Stat,
    pub amp_mae: Stat,
    pub wall_seconds: Stat,
}

pub fn groups(plan: &Plan, results: &[RunResult]) -> Vec<Group> {
    let mut out = Vec::new();
    for &depth in &plan.depths {
        for arm in &plan.arms {
            let rs: Vec<&RunResult> = results.iter().filter(|r| r.arm == arm.name && r.depth == depth).collect();
            let done: Vec<&&RunResult> = rs.iter().filter(|r| r.finished).collect();
            let failing: Vec<(u64, Failure, String)> = rs.iter().filter_map(|r| Some((r.seed, r.failure?, r.reason.clone().unwrap_or_default()))).collect();
            out.push(Group {
                arm: arm.name.clone(),
                depth,
                runs: rs.len(),
                failed: failing.len(),
                p_crash: (!rs.is_empty()).then(|| failing.len() as f64 / rs.len() as f64),
                runs_with_spikes: rs.iter().filter(|r| r.spikes > 0).count(),
                spikes: rs.iter().map(|r| r.spikes).sum(),
                nonfinite_steps: rs.iter().map(|r| r.nonfinite_steps).sum(),
                failing,
                best_val_loss: Stat::of(done.iter().map(|r| r.best_val_loss)),
                final_val_loss: Stat::of(done.iter().map(|r| r.final_val_loss)),
                amp_ssim: Stat::of(done.iter().map(|r| r.amp_ssim)),
                phase_ssim: Stat::of(done.iter().map(|r| r.phase_ssim)),
                amp_mae: Stat::of(done.iter().map(|r| r.amp_mae)),
                wall_seconds: Stat::of(rs.iter().map(|r| Some(r.wall_seconds))),
            });
        }
    }
    out
}

/// The shallowest depth at which some run of the given arm failed.
pub fn shallowest_failing_depth(plan: &Plan, results: &[RunResult], arm: &str) -> Option<usize> {
    let mut depths = plan.depths.clone();
    depths.sort_unstable();
    depths.into_iter().find(|&d| results.iter().any(|r| r.arm == arm && r.depth == d && r.failure.is_some()))
}

#[derive(Serialize)]
struct ResultsFile<'a> {
    kind: SweepKind,
    command: &'a str,
    complete: bool,
    planned: usize,
    criteria: super::Criteria,
    depths: &'a [usize],
    seeds: &'a [u64],
    arms: Vec<&'a str>,
    /// Per arm: the shallowest depth with a failing run (null: none failed).
    shallowest_failing_depth: Vec<(&'a str, Option<usize>)>,
    groups: Vec<Group>,
    runs: &'a [RunResult],
}

/// One report line per arm: its name and the fields its overlay sets.
pub(super) fn arm_lines(md: &mut String, plan: &Plan) {
    for a in &plan.arms {
        let fields: Vec<String> =
            a.overlay.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('[')).map(String::from).collect();
        let _ = writeln!(md, "- Arm `{}`: {}.", a.name, fields.join(", "));
    }
}

/// Writes a sweep's results.json (atomically).
pub(super) fn write_results(dir: &std::path::Path, file: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(file).map_err(|e| Error::invalid("report", e.to_string()))?;
    write_atomic(&dir.join("results.json"), json.as_bytes())
}

/// A config enum as written in TOML.
pub(super) fn word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

pub(super) fn scale_line(c: &Config) -> String {
    format!(
        "N {}, width {}, max_channels {}, modes {}, batch {}, {} epochs, {} training / {} validation patterns \
         ({} training object{}), {} lr {:.0e}, schedule {}",
        c.data.n,
        c.model.width,
        c.model.max_channels,
        c.model.modes,
        c.train.batch_size,
        c.train.epochs,
        c.train.train_patterns,
        c.train.test_patterns,
        c.data.train_objects,
        if c.data.train_objects == 1 { "" } else { "s" },
        word(&c.train.optimizer),
        c.train.lr,
        word(&c.train.schedule)
    )
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

/// Writes report.md, results.json, p_crash.png and val_curves.png into the sweep directory.
pub fn write(plan: &Plan, opts: &SweepOptions, outcome: &SweepOutcome) -> Result<()> {
    if plan.kind == SweepKind::StabilityMap {
        return super::map::write(plan, opts, outcome);
    }
    let dir = &opts.out_dir;
    let results = &outcome.results;
    let gs = groups(plan, results);
    let base = Config::parse(&plan.base, "the sweep's base config")?;
    let arms: Vec<&str> = plan.arms.iter().map(|a| a.name.as_str()).collect();
    let shallowest: Vec<(&str, Option<usize>)> = arms.iter().map(|a| (*a, shallowest_failing_depth(plan, results, a))).collect();

    let file = ResultsFile {
        kind: plan.kind,
        command: &opts.command,
        complete: outcome.complete(),
        planned: outcome.planned,
        criteria: opts.criteria,
        depths: &plan.depths,
        seeds: &plan.seeds,
        arms: arms.clone(),
        shallowest_failing_depth: shallowest.clone(),
        groups: gs.clone(),
        runs: results,
    };
    write_results(dir, &file)?;

    // report.md
    let mut md = String::new();
    let title = match plan.kind {
        SweepKind::CrashHunt => "Crash hunt",
        SweepKind::Shootout => "Shootout",
        SweepKind::StabilityMap => "Stability map",
    };
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
    let _ = writeln!(md, "# {title}\n");
    let _ = writeln!(md, "Command: `{}`\n", opts.command);
    if !outcome.complete() {
        let _ = writeln!(md, "**Incomplete:** {} of {} runs have ended; run the same command again to continue.\n", results.len(), outcome.planned);
    }
    let _ = writeln!(md, "- Scale (base config): {}.", scale_line(&base));
    let _ = writeln!(md, "- Depths {:?}, seeds {:?} (each seed sets model.seed and train.seed; the data is the same for all).", plan.depths, plan.seeds);
    arm_lines(&mut md, plan);
    let _ = writeln!(
        md,
        "- A run fails on: non-finite values (inputs, loss, gradients, weights or validation loss; {} failed steps in a row), \
         out of memory (budget: {}), loss spikes ({} in a row, spike = loss > {} x the mean of the last {} steps), \
         collapse (test amplitude SSIM < {}), or final validation loss > {}.\n",
        base.train.max_consecutive_failures,
        base.train.memory_limit.as_deref().unwrap_or("none"),
        base.train.max_consecutive_failures,
        base.train.spike_factor,
        base.train.spike_window,
        opts.criteria.min_amp_ssim,
        opts.criteria.max_val_loss
    );

    let _ = writeln!(md, "## Result\n");
    for (arm, d) in &shallowest {
        let failing_depths: Vec<usize> = gs.iter().filter(|g| g.arm == *arm && g.failed > 0).map(|g| g.depth).collect();
        let line = match (plan.kind, d) {
            (SweepKind::CrashHunt, Some(d)) => format!("`{arm}`: the shallowest depth with a failing run is **{d}** (failures at depths {failing_depths:?})."),
            (SweepKind::CrashHunt, None) => format!("`{arm}`: **no run failed** at depths {:?}.", plan.depths),
            (SweepKind::Shootout | SweepKind::StabilityMap, _) => {
                let g = gs.iter().find(|g| g.arm == *arm);
                format!(
                    "`{arm}`: {} of {} runs failed; final validation loss {}, amplitude SSIM {}.",
                    g.map_or(0, |g| g.failed),
                    g.map_or(0, |g| g.runs),
                    g.map_or("-".into(), |g| g.final_val_loss.show(4)),
                    g.map_or("-".into(), |g| g.amp_ssim.show(3))
                )
            }
        };
        let _ = writeln!(md, "- {line}");
    }
    let _ = writeln!(
        md,
        "\nA spike (loss > {} x the recent mean) is handled by the trainer (`spike_action = {}`) and fails a run only when {} come in a row. \
         Means ± sample standard deviations over the runs of a cell that trained to the end (n given when some did not).\n",
        base.train.spike_factor,
        word(&base.train.spike_action),
        base.train.max_consecutive_failures
    );
    let _ = writeln!(
        md,
        "| arm | depth | P_crash | failing seeds | runs with spikes (spikes) | non-finite steps | best val loss | final val loss | amp SSIM | phase SSIM | amp MAE | time per run (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for g in &gs {
        let failing: Vec<String> = g.failing.iter().map(|(s, f, why)| format!("{s}: {} ({why})", f.name())).collect();
        let n = |s: &Stat| if s.n < g.runs { format!(" (n={})", s.n) } else { String::new() };
        let _ = writeln!(
            md,
            "| {} | {} | {}/{} | {} | {}/{} ({}) | {} | {}{} | {}{} | {} | {} | {} | {} |",
            g.arm,
            g.depth,
            g.failed,
            g.runs,
            if failing.is_empty() { "-".into() } else { failing.join("; ") },
            g.runs_with_spikes,
            g.runs,
            g.spikes,
            g.nonfinite_steps,
            g.best_val_loss.show(4),
            n(&g.best_val_loss),
            g.final_val_loss.show(4),
            n(&g.final_val_loss),
            g.amp_ssim.show(3),
            g.phase_ssim.show(3),
            g.amp_mae.show(4),
            g.wall_seconds.show(0)
        );
    }
    let _ = writeln!(md, "\n## Runs\n");
    let _ = writeln!(
        md,
        "| run | outcome | epochs | spikes | non-finite steps | best val loss | final val loss | amp SSIM | phase SSIM | amp MAE | parameters | time (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let outcome = match (&r.failure, &r.reason) {
            (Some(f), Some(why)) => format!("FAILED: {} ({why})", f.name()),
            _ => "ok".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r.name,
            outcome,
            r.epochs_done,
            r.spikes,
            r.nonfinite_steps,
            fmt(r.best_val_loss, 4),
            fmt(r.final_val_loss, 4),
            fmt(r.amp_ssim, 3),
            fmt(r.phase_ssim, 3),
            fmt(r.amp_mae, 4),
            r.parameters,
            r.wall_seconds
        );
    }
    let _ = writeln!(md, "\n## Plots\n\n![P_crash](p_crash.png)\n\n![validation curves](val_curves.png)");
    let _ = writeln!(md, "\nEvery run's directory (metrics.jsonl, checkpoints, loss and gradient-norm plots, reconstruction) is under `runs/`.");
    write_atomic(&dir.join("report.md"), md.as_bytes())?;

    // Plots.
    let bars: Vec<(String, f64, String)> = gs
        .iter()
        .map(|g| {
            let name = match plan.kind {
                SweepKind::CrashHunt if arms.len() == 1 => format!("depth {}", g.depth),
                SweepKind::Shootout if plan.depths.len() == 1 => g.arm.clone(),
                _ => format!("{} d{}", g.arm, g.depth),
            };
            (name, g.p_crash.unwrap_or(0.0), format!("{}/{}", g.failed, g.runs))
        })
        .collect();
    plot::bars(&dir.join("p_crash.png"), &format!("{title}: P_crash (failed runs / runs)"), "P_crash", &bars)?;
    let mut series = Vec::new();
    let mut marks = Vec::new();
    for r in results {
        let gi = gs.iter().position(|g| g.arm == r.arm && g.depth == r.depth).unwrap_or(0);
        let points: Vec<(f64, f64)> = r.val_curve.iter().map(|&(s, v)| (s as f64, v)).collect();
        if r.failure.is_some() {
            if let Some(&p) = points.last() {
                marks.push(p);
            }
        }
        series.push((r.name.clone(), points, PALETTE[gi % PALETTE.len()]));
    }
    let series: Vec<plot::Series> = series.iter().map(|(n, p, c)| plot::Series { name: n, points: p.clone(), color: *c }).collect();
    plot::lines_marked(
        &dir.join("val_curves.png"),
        &format!("{title}: validation loss of every run"),
        "step (micro-batch)",
        "validation loss",
        &series,
        &[plot::Marks { name: "failed run (where it stopped)", points: marks, color: RGBColor(214, 39, 40) }],
        true,
    )?;
    Ok(())
}
