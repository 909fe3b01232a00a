//! The stability experiments: the crash hunt, the shootout and the stability map.
//!
//! A sweep is a [`Plan`]: a base config, arms (TOML overlays merged over it, `configs/arms/`),
//! depths and seeds. Each (arm, depth, seed) is one ordinary training run in
//! `<sweep>/runs/<arm>-d<depth>-s<seed>/`, so every run keeps its metrics, checkpoints and plots.
//! A run is classified as failed ([`Failure`]) by the trainer's crash kind (non-finite, spike,
//! out of memory) or, when it finished, by the [`Criteria`] (collapse, final validation loss).
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
];

/// When a finished run still counts as failed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Criteria {
    /// Final validation loss above this fails the run (REFERENCE section 3: 0.15).
    pub max_val_loss: f64,
    /// Test-object amplitude SSIM below this is a collapse (REFERENCE section 3: 0.5).
    pub min_amp_ssim: f64,
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria { max_val_loss: 0.15, min_amp_ssim: 0.5 }
    }
}

/// Why a run failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// NaN or Inf in inputs, losses, gradients, weights or the validation loss.
    Nonfinite,
    /// An allocation over the memory budget (`train.memory_limit`).
    Oom,
    /// Loss spikes that kept being skipped or rolled back.
    Spike,
    /// Test-object amplitude SSIM below `min_amp_ssim`.
    Collapse,
    /// Final validation loss above `max_val_loss`.
    ValLoss,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Nonfinite => "non-finite",
            Failure::Oom => "out of memory",
            Failure::Spike => "loss spike",
            Failure::Collapse => "collapse",
            Failure::ValLoss => "validation loss",
        }
    }
}

/// Classifies a run's summary: the trainer's crash kind first, then the criteria.
pub fn classify(s: &Summary, c: &Criteria) -> Option<(Failure, String)> {
    let why = || s.reason.clone().unwrap_or_default();
    match s.crash_kind {
        Some(Crash::Nonfinite) => return Some((Failure::Nonfinite, why())),
        Some(Crash::Oom) => return Some((Failure::Oom, why())),
        Some(Crash::Spike) => return Some((Failure::Spike, why())),
        None if s.crashed => return Some((Failure::Nonfinite, why())),
        None => {}
    }
    if !s.finished {
        return None;
    }
    let ssim = s.metrics.as_ref().and_then(|m| m["amp_ssim"].as_f64());
    if let Some(v) = ssim {
        // NaN counts as a collapse.
        if v < c.min_amp_ssim || v.is_nan() {
            return Some((Failure::Collapse, format!("amplitude SSIM {v:.3} < {}", c.min_amp_ssim)));
        }
    }
    match s.final_val_loss {
        Some(v) if v > c.max_val_loss || v.is_nan() => Some((Failure::ValLoss, format!("final validation loss {v:.4} > {}", c.max_val_loss))),
        _ => None,
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
    /// learning rates that train without diverging ([`Divergence`]).
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

    /// Every run, depth-major, then arm, then learning rate, then seed. Each run's config is the
    /// base with the arm merged over it, then `model.depth`, `train.lr` (a map's),
    /// `model.seed` and `train.seed` set.
    pub fn runs(&self) -> Result<Vec<RunSpec>> {
        let base = Config::parse(&self.base, "the sweep's base config")?;
        let lrs: Vec<Option<f64>> = if self.lrs.is_empty() { vec![None] } else { self.lrs.iter().map(|&l| Some(l)).collect() };
        let mut out = Vec::new();
        for &depth in &self.depths {
            for arm in &self.arms {
                let armed = arm.apply(&base)?;
                for &lr in &lrs {
                    for &seed in &self.seeds {
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

/// Why a run of a stability map counts as diverged (apart from how good a model it trained).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// A NaN or Inf the guards could not skip past (or out of memory).
    Nonfinite,
    /// Loss spikes rolled back or skipped `max_consecutive_failures` times in a row.
    RollbacksExhausted,
    /// It trained to the end but its final validation loss is above the loss it started from.
    AboveInitial,
}

impl Divergence {
    pub fn name(self) -> &'static str {
        match self {
            Divergence::Nonfinite => "non-finite",
            Divergence::RollbacksExhausted => "rollbacks exhausted",
            Divergence::AboveInitial => "final loss above the initial",
        }
    }
}

/// Whether a run diverged: the trainer's crash kind, or a final validation loss above
/// `initial_loss` (the loss of the first step, before any update).
pub fn divergence(s: &Summary, initial_loss: Option<f64>) -> Option<Divergence> {
    match s.crash_kind {
        Some(Crash::Spike) => return Some(Divergence::RollbacksExhausted),
        Some(Crash::Nonfinite | Crash::Oom) => return Some(Divergence::Nonfinite),
        None if s.crashed => return Some(Divergence::Nonfinite),
        None => {}
    }
    match (s.finished, s.final_val_loss, initial_loss) {
        (true, Some(v), _) if !v.is_finite() => Some(Divergence::Nonfinite),
        (true, Some(v), Some(i)) if v > i => Some(Divergence::AboveInitial),
        _ => None,
    }
}

/// What one run contributes to the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub arm: String,
    pub depth: usize,
    pub seed: u64,
    /// The learning rate a stability map set (None: the arm's own).
    #[serde(default)]
    pub lr: Option<f64>,
    /// The loss of the run's first step, before any update.
    #[serde(default)]
    pub initial_loss: Option<f64>,
    /// Whether (and how) the run diverged; quality failures are in `failure`.
    #[serde(default)]
    pub divergence: Option<Divergence>,
    /// The epoch whose weights the SSIM and MAE score (the best with `train.evaluate_best`).
    #[serde(default)]
    pub evaluated_epoch: Option<usize>,
    pub failure: Option<Failure>,
    pub reason: Option<String>,
    /// Whether training ran all its epochs (false for crashed runs).
    pub finished: bool,
    /// Steps whose loss was a spike (rolled back, skipped or only logged).
    pub spikes: u64,
    /// Steps skipped for non-finite inputs, losses or gradients (fp16 overflows included).
    pub nonfinite_steps: u64,
    pub epochs_done: usize,
    pub best_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub amp_ssim: Option<f64>,
    pub phase_ssim: Option<f64>,
    pub amp_mae: Option<f64>,
    pub phase_mae: Option<f64>,
    /// (micro-batch steps at the epoch's end, validation loss) per epoch.
    pub val_curve: Vec<(u64, f64)>,
    pub parameters: usize,
    pub wall_seconds: f64,
}

impl RunResult {
    fn from_summary(spec: &RunSpec, s: &Summary, dir: &Path, c: &Criteria) -> Result<RunResult> {
        let metric = |k: &str| s.metrics.as_ref().and_then(|m| m[k].as_f64());
        let failure = classify(s, c);
        let metrics = dir.join("metrics.jsonl");
        let initial_loss = first_step_loss(&metrics);
        Ok(RunResult {
            name: spec.name.clone(),
            arm: spec.arm.clone(),
            depth: spec.depth,
            seed: spec.seed,
            lr: spec.lr,
            initial_loss,
            divergence: divergence(s, initial_loss),
            evaluated_epoch: s.evaluated_epoch,
            failure: failure.as_ref().map(|f| f.0),
            reason: failure.map(|f| f.1),
            finished: s.finished,
            spikes: s.count(StepOutcome::is_spike),
            nonfinite_steps: s.count(StepOutcome::is_nonfinite),
            epochs_done: s.epochs_done,
            best_val_loss: s.best_val_loss,
            final_val_loss: s.final_val_loss,
            amp_ssim: metric("amp_ssim"),
            phase_ssim: metric("phase_ssim"),
            amp_mae: metric("amp_mae"),
            phase_mae: metric("phase_mae"),
            val_curve: val_curve(&metrics),
            parameters: s.parameters,
            wall_seconds: s.wall_seconds,
        })
    }
}

/// The loss of step 0 in a run's metrics.jsonl.
fn first_step_loss(metrics: &Path) -> Option<f64> {
    let text = fs::read_to_string(metrics).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "step" && v["step"] == 0)
        .and_then(|v| v["loss"].as_f64())
}

fn val_curve(metrics: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = fs::read_to_string(metrics) else { return Vec::new() };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "epoch")
        .filter_map(|v| Some((v["steps_end"].as_u64()?, v["val_loss"].as_f64()?)))
        .collect()
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
    let _lock = crate::train::run_dir::DirLock::take(out, "sweep")?;
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
                    "{} holds a different sweep (its plan.json differs in kind, base config, arms, depths or seeds); \
                     continue it with the same arguments, or choose another --out",
                    out.display()
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
                results[i] = Some(RunResult::from_summary(spec, &s, &dir, &opts.criteria)?);
                reused += 1;
            }
            None => pending.push_back(i),
        }
    }
    // Runs on a GPU go one after another: they would share its memory and its one stream.
    let on_gpu = specs.iter().any(|s| s.config.train.device_kind().is_ok_and(|k| k.is_gpu()));
    let jobs = if on_gpu { 1 } else { opts.jobs.max(1).min(pending.len().max(1)) };
    say(&format!(
        "{} runs planned: {} already ended (kept), {} to run, {} at a time{}",
        specs.len(),
        reused,
        pending.len(),
        jobs.min(pending.len()).max(1),
        if on_gpu { " (on the GPU)" } else { "" }
    ));

    // Simulate each distinct data set once before the runs share its cache.
    let mut warmed = Vec::new();
    for &i in &pending {
        let d = &specs[i].config.data;
        if !warmed.contains(d) {
            crate::data::load_or_simulate(d, &mut |m| say(m))?;
            warmed.push(d.clone());
        }
    }

    let limit = opts.max_runs.unwrap_or(usize::MAX).min(pending.len());
    let pending: VecDeque<usize> = pending.into_iter().take(limit).collect();
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
            match r.and_then(|s| RunResult::from_summary(spec, &s, &run_dir(out, spec), &opts.criteria)) {
                Ok(res) => {
                    ran += 1;
                    let done = results.iter().filter(|r| r.is_some()).count() + 1;
                    let verdict = match (plan.kind, res.divergence, &res.failure, &res.reason) {
                        (SweepKind::StabilityMap, Some(d), _, _) => format!("DIVERGED ({})", d.name()),
                        (SweepKind::StabilityMap, None, _, _) => "stable".to_string(),
                        (_, _, Some(f), Some(why)) => format!("FAILED ({}: {why})", f.name()),
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
    let outcome = SweepOutcome { results: results.into_iter().flatten().collect(), planned: total, ran, reused };
    report::write(plan, opts, &outcome)?;
    Ok(outcome)
}
