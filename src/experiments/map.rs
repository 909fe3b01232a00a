//! A stability map's report: per (arm, depth, learning rate) cell the fraction of runs whose
//! training went wrong ([`CrashKind::is_instability`]: non-finite values, a loss explosion, the
//! guard giving up, out of memory), with its exact (Clopper-Pearson) 95% interval, every crash
//! kind counted, and the quality of the stable runs; per (arm, depth) the largest stable learning
//! rate; a heat map per arm. Instability is kept apart from quality: a run that trained without
//! blowing up but reconstructs poorly is stable and poor (its collapse is still counted).

use std::fmt::Write as _;

use serde::Serialize;

use super::report::Stat;
use super::report::{interval_text, kind_counts, kinds_text, KindCount};
use super::{lr_label, Plan, RunResult, SweepOptions, SweepOutcome};
use crate::config::Config;
use crate::error::Result;
use crate::io::write_atomic;
use crate::train::plot::{self, HeatCell};

/// One (arm, depth, learning rate) cell.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub arm: String,
    pub depth: usize,
    pub lr: f64,
    /// Runs of this cell that have ended.
    pub runs: usize,
    /// Runs whose training went wrong ([`RunResult::unstable`]).
    pub unstable: usize,
    pub p_unstable: Option<f64>,
    /// The exact 95% interval of P_unstable.
    pub p_interval: Option<(f64, f64)>,
    /// Per crash kind (quality kinds too), the runs that crashed that way.
    pub kinds: Vec<KindCount>,
    /// (seed, reason) of each unstable run.
    pub unstable_runs: Vec<(u64, String)>,
    /// Runs that finished without training.
    pub did_not_train: usize,
    /// Runs with at least one loss spike (all kinds of handling).
    pub runs_with_spikes: usize,
    /// Over the stable runs, scored on the weights each run evaluated (the best
    /// epoch's when the base config sets `train.evaluate_best`).
    pub best_val_loss: Stat,
    pub amp_ssim: Stat,
    pub phase_ssim: Stat,
    pub wall_seconds: Stat,
}

/// The largest stable learning rate of one (arm, depth).
#[derive(Clone, Debug, Serialize)]
pub struct Edge {
    pub arm: String,
    pub depth: usize,
    /// The largest rate of the grid at which no run was unstable, every smaller rate stable too;
    /// None: some run was unstable at the smallest rate (or no cell has runs).
    pub largest_stable_lr: Option<f64>,
    /// The next rate of the grid (where some run was unstable); None when the largest rate was stable.
    pub first_unstable_lr: Option<f64>,
    /// The upper end of the 95% interval of P_unstable at `largest_stable_lr` (0 of n unstable).
    pub p_unstable_upper: Option<f64>,
    /// Whether some rate above `first_unstable_lr` was stable again (the edge is not sharp).
    pub non_monotone: bool,
    /// The cell at `largest_stable_lr`: its quality.
    pub best_val_loss: Stat,
    pub amp_ssim: Stat,
    pub phase_ssim: Stat,
}

/// P(X <= k) for X ~ Binomial(n, p).
fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    let mut term = (1.0 - p).powi(n as i32); // P(X = 0)
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        sum += term;
        if i < n {
            term *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p).max(f64::MIN_POSITIVE);
        }
    }
    sum.min(1.0)
}

/// The exact (Clopper-Pearson) two-sided 95% interval of a binomial proportion k / n.
pub fn clopper_pearson(k: usize, n: usize) -> (f64, f64) {
    let alpha = 0.05;
    // Bisection on a monotone function of p.
    let solve = |f: &dyn Fn(f64) -> bool| {
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..80 {
            let mid = 0.5 * (lo + hi);
            if f(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    // Lower: the p at which P(X >= k) = alpha / 2; upper: P(X <= k) = alpha / 2.
    let lower = if k == 0 { 0.0 } else { solve(&|p| 1.0 - binomial_cdf(k - 1, n, p) < alpha / 2.0) };
    let upper = if k == n { 1.0 } else { solve(&|p| binomial_cdf(k, n, p) > alpha / 2.0) };
    (lower, upper)
}

pub fn cells(plan: &Plan, results: &[RunResult]) -> Vec<Cell> {
    let mut out = Vec::new();
    for arm in &plan.arms {
        for &depth in &plan.depths {
            for &lr in &plan.lrs {
                let rs: Vec<&RunResult> = results.iter().filter(|r| r.arm == arm.name && r.depth == depth && r.lr == Some(lr)).collect();
                let stable: Vec<&&RunResult> = rs.iter().filter(|r| !r.unstable()).collect();
                let unstable_runs: Vec<(u64, String)> = rs.iter().filter(|r| r.unstable()).map(|r| (r.seed, r.reason.clone().unwrap_or_default())).collect();
                let n = rs.len();
                out.push(Cell {
                    arm: arm.name.clone(),
                    depth,
                    lr,
                    runs: n,
                    unstable: unstable_runs.len(),
                    p_unstable: (n > 0).then(|| unstable_runs.len() as f64 / n as f64),
                    p_interval: (n > 0).then(|| clopper_pearson(unstable_runs.len(), n)),
                    kinds: kind_counts(rs.iter().copied()),
                    unstable_runs,
                    did_not_train: rs.iter().filter(|r| r.did_not_train).count(),
                    runs_with_spikes: rs.iter().filter(|r| r.spikes > 0).count(),
                    best_val_loss: Stat::of(stable.iter().map(|r| r.best_val_loss)),
                    amp_ssim: Stat::of(stable.iter().map(|r| r.amp_ssim)),
                    phase_ssim: Stat::of(stable.iter().map(|r| r.phase_ssim)),
                    wall_seconds: Stat::of(rs.iter().map(|r| Some(r.wall_seconds))),
                });
            }
        }
    }
    out
}

/// The largest stable rate of each (arm, depth), from its cells (the plan's rates ascending).
pub fn edges(plan: &Plan, cells: &[Cell]) -> Vec<Edge> {
    let mut out = Vec::new();
    for arm in &plan.arms {
        for &depth in &plan.depths {
            let row: Vec<&Cell> = cells.iter().filter(|c| c.arm == arm.name && c.depth == depth && c.runs > 0).collect();
            let first_bad = row.iter().position(|c| c.unstable > 0);
            let stable_upto = first_bad.unwrap_or(row.len());
            let at = stable_upto.checked_sub(1).map(|i| row[i]);
            let empty = || Stat::of(std::iter::empty());
            out.push(Edge {
                arm: arm.name.clone(),
                depth,
                largest_stable_lr: at.map(|c| c.lr),
                first_unstable_lr: first_bad.map(|i| row[i].lr),
                p_unstable_upper: at.and_then(|c| c.p_interval.map(|p| p.1)),
                non_monotone: first_bad.is_some_and(|i| row[i + 1..].iter().any(|c| c.unstable == 0)),
                best_val_loss: at.map_or_else(empty, |c| c.best_val_loss.clone()),
                amp_ssim: at.map_or_else(empty, |c| c.amp_ssim.clone()),
                phase_ssim: at.map_or_else(empty, |c| c.phase_ssim.clone()),
            });
        }
    }
    out
}

#[derive(Serialize)]
struct MapFile<'a> {
    kind: super::SweepKind,
    command: &'a str,
    complete: bool,
    planned: usize,
    depths: &'a [usize],
    lrs: &'a [f64],
    seeds: &'a [u64],
    arms: Vec<&'a str>,
    edges: Vec<Edge>,
    cells: Vec<Cell>,
    runs: &'a [RunResult],
}

/// The stable range of an edge as a table shows it: `1e-2 (unstable at 3e-2)`.
fn range_text(e: &Edge, lrs: &[f64]) -> String {
    match (e.largest_stable_lr, e.first_unstable_lr) {
        (Some(s), Some(u)) => format!("{} (unstable at {})", lr_label(s), lr_label(u)),
        (Some(s), None) => format!(">= {} (stable on the whole grid)", lr_label(s)),
        (None, Some(_)) => format!("< {} (unstable at the smallest rate)", lrs.first().map_or("-".into(), |l| lr_label(*l))),
        (None, None) => "-".into(),
    }
}

/// How an arm's edge compares with the control's at the same depth.
fn versus_control(e: &Edge, control: Option<&Edge>, lrs: &[f64], cells: &[Cell]) -> String {
    let Some(c) = control else { return String::new() };
    let steps = |l: Option<f64>| l.and_then(|l| lrs.iter().position(|&x| x == l)).map_or(-1, |i| i as i64);
    let (a, b) = (steps(e.largest_stable_lr), steps(c.largest_stable_lr));
    // An edge is set by its first unstable cell: say how many runs that was, since one run in
    // five moves an edge by a grid step.
    let evidence = |edge: &Edge, who: &str| {
        let cell = edge.first_unstable_lr.and_then(|lr| cells.iter().find(|x| x.arm == edge.arm && x.depth == edge.depth && x.lr == lr));
        cell.map_or(String::new(), |x| format!("; {who} edge rests on {} of {} runs at {}", x.unstable, x.runs, lr_label(x.lr)))
    };
    let plural = |n: i64| if n == 1 { "" } else { "s" };
    match a.cmp(&b) {
        std::cmp::Ordering::Equal => "same as the control".into(),
        std::cmp::Ordering::Greater => format!("wider than the control by {} grid step{}{}", a - b, plural(a - b), evidence(c, "the control's")),
        std::cmp::Ordering::Less => format!("narrower than the control by {} grid step{}{}", b - a, plural(b - a), evidence(e, "its")),
    }
}

/// Writes report.md, results.json and map_<arm>.png into the sweep directory.
pub fn write(plan: &Plan, opts: &SweepOptions, outcome: &SweepOutcome) -> Result<()> {
    let dir = &opts.out_dir;
    let results = &outcome.results;
    let cs = cells(plan, results);
    let es = edges(plan, &cs);
    let base = Config::parse(&plan.base, "the sweep's base config")?;
    let arms: Vec<&str> = plan.arms.iter().map(|a| a.name.as_str()).collect();
    let file = MapFile {
        kind: plan.kind,
        command: &opts.command,
        complete: outcome.complete(),
        planned: outcome.planned,
        depths: &plan.depths,
        lrs: &plan.lrs,
        seeds: &plan.seeds,
        arms: arms.clone(),
        edges: es.clone(),
        cells: cs.clone(),
        runs: results,
    };
    super::report::write_results(dir, &file)?;

    let mut md = String::new();
    let _ = writeln!(md, "# Stability map\n");
    let _ = writeln!(md, "Command: `{}`\n", opts.command);
    if !outcome.complete() {
        let _ = writeln!(md, "**Incomplete:** {} of {} runs have ended; run the same command again to continue.\n", results.len(), outcome.planned);
    }
    let _ = writeln!(md, "- Scale (base config): {}.", super::report::scale_line(&base));
    let lrs: Vec<String> = plan.lrs.iter().map(|&l| lr_label(l)).collect();
    let _ = writeln!(
        md,
        "- Depths {:?}; peak learning rates (`train.lr`) {}; seeds {:?} (each seed sets model.seed and train.seed; the data is the same for all).",
        plan.depths,
        lrs.join(", "),
        plan.seeds
    );
    super::report::arm_lines(&mut md, plan);
    super::report::crash_definition(&mut md, &base, &opts.criteria);
    let _ = writeln!(
        md,
        "- A run is **unstable** when its training went wrong: non-finite values, a loss explosion, the guard giving up or out of \
         memory. The quality columns average the stable runs, scored on {} weights; collapses and high validation losses are \
         counted in the kinds column, not as instability. P_unstable intervals are exact (Clopper-Pearson) 95% intervals over the \
         cell's seeds.\n",
        if base.train.evaluate_best { "each run's best epoch's (lowest validation loss)" } else { "each run's last epoch's" }
    );

    let _ = writeln!(md, "## Largest stable learning rate\n");
    let _ = writeln!(
        md,
        "The largest rate of the grid at which no seed was unstable, with every smaller rate stable too; the edge lies between it \
         and the next rate. With 0 of n seeds unstable, P_unstable there is still only bounded by the interval's upper end; one \
         unstable run in n moves the edge by a grid step.\n"
    );
    let _ = writeln!(md, "| arm | depth | largest stable lr | P_unstable there (95% upper) | vs control | best val loss | amp SSIM | phase SSIM |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for e in &es {
        let control = es.iter().find(|c| c.arm == "control" && c.depth == e.depth && e.arm != "control");
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {} | {} | {} | {} | {} |",
            e.arm,
            e.depth,
            range_text(e, &plan.lrs),
            if e.non_monotone { " (not monotone: stable again above)" } else { "" },
            e.p_unstable_upper.map_or("-".into(), |p| format!("0 (≤ {p:.2})")),
            versus_control(e, control, &plan.lrs, &cs),
            e.best_val_loss.show(4),
            e.amp_ssim.show(3),
            e.phase_ssim.show(3)
        );
    }
    let _ = writeln!(md, "\n## Cells\n");
    let _ = writeln!(
        md,
        "| arm | depth | lr | unstable [95% interval] | crashes by kind | did not train | runs with spikes | best val loss | amp SSIM | phase SSIM | time per run (s) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &cs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} |",
            c.arm,
            c.depth,
            lr_label(c.lr),
            interval_text(c.unstable, c.runs),
            kinds_text(&c.kinds),
            c.did_not_train,
            c.runs_with_spikes,
            c.runs,
            c.best_val_loss.show(4),
            c.amp_ssim.show(3),
            c.phase_ssim.show(3),
            c.wall_seconds.show(0)
        );
    }
    let _ = writeln!(md, "\n## Heat maps\n");
    for a in &arms {
        let _ = writeln!(md, "![{a}](map_{a}.png)\n");
    }
    let _ = writeln!(md, "Every run's directory (metrics.jsonl, checkpoints, plots, reconstruction) is under `runs/`.");
    write_atomic(&dir.join("report.md"), md.as_bytes())?;

    // One heat map per arm: depth rows (deepest on top), learning-rate columns.
    let mut depths = plan.depths.clone();
    depths.sort_unstable_by(|a, b| b.cmp(a));
    for a in &arms {
        let grid: Vec<Vec<HeatCell>> = depths
            .iter()
            .map(|&d| {
                plan.lrs
                    .iter()
                    .map(|&lr| {
                        let c = cs.iter().find(|c| c.arm == *a && c.depth == d && c.lr == lr);
                        match c.filter(|c| c.runs > 0) {
                            Some(c) => HeatCell {
                                value: c.p_unstable,
                                text: [format!("{}/{} unstable", c.unstable, c.runs), c.amp_ssim.mean.map_or("SSIM -".into(), |s| format!("SSIM {s:.2}"))],
                            },
                            None => HeatCell { value: None, text: ["no runs".into(), String::new()] },
                        }
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<String> = depths.iter().map(|d| format!("depth {d}")).collect();
        plot::heat_map(
            &dir.join(format!("map_{a}.png")),
            &format!("{a}: unstable runs / runs (red: P_unstable), amp SSIM of the rest"),
            "",
            "peak learning rate",
            &rows,
            &lrs,
            &grid,
        )?;
    }
    Ok(())
}
