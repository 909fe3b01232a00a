//! The stability experiments: the crash hunt, the shootout and the stability map.
//!
//! A sweep is a [`Plan`]: a base config, arms (TOML overlays merged over it, `configs/arms/`),
//! depths and seeds. Each (arm, depth, seed) is one ordinary training run in
//! `<sweep>/runs/<arm>-d<depth>-s<seed>/`, so every run keeps its metrics, checkpoints and plots.
//! A run is judged by what happened in it ([`CrashKind`], [`Criteria`]): non-finite values, a loss
//! explosion, the guard giving up, out of memory, a collapse, a high final validation loss, each
//! counted whatever a guard did after it; a run that did not train is counted apart. The sweeps
//! run with the spike guard off unless an arm turns it on (the `guard` arm).
//!
//! Sweeps resume: a run whose summary says finished or crashed is never run again, a run killed
//! mid-way continues from its last checkpoint, and `plan.json` refuses to mix two different
//! sweeps in one directory. Runs go in parallel on the CPU (`jobs` threads, each with its own
//! rayon pool) and one after another on a GPU; the backend is deterministic in the thread count, so parallelism does not change
//! a result. [`report`] writes report.md, results.json and the plots.

pub mod map;
pub mod report;

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::train::{self, Crash, RunOptions, StepOutcome, Summary};

/// The arms shipped in `configs/arms/`, compiled in so that they work from any directory.
pub const BUILTIN_ARMS: &[(&str, &str)] = &[
    ("control", include_str!("../../configs/arms/control.toml")),
    ("layerscale", include_str!("../../configs/arms/layerscale.toml")),
    ("agc", include_str!("../../configs/arms/agc.toml")),
    ("agc0.01", include_str!("../../configs/arms/agc0.01.toml")),
    ("prenorm", include_str!("../../configs/arms/prenorm.toml")),
    ("bf16", include_str!("../../configs/arms/bf16.toml")),
    ("warmup_cosine", include_str!("../../configs/arms/warmup_cosine.toml")),
    ("sgd", include_str!("../../configs/arms/sgd.toml")),
    ("guard", include_str!("../../configs/arms/guard.toml")),
    ("constant_width", include_str!("../../configs/arms/constant_width.toml")),
    ("constant_width32", include_str!("../../configs/arms/constant_width32.toml")),
    ("adam_eps", include_str!("../../configs/arms/adam_eps.toml")),
    ("adam_beta2", include_str!("../../configs/arms/adam_beta2.toml")),
];

/// When a run counts as crashed (REFERENCE section 3, issue 30). Every threshold is applied to
/// raw facts a [`RunResult`] keeps, so a report can be re-judged under other criteria.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Criteria {
    /// Final validation loss above this is a crash (REFERENCE section 3: 0.15).
    pub max_val_loss: f64,
    /// Test-object amplitude SSIM below this is a collapse (REFERENCE section 3: 0.5).
    pub min_amp_ssim: f64,
    /// A training or validation loss above this multiple of the first step's loss is a loss
    /// explosion, even when a guard then rescued the run.
    #[serde(default = "default_explosion_factor")]
    pub explosion_factor: f64,
    /// An amplitude contrast (sd of the prediction / sd of the truth) below this is a flat
    /// output: a collapse whatever the SSIM says.
    #[serde(default = "default_min_amp_contrast")]
    pub min_amp_contrast: f64,
    /// A finished run whose best validation loss is above this fraction of its first step's loss
    /// did not train (counted apart: not a crash).
    #[serde(default = "default_did_not_train_above")]
    pub did_not_train_above: f64,
}

fn default_explosion_factor() -> f64 {
    3.0
}
fn default_min_amp_contrast() -> f64 {
    0.1
}
fn default_did_not_train_above() -> f64 {
    0.9
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria {
            max_val_loss: 0.15,
            min_amp_ssim: 0.5,
            explosion_factor: default_explosion_factor(),
            min_amp_contrast: default_min_amp_contrast(),
            did_not_train_above: default_did_not_train_above(),
        }
    }
}

impl Criteria {
    /// Refuses thresholds that cannot mean anything.
    pub fn check(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::invalid("criteria", why.to_string()));
        if self.max_val_loss.is_nan() || self.max_val_loss <= 0.0 {
            return bad("the largest final validation loss must be > 0");
        }
        if !(0.0..=1.0).contains(&self.min_amp_ssim) {
            return bad("the smallest amplitude SSIM must be in [0, 1]");
        }
        if !(self.explosion_factor > 1.0 && self.explosion_factor.is_finite()) {
            return bad("the explosion factor must be finite and > 1");
        }
        if !(self.min_amp_contrast >= 0.0 && self.min_amp_contrast.is_finite()) {
            return bad("the smallest amplitude contrast must be finite and >= 0");
        }
        if !(self.did_not_train_above > 0.0 && self.did_not_train_above.is_finite()) {
            return bad("the did-not-train fraction must be finite and > 0");
        }
        Ok(())
    }
}

/// One way a run crashes. A run can crash several ways (an explosion, then a collapse); each is
/// counted for what happened, whatever a guard did about it afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashKind {
    /// A NaN or Inf in a loss, a gradient, an input, the weights or the validation loss, skipped
    /// or not (an fp16 overflow the loss scaler backed off from is not one).
    Nonfinite,
    /// A training or validation loss above `explosion_factor` x the first step's loss.
    Explosion,
    /// The spike guard gave up (`max_consecutive_failures` rollbacks or skips in a row).
    Spike,
    /// An allocation over the memory budget (`train.memory_limit`) or the device's memory.
    Oom,
    /// Test-object amplitude SSIM below `min_amp_ssim`, or a flat output.
    Collapse,
    /// Final validation loss above `max_val_loss`.
    ValLoss,
}

impl CrashKind {
    pub const ALL: [CrashKind; 6] = [CrashKind::Nonfinite, CrashKind::Explosion, CrashKind::Spike, CrashKind::Oom, CrashKind::Collapse, CrashKind::ValLoss];

    pub fn name(self) -> &'static str {
        match self {
            CrashKind::Nonfinite => "non-finite",
            CrashKind::Explosion => "loss explosion",
            CrashKind::Spike => "guard gave up",
            CrashKind::Oom => "out of memory",
            CrashKind::Collapse => "collapse",
            CrashKind::ValLoss => "validation loss",
        }
    }

    /// Training itself went wrong (as opposed to training that ran but reconstructs poorly):
    /// what a stability map counts.
    pub fn is_instability(self) -> bool {
        matches!(self, CrashKind::Nonfinite | CrashKind::Explosion | CrashKind::Spike | CrashKind::Oom)
    }
}

/// One arm: a name and a TOML overlay (sections and fields of a config) merged over the base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub overlay: String,
}

impl Arm {
    /// `name` is a path to a .toml file, or the name of a file in `./configs/arms/`, or a
    /// built-in arm (control, layerscale, agc, prenorm).
    pub fn load(name: &str) -> Result<Arm> {
        let as_path = Path::new(name);
        let local = Path::new("configs/arms").join(format!("{name}.toml"));
        let file = if name.ends_with(".toml") || name.contains('/') { Some(as_path.to_path_buf()) } else { local.is_file().then_some(local) };
        let arm = match file {
            Some(p) => Arm {
                name: p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| name.to_string()),
                overlay: fs::read_to_string(&p).map_err(|source| Error::Io { path: p.display().to_string(), source })?,
            },
            None => match BUILTIN_ARMS.iter().find(|a| a.0 == name) {
                Some((n, text)) => Arm { name: n.to_string(), overlay: text.to_string() },
                None => {
                    let names: Vec<&str> = BUILTIN_ARMS.iter().map(|a| a.0).collect();
                    return Err(Error::invalid("arm", format!("no arm `{name}`: not a .toml file, not in configs/arms/, not built in ({})", names.join(", "))));
                }
            },
        };
        // Reject a broken overlay now rather than when its first run starts.
        arm.apply(&Config::default())?;
        Ok(arm)
    }

    /// The base config with this arm's overlay merged over it, validated.
    pub fn apply(&self, base: &Config) -> Result<Config> {
        let origin = format!("arm `{}`", self.name);
        let overlay: toml::Table = toml::from_str(&self.overlay).map_err(|e| Error::Config { origin: origin.clone(), why: e.message().to_string() })?;
        let mut table = toml::Table::try_from(base).map_err(|e| Error::invalid("arm", e.to_string()))?;
        merge(&mut table, &overlay);
        let cfg: Config = table.try_into().map_err(|e: toml::de::Error| Error::Config { origin, why: e.message().to_string() })?;
        cfg.validate()?;
        if cfg.data.workload != crate::config::Workload::Gridlines {
            // The sweeps score runs by the stitched test object's SSIM.
            return Err(Error::invalid("sweep", "the crash hunt and the shootout run the grid-lines workload; train Darcy configs with `fnokern train`"));
        }
        Ok(cfg)
    }
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SweepKind {
    CrashHunt,
    Shootout,
    /// Every arm at every depth, peak learning rate and seed: which arm widens the range of
    /// learning rates that train without blowing up ([`CrashKind::is_instability`]).
    StabilityMap,
}

/// What a sweep runs. Two invocations with equal plans are the same sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub kind: SweepKind,
    /// The base config (TOML) every arm is merged over.
    pub base: String,
    pub arms: Vec<Arm>,
    pub depths: Vec<usize>,
    pub seeds: Vec<u64>,
    /// Peak learning rates (`train.lr`), each run at every (arm, depth, seed); empty: the arm's
    /// own rate (the crash hunt and the shootout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lrs: Vec<f64>,
}

/// One run of a sweep.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub name: String,
    pub arm: String,
    pub depth: usize,
    pub seed: u64,
    /// The learning rate the plan set (None: the arm's own).
    pub lr: Option<f64>,
    pub config: Config,
}

impl Plan {
    pub fn new(kind: SweepKind, base: &Config, arms: Vec<Arm>, depths: Vec<usize>, seeds: Vec<u64>) -> Result<Plan> {
        if arms.is_empty() || depths.is_empty() || seeds.is_empty() {
            return Err(Error::invalid("sweep", "a sweep needs at least one arm, one depth and one seed"));
        }
        if depths.contains(&0) {
            return Err(Error::invalid("sweep", "depths must be at least 1"));
        }
        // A repeated cell would train one run twice at once in one directory.
        let repeated = |v: &[u64]| (1..v.len()).any(|i| v[..i].contains(&v[i]));
        if repeated(&depths.iter().map(|&d| d as u64).collect::<Vec<_>>()) || repeated(&seeds) {
            return Err(Error::invalid("sweep", format!("depths {depths:?} and seeds {seeds:?} must not repeat a value")));
        }
        let mut names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != arms.len() {
            return Err(Error::invalid("sweep", "two arms have the same name"));
        }
        let base = toml::to_string(base).map_err(|e| Error::invalid("sweep", e.to_string()))?;
        let plan = Plan { kind, base, arms, depths, seeds, lrs: Vec::new() };
        plan.runs()?;
        Ok(plan)
    }

    /// A stability map: every arm at every depth, learning rate and seed.
    pub fn map(base: &Config, arms: Vec<Arm>, depths: Vec<usize>, lrs: Vec<f64>, seeds: Vec<u64>) -> Result<Plan> {
        if lrs.is_empty() {
            return Err(Error::invalid("sweep", "a stability map needs at least one learning rate"));
        }
        if lrs.iter().any(|&lr| !(lr.is_finite() && lr > 0.0)) {
            return Err(Error::invalid("sweep", format!("learning rates must be finite and positive (got {lrs:?})")));
        }
        let mut sorted = lrs.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        if sorted.len() != lrs.len() {
            return Err(Error::invalid("sweep", format!("learning rates {lrs:?} must not repeat a value")));
        }
        let mut plan = Plan::new(SweepKind::StabilityMap, base, arms, depths, seeds)?;
        plan.lrs = sorted;
        plan.runs()?;
        Ok(plan)
    }

    /// Whether two plans are the same sweep: same kind, arms, depths and seeds, and base configs
    /// that read the same (so fields added to the config since, at their defaults, do not count).
    pub fn same_sweep(&self, other: &Plan) -> bool {
        let parse = |p: &Plan| toml::from_str::<Config>(&p.base).ok();
        self.kind == other.kind
            && self.arms == other.arms
            && self.depths == other.depths
            && self.seeds == other.seeds
            && self.lrs == other.lrs
            && parse(self).is_some()
            && parse(self) == parse(other)
    }

    /// What differs between two plans, in words: `kind`, `arms`, ..., or each base-config field
    /// (`train.eval_seeds: [] here, [1001, 1002, 1003] now`).
    pub fn differences(&self, now: &Plan) -> Vec<String> {
        let mut out = Vec::new();
        let mut field = |name: &str, same: bool| {
            if !same {
                out.push(name.to_string());
            }
        };
        field("kind", self.kind == now.kind);
        field("arms", self.arms == now.arms);
        field("depths", self.depths == now.depths);
        field("seeds", self.seeds == now.seeds);
        field("learning rates", self.lrs == now.lrs);
        let table = |p: &Plan| Config::parse(&p.base, "a sweep's base config").ok().and_then(|c| toml::Table::try_from(c).ok());
        match (table(self), table(now)) {
            (Some(a), Some(b)) => {
                for (section, va) in &a {
                    let (Some(ta), Some(tb)) = (va.as_table(), b.get(section).and_then(|v| v.as_table())) else { continue };
                    for (k, x) in ta {
                        let y = tb.get(k);
                        if y != Some(x) {
                            out.push(format!("{section}.{k}: {x} here, {} now", y.map_or("unset".to_string(), |y| y.to_string())));
                        }
                    }
                }
            }
            _ => out.push("base config".into()),
        }
        out
    }

    /// Every run, depth-major, then seed, then arm, then learning rate: a sweep cut short (a
    /// session's end) has as many seeds of every arm. Each run's config is the base with the arm
    /// merged over it, then `model.depth`, `train.lr` (a map's), `model.seed` and `train.seed` set.
    pub fn runs(&self) -> Result<Vec<RunSpec>> {
        let base = Config::parse(&self.base, "the sweep's base config")?;
        let lrs: Vec<Option<f64>> = if self.lrs.is_empty() { vec![None] } else { self.lrs.iter().map(|&l| Some(l)).collect() };
        let armed: Vec<Config> = self.arms.iter().map(|arm| arm.apply(&base)).collect::<Result<_>>()?;
        let mut out = Vec::new();
        for &depth in &self.depths {
            for &seed in &self.seeds {
                for (arm, armed) in self.arms.iter().zip(&armed) {
                    for &lr in &lrs {
                        let mut config = armed.clone();
                        config.model.depth = depth;
                        config.model.seed = seed;
                        config.train.seed = seed;
                        let name = match lr {
                            Some(lr) => {
                                config.train.lr = lr;
                                format!("{}-d{depth}-lr{}-s{seed}", arm.name, lr_label(lr))
                            }
                            None => format!("{}-d{depth}-s{seed}", arm.name),
                        };
                        config.validate()?;
                        out.push(RunSpec { name, arm: arm.name.clone(), depth, seed, lr, config });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A learning rate as run names and tables show it: `3e-4`, `1e-2`, `2.5e-3`.
pub fn lr_label(lr: f64) -> String {
    let s = format!("{lr:e}");
    match s.split_once('e') {
        Some((m, e)) => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
        None => s,
    }
}

/// What one run contributes to the report: the facts read from its summary and metrics.jsonl,
/// and the verdict [`RunResult::judge`] draws from them under a sweep's [`Criteria`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub arm: String,
    pub depth: usize,
    pub seed: u64,
    /// The learning rate a stability map set (None: the arm's own).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Every way the run crashed (empty: it did not).
    #[serde(default)]
    pub crashes: Vec<CrashKind>,
    /// It finished, but its best validation loss stayed near its first step's loss.
    #[serde(default)]
    pub did_not_train: bool,
    /// Why, in words: one clause per crash kind (and for not training).
    pub reason: Option<String>,

    // The facts the verdict is drawn from.
    /// The loss of the run's first step, before any update.
    #[serde(default)]
    pub initial_loss: Option<f64>,
    /// The largest finite training loss of any step (spikes the guard rolled back or skipped
    /// included), and that step.
    #[serde(default)]
    pub max_train_loss: Option<(u64, f64)>,
    /// What stopped the run, if the trainer stopped it (`nonfinite`, `spike`, `oom`).
    #[serde(default)]
    pub trainer_crash: Option<Crash>,
    /// The trainer gave up without naming a kind (kept for summaries from before kinds).
    #[serde(default)]
    pub crashed: bool,
    /// The epoch whose weights the SSIM and MAE score (the best with `train.evaluate_best`).
    #[serde(default)]
    pub evaluated_epoch: Option<usize>,
    /// Whether training ran all its epochs (false for crashed runs).
    pub finished: bool,
    /// Steps whose loss was a spike (rolled back, skipped or only logged).
    pub spikes: u64,
    /// Steps the guard rolled back.
    #[serde(default)]
    pub rollbacks: u64,
    /// Steps that met a non-finite input, loss or gradient (fp16 overflows included).
    pub nonfinite_steps: u64,
    /// Of those, the ones that count as a crash: all but the fp16 overflows the loss scaler
    /// backed off from.
    #[serde(default)]
    pub nonfinite_crash_steps: u64,
    pub epochs_done: usize,
    pub best_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub amp_ssim: Option<f64>,
    pub phase_ssim: Option<f64>,
    pub amp_mae: Option<f64>,
    pub phase_mae: Option<f64>,
    /// sd(predicted amplitude) / sd(true amplitude) on the test object ([`crate::eval::Metrics`]).
    #[serde(default)]
    pub amp_contrast: Option<f64>,
    /// (micro-batch steps at the epoch's end, validation loss) per epoch; a non-finite
    /// validation loss is not in it (see `nonfinite_val`).
    pub val_curve: Vec<(u64, f64)>,
    /// Some epoch ended with a non-finite validation loss.
    #[serde(default)]
    pub nonfinite_val: bool,
    pub parameters: usize,
    pub wall_seconds: f64,
}

impl RunResult {
    fn from_summary(spec: &RunSpec, s: &Summary, dir: &Path, c: &Criteria) -> Result<RunResult> {
        let metric = |k: &str| s.metrics.as_ref().and_then(|m| m[k].as_f64());
        let log = read_metrics(&dir.join("metrics.jsonl"));
        let mut r = RunResult {
            name: spec.name.clone(),
            arm: spec.arm.clone(),
            depth: spec.depth,
            seed: spec.seed,
            lr: spec.lr,
            crashes: Vec::new(),
            did_not_train: false,
            reason: None,
            initial_loss: log.initial_loss,
            max_train_loss: log.max_train_loss,
            trainer_crash: s.crash_kind,
            crashed: s.crashed,
            evaluated_epoch: s.evaluated_epoch,
            finished: s.finished,
            spikes: s.count(StepOutcome::is_spike),
            rollbacks: s.count(|o| o == StepOutcome::RolledBack),
            nonfinite_steps: s.count(StepOutcome::is_nonfinite),
            nonfinite_crash_steps: s.count(|o| o.is_nonfinite() && o != StepOutcome::OverflowSkipped),
            epochs_done: s.epochs_done,
            best_val_loss: s.best_val_loss,
            final_val_loss: s.final_val_loss,
            amp_ssim: metric("amp_ssim"),
            phase_ssim: metric("phase_ssim"),
            amp_mae: metric("amp_mae"),
            phase_mae: metric("phase_mae"),
            amp_contrast: metric("amp_contrast"),
            val_curve: log.val_curve,
            nonfinite_val: log.nonfinite_val,
            parameters: s.parameters,
            wall_seconds: s.wall_seconds,
        };
        r.judge(c);
        Ok(r)
    }

    /// Draws the verdict (`crashes`, `did_not_train`, `reason`) from the facts under `c`.
    pub fn judge(&mut self, c: &Criteria) {
        let mut why: Vec<(Option<CrashKind>, String)> = Vec::new();
        let mut crash = |k: CrashKind, w: String| why.push((Some(k), w));
        if self.nonfinite_crash_steps > 0
            || self.nonfinite_val
            || matches!(self.trainer_crash, Some(Crash::Nonfinite))
            || (self.crashed && self.trainer_crash.is_none())
        {
            let w = match self.trainer_crash {
                Some(Crash::Nonfinite) => "stopped on non-finite values".to_string(),
                _ if self.nonfinite_val => "a non-finite validation loss".to_string(),
                _ => format!("{} step(s) met non-finite values", self.nonfinite_crash_steps),
            };
            crash(CrashKind::Nonfinite, w);
        }
        if let Some(init) = self.initial_loss.filter(|l| *l > 0.0) {
            let bound = c.explosion_factor * init;
            let val = self.val_curve.iter().map(|v| v.1).fold(f64::NEG_INFINITY, f64::max);
            match self.max_train_loss {
                Some((step, l)) if l > bound => crash(CrashKind::Explosion, format!("training loss {l:.3e} at step {step}, {:.0}x the first step's", l / init)),
                _ if val > bound => crash(CrashKind::Explosion, format!("validation loss {val:.3e}, {:.0}x the first step's loss", val / init)),
                _ => {}
            }
        }
        match self.trainer_crash {
            Some(Crash::Spike) => crash(CrashKind::Spike, "the spike guard gave up".into()),
            Some(Crash::Oom) => crash(CrashKind::Oom, "out of memory".into()),
            _ => {}
        }
        if self.finished {
            if let Some(v) = self.amp_ssim.filter(|v| v.is_nan() || *v < c.min_amp_ssim) {
                crash(CrashKind::Collapse, format!("amplitude SSIM {v:.3} < {}", c.min_amp_ssim));
            } else if let Some(k) = self.amp_contrast.filter(|k| k.is_nan() || *k < c.min_amp_contrast) {
                crash(CrashKind::Collapse, format!("a flat output (amplitude contrast {k:.3} < {})", c.min_amp_contrast));
            }
            if let Some(v) = self.final_val_loss.filter(|v| v.is_nan() || *v > c.max_val_loss) {
                crash(CrashKind::ValLoss, format!("final validation loss {v:.4} > {}", c.max_val_loss));
            }
        }
        self.did_not_train = self.finished
            && match (self.best_val_loss, self.initial_loss) {
                (Some(b), Some(i)) => b.is_nan() || b > c.did_not_train_above * i,
                _ => false,
            };
        if self.did_not_train {
            why.push((
                None,
                format!(
                    "did not train (best validation loss {:.4} against a first loss of {:.4})",
                    self.best_val_loss.unwrap_or(f64::NAN),
                    self.initial_loss.unwrap_or(f64::NAN)
                ),
            ));
        }
        self.crashes = why.iter().filter_map(|w| w.0).collect();
        self.reason = (!why.is_empty()).then(|| why.into_iter().map(|w| w.1).collect::<Vec<_>>().join("; "));
    }

    /// Whether the run crashed at all (any kind).
    pub fn crashed_any(&self) -> bool {
        !self.crashes.is_empty()
    }

    /// It blew up (an explosion or non-finite values) and still finished with a good model:
    /// no other crash kind.
    pub fn recovered(&self) -> bool {
        self.finished
            && self.crashes.iter().any(|k| matches!(k, CrashKind::Explosion | CrashKind::Nonfinite))
            && self.crashes.iter().all(|k| matches!(k, CrashKind::Explosion | CrashKind::Nonfinite))
    }

    /// Whether training itself went wrong ([`CrashKind::is_instability`]).
    pub fn unstable(&self) -> bool {
        self.crashes.iter().any(|k| k.is_instability())
    }
}

/// What the sweeps read from a run's metrics.jsonl.
#[derive(Default)]
struct LogFacts {
    initial_loss: Option<f64>,
    max_train_loss: Option<(u64, f64)>,
    val_curve: Vec<(u64, f64)>,
    nonfinite_val: bool,
}

fn read_metrics(path: &Path) -> LogFacts {
    let mut f = LogFacts::default();
    let Ok(text) = fs::read_to_string(path) else { return f };
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        match v["kind"].as_str() {
            Some("step") => {
                let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) else { continue };
                if step == 0 {
                    f.initial_loss = Some(loss);
                }
                if loss.is_finite() && f.max_train_loss.is_none_or(|m| loss > m.1) {
                    f.max_train_loss = Some((step, loss));
                }
            }
            Some("epoch") => match (v["steps_end"].as_u64(), v["val_loss"].as_f64()) {
                (Some(s), Some(l)) => f.val_curve.push((s, l)),
                // serde_json writes a non-finite number as null.
                (Some(_), None) => f.nonfinite_val |= v.get("val_loss").is_some(),
                _ => {}
            },
            _ => {}
        }
    }
    f
}

/// Which runs of a plan one process takes (`--shard INDEX/COUNT`): run i (in plan order) when
/// i % count == index. Shards of one sweep share its directory: a job array or one process per
/// GPU runs the whole plan, each run exactly once, and any of them reports on every run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || {
            Error::invalid("shard", format!("`{s}` is not INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4; Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    pub fn takes(&self, run: usize) -> bool {
        run % self.count == self.index
    }
}

/// What one (arm, depth, learning rate) cell of a plan costs, for a dry run.
#[derive(Clone, Debug, Serialize)]
pub struct CellCost {
    pub arm: String,
    pub depth: usize,
    pub lr: Option<f64>,
    /// Runs of the cell (in the shard, when one is given).
    pub runs: usize,
    pub parameters: usize,
    /// The peak of one training step (the config's checkpointing), from the memory plan.
    pub peak_bytes: u64,
    /// Optimiser steps a run makes (epochs x batches per epoch); None when the data's size is
    /// not known before it is read (NPZ data).
    pub steps_per_run: Option<u64>,
}

/// The cost of each cell of `plan` (the runs `shard` takes), from the memory plan on the meta
/// device: nothing is trained or allocated.
pub fn costs(plan: &Plan, shard: Option<Shard>) -> Result<Vec<CellCost>> {
    let specs = plan.runs()?;
    let mut out: Vec<CellCost> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let taken = shard.is_none_or(|s| s.takes(i));
        if let Some(c) = out.iter_mut().find(|c| c.arm == spec.arm && c.depth == spec.depth && c.lr == spec.lr) {
            c.runs += usize::from(taken);
            continue;
        }
        let cfg = &spec.config;
        let meta = crate::device::Device::meta();
        let parameters = crate::model::Generator::for_run(cfg, &meta)?.num_params();
        let peak_bytes = crate::plan::step_memory(cfg, &meta)?.peak;
        let steps_per_run = crate::data::pattern_counts(&cfg.data).map(|(train, _)| {
            let used = if cfg.train.train_patterns == 0 { train } else { train.min(cfg.train.train_patterns as u64) };
            cfg.train.epochs as u64 * used.div_ceil(cfg.train.batch_size as u64)
        });
        out.push(CellCost { arm: spec.arm.clone(), depth: spec.depth, lr: spec.lr, runs: usize::from(taken), parameters, peak_bytes, steps_per_run });
    }
    Ok(out)
}

/// How a sweep is driven (not part of its identity).
#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub out_dir: PathBuf,
    /// Runs at once (each gets `threads / jobs` rayon threads, at least one).
    pub jobs: usize,
    /// Threads in all; defaults to the machine's cores.
    pub threads: Option<usize>,
    /// Stop after this many runs of this invocation have ended, as if killed (for tests).
    pub max_runs: Option<usize>,
    pub criteria: Criteria,
    /// The command line, for the report.
    pub command: String,
    /// Set (by a signal handler) to stop: running runs checkpoint and stop, no new run starts,
    /// and the same command continues the sweep.
    pub stop: Option<Arc<AtomicBool>>,
    /// Run only this shard's runs, beside the other shards' processes.
    pub shard: Option<Shard>,
}

/// The sweep's state after an invocation.
#[derive(Clone, Debug)]
pub struct SweepOutcome {
    /// Results of every run that has ended (in plan order).
    pub results: Vec<RunResult>,
    /// Runs in the plan.
    pub planned: usize,
    /// Runs this invocation trained (or resumed).
    pub ran: usize,
    /// Runs found already ended and not run again.
    pub reused: usize,
}

impl SweepOutcome {
    pub fn complete(&self) -> bool {
        self.results.len() == self.planned
    }
}

/// The number of CPU cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn run_dir(out: &Path, spec: &RunSpec) -> PathBuf {
    out.join("runs").join(&spec.name)
}

/// The summary of a run that has ended (finished or crashed), if it has.
fn ended(dir: &Path) -> Option<Summary> {
    let s: Summary = serde_json::from_slice(&fs::read(dir.join("summary.json")).ok()?).ok()?;
    (s.finished || s.crashed).then_some(s)
}

/// The result of a run that has ended, judged under `c`: from its metrics.jsonl when the
/// directory has one (and then, when `owner`, written to result.json beside it: another shard's
/// run is its own shard's to write), else from that result.json: a committed sweep keeps
/// summary.json and result.json of each run, not the logs.
fn result_of(spec: &RunSpec, s: &Summary, dir: &Path, c: &Criteria, owner: bool) -> Result<RunResult> {
    let path = dir.join("result.json");
    if dir.join("metrics.jsonl").is_file() || !path.is_file() {
        let r = RunResult::from_summary(spec, s, dir, c)?;
        if owner {
            let json = serde_json::to_string_pretty(&r).map_err(|e| Error::invalid("sweep", e.to_string()))?;
            crate::io::write_atomic(&path, json.as_bytes())?;
        }
        return Ok(r);
    }
    let text = fs::read(&path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let mut r: RunResult =
        serde_json::from_slice(&text).map_err(|e| Error::BadFile { path: path.display().to_string(), why: format!("not a run result: {e}") })?;
    if (r.name.as_str(), r.depth, r.seed) != (spec.name.as_str(), spec.depth, spec.seed) {
        return Err(Error::BadFile { path: path.display().to_string(), why: format!("holds run {}, not {}", r.name, spec.name) });
    }
    r.judge(c);
    Ok(r)
}

/// Trains (or resumes) one run in its directory; its messages go to train.log there.
fn run_one(spec: &RunSpec, dir: &Path, threads: usize, stop: Option<Arc<AtomicBool>>) -> Result<Summary> {
    // A run killed before its first checkpoint starts again from its beginning (train says so).
    let resume = dir.exists();
    crate::train::run_dir::claim(dir)?;
    let log_path = dir.join("train.log");
    let mut log =
        fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|source| Error::Io { path: log_path.display().to_string(), source })?;
    let opts = RunOptions { resume, preset: Some(spec.name.clone()), stop, ..RunOptions::new(dir) };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| Error::invalid("sweep", format!("cannot start a thread pool: {e}")))?;
    pool.install(|| train::train(&spec.config, &opts, &mut |m| drop(writeln!(log, "{m}"))))
}

/// Runs (or continues) a sweep in `opts.out_dir` and writes its report.
pub fn run_sweep(plan: &Plan, opts: &SweepOptions, say: &(dyn Fn(&str) + Sync)) -> Result<SweepOutcome> {
    let out = &opts.out_dir;
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { path, source }
    };
    crate::train::run_dir::refuse_foreign(out)?;
    // One process holds a sweep for its whole length; shards share it, each holding the lock
    // only while it checks the plan and while it writes the report (each run is locked by its
    // own trainer).
    let lock = match opts.shard {
        None => crate::train::run_dir::DirLock::take(out, "sweep")?,
        Some(_) => crate::train::run_dir::DirLock::wait(out, "sweep")?,
    };
    fs::create_dir_all(out.join("runs")).map_err(io(out))?;
    let plan_path = out.join("plan.json");
    let plan_text = serde_json::to_string_pretty(plan).map_err(|e| Error::invalid("sweep", e.to_string()))?;
    if plan_path.is_file() {
        let old: Plan = serde_json::from_slice(&fs::read(&plan_path).map_err(io(&plan_path))?)
            .map_err(|e| Error::BadFile { path: plan_path.display().to_string(), why: format!("not a sweep plan: {e}") })?;
        if !old.same_sweep(plan) {
            return Err(Error::invalid(
                "sweep",
                format!(
                    "{} holds a different sweep (its plan.json differs: {}); continue it with the same arguments \
                     (--set the fields back), or choose another --out",
                    out.display(),
                    old.differences(plan).join("; ")
                ),
            ));
        }
    } else {
        crate::io::write_atomic(&plan_path, plan_text.as_bytes())?;
    }

    let specs = plan.runs()?;
    let mut results: Vec<Option<RunResult>> = vec![None; specs.len()];
    let mut pending = VecDeque::new();
    let mut reused = 0;
    for (i, spec) in specs.iter().enumerate() {
        let dir = run_dir(out, spec);
        match ended(&dir) {
            Some(s) => {
                let owner = opts.shard.is_none_or(|sh| sh.takes(i));
                results[i] = Some(result_of(spec, &s, &dir, &opts.criteria, owner)?);
                reused += 1;
            }
            None if opts.shard.is_none_or(|s| s.takes(i)) => pending.push_back(i),
            None => {}
        }
    }
    // Unsharded, `lock` is held to the end; a shard gives it up before training.
    let mut lock = Some(lock);
    let shard_lock = if opts.shard.is_some() { lock.take() } else { None };
    // Runs on a GPU go one after another: they would share its memory and its one stream.
    let on_gpu = specs.iter().any(|s| s.config.train.device_kind().is_ok_and(|k| k.is_gpu()));
    let jobs = if on_gpu { 1 } else { opts.jobs.max(1).min(pending.len().max(1)) };
    say(&format!(
        "{} runs planned: {} already ended (kept), {} to run{}, {} at a time{}",
        specs.len(),
        reused,
        pending.len(),
        opts.shard.map_or(String::new(), |s| format!(" in shard {}/{} (the other shards run the rest)", s.index, s.count)),
        jobs.min(pending.len()).max(1),
        if on_gpu { " (on the GPU)" } else { "" }
    ));

    // The other shards need the directory while this one trains.
    drop(shard_lock);
    let limit = opts.max_runs.unwrap_or(usize::MAX).min(pending.len());
    let pending: VecDeque<usize> = pending.into_iter().take(limit).collect();

    // Simulate each distinct data set once before the runs share its cache.
    let mut warmed = Vec::new();
    for &i in &pending {
        let d = &specs[i].config.data;
        if !warmed.contains(d) {
            crate::data::load_or_simulate(d, &mut |m| say(m))?;
            warmed.push(d.clone());
        }
    }
    let jobs = jobs.min(pending.len().max(1));
    let threads = (opts.threads.unwrap_or_else(cores) / jobs).max(1);
    let queue = Mutex::new(pending);
    let (tx, rx) = mpsc::channel::<(usize, Result<Summary>, f64)>();
    let total = specs.len();
    let started = Instant::now();
    let mut ran = 0;
    let mut first_error = None;
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let tx = tx.clone();
            let (queue, specs) = (&queue, &specs);
            scope.spawn(move || loop {
                let stopping = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
                let next = if stopping { None } else { queue.lock().map(|mut q| q.pop_front()).unwrap_or(None) };
                let Some(i) = next else { break };
                let spec = &specs[i];
                say(&format!("start {} ({} threads)", spec.name, threads));
                let t0 = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(spec, &run_dir(out, spec), threads, opts.stop.clone())))
                    .unwrap_or_else(|_| Err(Error::invalid("sweep", format!("run {} panicked", spec.name))));
                let failed = r.is_err();
                if tx.send((i, r, t0.elapsed().as_secs_f64())).is_err() || failed {
                    // Stop taking work after an error; the others finish their runs.
                    if let Ok(mut q) = queue.lock() {
                        q.clear();
                    }
                    break;
                }
            });
        }
        drop(tx);
        for (i, r, secs) in rx {
            let spec = &specs[i];
            if let Ok(s) = &r {
                if s.interrupted {
                    say(&format!("{}: interrupted at step {}; the same command continues it", spec.name, s.steps));
                    continue;
                }
            }
            match r.and_then(|s| result_of(spec, &s, &run_dir(out, spec), &opts.criteria, true)) {
                Ok(res) => {
                    ran += 1;
                    let done = results.iter().filter(|r| r.is_some()).count() + 1;
                    let kinds = res.crashes.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
                    let verdict = match (res.crashed_any(), &res.reason) {
                        (true, Some(why)) => format!("CRASHED ({kinds}: {why})"),
                        (false, Some(why)) => format!("no crash, but {why}"),
                        _ => "ok".to_string(),
                    };
                    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
                    say(&format!(
                        "[{done}/{total}] {}: {verdict}; final val loss {}, amp SSIM {} ({secs:.0} s; sweep {:.0} s)",
                        spec.name,
                        fmt(res.final_val_loss),
                        fmt(res.amp_ssim),
                        started.elapsed().as_secs_f64()
                    ));
                    results[i] = Some(res);
                }
                Err(e) => {
                    say(&format!("{}: error: {e}", spec.name));
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let _report_lock = match opts.shard {
        Some(_) => {
            let l = crate::train::run_dir::DirLock::wait(out, "sweep")?;
            // Report every run any shard has ended by now.
            for (i, spec) in specs.iter().enumerate() {
                if results[i].is_none() {
                    let dir = run_dir(out, spec);
                    if let Some(s) = ended(&dir) {
                        results[i] = Some(result_of(spec, &s, &dir, &opts.criteria, false)?);
                    }
                }
            }
            Some(l)
        }
        None => None,
    };
    let mut results: Vec<RunResult> = results.into_iter().flatten().collect();
    // The reports list runs cell by cell (the plan trains them seed by seed).
    let at = |r: &RunResult| {
        let pos = |found: Option<usize>| found.unwrap_or(usize::MAX);
        (
            pos(plan.depths.iter().position(|&d| d == r.depth)),
            pos(plan.arms.iter().position(|a| a.name == r.arm)),
            pos(r.lr.and_then(|lr| plan.lrs.iter().position(|&l| l.to_bits() == lr.to_bits()))),
            pos(plan.seeds.iter().position(|&s| s == r.seed)),
        )
    };
    results.sort_by_key(at);
    let outcome = SweepOutcome { results, planned: total, ran, reused };
    report::write(plan, opts, &outcome)?;
    Ok(outcome)
}
