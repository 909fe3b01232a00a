//! A crash hunt's or shootout's report (a stability map's is [`super::map`]): report.md (tables), results.json (every number), p_crash.png and
//! val_curves.png (validation loss of every run, failures marked where they stopped).

use std::fmt::Write as _;

use plotters::style::RGBColor;
use serde::Serialize;

use super::map::clopper_pearson;
use super::{CrashKind, Plan, RunResult, SweepKind, SweepOptions, SweepOutcome};
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

/// How many runs of a cell crashed each way (a run that crashed two ways counts in both).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KindCount {
    pub kind: super::CrashKind,
    pub runs: usize,
}

/// One (arm, depth) cell of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub arm: String,
    pub depth: usize,
    /// Runs of this cell that have ended.
    pub runs: usize,
    /// Runs that crashed in any way.
    pub crashed: usize,
    pub p_crash: Option<f64>,
    /// The exact (Clopper-Pearson) 95% interval of P_crash.
    pub p_interval: Option<(f64, f64)>,
    /// Per crash kind, the runs that crashed that way.
    pub kinds: Vec<KindCount>,
    /// Runs that finished without training (not crashes).
    pub did_not_train: usize,
    /// Crashed runs that blew up (explosion or non-finite values) and still finished with a good
    /// model: no collapse, no high validation loss.
    pub recovered: usize,
    /// Runs with at least one loss spike, and spikes in all.
    pub runs_with_spikes: usize,
    pub spikes: u64,
    /// Steps the guard rolled back, in all.
    pub rollbacks: u64,
    /// Steps that met non-finite values, in all (fp16 overflows included).
    pub nonfinite_steps: u64,
    /// (seed, reason) of each crashed run.
    pub crashing: Vec<(u64, String)>,
    /// Over the runs that trained to the end (crashed runs have no final numbers).
    pub best_val_loss: Stat,
    pub final_val_loss: Stat,
    pub amp_ssim: Stat,
    pub phase_ssim: Stat,
    pub amp_mae: Stat,
    pub wall_seconds: Stat,
}

/// Per crash kind, how many of `rs` crashed that way.
pub fn kind_counts<'a>(rs: impl Iterator<Item = &'a RunResult> + Clone) -> Vec<KindCount> {
    CrashKind::ALL.iter().map(|&kind| KindCount { kind, runs: rs.clone().filter(|r| r.crashes.contains(&kind)).count() }).collect()
}

/// The kinds that occurred, as a table cell shows them: `explosion 2, collapse 1` (`-`: none).
pub fn kinds_text(kinds: &[KindCount]) -> String {
    let v: Vec<String> = kinds.iter().filter(|k| k.runs > 0).map(|k| format!("{} {}", k.kind.name(), k.runs)).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// `k/n [lo, hi]`: a count and its exact 95% interval.
pub fn interval_text(k: usize, n: usize) -> String {
    if n == 0 {
        return "-".into();
    }
    let (lo, hi) = clopper_pearson(k, n);
    format!("{k}/{n} [{lo:.2}, {hi:.2}]")
}

pub fn groups(plan: &Plan, results: &[RunResult]) -> Vec<Group> {
    let mut out = Vec::new();
    for &depth in &plan.depths {
        for arm in &plan.arms {
            let rs: Vec<&RunResult> = results.iter().filter(|r| r.arm == arm.name && r.depth == depth).collect();
            let done: Vec<&&RunResult> = rs.iter().filter(|r| r.finished).collect();
            let crashing: Vec<(u64, String)> = rs.iter().filter(|r| r.crashed_any()).map(|r| (r.seed, r.reason.clone().unwrap_or_default())).collect();
            let n = rs.len();
            out.push(Group {
                arm: arm.name.clone(),
                depth,
                runs: n,
                crashed: crashing.len(),
                p_crash: (n > 0).then(|| crashing.len() as f64 / n as f64),
                p_interval: (n > 0).then(|| clopper_pearson(crashing.len(), n)),
                kinds: kind_counts(rs.iter().copied()),
                did_not_train: rs.iter().filter(|r| r.did_not_train).count(),
                recovered: rs.iter().filter(|r| r.recovered()).count(),
                runs_with_spikes: rs.iter().filter(|r| r.spikes > 0).count(),
                spikes: rs.iter().map(|r| r.spikes).sum(),
                rollbacks: rs.iter().map(|r| r.rollbacks).sum(),
                nonfinite_steps: rs.iter().map(|r| r.nonfinite_steps).sum(),
                crashing,
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

/// The shallowest depth at which some run of the given arm crashed.
pub fn shallowest_failing_depth(plan: &Plan, results: &[RunResult], arm: &str) -> Option<usize> {
    let mut depths = plan.depths.clone();
    depths.sort_unstable();
    depths.into_iter().find(|&d| results.iter().any(|r| r.arm == arm && r.depth == d && r.crashed_any()))
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

/// The report's lines saying what counts as a crash, and what the guard was set to.
pub(super) fn crash_definition(md: &mut String, base: &Config, c: &super::Criteria) {
    let _ = writeln!(
        md,
        "- A run **crashed** when any of these happened, each counted whatever a guard did next (REFERENCE section 3): \
         non-finite values (in a loss, gradient, input, the weights or the validation loss; skipped steps count; an fp16 \
         overflow the loss scaler backed off from does not); a **loss explosion** (a training or validation loss above {} x the \
         first step's loss); the spike guard giving up ({} failed steps in a row); out of memory (budget: {}); a **collapse** \
         (test amplitude SSIM < {}, or a flat output: amplitude contrast < {}); a final validation loss > {}. A run that \
         finished with its best validation loss above {} x its first step's loss **did not train**: counted apart, not a crash.",
        c.explosion_factor,
        base.train.max_consecutive_failures,
        base.train.memory_limit.as_deref().unwrap_or("none"),
        c.min_amp_ssim,
        c.min_amp_contrast,
        c.max_val_loss,
        c.did_not_train_above,
    );
    let _ = writeln!(
        md,
        "- The spike guard in the base config: `spike_action = {}` (spike = loss > {} x the mean of the last {} steps); \
         the sweeps set `log` (off) unless an arm or `--set` turns it on.\n",
        word(&base.train.spike_action),
        base.train.spike_factor,
        base.train.spike_window
    );
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
    crash_definition(&mut md, &base, &opts.criteria);

    let _ = writeln!(md, "## Result\n");
    for (arm, d) in &shallowest {
        let rs = || results.iter().filter(|r| r.arm == *arm);
        let (crashed, runs) = (rs().filter(|r| r.crashed_any()).count(), rs().count());
        let line = match (plan.kind, d) {
            (SweepKind::CrashHunt, Some(d)) => {
                let depths: Vec<usize> = gs.iter().filter(|g| g.arm == *arm && g.crashed > 0).map(|g| g.depth).collect();
                format!("`{arm}`: the shallowest depth with a crashed run is **{d}** (crashes at depths {depths:?}; {crashed} of {runs} runs).")
            }
            (SweepKind::CrashHunt, None) => format!("`{arm}`: **no run crashed** at depths {:?} (0 of {runs} runs).", plan.depths),
            (SweepKind::Shootout | SweepKind::StabilityMap, _) => {
                let g = gs.iter().find(|g| g.arm == *arm);
                format!(
                    "`{arm}`: P_crash {}; final validation loss {}, amplitude SSIM {}.",
                    interval_text(crashed, runs),
                    g.map_or("-".into(), |g| g.final_val_loss.show(4)),
                    g.map_or("-".into(), |g| g.amp_ssim.show(3))
                )
            }
        };
        let _ = writeln!(md, "- {line}");
    }
    let _ = writeln!(
        md,
        "\nP_crash: crashed runs / runs, with its exact (Clopper-Pearson) 95% interval. \"Recovered\": crashed runs that blew up \
         (an explosion or non-finite values) and still finished without a collapse or a high validation loss. Means ± sample standard deviations over \
         the runs of a cell that trained to the end (n given when some did not).\n"
    );
    let _ = writeln!(
        md,
        "| arm | depth | P_crash [95% interval] | crashes by kind | of those, recovered | did not train | runs with spikes (spikes) | rollbacks | non-finite steps | best val loss | final val loss | amp SSIM | phase SSIM | amp MAE | time per run (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for g in &gs {
        let n = |s: &Stat| if s.n < g.runs { format!(" (n={})", s.n) } else { String::new() };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {}/{} ({}) | {} | {} | {}{} | {}{} | {} | {} | {} | {} |",
            g.arm,
            g.depth,
            interval_text(g.crashed, g.runs),
            kinds_text(&g.kinds),
            g.recovered,
            g.did_not_train,
            g.runs_with_spikes,
            g.runs,
            g.spikes,
            g.rollbacks,
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
        "| run | outcome | epochs | largest training loss (step) | spikes | rollbacks | non-finite steps | best val loss | final val loss | amp SSIM | phase SSIM | amp MAE | time (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let outcome = match (r.crashed_any(), &r.reason) {
            (true, Some(why)) => format!("CRASHED: {why}"),
            (false, Some(why)) => why.clone(),
            _ => "ok".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r.name,
            outcome,
            r.epochs_done,
            r.max_train_loss.map_or("-".into(), |(s, l)| format!("{l:.3} ({s})")),
            r.spikes,
            r.rollbacks,
            r.nonfinite_steps,
            fmt(r.best_val_loss, 4),
            fmt(r.final_val_loss, 4),
            fmt(r.amp_ssim, 3),
            fmt(r.phase_ssim, 3),
            fmt(r.amp_mae, 4),
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
            (name, g.p_crash.unwrap_or(0.0), format!("{}/{}", g.crashed, g.runs))
        })
        .collect();
    plot::bars(&dir.join("p_crash.png"), &format!("{title}: P_crash (crashed runs / runs)"), "P_crash", &bars)?;
    let mut series = Vec::new();
    let mut marks = Vec::new();
    for r in results {
        let gi = gs.iter().position(|g| g.arm == r.arm && g.depth == r.depth).unwrap_or(0);
        let points: Vec<(f64, f64)> = r.val_curve.iter().map(|&(s, v)| (s as f64, v)).collect();
        if r.crashed_any() {
            // An explosion is marked at the end of the epoch it happened in; any other crash
            // at the run's last epoch.
            let at = match r.max_train_loss {
                Some((step, _)) if r.crashes.contains(&super::CrashKind::Explosion) => points.iter().find(|p| p.0 > step as f64).or(points.last()),
                _ => points.last(),
            };
            if let Some(&p) = at {
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
        &[plot::Marks { name: "crashed run (an explosion's epoch, else the last)", points: marks, color: RGBColor(214, 39, 40) }],
        true,
    )?;
    Ok(())
}
