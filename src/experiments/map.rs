//! A stability map's report: per (arm, depth, learning rate) cell the fraction of runs that
//! diverged, with its exact (Clopper-Pearson) 95% interval, and the quality of the runs that did
//! not; per (arm, depth) the largest stable learning rate; a heat map per arm. Divergence
//! ([`Divergence`]) is kept apart from quality: a run that trained without diverging but scores
//! a poor reconstruction is stable and poor, not crashed.

use std::fmt::Write as _;

use serde::Serialize;

use super::report::Stat;
use super::{lr_label, Divergence, Plan, RunResult, SweepOptions, SweepOutcome};
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
    pub diverged: usize,
    pub p_diverge: Option<f64>,
    /// The exact 95% interval of the divergence probability.
    pub p_interval: Option<(f64, f64)>,
    /// (seed, how) of each diverged run.
    pub divergences: Vec<(u64, Divergence)>,
    /// Runs with at least one loss spike (all kinds of handling).
    pub runs_with_spikes: usize,
    /// Over the runs that did not diverge, scored on the weights each run evaluated (the best
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
    /// The largest rate of the grid at which no run diverged, every smaller rate stable too;
    /// None: some run diverged at the smallest rate (or no cell has runs).
    pub largest_stable_lr: Option<f64>,
    /// The next rate of the grid (where some run diverged); None when the largest rate was stable.
    pub first_unstable_lr: Option<f64>,
    /// The upper end of the 95% interval of P_diverge at `largest_stable_lr` (0 of n diverged).
    pub p_diverge_upper: Option<f64>,
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
                let stable: Vec<&&RunResult> = rs.iter().filter(|r| r.divergence.is_none()).collect();
                let divergences: Vec<(u64, Divergence)> = rs.iter().filter_map(|r| Some((r.seed, r.divergence?))).collect();
                let n = rs.len();
                out.push(Cell {
                    arm: arm.name.clone(),
                    depth,
                    lr,
                    runs: n,
                    diverged: divergences.len(),
                    p_diverge: (n > 0).then(|| divergences.len() as f64 / n as f64),
                    p_interval: (n > 0).then(|| clopper_pearson(divergences.len(), n)),
                    divergences,
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
            let first_bad = row.iter().position(|c| c.diverged > 0);
            let stable_upto = first_bad.unwrap_or(row.len());
            let at = stable_upto.checked_sub(1).map(|i| row[i]);
            let empty = || Stat::of(std::iter::empty());
            out.push(Edge {
                arm: arm.name.clone(),
                depth,
                largest_stable_lr: at.map(|c| c.lr),
                first_unstable_lr: first_bad.map(|i| row[i].lr),
                p_diverge_upper: at.and_then(|c| c.p_interval.map(|p| p.1)),
                non_monotone: first_bad.is_some_and(|i| row[i + 1..].iter().any(|c| c.diverged == 0)),
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

/// The stable range of an edge as a table shows it: `1e-2 (diverges at 3e-2)`.
fn range_text(e: &Edge, lrs: &[f64]) -> String {
    match (e.largest_stable_lr, e.first_unstable_lr) {
        (Some(s), Some(u)) => format!("{} (diverges at {})", lr_label(s), lr_label(u)),
        (Some(s), None) => format!(">= {} (stable on the whole grid)", lr_label(s)),
        (None, Some(_)) => format!("< {} (diverges at the smallest rate)", lrs.first().map_or("-".into(), |l| lr_label(*l))),
        (None, None) => "-".into(),
    }
}

/// How an arm's edge compares with the control's at the same depth.
fn versus_control(e: &Edge, control: Option<&Edge>, lrs: &[f64]) -> String {
    let Some(c) = control else { return String::new() };
    let steps = |l: Option<f64>| l.and_then(|l| lrs.iter().position(|&x| x == l)).map_or(-1, |i| i as i64);
    let (a, b) = (steps(e.largest_stable_lr), steps(c.largest_stable_lr));
    match a.cmp(&b) {
        std::cmp::Ordering::Equal => "same as the control".into(),
        std::cmp::Ordering::Greater => format!("wider than the control by {} grid step{}", a - b, if a - b == 1 { "" } else { "s" }),
        std::cmp::Ordering::Less => format!("narrower than the control by {} grid step{}", b - a, if b - a == 1 { "" } else { "s" }),
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
    let _ = writeln!(
        md,
        "- A run **diverged** when it met a non-finite value the guards could not skip past ({} failed steps in a row), when its loss \
         spikes were handled (`spike_action = {}`) {} times in a row (rollbacks exhausted), or when it trained to the end with a final \
         validation loss above the loss of its first step. Divergence is counted apart from quality: the quality columns average the \
         runs that did not diverge, scored on {} weights.",
        base.train.max_consecutive_failures,
        super::report::word(&base.train.spike_action),
        base.train.max_consecutive_failures,
        if base.train.evaluate_best { "each run's best epoch's (lowest validation loss)" } else { "each run's last epoch's" }
    );
    let _ = writeln!(md, "- P_diverge intervals are exact (Clopper-Pearson) 95% intervals over the cell's seeds.\n");

    let _ = writeln!(md, "## Largest stable learning rate\n");
    let _ = writeln!(
        md,
        "The largest rate of the grid at which no seed diverged, with every smaller rate stable too; the edge lies between it and the next \
         rate. With 0 of n seeds diverged, P_diverge there is still only bounded by the interval's upper end.\n"
    );
    let _ = writeln!(md, "| arm | depth | largest stable lr | P_diverge there (95% upper) | vs control | best val loss | amp SSIM | phase SSIM |");
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
            e.p_diverge_upper.map_or("-".into(), |p| format!("0 (≤ {p:.2})")),
            versus_control(e, control, &plan.lrs),
            e.best_val_loss.show(4),
            e.amp_ssim.show(3),
            e.phase_ssim.show(3)
        );
    }
    let _ = writeln!(md, "\n## Cells\n");
    let _ =
        writeln!(md, "| arm | depth | lr | diverged | P_diverge (95%) | how | runs with spikes | best val loss | amp SSIM | phase SSIM | time per run (s) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &cs {
        let how: Vec<String> = c.divergences.iter().map(|(s, d)| format!("{s}: {}", d.name())).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}/{} | {} | {} | {}/{} | {} | {} | {} | {} |",
            c.arm,
            c.depth,
            lr_label(c.lr),
            c.diverged,
            c.runs,
            match (c.p_diverge, c.p_interval) {
                (Some(p), Some((lo, hi))) => format!("{p:.2} [{lo:.2}, {hi:.2}]"),
                _ => "-".into(),
            },
            if how.is_empty() { "-".into() } else { how.join("; ") },
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
                                value: c.p_diverge,
                                text: [format!("{}/{} diverged", c.diverged, c.runs), c.amp_ssim.mean.map_or("SSIM -".into(), |s| format!("SSIM {s:.2}"))],
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
            &format!("{a}: runs diverged / runs (red: P_diverge), amp SSIM of the rest"),
            "",
            "peak learning rate",
            &rows,
            &lrs,
            &grid,
        )?;
    }
    Ok(())
}
